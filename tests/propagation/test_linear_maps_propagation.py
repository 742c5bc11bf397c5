"""Propagation of the op table's structured linear maps (Note [Affine maps of the op table]
in `lipnets.propagation.linear_maps`): exact on linear models, sound by sampling behind a
ReLU layer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipnets.propagation import crown_bounds, interval_bounds
from tests.helpers import Fn, assert_within
from tests.propagation.test_propagation_models import ball_points

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _bicubic(h):
    return F.interpolate(h, scale_factor=1.5, mode="bicubic")


MAPS = {  # name: (map, per-sample input shape)
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(2, 3, 3, 2, 1, output_padding=1), (2, 5, 5)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(2, 2, 4, 2, groups=2, dilation=2), (2, 6)),
    "upsample_bilinear": (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), (2, 4, 4)),
    "upsample_nearest": (lambda: nn.Upsample(scale_factor=2), (2, 3, 4)),
    "interpolate_bicubic": (lambda: Fn(_bicubic), (2, 4, 4)),
    "reflect": (lambda: nn.ReflectionPad2d(2), (2, 4, 4)),
    "replicate": (lambda: nn.ReplicationPad1d((1, 3)), (2, 5)),
    "circular": (lambda: nn.CircularPad2d(1), (2, 4, 4)),
    "unfold": (lambda: nn.Unfold(2, stride=1, padding=1), (2, 4, 4)),
    "fold": (lambda: Fn(lambda h: F.fold(F.unfold(h, 2), (4, 4), 2)), (2, 4, 4)),
    "cumsum": (lambda: Fn(lambda h: h.cumsum(-1)), (2, 6)),
    "diff": (lambda: Fn(lambda h: torch.diff(h, 2, -1)), (2, 6)),
}  # fmt: skip
NORMS = (2.0, math.inf)


def _model(name: str, relu: bool) -> tuple[nn.Module, tuple[int, ...]]:
    make, shape = MAPS[name]
    layers: list[nn.Module] = []
    if relu:
        conv = nn.Conv2d if len(shape) == 3 else nn.Conv1d
        layers += [conv(shape[0], shape[0], 3, padding=1), nn.ReLU()]
    layers += [make(), nn.Flatten(), nn.LazyLinear(5)]
    model = nn.Sequential(*layers).double()
    model(torch.zeros((1, *shape), dtype=F64))  # the lazy layer's size
    return model.eval(), shape


def _dense(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    basis = torch.eye(n, dtype=F64).reshape(n, *shape)
    with torch.no_grad():
        zero = model(torch.zeros((1, *shape), dtype=F64))
        return (model(basis) - zero).T  # (outputs, inputs)


@pytest.mark.parametrize("name", sorted(MAPS))
@pytest.mark.parametrize("norm", NORMS)
def test_exact_on_a_linear_model(name, norm):
    """Map then Linear: CROWN (and IBP over an l2 ball) is the exact range of the affine map,
    centre +- eps times the dual norms of the dense operator's rows."""
    torch.manual_seed(1)
    model, shape = _model(name, relu=False)
    x, eps = torch.randn(3, *shape, dtype=F64), 0.2
    matrix = _dense(model, shape)
    dual = 1.0 if norm == math.inf else 2.0
    radius = eps * torch.linalg.vector_norm(matrix, ord=dual, dim=1)
    with torch.no_grad():
        centre = model(x)
    lo, up = crown_bounds(model, x, eps, norm=norm)
    torch.testing.assert_close(lo, centre - radius, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(up, centre + radius, rtol=1e-10, atol=1e-10)
    ilo, iup = interval_bounds(model, x, eps, norm=norm)
    assert bool((ilo <= lo + 1e-10).all() and (iup >= up - 1e-10).all())


@pytest.mark.parametrize("name", sorted(MAPS))
@pytest.mark.parametrize("norm", NORMS)
def test_sampled_outputs_inside_the_bounds_behind_a_relu_layer(name, norm):
    torch.manual_seed(2)
    model, shape = _model(name, relu=True)
    x, eps, count = torch.randn(2, *shape, dtype=F64), 0.15, 2000
    points = ball_points(x, eps, norm, count)  # boundary included
    with torch.no_grad():
        y = model(points.reshape(-1, *shape)).reshape(count, 2, -1)
    for fn in (interval_bounds, crown_bounds):
        assert_within(y, fn(model, x, eps, norm=norm), fn.__name__)
