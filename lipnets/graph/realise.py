"""Realised parametrizations: the weights parametrized modules compute, once per call.

# Note [Realised parametrizations]

A layer parametrized with ``torch.nn.utils.parametrize`` (torch's ``orthogonal`` and
``spectral_norm``, deel-torchlip's ``SpectralLinear``, orthogonium's ``OrthoLinear`` and
``AdaptiveOrthoConv2d``, geotorch's layers) computes its weight from raw parameters
whenever the weight is read, and parametrize gives its class a name made at run time
(``ParametrizedSpectralLinear``). lipnets bounds such a layer from the weights it
realises, whatever its class is called, as the torch.nn class it is:

* a module that is **traced into** (the trust policy does not trust it with a rule, as
  ``SpectralLinear``, which defines ``vanilla_export``, or orthogonium's ``OrthoLinear``)
  reads its weight in ``forward``: each read is a ``call_module`` node of its
  ``ParametrizationList``, a leaf the tracer never traces into (the parametrization's code,
  loops and state included, is run, not recorded), so torch.nn's ``forward`` becomes
  ``F.linear(x, W, b)`` with the realised ``W``;
* a **leaf** trusted with a torch.nn class's rule (orthogonium's ``FastBlockConv2d`` is an
  ``nn.Conv2d`` that defines no method) is bounded and propagated by that rule, applied to
  a *stand-in*: a shallow copy of the module, of its class without parametrize's, whose
  parametrized tensors are their realised values (its other parameters, buffers and
  attributes are the module's own objects). Leaves whose rule is not torch.nn's (lipnets'
  layers, a user's ``lipschitz_bound`` method) read their parametrizations themselves.

`realise` computes these values for one call, from the model's current state and in its
current mode, in the order the graph reads them (the order of ``forward``), and then puts
the parametrizations' state back (Note [State restored] in `lipnets._state`), so the model
is left unchanged. Autograd is kept when it is on (Note [Differentiable bounds] in
`lipnets.propagation.checks`). It then computes them a second time from the same state:
values that differ (a parametrization that draws random numbers, or keeps state lipnets
cannot restore) are refused, and so is a module read twice in one call whose values differ
between the reads (a parametrization that advances its state on every read: the graph
holds one value per module). The eager check (Note [Graph faithfulness]) runs the model
itself under the same save and restore and compares the graph, with these values, to it.

**What the bound covers.** The function the model computes on its next call from its
current state and mode: the weights realised now, which are also what
`lipnets.to_vanilla` exports now. Where a parametrization changes the weights on every
call (orthogonium's ``BatchedPowerIteration`` runs in every ``forward``, in eval mode too;
torch's and deel-torchlip's power iterations and deel-torchlip's Björck step in training
mode), a later call computes other weights, which this bound does not cover: compute it
again, or bound and deploy the exported model, whose weights are fixed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lipnets._state import STATE_LOCK, ModuleState
from lipnets.errors import InvalidModelError, LipnetsError, UntraceableModelError
from lipnets.graph.policy import check_finite, module_kind, trusted_owner

__all__ = ["Realised", "realise", "state_modules"]


class Realised(nn.Module):
    """The value of one parametrized tensor for one call: a graph leaf with no input."""

    def __init__(self, value: Tensor, where: str) -> None:
        super().__init__()
        self.value = value
        self.where = where

    def forward(self) -> Tensor:
        return self.value

    def extra_repr(self) -> str:
        return f"{self.where}, shape={tuple(self.value.shape)}"


def _plan(graph: Any) -> list[tuple[str, nn.Module, bool]]:
    """(target, module, is_leaf) of the nodes whose values `realise` computes, in order."""
    found = []
    for node in graph.gm.graph.nodes:
        if node.op != "call_module":
            continue
        target = str(node.target)
        module = graph.gm.get_submodule(target)
        if isinstance(module, parametrize.ParametrizationList):
            found.append((target, module, False))
        elif parametrize.is_parametrized(module):
            owner = trusted_owner(module)
            if owner is None or owner.__module__.startswith("torch."):
                found.append((target, module, True))
    return found


def state_modules(graph: Any) -> list[nn.Module]:
    """The modules whose state realising ``graph``'s parametrized tensors may change."""
    found: list[nn.Module] = []
    for _, module, leaf in _plan(graph):
        found.extend((module.parametrizations if leaf else module).modules())
    return found


