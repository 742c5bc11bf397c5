"""What a composition returns: the composed bound, its leaves, and the final linear layer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Composition", "LeafBound", "LeafValue"]


@dataclass(frozen=True)
class LeafBound:
    """The sound bound of one leaf module of a traced model."""

    name: str
    """Qualified module name, e.g. ``"features.3"``."""
    kind: str
    """The module's class name."""
    bound: torch.Tensor
    """Its sound bound (0-dim float64)."""


@dataclass
class Composition:
    """The composed constant and the leaves it was composed from."""

    bound: torch.Tensor
    leaves: list[LeafBound] = field(default_factory=list)
    head: nn.Module | None = None
    """The final linear layer, when the model's output is a trusted ``nn.Linear``'s
    output (`last_linear`)."""
    body: torch.Tensor | None = None
    """With ``head``: the sound bound of everything before it (the head's input)."""


LeafValue = Callable[[nn.Module, "torch.Size | None", str], "torch.Tensor | None"]
"""A leaf's constant from (module, its input shape or None, where): `own_bound` by default.

Only `lipnets.estimators.autolip` passes another one (power-iteration estimates
for affine leaves); every bound in lipnets uses the default.
"""
