"""The registry of sound Lipschitz bound rules for module types."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from lipnets.errors import UnboundedModuleError
from lipnets.graph import method_owner, register_rule_provider, rule_decorator, trusted_owner

__all__ = ["BoundRule", "as_bound", "bound_rule", "find_rule", "pair", "register_bound"]

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

    Examples:
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
    return rule_decorator("register_bound", _RULES, module_types)


def _owner(cls: type) -> type | None:
    """The class in ``cls``'s MRO that provides its bound: a ``lipschitz_bound`` method or a
    registered rule, whichever is nearer (the trust policy then decides, Note [Trust policy])."""
    owners = []
    if callable(getattr(cls, "lipschitz_bound", None)):
        owner = method_owner(cls, "lipschitz_bound")
        if owner is not None:
            owners.append(owner)
    registered = next((base for base in cls.__mro__ if base in _RULES), None)
    if registered is not None:
        owners.append(registered)
    return min(owners, key=cls.__mro__.index) if owners else None


register_rule_provider("bound", _owner)


def bound_rule(module: nn.Module) -> BoundRule | None:
    """The rule that bounds ``module``: its class's ``lipschitz_bound`` method or registered
    rule, when the trust policy trusts the module with it (Note [Trust policy] in
    `lipnets.graph.policy`); else None, and lipnets traces into the module."""
    owner = trusted_owner(module, "bound")
    if owner is None:
        return None
    if owner in _RULES:
        return _RULES[owner]
    return lambda m, shape: m.lipschitz_bound(input_shape=shape)


def find_rule(module: nn.Module) -> BoundRule | None:
    """The registered rule that bounds ``module``, or ``None``.

    The nearest registered class in the MRO provides it, and the module must be
    trusted with it (Note [Trust policy] in `lipnets.graph.policy`): a subclass
    that defines methods of its own (``forward``, or a helper ``forward`` calls),
    a method replaced on the instance or a hook makes lipnets trace into the
    module instead.
    """
    owner = trusted_owner(module, "bound")
    return _RULES.get(owner) if owner is not None else None


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


def pair(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    """Expand an int or a sequence to an ``n``-tuple (torch's _ntuple)."""
    if isinstance(value, int):
        return (value,) * n
    out = tuple(int(v) for v in value)
    if len(out) == 1:
        return out * n
    return out
