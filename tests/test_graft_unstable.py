"""lipnets.graft.unstable_relus: per input, the ReLU entries whose CROWN bounds straddle 0."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lipnets.graft import graft, unstable_relus
from lipnets.propagation import crown_bounds

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)
    ).double()


def _straddles(head: nn.Module, x: torch.Tensor, eps: float, norm: float) -> torch.Tensor:
    b = crown_bounds(head, x, eps, norm=norm)
    return ((b.lower < 0) & (b.upper > 0)).sum(1)


@pytest.mark.parametrize("norm", [2, math.inf])
def test_counts_are_the_straddling_crown_bounds(norm: float) -> None:
    model = _mlp()
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(1), dtype=DT)
    eps = 0.4 if norm == 2 else 0.15
    want = _straddles(model[:1], x, eps, norm) + _straddles(model[:3], x, eps, norm)
    assert 0 < int(want.sum()) < 9 * 22
    assert torch.equal(unstable_relus(model, x, eps, norm=norm), want)
    assert torch.equal(unstable_relus(model, x, eps, norm=norm, batch_size=4), want)
    # grafting the second layer whole: only the first layer's (unchanged bounds) remain
    grafted = graft(model, {"3": torch.ones(10, dtype=torch.bool)})
    first = _straddles(model[:1], x, eps, norm)
    assert torch.equal(unstable_relus(grafted, x, eps, norm=norm), first)


def test_errors_are_crown_bounds_errors() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match="norm"):
        unstable_relus(model, torch.zeros(2, 5, dtype=DT), 0.1, norm=1)
    with pytest.raises(TypeError, match="dtype"):
        unstable_relus(model, torch.zeros(2, 5), 0.1, norm=2)
