"""Save and restore what reading a model may change: modes and buffers (no lipnets imports).

One helper for everyone who runs a model on its own behalf (bounds, propagation,
estimators, certification, reports): each submodule's ``training`` flag and
every buffer are put back on exit, and so is the state of its parametrizations
(Note [State restored]). Nothing here touches the global RNG; code
that needs random numbers draws them from a private ``torch.Generator``, and
nothing here switches on ``parametrize.cached()``, whose cache is process-wide
(Note [Realised weights]).

# Note [State restored]

A forward pass can change a model: BatchNorm updates its running statistics in
training mode, torch's ``spectral_norm`` advances its power-iteration vectors,
deel-torchlip's Björck parametrization stores the weight it computed in a
buffer it reassigns, and orthogonium's ``BatchedPowerIteration`` writes its
vectors ``u`` and ``v`` (parameters, themselves parametrized) on *every* call,
through ``parametrize``'s ``right_inverse`` and ``Tensor.set_``. lipnets runs a
model and its parametrizations on its own behalf (faithfulness checks, realised
weights, certification) and leaves it as it found it: `restored_buffers` saves
every buffer and, inside every parametrization that is not lipnets' own (those
are functions of their raw parameters), every parameter, buffer and attribute
of every module, and puts each back on exit: the same objects (a reassigned
buffer or attribute gets its old object back), with the same storage (a
``set_`` is undone) and the same values (copied back only where they differ, so
an unchanged tensor is not written). `ModuleState` is that snapshot.
`STATE_LOCK` is held from the snapshot to the restore (and by `eval_mode`, whose
flags are state too), so two lipnets calls on one model in two threads cannot
interleave a change and a restore (lipnets' own reads of models are serialised);
a forward pass that the user runs in another thread meanwhile is not, and may see
the intermediate state. State kept elsewhere (a Python list appended to, a
global) is not restored.

# Note [Realised weights]

An estimator evaluates a model hundreds of times; a Björck or Cayley weight
recomputed on each call dominates the cost. ``torch.nn.utils.parametrize.cached()``
would compute it once, but its switch and its cache are global: while it is on,
every thread's forward passes read cached weights, so a model training in
another thread would see weights that no longer follow its raw parameters (and
its gradients would not reach them). `realised_weights` computes the weights
once on a private copy instead: a deep copy in eval mode whose parametrized
tensors are replaced by the values they realise. The copy computes the same
function (the same arithmetic, once); nothing the caller or another thread
holds is touched. A model that cannot be deep-copied is evaluated as it is,
recomputing its weights on each call.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "STATE_LOCK",
    "ModuleState",
    "eval_mode",
    "freeze_parametrizations",
    "frozen_copy",
    "parametrization_modules",
    "realised_weights",
    "restored_buffers",
]

STATE_LOCK = threading.RLock()
"""Held from a snapshot of a model's state to its restore (Note [State restored])."""


@contextlib.contextmanager
def eval_mode(op: object) -> Iterator[None]:
    """Put a module (and its submodules) in eval mode; restore each flag on exit.

    Each submodule gets its own flag back, so a model that was partly in eval mode
    (a frozen BatchNorm inside a training model) is restored exactly. Anything that
    is not an ``nn.Module`` passes through untouched. `STATE_LOCK` is held meanwhile: the
    modes are state another lipnets call must not see changed (Note [State restored]).
    """
    if not isinstance(op, nn.Module):
        yield
        return
    with STATE_LOCK:
        modes = [(module, module.training) for module in op.modules()]
        op.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training


