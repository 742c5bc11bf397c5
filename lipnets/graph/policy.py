"""The one trust policy: which modules are leaves whose own rule is trusted.

# Note [Trust policy]

A rule (a ``lipschitz_bound`` method, a rule registered with
``register_bound`` or a propagation rule, a ``to_vanilla`` method) is written
for the function one class computes. A module is trusted through a rule only
when that function is the one it runs:

* the class that provides the rule, or a subclass that defines no methods of
  its own, is the module's class: no class between the module's class and the
  rule's owner in the method resolution order defines a method (dunder
  methods such as ``__init__`` aside, but ``__call__``, ``__getattr__``,
  ``__getattribute__`` and ``__setattr__`` count; a property that replaces a
  method counts; ``extra_repr``, ``reset_parameters``, ``to_vanilla``,
  ``lipschitz_bound`` and ``orthogonality_error``, which no forward of
  torch.nn or lipnets calls, do not), so neither ``forward`` nor a helper it calls
  (``_conv_forward``) is overridden;
* nothing is replaced on the instance (``module.forward = ...``,
  ``module.compile()``);
* no forward hook or forward pre-hook is attached to it.

A module that fails this is not a leaf: it is traced into (its ``forward`` is
recorded op by op) or, where that is impossible, refused. The registries pass
their "who provides a rule for this class" function to
`register_rule_provider`, so this package never imports them.

Model-wide checks (`check_model`) refuse what no rule can see: global hooks,
hooks on any module (their outputs replace the module's), ``__call__``
overrides (torch.fx traces ``forward``), methods replaced on instances, the
deprecated ``spectral_norm``/``weight_norm`` hooks, uninitialised lazy
modules, and parameters or buffers holding NaN or infinite values.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from lipnets.errors import NonFiniteError, UnboundedModuleError

__all__ = [
    "check_model",
    "defines_methods",
    "draws_random",
    "module_kind",
    "register_rule_provider",
    "rule_decorator",
    "rule_owner",
    "rules_version",
    "trusted",
    "trusted_owner",
    "unwrap",
]

RuleProvider = Callable[[type], "type | None"]
"""Maps a module class to the class in its MRO that provides a rule, or None."""

_PROVIDERS: dict[str, RuleProvider] = {}
_VERSION = [0]
_LOCK = threading.Lock()


def register_rule_provider(name: str, provider: RuleProvider) -> None:
    """Tell the front end how one registry finds the owner of a module's rule."""
    with _LOCK:
        _PROVIDERS[name] = provider
        _VERSION[0] += 1


def rule_decorator(
    caller: str, table: dict[type, Any], module_types: tuple[Any, ...]
) -> Callable[[Any], Any]:
    """The decorator of a rule registry (``register_bound``, ``register_propagation``):
    checks the arguments (naming ``caller``), then stores the decorated function in
    ``table`` for each type and bumps the rules version (cached traces are rebuilt)."""
    if not module_types:
        raise TypeError(f"{caller}() needs at least one nn.Module subclass")
    for t in module_types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"{caller}() takes nn.Module subclasses, got {t!r}")

    def decorator(fn: Any) -> Any:
        if not callable(fn):
            raise TypeError(f"{caller}() decorates a callable, got {fn!r}")
        with _LOCK:
            for t in module_types:
                table[t] = fn
            _VERSION[0] += 1
        return fn

    return decorator


def rules_version() -> int:
    """A number that changes whenever a rule or provider is registered (cache key)."""
    return _VERSION[0]


def method_owner(cls: type, name: str) -> type | None:
    """The class in ``cls``'s MRO whose own namespace defines ``name``."""
    for base in cls.__mro__:
        if name in vars(base):
            return base
    return None


def rule_owner(module: nn.Module, kind: str | None = None) -> type | None:
    """The nearest class in the MRO that provides a rule (of ``kind``, or of any kind)."""
    cls = type(module)
    owners = []
    for name, provider in list(_PROVIDERS.items()):
        if kind is not None and name != kind:
            continue
        owner = provider(cls)
        if owner is not None:
            owners.append(owner)
    if not owners:
        return None
    return min(owners, key=cls.__mro__.index)


_METHOD_DUNDERS = ("__call__", "__getattr__", "__getattribute__", "__setattr__")
_INERT_METHODS = frozenset(
    {"extra_repr", "reset_parameters", "to_vanilla", "lipschitz_bound", "orthogonality_error"}
)
"""Methods no forward of torch.nn or lipnets calls: a subclass may define them and stay trusted."""


def _is_method(name: str, value: Any) -> bool:
    if name in _INERT_METHODS:
        return False
    dunder = name.startswith("__") and name.endswith("__")
    if isinstance(value, (staticmethod, classmethod)):
        return not dunder
    return (
        callable(value) and not isinstance(value, type) and (not dunder or name in _METHOD_DUNDERS)
    )


