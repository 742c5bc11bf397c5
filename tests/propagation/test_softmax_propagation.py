"""Propagation of softmax, softmin and log_softmax (Note [Softmax intervals] in
`lipnets.propagation.ops_softmax`)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipnets.errors import UnboundedModuleError
from lipnets.propagation import crown_bounds, interval_bounds
from lipnets.propagation.ops_softmax import Softmax
from tests.helpers import assert_within
from tests.propagation.test_propagation_models import ball_points

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = {"softmax": (1, False), "softmin": (-1, False), "log_softmax": (1, True)}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_interval_is_the_exact_range_of_each_entry(kind):
    """Each end is the value at one corner of the box, and no sampled point leaves it."""
    sign, log = KINDS[kind]
    torch.manual_seed(0)
    lo = torch.randn(4, 5, 3, dtype=F64) * 3
    up = lo + torch.rand_like(lo) * torch.tensor([0.0, 1e-3, 1.0, 10.0]).reshape(4, 1, 1)
    op = Softmax(torch.Size([5, 3]), 1, sign, log)
    low, high = op.interval([lo], [up])
    fn = (lambda z: F.log_softmax(sign * z, 1)) if log else (lambda z: F.softmax(sign * z, 1))
    for i in range(5):  # the corners that reach entry i's ends
        pick = torch.zeros(5, dtype=torch.bool)
        pick[i] = True
        pick = pick.reshape(1, 5, 1)
        small = fn(torch.where(pick == (sign > 0), lo, up))[:, i]
        large = fn(torch.where(pick == (sign > 0), up, lo))[:, i]
        torch.testing.assert_close(low[:, i], small, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(high[:, i], large, rtol=1e-12, atol=1e-14)
    t = torch.rand((2000, *lo.shape), dtype=F64)
    values = fn((lo + t * (up - lo)).reshape(-1, 5, 3)).reshape(2000, *lo.shape)
    assert bool((values >= low - 1e-12).all() and (values <= high + 1e-12).all())


@pytest.mark.parametrize("act", [nn.Softmax(dim=1), nn.Softmin(dim=-1), nn.LogSoftmax(dim=1)])
@pytest.mark.parametrize("norm", [2.0, math.inf])
def test_sampled_outputs_inside_ibp_and_crown(act, norm):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), act, nn.Linear(4, 3))
    model = model.double().eval()
    x, eps, count = torch.randn(3, 5, dtype=F64), 0.3, 2000
    with torch.no_grad():
        y = model(ball_points(x, eps, norm, count).reshape(-1, 5)).reshape(count, 3, -1)
    ibp = interval_bounds(model, x, eps, norm=norm)
    crown = crown_bounds(model, x, eps, norm=norm)
    assert_within(y, ibp, "IBP")
    assert_within(y, crown, "CROWN")
    assert bool(
        (crown.lower >= ibp.lower - 1e-12).all() and (crown.upper <= ibp.upper + 1e-12).all()
    )


@pytest.mark.filterwarnings("ignore:Implicit dimension choice")
def test_refusals():
    lin = nn.Linear(4, 4).double()
    x = torch.randn(2, 4, dtype=F64)
    for bad, why in [(nn.Softmax(dim=0), "batch"), (nn.Softmax(), "no dim")]:
        with pytest.raises(UnboundedModuleError, match=why):
            interval_bounds(nn.Sequential(lin, bad), x, 0.1, norm=2)