class _TensorState:
    """One tensor's object, storage, geometry and (a copy of) its values."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.storage = tensor.untyped_storage()
        self.geometry = (tensor.storage_offset(), tensor.size(), tensor.stride())
        self.values = tensor.detach().clone()

    def restore(self) -> None:
        t = self.tensor
        moved = t.untyped_storage().data_ptr() != self.storage.data_ptr()
        if moved or (t.storage_offset(), t.size(), t.stride()) != self.geometry:
            t.set_(self.storage, *self.geometry)  # undo a set_ (parametrize's right_inverse)
        if t.shape == self.values.shape and not torch.equal(t, self.values):
            t.copy_(self.values)


class ModuleState:
    """What a forward pass may change in ``modules``: each module's attributes (by object),
    its parameters, buffers and submodules (by name and object) and its tensors (storage and
    values); `restore` puts them all back (Note [State restored])."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules: list[tuple[nn.Module, type, dict[str, Any], list[dict[str, Any]]]] = []
        tensors: dict[int, _TensorState] = {}
        seen: set[int] = set()
        for module in modules:
            if id(module) in seen:
                continue
            seen.add(id(module))
            attrs = dict(vars(module))
            tables = [dict(getattr(module, k)) for k in _TABLES]
            self.modules.append((module, type(module), attrs, tables))
            values = [*tables[0].values(), *tables[1].values(), *attrs.values()]
            for value in values:
                if isinstance(value, torch.Tensor) and id(value) not in tensors:
                    tensors[id(value)] = _TensorState(value)
        self.tensors = list(tensors.values())

    def storages(self) -> set[int]:
        """The data pointers of the saved tensors' storages (to detect aliases of them)."""
        return {t.storage.data_ptr() for t in self.tensors}

    def restore(self) -> None:
        with torch.no_grad():
            for module, cls, attrs, tables in self.modules:
                if type(module) is not cls:
                    module.__class__ = cls
                now = vars(module)
                for key in [k for k in now if k not in attrs]:
                    del now[key]
                for key, value in attrs.items():
                    if now.get(key) is not value:
                        now[key] = value
                for key, saved in zip(_TABLES, tables, strict=True):
                    table = now[key]
                    if table.keys() != saved.keys() or any(table[k] is not saved[k] for k in saved):
                        table.clear()
                        table.update(saved)
            for tensor in self.tensors:
                tensor.restore()


_TABLES = ("_parameters", "_buffers", "_modules")


def parametrization_modules(model: nn.Module) -> list[nn.Module]:
    """Every module inside ``model``'s parametrizations that may hold state: all but those of
    lists made only of lipnets' own parametrizations, which are functions of their raw
    parameters (Note [State restored])."""
    found: list[nn.Module] = []
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for plist in module.parametrizations.values():
            if all(type(p).__module__.startswith("lipnets.") for p in plist):
                continue
            found.extend(plist.modules())
    return found


@contextlib.contextmanager
def restored_buffers(model: nn.Module) -> Iterator[None]:
    """Put every buffer back on exit, and the state of the model's parametrizations (a
    forward in training mode may update them; Note [State restored]).

    Reading a parametrized weight can advance state too (``spectral_norm``'s
    power iteration in training mode), so bounds and checks run inside this.
    """
    with STATE_LOCK:
        saved = [
            (module, name, b, b.detach().clone())
            for module in model.modules()
            for name, b in module._buffers.items()
            if b is not None
        ]
        state = ModuleState(parametrization_modules(model))
        try:
            yield
        finally:
            state.restore()
            with torch.no_grad():
                for module, name, buffer, copy_ in saved:
                    if module._buffers.get(name) is not buffer and name in module._buffers:
                        module._buffers[name] = buffer  # reassigned in forward
                    if buffer.shape == copy_.shape and not torch.equal(buffer, copy_):
                        buffer.copy_(copy_)


def freeze_parametrizations(module: nn.Module) -> None:
    """Replace each parametrized tensor of `module` by the value it realises.

    `copy.deepcopy` keeps the class that parametrize created for the original
    module, and `remove_parametrizations` deletes properties from that class,
    which would break the original. The copy gets a class of its own first.
    """
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    for name in list(module.parametrizations.keys()):
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` in eval mode, its parametrized tensors frozen at their values.

    The values are those the parametrizations realise in eval mode; no parameter
    of the copy requires a gradient. Raises whatever `copy.deepcopy` raises.
    """
    clone = copy.deepcopy(model)
    clone.eval()
    with torch.no_grad():
        for sub in list(clone.modules()):
            if parametrize.is_parametrized(sub):
                freeze_parametrizations(sub)
    clone.requires_grad_(False)
    return clone


@contextlib.contextmanager
def realised_weights(op: object) -> Iterator[object]:
    """Yield what to evaluate for `op`: a frozen copy when it holds parametrized weights.

    Anything without parametrizations (or not an ``nn.Module``) is yielded as it
    is; so is a module that cannot be deep-copied (Note [Realised weights]).
    Callers put `op` in eval mode first; the copy is in eval mode too.
    """
    if not isinstance(op, nn.Module) or not any(
        parametrize.is_parametrized(m) for m in op.modules()
    ):
        yield op
        return
    try:
        clone = frozen_copy(op)
    except Exception:  # deepcopy of arbitrary user state: evaluate the model itself
        clone = op
    yield clone
