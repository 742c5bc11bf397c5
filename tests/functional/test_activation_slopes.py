"""The constants of Note [Maximal slopes of activations] and Note [Softmax Jacobian],
found again independently: the supremum of |f'| by Newton's method on f'' (float64
autograd) and on a dense grid, and the Jacobian norms of the softmax family by gradient
ascent over the logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipnets
from lipnets.errors import ShapeRequiredError, UnboundedModuleError
from lipnets.functional import activation_slopes as AS
from tests.helpers import Fn

F64 = torch.float64
ACTIVATIONS = {  # name: (function, constant, torch.nn module)
    "gelu": (F.gelu, AS.GELU_SLOPE, nn.GELU()),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), AS.GELU_TANH_SLOPE, nn.GELU("tanh")),
    "silu": (F.silu, AS.SILU_SLOPE, nn.SiLU()),
    "mish": (F.mish, AS.MISH_SLOPE, nn.Mish()),
    "hardswish": (F.hardswish, AS.HARDSWISH_SLOPE, nn.Hardswish()),
    "selu": (F.selu, AS.SELU_SLOPE, nn.SELU()),
    "celu": (lambda x: F.celu(x, 2.0), AS.CELU_SLOPE, nn.CELU(2.0)),
}


def _slope(f, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    return g


def _sup_slope(f) -> float:
    """max |f'| on a grid of [-40, 40] (spacing 4e-5), refined by Newton on f''."""
    x = torch.linspace(-40, 40, 2_000_001, dtype=F64)
    g = _slope(f, x).detach().abs()
    best = float(g.max())
    t = x[int(g.argmax())].clone().reshape(1)
    for _ in range(30):  # Newton on f'' = 0 (where f'' is smooth)
        t = t.detach().requires_grad_(True)
        (g1,) = torch.autograd.grad(f(t).sum(), t, create_graph=True)
        (g2,) = torch.autograd.grad(g1.sum(), t, create_graph=True)
        if not g2.requires_grad:
            break
        (g3,) = torch.autograd.grad(g2.sum(), t)
        if float(g3.abs()) < 1e-300:
            break
        t = t - g2 / g3
    return max(best, float(_slope(f, t.detach()).detach().abs().max()))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_the_slope_is_the_supremum_of_the_derivative_rounded_up(name):
    f, constant, _ = ACTIVATIONS[name]
    exact = _sup_slope(f)
    assert exact <= constant <= exact * (1 + 1e-11)


def test_closed_forms():
    gelu = 0.5 * (1 + math.erf(1)) + math.exp(-1) / math.sqrt(math.pi)
    assert gelu <= AS.GELU_SLOPE <= gelu * (1 + 1e-12)
    selu = 1.0507009873554804934193349852946 * 1.6732632423543772848170429916717
    assert selu <= AS.SELU_SLOPE <= selu * (1 + 1e-12)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("spelling", ["module", "function"])
def test_lipschitz_bound_uses_the_slope_for_both_spellings(name, spelling):
    f, constant, module = ACTIVATIONS[name]
    torch.manual_seed(0)
    lin = nn.Linear(5, 5).double()
    act = module if spelling == "module" else Fn(f)
    model = nn.Sequential(lin, act)
    sigma = float(torch.linalg.matrix_norm(lin.weight.detach(), ord=2))
    for shape in (None, (1, 5)):
        got = float(lipnets.lipschitz_bound(model, shape))
        assert constant * sigma <= got <= constant * sigma * (1 + 1e-9)


def test_x_times_sigmoid_x_is_silu():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4).double()
    sigma = float(torch.linalg.matrix_norm(lin.weight.detach(), ord=2))
    spellings = [
        lambda h: h * torch.sigmoid(h),
        lambda h: torch.sigmoid(h) * h,
        lambda h: torch.mul(h, h.sigmoid()),
        lambda h: h.mul(F.sigmoid(h)),
    ]
    for fn in spellings:
        got = float(lipnets.lipschitz_bound(nn.Sequential(lin, Fn(fn))))
        assert AS.SILU_SLOPE * sigma <= got <= AS.SILU_SLOPE * sigma * (1 + 1e-9)

    class Swish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sig = nn.Sigmoid()

        def forward(self, x):
            return x * self.sig(x)

    got = float(lipnets.lipschitz_bound(nn.Sequential(lin, Swish())))
    assert AS.SILU_SLOPE * sigma <= got <= AS.SILU_SLOPE * sigma * (1 + 1e-9)
    # Not the pattern: the sigmoid of another tensor, or of a scaled copy, is a product of
    # two input-dependent tensors (not globally Lipschitz).
    for fn in (lambda h: h * torch.sigmoid(2 * h), lambda h: h * torch.sigmoid(h.flip(-1))):
        with pytest.raises(UnboundedModuleError, match="two input-dependent"):
            lipnets.lipschitz_bound(nn.Sequential(lin, Fn(fn)))


