"""Module-mode helpers shared across subpackages (no lipnets imports: any layer may use it)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode"]


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
