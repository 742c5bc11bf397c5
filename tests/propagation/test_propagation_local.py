"""local_lipschitz: above every slope on the ball, below the global sound bound."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lipnets
from lipnets.estimators import jacobian_norm
from lipnets.propagation import local_lipschitz

from .test_propagation_models import DT, MIXES, ball_points

NORMS = [2, math.inf]
LOCAL_MIXES = [
    "linear_relu",
    "linear_maxmin",
    "linear_groupsort4",
    "residual",
    "cat",
    "conv",
    "avgpool",
    "batchnorm",
    "invertible_downsample",
    "orthogonal_linear",
    "bcop",
    "cayley_conv",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("mix", LOCAL_MIXES)
def test_local_bound_between_slopes_and_global_bound(mix: str) -> None:
    """Jacobian norms at points of the ball and difference quotients of pairs in the ball
    never exceed local_lipschitz, which never exceeds lipschitz_bound
    (Note [Local Lipschitz bound])."""
    for seed in range(6):
        model, x, eps = MIXES[mix](seed)
        norm = NORMS[seed % 2]
        local = local_lipschitz(model, x, eps, norm=norm)
        overall = lipnets.lipschitz_bound(model, input_shape=tuple(x.shape))
        assert local.shape == (x.shape[0],) and local.dtype == torch.float64
        assert bool((local <= overall).all())
        points = ball_points(x, eps, norm, 60)  # (60, N, ...)
        for i in range(x.shape[0]):
            slopes = jacobian_norm(model, torch.cat([x[i : i + 1], points[:, i]]))
            assert float(slopes.max()) <= float(local[i]) * (1 + 1e-9), (seed, i)
            a, b = points[:30, i], points[30:, i]
            with torch.no_grad():
                num = (model(a) - model(b)).flatten(1).norm(dim=1)
            ratio = num / (a - b).flatten(1).norm(dim=1)
            assert float(ratio.max()) <= float(local[i]) * (1 + 1e-9), (seed, i)


def test_local_bound_drops_inactive_units() -> None:
    """On a small ball the inactive ReLUs are dropped: strictly below the global bound."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    ).to(DT)
    x = torch.randn(5, 6, dtype=DT)
    overall = lipnets.lipschitz_bound(model, input_shape=tuple(x.shape))
    small = local_lipschitz(model, x, 1e-3)
    assert bool((small < 0.95 * overall).all())
    assert bool((local_lipschitz(model, x, 1e-3, norm="inf") < 0.95 * overall).all())
    huge = local_lipschitz(model, x, 1e3)
    torch.testing.assert_close(huge, overall.expand(5), rtol=1e-6, atol=0)
    slopes = jacobian_norm(model, x)
    assert bool((slopes <= small * (1 + 1e-9)).all())


def test_local_bound_of_a_linear_map_is_its_norm() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(7, 4).to(DT)
    x = torch.randn(3, 7, dtype=DT)
    sigma = torch.linalg.matrix_norm(layer.weight.detach(), 2)
    local = local_lipschitz(layer, x, 0.5)
    assert bool((local >= sigma).all()) and bool((local <= sigma * (1 + 1e-9)).all())


def test_per_sample_radius() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 2)).to(DT)
    x = torch.randn(3, 4, dtype=DT)
    eps = torch.tensor([1e-3, 0.5, 5.0], dtype=DT)
    together = local_lipschitz(model, x, eps)
    for i in range(3):
        alone = local_lipschitz(model, x[i : i + 1], float(eps[i]))
        torch.testing.assert_close(alone[0], together[i])
