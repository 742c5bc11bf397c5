"""What the results of `lipnets.verify.verify` and `lipnets.verify.milp_verify` share."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["STATUSES", "Statuses"]

STATUSES = ("verified", "falsified", "unknown")


class Statuses:
    """The per-sample ``status`` ("verified", "falsified" or "unknown") as masks."""

    status: tuple[str, ...]

    @property
    def verified(self) -> Tensor:
        """(N,) bool: the samples proven robust."""
        return torch.tensor([s == "verified" for s in self.status], dtype=torch.bool)

    @property
    def falsified(self) -> Tensor:
        """(N,) bool: the samples with a confirmed counterexample."""
        return torch.tensor([s == "falsified" for s in self.status], dtype=torch.bool)