def realise(graph: Any) -> dict[str, nn.Module]:
    """Graph target -> the module that stands for it in one call: a `Realised` value for a
    parametrization list, a stand-in for a parametrized leaf (Note [Realised
    parametrizations]). Empty when the graph reads no parametrized tensor."""
    plan = _plan(graph)
    if not plan:
        return {}
    with STATE_LOCK:
        state = ModuleState(state_modules(graph))
        try:
            first = _values(graph, plan, state)
            state.restore()
            second = _values(graph, plan, state)
        finally:
            state.restore()
    overrides: dict[str, nn.Module] = {}
    for target, module, leaf in plan:
        where = _where(graph, target, module, leaf)
        for name, value in first[target].items():
            if not _same(value, second[target][name]):
                raise UntraceableModelError(
                    f"{where}: its parametrization computes {name or 'its tensor'} differently "
                    "when run twice from the same state (it draws random numbers or keeps state "
                    "that lipnets cannot restore), so no bound holds for its next call (Note "
                    "[Realised parametrizations]); bound lipnets.to_vanilla(model), whose weights "
                    "are fixed"
                )
        if leaf:
            overrides[target] = _stand_in(module, first[target], where)
        else:
            overrides[target] = Realised(first[target][""], where)
    return overrides


def _values(
    graph: Any, plan: list[tuple[str, nn.Module, bool]], state: ModuleState
) -> dict[str, dict[str, Tensor]]:
    storages = state.storages()
    out: dict[str, dict[str, Tensor]] = {}
    for target, module, leaf in plan:
        names = list(module.parametrizations) if leaf else [""]
        values = {}
        for name in names:
            plist = module.parametrizations[name] if leaf else module
            try:
                value = plist()
            except LipnetsError:
                raise
            except Exception as exc:
                raise InvalidModelError(
                    f"{_where(graph, target, module, leaf)}: computing its parametrized "
                    f"{name or 'tensor'} failed: {type(exc).__name__}: {exc}"
                ) from exc
            if not isinstance(value, Tensor):
                raise InvalidModelError(
                    f"{_where(graph, target, module, leaf)}: its parametrization returns "
                    f"{type(value).__name__}, not a tensor"
                )
            check_finite(value, f"{_where(graph, target, module, leaf)}: {name or 'its tensor'}")
            if value.untyped_storage().data_ptr() in storages:
                value = value.clone()  # the state it aliases is restored next
            values[name] = value
        if target in out:
            if any(not _same(v, out[target][k]) for k, v in values.items()):
                raise UntraceableModelError(
                    f"{_where(graph, target, module, leaf)} is read more than once in one call "
                    "and its parametrization computes another value at each read (it advances "
                    "its state), so one graph cannot hold what the model computes (Note "
                    "[Realised parametrizations]); use the module once per forward, or bound "
                    "lipnets.to_vanilla(model)"
                )
            continue
        out[target] = values
    return out


def _same(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    with torch.no_grad():
        return bool(torch.equal(a, b)) or bool(
            torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)
        )


def _where(graph: Any, target: str, module: nn.Module, leaf: bool) -> str:
    if leaf:
        return f"{_user(target)} ({module_kind(module)})"
    owner, _, name = target.rpartition(".parametrizations.")
    kind = module_kind(graph.root.get_submodule(owner)) if owner else "?"
    return f"{_user(owner)} ({kind}), its parametrized {name!r}"


def _user(qualname: str) -> str:
    return "the model" if qualname in ("", "0") else qualname.removeprefix("0.")


def _stand_in(module: nn.Module, values: dict[str, Tensor], where: str) -> nn.Module:
    """A shallow copy of ``module`` of its class without parametrize's, holding ``values``
    in place of its parametrized tensors."""
    cls = type(module)
    base = cls.__bases__[0] if cls.__name__.startswith("Parametrized") else cls
    for name in values:
        if hasattr(base, name):  # a class attribute (a property) would hide the value
            raise UntraceableModelError(
                f"{where}: its class {base.__name__} defines {name!r}, which its "
                "parametrization replaces, so lipnets cannot give its rule the realised value; "
                "bound lipnets.to_vanilla(model)"
            )
    new = base.__new__(base)
    state = dict(vars(module))
    state["_parameters"] = dict(module._parameters)
    state["_buffers"] = dict(module._buffers)
    state["_modules"] = {k: v for k, v in module._modules.items() if k != "parametrizations"}
    state.update(values)
    new.__dict__.update(state)
    return new
