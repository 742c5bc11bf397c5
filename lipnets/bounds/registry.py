"""The registry of sound Lipschitz bound rules for module types."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from lipnets.errors import UnboundedModuleError

__all__ = ["BoundRule", "as_bound", "find_rule", "register_bound"]

BoundRule = Callable[[nn.Module, "torch.Size | None"], Any]
"""A rule maps ``(module, input_shape)`` to a sound bound (float or 0-dim tensor).

``input_shape`` is the shape of the module's input batch when the caller knows
it, and ``None`` when the bound must hold for every input size.
"""

_RULES: dict[type[nn.Module], BoundRule] = {}

_R = TypeVar("_R", bound=BoundRule)


def register_bound(*module_types: type[nn.Module]) -> Callable[[_R], _R]:
    """Register a sound Lipschitz bound rule for one or more module types.

    The decorated function receives ``(module, input_shape)`` and returns a
    sound upper bound on the module's l2 -> l2 Lipschitz constant (a float or
    a 0-dim tensor), computed from the module's current parameters.
    ``input_shape`` is a ``torch.Size`` when the bound may depend on the input
    size, and ``None`` when it must hold for every size. A rule registered for
    a type also serves subclasses that define no methods of their own (see
    [`find_rule`][lipnets.bounds.registry.find_rule]); a subclass that does
    may compute something else, so lipnets traces into it instead.

    Registering a type again replaces its rule.

    Args:
        *module_types: the ``nn.Module`` subclasses the rule bounds.

    Returns:
        A decorator that registers the function and returns it unchanged.

    Raises:
        TypeError: if no type is given or one is not an ``nn.Module`` subclass.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import lipnets
        >>> class Halve(nn.Module):
        ...     def forward(self, x):
        ...         return torch.where(x > 0, x, 0.5 * x)
        >>> @lipnets.register_bound(Halve)
        ... def _halve(module, input_shape):
        ...     return 1.0  # slopes 1 and 1/2
        >>> float(lipnets.lipschitz_bound(nn.Sequential(Halve(), nn.ReLU(), Halve())))
        1.0
    """
    if not module_types:
        raise TypeError("register_bound() needs at least one nn.Module subclass")
    for t in module_types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"register_bound() takes nn.Module subclasses, got {t!r}")

    def decorator(fn: _R) -> _R:
        if not callable(fn):
            raise TypeError(f"register_bound() decorates a callable, got {fn!r}")
        for t in module_types:
            _RULES[t] = fn
        return fn

    return decorator


def find_rule(module: nn.Module) -> BoundRule | None:
    """The rule that bounds ``module``, or ``None``.

    The nearest registered class in the MRO is used, but a subclass inherits
    its rule only when it cannot compute something else: it defines no
    methods of its own (dunder methods such as ``__init__`` aside; properties,
    as torch's parametrizations add, are fine), overrides neither ``forward``
    nor ``__call__``, and the instance has no patched ``forward``. Otherwise
    lipnets traces into it.
    """
    cls = type(module)
    if "forward" in vars(module) or cls.__call__ is not nn.Module.__call__:
        return None
    for i, base in enumerate(cls.__mro__):
        rule = _RULES.get(base)
        if rule is not None:
            return rule
        later = cls.__mro__[i + 1 :]
        for name, value in vars(base).items():
            if _is_method(name, value):
                return None
            # A property that replaces a method of a base class is a method too.
            if isinstance(value, property) and any(callable(vars(b).get(name)) for b in later):
                return None
    return None


_METHOD_DUNDERS = ("__call__", "__getattr__", "__getattribute__", "__setattr__")


def _is_method(name: str, value: Any) -> bool:
    dunder = name.startswith("__") and name.endswith("__")
    return (
        callable(value) and not isinstance(value, type) and (not dunder or name in _METHOD_DUNDERS)
    )


def as_bound(value: Any, where: str) -> torch.Tensor:
    """Check a rule's result and return it as a 0-dim float64 CPU tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise UnboundedModuleError(
                f"{where}: a bound must be a scalar, got a tensor of shape {tuple(value.shape)}"
            )
        value = float(value.detach().reshape(()).to(torch.float64).cpu())
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise UnboundedModuleError(
            f"{where}: a bound must be a float or a 0-dim tensor, got {type(value).__name__}"
        )
    value = float(value)
    if math.isnan(value) or value < 0:
        raise UnboundedModuleError(f"{where}: a bound must be >= 0, got {value}")
    if math.isinf(value):
        raise UnboundedModuleError(f"{where}: the bound is infinite")
    return torch.tensor(value, dtype=torch.float64)


def _pair(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    """Expand an int or a sequence to an ``n``-tuple (torch's _ntuple)."""
    if isinstance(value, int):
        return (value,) * n
    out = tuple(int(v) for v in value)
    if len(out) == 1:
        return out * n
    return out
