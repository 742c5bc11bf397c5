"""interval_bounds(spec=C) folds C into the last affine layer (Note [Specification folded
into the last affine layer] in `lipnets.propagation.lirpa`)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lipnets.certify import certify_crown
from lipnets.propagation import interval_bounds
from lipnets.propagation.lirpa import spec_interval
from tests.helpers import assert_within
from tests.propagation.test_propagation_models import ball_points

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _margins(n: int, classes: int, y: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(classes, dtype=F64)
    rows = [eye[y[i]] - eye[[j for j in range(classes) if j != y[i]]] for i in range(n)]
    return torch.stack(rows)


@pytest.mark.parametrize("norm", [2.0, math.inf])
def test_folded_ibp_is_the_interval_of_cw_over_the_hidden_box(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4)).double().eval()
    x, eps = torch.randn(6, 5, dtype=F64), 0.3
    y = torch.randint(0, 4, (6,))
    spec = _margins(6, 4, y)
    got = interval_bounds(model, x, eps, norm=norm, spec=spec)
    # By hand: the ReLU's input box is exact (an affine map of the ball); its output box is
    # the ReLU of it; C W2 over that box, plus C b2.
    w1, b1, w2, b2 = (
        t.detach() for t in (model[0].weight, model[0].bias, model[2].weight, model[2].bias)
    )
    dual = 1.0 if norm == math.inf else 2.0
    centre, radius = x @ w1.T + b1, eps * torch.linalg.vector_norm(w1, ord=dual, dim=1)
    lo, up = (centre - radius).relu(), (centre + radius).relu()
    cw = spec @ w2  # (N, R, 7)
    want_lo = (cw.clamp_min(0) * lo[:, None] + cw.clamp_max(0) * up[:, None]).sum(-1) + spec @ b2
    want_up = (cw.clamp_min(0) * up[:, None] + cw.clamp_max(0) * lo[:, None]).sum(-1) + spec @ b2
    torch.testing.assert_close(got.lower, want_lo, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.upper, want_up, rtol=1e-12, atol=1e-12)
    # Never looser than interval arithmetic on the outputs, and strictly tighter here.
    plain = spec_interval(spec, *interval_bounds(model, x, eps, norm=norm))
    assert bool((got.lower >= plain[0] - 1e-12).all() and (got.upper <= plain[1] + 1e-12).all())
    assert bool((got.lower > plain[0] + 1e-6).any())
    # Sound: sampled margins (boundary and inside) within the bounds.
    count = 2000
    with torch.no_grad():
        out = model(ball_points(x, eps, norm, count).reshape(-1, 5)).reshape(count, 6, 4)
    assert_within(torch.einsum("nrm,knm->knr", spec, out), got, "margins")


def test_a_single_affine_layer_is_exact_and_certify_ibp_uses_the_fold():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3)).double().eval()
    x, eps = torch.randn(8, 4, dtype=F64), 0.2
    y = model(x).argmax(1)
    spec = _margins(8, 3, y)
    got = interval_bounds(model, x, eps, norm=2, spec=spec)
    rows = spec @ model[0].weight.detach()
    exact = torch.einsum("nrk,nk->nr", rows, x) + spec @ model[0].bias.detach()
    exact_lo = exact - eps * rows.norm(dim=-1)
    torch.testing.assert_close(got.lower, exact_lo, rtol=1e-12, atol=1e-12)
    certified = certify_crown(model, x, y, eps, norm=2, method="ibp")
    assert torch.equal(certified, (exact_lo > 0).all(1))
