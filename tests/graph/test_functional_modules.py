"""Functional pooling calls are their torch.nn modules (Note [Functional calls as modules]).

``F.max_pool2d(x, 2)`` is traced as a call of ``nn.MaxPool2d(2)``: the Lipschitz
bound, the interval and CROWN bounds and the local bound of the functional form
are those of the module form, to the bit; a call whose arguments depend on the
input is refused, never bounded as something else.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipnets import lipschitz_bound
from lipnets.errors import UnboundedModuleError
from lipnets.propagation import crown_bounds, interval_bounds, local_lipschitz
from tests.helpers import Fn, lipschitz_ascent

DT = torch.float64

PAIRS = [  # (input shape, functional form, module form)
    ((1, 2, 7, 6), lambda h: F.max_pool2d(h, 3, 2, 1, ceil_mode=True),
     nn.MaxPool2d(3, 2, 1, ceil_mode=True)),
    ((1, 2, 7, 6), lambda h: F.max_pool2d(h, (2, 3), stride=1, dilation=(2, 1)),
     nn.MaxPool2d((2, 3), 1, dilation=(2, 1))),
    ((1, 2, 7, 6), lambda h: torch.max_pool2d(h, 2), nn.MaxPool2d(2)),
    ((1, 2, 9), lambda h: F.max_pool1d(h, 3, 1), nn.MaxPool1d(3, 1)),
    ((1, 2, 7, 6), lambda h: F.adaptive_max_pool2d(h, (3, 4)), nn.AdaptiveMaxPool2d((3, 4))),
    ((1, 2, 9), lambda h: F.adaptive_max_pool1d(h, 4), nn.AdaptiveMaxPool1d(4)),
    ((1, 2, 7, 6), lambda h: F.avg_pool2d(h, 3, 1, 1, count_include_pad=False),
     nn.AvgPool2d(3, 1, 1, count_include_pad=False)),
    ((1, 2, 9), lambda h: F.avg_pool1d(h, 2), nn.AvgPool1d(2)),
    ((1, 2, 7, 6), lambda h: F.adaptive_avg_pool2d(h, 3), nn.AdaptiveAvgPool2d(3)),
    ((1, 2, 4, 4, 4), lambda h: F.max_pool3d(h, 2, 1), nn.MaxPool3d(2, 1)),
]  # fmt: skip


def _net(pool: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    conv = (nn.Conv1d, nn.Conv2d, nn.Identity)[len(shape) - 3](2, 2, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), pool, nn.Flatten())
    model = model.to(DT).eval()
    with torch.no_grad():
        width = model(torch.zeros(shape, dtype=DT)).shape[1]
    torch.manual_seed(1)
    return model.append(nn.Linear(width, 3).to(DT))


@pytest.mark.parametrize("index", range(len(PAIRS)))
def test_functional_pool_is_its_module(index: int) -> None:
    shape, fn, module = PAIRS[index]
    functional, modular = _net(Fn(fn), shape), _net(module, shape)
    x = torch.rand(2, *shape[1:], dtype=DT)
    with torch.no_grad():
        torch.testing.assert_close(functional(x), modular(x), rtol=0, atol=0)
    bound = lipschitz_bound(functional, input_shape=shape)
    assert float(bound) == float(lipschitz_bound(modular, input_shape=shape))
    assert lipschitz_ascent(functional, shape, starts=4, steps=30) <= float(bound)
    for norm in (2, math.inf):
        for method in (interval_bounds, crown_bounds):
            got, want = method(functional, x, 0.2, norm=norm), method(modular, x, 0.2, norm=norm)
            assert torch.equal(got.lower, want.lower) and torch.equal(got.upper, want.upper)
    assert torch.equal(local_lipschitz(functional, x, 0.2), local_lipschitz(modular, x, 0.2))


def test_input_dependent_arguments_are_refused() -> None:
    """A kernel read from the input's shape is a graph value, not a constant: no rewrite, and
    no rule for the bare function call."""
    model = nn.Sequential(nn.Conv2d(1, 1, 3), Fn(lambda h: F.max_pool2d(h, h.shape[-1] // 2)))
    model = model.to(DT)
    with pytest.raises(UnboundedModuleError, match="max_pool2d"):
        lipschitz_bound(model, input_shape=(1, 1, 6, 6))
    with pytest.raises(UnboundedModuleError, match="max_pool2d"):
        crown_bounds(model, torch.rand(1, 1, 6, 6, dtype=DT), 0.1, norm=2)