def _jacobian_norm_ascent(fn, n: int, steps: int = 300) -> float:
    """A lower bound on sup ||J|| by gradient ascent over logits and direction."""
    torch.manual_seed(n)
    best = 0.0
    for _ in range(8):
        z = (torch.randn(n, dtype=F64) * 3).requires_grad_(True)
        v = torch.randn(n, dtype=F64).requires_grad_(True)
        opt = torch.optim.Adam([z, v], lr=0.1)
        for _ in range(steps):
            _, jv = torch.autograd.functional.jvp(fn, z, v / v.norm(), create_graph=True)
            loss = -jv.norm()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            _, jv = torch.autograd.functional.jvp(fn, z, v / v.norm())
        best = max(best, float(jv.norm()))
    return best


@pytest.mark.parametrize("n", [2, 3, 6])
def test_softmax_family_constants(n):
    softmax = _jacobian_norm_ascent(lambda z: torch.softmax(z, 0), n)
    assert softmax <= AS.SOFTMAX_CONSTANT
    assert softmax >= 0.99 * AS.SOFTMAX_CONSTANT  # approached (one pair of logits dominates)
    log_softmax = _jacobian_norm_ascent(lambda z: torch.log_softmax(z, 0), n)
    assert log_softmax <= AS.log_softmax_constant(n)
    assert log_softmax >= 0.99 * math.sqrt(n)
    lse = _jacobian_norm_ascent(lambda z: torch.logsumexp(z, 0, keepdim=True), n)
    assert 0.99 <= lse <= AS.LOGSUMEXP_CONSTANT


def test_softmax_family_in_models():
    torch.manual_seed(0)
    lin = nn.Linear(6, 6).double()
    sigma = float(torch.linalg.matrix_norm(lin.weight.detach(), ord=2))
    cases = [
        (nn.Softmax(dim=-1), None, 0.5),
        (nn.Softmin(dim=1), (1, 6), 0.5),
        (Fn(lambda h: h.softmax(-1)), None, 0.5),
        (nn.LogSoftmax(dim=1), (1, 6), math.sqrt(6)),
        (Fn(lambda h: torch.logsumexp(h, 1)), None, 1.0),
        (Fn(lambda h: h.unsqueeze(2).softmax(2)), (1, 6), 0.0),  # fibres of size 1
    ]
    for act, shape, constant in cases:
        got = float(lipnets.lipschitz_bound(nn.Sequential(lin, act), shape))
        assert constant * sigma <= got <= constant * sigma * (1 + 1e-9) + 1e-300
    with pytest.raises(ShapeRequiredError, match="square root of the size"):
        lipnets.lipschitz_bound(nn.Sequential(lin, nn.LogSoftmax(dim=1)))
    with pytest.raises(UnboundedModuleError, match="batch"):
        lipnets.lipschitz_bound(nn.Sequential(lin, nn.Softmax(dim=0)), (1, 6))
    with pytest.raises(UnboundedModuleError, match="dim"):
        lipnets.lipschitz_bound(nn.Sequential(lin, Fn(lambda h: F.softmax(h))))


def test_refused_activation_arguments():
    lin = nn.Linear(3, 3)
    with pytest.raises(UnboundedModuleError, match="alpha must be > 0"):
        lipnets.lipschitz_bound(nn.Sequential(lin, Fn(lambda h: F.celu(h, -1.0))))
    with pytest.raises(UnboundedModuleError, match=r"no bound rule|Softplus"):
        lipnets.lipschitz_bound(nn.Sequential(lin, nn.Softplus()))
