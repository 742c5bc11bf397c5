"""``F.normalize``: the global constant 1/eps, sound intervals and CROWN lines, and a local
constant 1 / max(r, eps) from the distance of the input's box to 0 (Note [Normalisation],
Note [Normalisation intervals])."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipnets import lipschitz_bound
from lipnets.errors import UnboundedModuleError
from lipnets.propagation import crown_bounds, interval_bounds, local_lipschitz
from tests.helpers import Fn, assert_within, lipschitz_ascent

from .test_propagation_models import DT, ball_points

CASES = [(1, 1e-12), (1, 0.3), ((1, 2), 1e-12), (2, 2.0)]


def _model(dim, eps: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv1d(2, 3, 3), Fn(lambda h: F.normalize(h, dim=dim, eps=eps)))
    return body.append(nn.Flatten()).append(nn.Linear(9, 2)).to(DT).eval()


def test_global_constant_is_one_over_eps() -> None:
    """x / max(||x||, eps) is x / eps near 0: the constant 1/eps is exact, and rounded up."""
    for eps in (0.5, 0.3, 2.0):
        layer = Fn(lambda h, e=eps: F.normalize(h, dim=1, eps=e))
        bound = float(lipschitz_bound(layer, input_shape=(1, 5)))
        assert 1.0 / eps <= bound <= (1.0 / eps) * (1 + 4e-16)
        assert lipschitz_ascent(layer, (1, 5), starts=4, steps=30) <= bound
    model = _model(1, 0.3, 0)
    ascent = lipschitz_ascent(model, (1, 2, 5), starts=4, steps=40)
    assert ascent <= float(lipschitz_bound(model, input_shape=(1, 2, 5)))


def test_global_refusals_say_why() -> None:
    with pytest.raises(UnboundedModuleError, match="default eps"):
        lipschitz_bound(Fn(lambda h: F.normalize(h, dim=1)), input_shape=(1, 5))
    with pytest.raises(UnboundedModuleError, match="p=1"):
        lipschitz_bound(Fn(lambda h: F.normalize(h, p=1, dim=1, eps=0.5)), input_shape=(1, 5))
    with pytest.raises(UnboundedModuleError, match="dim 0"):
        lipschitz_bound(Fn(lambda h: F.normalize(h, dim=0, eps=0.5)), input_shape=(1, 5))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_bounds_contain_sampled_outputs(case: int) -> None:
    """2000 points of each l2 and l-infinity ball (boundary included), inputs near and far
    from 0: inside the IBP and CROWN bounds."""
    dim, eps = CASES[case]
    for seed in range(2):
        model = _model(dim, eps, seed)
        x = torch.randn(3, 2, 5, dtype=DT) * (0.2 if seed == 0 else 2.0)
        for norm in (2, math.inf):
            for radius in (0.05, 0.5):
                points = ball_points(x, radius, norm, 2000)
                with torch.no_grad():
                    y = model(points.reshape(-1, 2, 5)).reshape(2000, 3, 2)
                for method in (interval_bounds, crown_bounds):
                    bounds = method(model, x, radius, norm=norm)
                    assert_within(y, bounds, f"{method.__name__} {case} {seed} {norm} {radius}")


def test_local_constant_holds_and_shrinks_away_from_zero() -> None:
    """Pairs of the ball never beat the local constant; far from 0 it is far below 1/eps."""
    model = _model(1, 1e-12, 4)
    x = torch.randn(3, 2, 5, dtype=DT) * 3.0
    for radius in (0.01, 0.2):
        local = local_lipschitz(model, x, radius)
        assert bool((local < 1e6).all()), local  # the global constant is 1e12 times |W|
        a, b = ball_points(x, radius, 2, 400), ball_points(x, radius, 2, 400).flip(0)
        with torch.no_grad():
            fa, fb = model(a.reshape(-1, 2, 5)), model(b.reshape(-1, 2, 5))
        gap = (fa - fb).reshape(400, 3, -1).norm(dim=-1)
        ratio = gap / (a - b).reshape(400, 3, -1).norm(dim=-1).clamp_min(1e-12)
        assert bool((ratio <= local).all()), (ratio.max(0).values, local)
        assert float(_ball_ascent(model, x, radius).max(0).values.sub(local).max()) <= 0


def _ball_ascent(model: nn.Module, x: torch.Tensor, radius: float) -> torch.Tensor:
    """The largest ratio ||f(a) - f(b)|| / ||a - b|| found by projected gradient ascent over
    pairs of the l2 ball around each input: a lower bound of the local constant."""
    g = torch.Generator().manual_seed(0)
    starts = 8
    centre = x.unsqueeze(0).expand(starts, *x.shape)

    def project(p: torch.Tensor) -> torch.Tensor:
        d = p - centre
        norms = d.flatten(2).norm(dim=-1).reshape(*d.shape[:2], 1, 1).clamp_min(1e-30)
        return centre + d * (radius / norms).clamp_max(1.0)

    a = project(centre + radius * torch.randn(centre.shape, generator=g, dtype=DT))
    b = project(a + 1e-3 * radius * torch.randn(centre.shape, generator=g, dtype=DT))
    a.requires_grad_(), b.requires_grad_()
    best = torch.zeros(starts, x.shape[0], dtype=DT)
    opt = torch.optim.Adam([a, b], lr=0.05 * radius)
    for _ in range(60):
        fa, fb = model(a.reshape(-1, *x.shape[1:])), model(b.reshape(-1, *x.shape[1:]))
        gap = (fa - fb).reshape(starts, x.shape[0], -1).norm(dim=-1)
        ratio = gap / (a - b).flatten(2).norm(dim=-1).clamp_min(1e-12)
        best = torch.maximum(best, ratio.detach())
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
        with torch.no_grad():
            a.copy_(project(a)), b.copy_(project(b))
    return best
