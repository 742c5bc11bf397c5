"""Save and restore what reading a model may change: modes and buffers (no lipnets imports).

One helper for everyone who runs a model on its own behalf (bounds, propagation,
estimators, certification, reports): each submodule's ``training`` flag and
every buffer are put back on exit. Nothing here touches the global RNG; code
that needs random numbers draws them from a private ``torch.Generator``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["eval_mode", "restored_buffers"]


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