def defines_methods(cls: type, owner: type) -> str | None:
    """The first method a class between ``cls`` (included) and ``owner`` (excluded) defines."""
    mro = cls.__mro__
    stop = mro.index(owner)
    for i, base in enumerate(mro[:stop]):
        later = mro[i + 1 :]
        for name, value in vars(base).items():
            if _is_method(name, value):
                return f"{base.__name__}.{name}"
            if isinstance(value, property) and any(callable(vars(b).get(name)) for b in later):
                return f"{base.__name__}.{name}"
    return None


def trusted(module: nn.Module, owner: type) -> bool:
    """Whether ``module`` computes the function ``owner``'s rule is written for."""
    return (
        isinstance(module, owner)
        and defines_methods(type(module), owner) is None
        and not replaced_on_instance(module)
        and not hooks_of(module)
    )


def trusted_owner(module: nn.Module, kind: str | None = None) -> type | None:
    """The owner of ``module``'s rule (of ``kind``) when the module is trusted, else None."""
    owner = rule_owner(module, kind)
    if owner is None or not trusted(module, owner):
        return None
    return owner


def replaced_on_instance(module: nn.Module) -> list[str]:
    """Names of class methods that the instance shadows (``module.forward = ...``)."""
    found = [
        k
        for k, v in vars(module).items()
        if callable(v)
        and not isinstance(v, (nn.Module, torch.Tensor))
        and callable(getattr(type(module), k, None))
    ]
    if getattr(module, "_compiled_call_impl", None) is not None:
        found.append("_compiled_call_impl (module.compile())")
    return found


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs")


def hooks_of(module: nn.Module) -> list[Any]:
    return [h for attr in _HOOK_DICTS for h in getattr(module, attr, {}).values()]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``, ``DataParallel`` and DDP wrappers."""
    while True:
        if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def draws_random(module: nn.Module) -> bool:
    """Whether torch's module draws random numbers in its current mode: the dropout layers
    and ``RReLU`` in training mode. On an input-dependent path their bound rules hold for
    every draw; a value computed from constants alone (a weight passed through dropout)
    would freeze one draw, so lipnets refuses to read it."""
    random = (nn.modules.dropout._DropoutNd, nn.RReLU)
    return module.training and isinstance(module, random)


def module_kind(module: nn.Module) -> str:
    """The class name a user wrote: ``BjorckLinear``, not ``ParametrizedBjorckLinear``."""
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__name__.startswith("Parametrized"):
        cls = cls.__bases__[0]
    return cls.__name__


def check_model(model: nn.Module) -> None:
    """Refuse what makes a model compute something no trace or rule sees (Note [Trust policy])."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        raise UnboundedModuleError(
            "global forward hooks are registered (register_module_forward_hook); they can "
            "change every module's output, so no bound is sound while they are active"
        )
    for name, module in model.named_modules(remove_duplicate=True):
        where = f"{name or 'the model'} ({module_kind(module)})"
        lazy = isinstance(module, nn.modules.lazy.LazyModuleMixin)
        if lazy and module.has_uninitialized_params():
            raise ValueError(f"{where} is uninitialised (lazy): run one forward pass first")
        # GraphModule.__call__ only wraps forward to improve error messages.
        graph_module = isinstance(module, fx.GraphModule)
        if type(module).__call__ is not nn.Module.__call__ and not graph_module:
            raise UnboundedModuleError(
                f"{where} overrides __call__, which torch.fx does not follow (it traces "
                "forward); move that logic into forward"
            )
        patched = replaced_on_instance(module)
        if patched:
            raise UnboundedModuleError(
                f"{where} has {patched[0]} replaced on the instance, so it computes something "
                "else than its class, which is what lipnets bounds and traces; bound a module "
                "whose methods are its class's"
            )
        hooks = hooks_of(module)
        # The deprecated spectral_norm/weight_norm hooks rewrite `weight` before
        # each forward, so the attribute a rule reads can be stale.
        for hook in hooks:
            if type(hook).__name__ in ("SpectralNorm", "WeightNorm"):
                raise UnboundedModuleError(
                    f"{where} uses the deprecated torch.nn.utils.{type(hook).__name__.lower()} "
                    "hook, whose `weight` attribute can be stale; use "
                    "torch.nn.utils.parametrizations instead"
                )
        if hooks:
            raise UnboundedModuleError(
                f"{where} has forward hooks, which can change its output; remove them (or "
                "compute the bound on a copy without them)"
            )
        for key, tensor in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            check_finite(tensor, f"{name + '.' if name else ''}{key}")


def check_finite(tensor: torch.Tensor | None, name: str) -> None:
    """Raise `NonFiniteError` naming ``name`` if a floating tensor holds NaN or infinity."""
    if tensor is None or not (tensor.is_floating_point() or tensor.is_complex()):
        return
    t = tensor.detach()
    # A finite sum has no NaN or infinite term (NaN and ±inf propagate); a sum that
    # overflows is checked entry by entry. The sum is ~20x cheaper than isfinite().all().
    if t.numel() and not math.isfinite(abs(complex(t.sum()))) and not bool(torch.isfinite(t).all()):
        nan = bool(torch.isnan(t).any())
        raise NonFiniteError(
            f"{name} holds {'NaN' if nan else 'infinite'} values, and NaN or infinite weights "
            "have no finite Lipschitz bound (did training diverge?)"
        )
