"""Save and restore what reading a model may change: modes and buffers (no lipnets imports).

One helper for everyone who runs a model on its own behalf (bounds, propagation,
estimators, certification, reports): each submodule's ``training`` flag and
every buffer are put back on exit. Nothing here touches the global RNG; code
that needs random numbers draws them from a private ``torch.Generator``, and
nothing here switches on ``parametrize.cached()``, whose cache is process-wide
(Note [Realised weights]).

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
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "eval_mode",
    "freeze_parametrizations",
    "frozen_copy",
    "realised_weights",
    "restored_buffers",
]


@contextlib.contextmanager
def eval_mode(op: object) -> Iterator[None]:
    """Put a module (and its submodules) in eval mode; restore each flag on exit.

    Each submodule gets its own flag back, so a model that was partly in eval mode
    (a frozen BatchNorm inside a training model) is restored exactly. Anything that
    is not an ``nn.Module`` passes through untouched.
    """
    if not isinstance(op, nn.Module):
        yield
        return
    modes = [(module, module.training) for module in op.modules()]
    op.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def restored_buffers(model: nn.Module) -> Iterator[None]:
    """Copy every buffer back on exit (a forward in training mode may update them).

    Reading a parametrized weight can advance state too (``spectral_norm``'s
    power iteration in training mode), so bounds and checks run inside this.
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, copy in saved:
                if buffer.shape == copy.shape:
                    buffer.copy_(copy)


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
