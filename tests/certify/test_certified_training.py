"""Certified training: differentiable bounds (Note [Differentiable bounds] in
lipnets.propagation.checks) and the IBP / CROWN-IBP losses (Note [Certified cross-entropy]
in lipnets.certify.training).

The gradients of bounds and losses with respect to the parameters are checked against
finite differences by torch.autograd.gradcheck in float64; differentiable bounds must
equal the default ones to the bit, be sound by sampling, and reach every parameter; the
loss is checked against its definition (clean CE at kappa = 1, the beta mixture, an upper
bound of the loss at sampled points of the balls); schedules against their closed forms.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import lipnets
from lipnets.certify import (
    CertifiedSchedule,
    CrownIBPLoss,
    IBPLoss,
    certified_cross_entropy,
    worst_case_logits,
)
from lipnets.certify.training import ScheduleValues, linear_ramp
from lipnets.propagation import crown_bounds, crown_ibp_bounds, interval_bounds

DT = torch.float64
INF = math.inf
BOUNDS = {"ibp": interval_bounds, "crown-ibp": crown_ibp_bounds, "crown": crown_bounds}

pytestmark = pytest.mark.usefixtures("one_thread")


class Residual(nn.Module):
    """A skip connection, a parameter used as a constant coefficient and a cat."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        h = torch.relu(self.a(x))
        return x * self.scale + 0.5 * self.b(h) + torch.cat([h[:, :2], x[:, 2:]], 1)


def _models():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
    return {
        "mlp": (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                              nn.Linear(8, 3)), (4,)),
        "maxmin": (nn.Sequential(nn.Linear(4, 8), lipnets.MaxMin(), nn.Linear(8, 4),
                                 lipnets.GroupSort(4), nn.Linear(4, 3)), (4,)),
        "cnn": (nn.Sequential(nn.Conv2d(1, 3, 3, padding="same", padding_mode="circular"), bn,
                              nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2), nn.LeakyReLU(0.1),
                              nn.Flatten(), nn.Linear(8, 3)), (1, 5, 5)),
        "residual": (nn.Sequential(Residual(), nn.ReLU(), nn.Linear(4, 3)), (4,)),
        "bjorck": (nn.Sequential(lipnets.BjorckLinear(4, 6), lipnets.MaxMin(),
                                 lipnets.BjorckLinear(6, 3)), (4,)),
    }  # fmt: skip


MODELS = _models()


def _setup(name: str, n: int = 3):
    model, shape = MODELS[name]
    model = model.to(DT).eval()
    x = torch.randn(n, *shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    y = torch.arange(n) % 3
    return model, x, y


def _margin_rows(y: torch.Tensor, classes: int = 3) -> torch.Tensor:
    eye = torch.eye(classes, dtype=DT)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


# -- differentiable bounds: the same numbers, connected to the parameters -------------------


@pytest.mark.parametrize(
    ("name", "norm"), [*((name, INF) for name in sorted(MODELS)), ("cnn", 2), ("residual", 2)]
)
def test_differentiable_bounds_equal_the_default_ones_to_the_bit(name, norm):
    model, x, y = _setup(name)
    for method, bounds in BOUNDS.items():
        for spec in (None, _margin_rows(y)):
            plain = bounds(model, x, 0.1, norm=norm, spec=spec)
            diff = bounds(model, x, 0.1, norm=norm, spec=spec, differentiable=True)
            assert not plain.lower.requires_grad
            assert diff.lower.requires_grad and diff.upper.requires_grad, method
            assert torch.equal(plain.lower, diff.lower), (method, spec is None)
            assert torch.equal(plain.upper, diff.upper), (method, spec is None)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_parameter_gets_a_gradient_through_the_bounds(name):
    model, x, y = _setup(name)
    model.zero_grad()
    lower = crown_ibp_bounds(model, x, 0.1, norm=INF, spec=_margin_rows(y), differentiable=True)
    weights = torch.rand(lower.lower.shape, dtype=DT, generator=torch.Generator().manual_seed(7))
    (weights * lower.lower).sum().backward()  # not a plain sum: sum_j (b_y - b_j) cancels
    for pname, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), pname


@pytest.mark.parametrize("name", ["mlp", "maxmin", "cnn"])
@pytest.mark.parametrize("norm", [2, INF], ids=["l2", "linf"])
def test_differentiable_bounds_are_sound_by_sampling(name, norm):
    model, x, _ = _setup(name, n=2)
    gen = torch.Generator().manual_seed(3)
    eps = 0.2
    for method, bounds in BOUNDS.items():
        lo, up = bounds(model, x, eps, norm=norm, differentiable=True)
        lo, up = lo.detach(), up.detach()
        for _ in range(4):
            u = torch.randn((500, *x.shape), generator=gen, dtype=DT)
            if norm == INF:
                step = u.sign() if _ % 2 else torch.rand(u.shape, generator=gen, dtype=DT) * 2 - 1
            else:
                flat = u.flatten(2)
                step = (flat / flat.norm(dim=2, keepdim=True)).reshape(u.shape)
            with torch.no_grad():
                f = model((x + eps * step).flatten(0, 1)).reshape(500, x.shape[0], -1)
            assert bool((f >= lo - 1e-9).all() and (f <= up + 1e-9).all()), method


def test_bounds_leave_modes_buffers_and_parameters_as_they_were():
    model, x, _ = _setup("cnn")
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    crown_ibp_bounds(model, x, 0.1, norm=INF, differentiable=True).lower.sum().backward()
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    model.eval()


# -- gradients against finite differences (float64) ------------------------------------------


def _as_function(model, fn, x):
    """``fn(model, x)`` as a function of the parameters (for gradcheck), and their values."""
    names = [n for n, _ in model.named_parameters()]

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, x):
            return fn(self.m, x)

    wrap = Wrap()

    def of(*params):
        return functional_call(wrap, {"m." + n: p for n, p in zip(names, params, strict=True)}, x)

    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    return of, params


@pytest.mark.parametrize(("method", "norm"), [("ibp", INF), ("crown-ibp", INF), ("crown", 2)])
def test_bounds_gradients_match_finite_differences(method, norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), lipnets.MaxMin(),
                          nn.Linear(4, 2)).to(DT).eval()  # fmt: skip
    x = torch.randn(2, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    spec = torch.tensor([[1.0, -1.0]], dtype=DT)
    bounds = BOUNDS[method]

    def fn(m, x):
        b = bounds(m, x, 0.3, norm=norm, spec=spec, differentiable=True)
        return torch.cat([b.lower, b.upper], 1)

    of, params = _as_function(model, fn, x)
    assert torch.autograd.gradcheck(of, params, eps=1e-6, atol=1e-7)


def test_loss_gradient_matches_finite_differences():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding="same", padding_mode="circular"), nn.ReLU(),
                          nn.Conv2d(2, 2, 3, padding="same"), nn.ReLU(), nn.Flatten(),
                          nn.Linear(18, 3)).to(DT).eval()  # fmt: skip
    x = torch.rand(2, 1, 3, 3, dtype=DT, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 1])
    # CROWN-IBP is strictly tighter than IBP on every margin here, so the gradient runs
    # through the backward pass (the convolutions' adjoints by autograd), not only IBP's.
    rows = torch.stack([_margin_rows(y)[0, [1, 2]], _margin_rows(y)[1, [0, 2]]])
    tight = crown_ibp_bounds(model, x, 0.1, norm=INF, spec=rows).lower
    assert bool((tight > interval_bounds(model, x, 0.1, norm=INF, spec=rows).lower).all())

    def fn(m, x):
        return certified_cross_entropy(m, x, y, 0.1, beta=0.5, kappa=0.25, reduction="none")

    of, params = _as_function(model, fn, x)
    assert torch.autograd.gradcheck(of, params, eps=1e-6, atol=1e-7, fast_mode=True)


# -- the loss against its definition ---------------------------------------------------------


def test_kappa_one_is_the_clean_cross_entropy_and_beta_mixes_the_bounds():
    model, x, y = _setup("mlp", n=6)
    clean = F.cross_entropy(model(x), y, reduction="none")
    got = certified_cross_entropy(model, x, y, 0.1, kappa=1.0, reduction="none")
    assert torch.equal(got, clean)
    rows = _margin_rows(y)
    m_c = crown_ibp_bounds(model, x, 0.1, norm=INF, spec=rows).lower
    m_i = interval_bounds(model, x, 0.1, norm=INF, spec=rows).lower
    z = torch.where(F.one_hot(y, 3).bool(), 0.0, -(0.3 * m_c + 0.7 * m_i))
    torch.testing.assert_close(worst_case_logits(model, x, y, 0.1, beta=0.3), z, rtol=0, atol=1e-15)
    want = 0.4 * clean + 0.6 * F.cross_entropy(z, y, reduction="none")
    got = certified_cross_entropy(model, x, y, 0.1, beta=0.3, kappa=0.4, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)
    assert torch.equal(
        certified_cross_entropy(model, x, y, 0.1, beta=0.3, kappa=0.4, reduction="sum"),
        got.sum(),
    )
    mean = certified_cross_entropy(model, x, y, 0.1, beta=0.3, kappa=0.4)
    assert torch.equal(mean, got.mean())
    # one sample alone has the value it has in the batch (no batch statistic)
    alone = certified_cross_entropy(model, x[2:3], y[2:3], 0.1, beta=0.3, kappa=0.4)
    torch.testing.assert_close(alone, got[2], rtol=1e-14, atol=0)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_certified_loss_bounds_the_loss_everywhere_in_the_balls(beta):
    model, x, y = _setup("maxmin", n=4)
    eps = 0.15
    bound = certified_cross_entropy(model, x, y, eps, beta=beta, reduction="none")
    z = worst_case_logits(model, x, y, eps, beta=beta)
    assert torch.equal(z.gather(1, y[:, None]), torch.zeros(4, 1, dtype=DT))
    gen = torch.Generator().manual_seed(5)
    step = torch.rand((2000, *x.shape), generator=gen, dtype=DT) * 2 - 1
    step[:1000] = step[:1000].sign()
    with torch.no_grad():
        f = model((x + eps * step).flatten(0, 1)).reshape(2000, 4, 3)
        ce = F.cross_entropy(f.flatten(0, 1), y.repeat(2000), reduction="none").reshape(2000, 4)
    f_y = f.gather(2, y.expand(2000, 4)[..., None])
    assert bool((f - f_y <= z.detach() + 1e-9).all())
    assert bool((ce <= bound.detach() + 1e-9).all())
    assert bool((bound > F.cross_entropy(model(x), y, reduction="none")).all())


def test_ibp_loss_is_crown_ibp_loss_with_beta_zero_and_modules_match_the_function():
    model, x, y = _setup("residual", n=4)
    ibp = IBPLoss(0.1, kappa=0.5, reduction="none")
    assert torch.equal(ibp(model, x, y), CrownIBPLoss(0.1, beta=0.0, kappa=0.5,
                                                      reduction="none")(model, x, y))  # fmt: skip
    loss = CrownIBPLoss(0.05, norm="l2", beta=0.7, kappa=0.2)
    want = certified_cross_entropy(model, x, y, 0.05, norm=2, beta=0.7, kappa=0.2)
    assert torch.equal(loss(model, x, y), want)
    assert "beta=0.7" in repr(loss) and "norm=2" in repr(loss)
    one_hot = F.one_hot(y, 3)
    assert torch.equal(loss(model, x, one_hot), want)


def test_a_training_step_lowers_the_certified_loss_and_raises_the_margins():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).to(DT)
    x = torch.rand(32, 4, dtype=DT, generator=torch.Generator().manual_seed(6))
    y = (x[:, 0] > 0.5).long() + (x[:, 1] > 0.5).long()
    loss = CrownIBPLoss(0.05, beta=0.5)
    before = loss(model, x, y)
    before.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-3 * p.grad
    assert float(loss(model, x, y).detach()) < float(before.detach())


# -- schedules -------------------------------------------------------------------------------


def test_linear_ramp_and_schedule_values():
    assert [linear_ramp(t, start=0.0, end=2.0, begin=1, length=2) for t in (0, 1, 1.5, 3, 7)] == [
        0.0, 0.0, 0.5, 2.0, 2.0,
    ]  # fmt: skip
    assert linear_ramp(0.99, start=1.0, end=3.0, begin=1, length=0) == 1.0
    assert linear_ramp(1.0, start=1.0, end=3.0, begin=1, length=0) == 3.0
    schedule = CertifiedSchedule(eps=0.2, warmup=1, ramp=4, kappa_end=0.5)
    assert schedule(0.5) == ScheduleValues(0.0, 1.0, 1.0)
    assert schedule(3.0) == ScheduleValues(pytest.approx(0.1), 0.5, 0.75)
    assert schedule(5.0) == schedule(50.0) == ScheduleValues(0.2, 0.0, 0.5)
    loss = schedule.apply(CrownIBPLoss(0.2), 2.0)
    assert (loss.eps, loss.beta, loss.kappa) == (pytest.approx(0.05), 0.75, 0.875)
    ibp = schedule.apply(IBPLoss(0.2), 2.0)
    assert ibp.beta == 0.0 and ibp.kappa == 0.875


# -- errors ----------------------------------------------------------------------------------


def test_errors_name_the_argument_the_allowed_values_and_the_value():
    model, x, y = _setup("mlp")
    with pytest.raises(ValueError, match=r"eps must be finite and in \[0, inf\), got -0.1"):
        CrownIBPLoss(-0.1)
    with pytest.raises(ValueError, match=r"beta must be finite and in \[0, 1\], got 1.5"):
        CrownIBPLoss(0.1, beta=1.5)
    with pytest.raises(ValueError, match=r"kappa must be finite and in \[0, 1\], got -0.2"):
        IBPLoss(0.1, kappa=-0.2)
    with pytest.raises(ValueError, match=r"reduction must be one of .*got 'avg'"):
        CrownIBPLoss(0.1, reduction="avg")
    with pytest.raises(ValueError, match=r"norm must be 2 or float\('inf'\).*got 3"):
        CrownIBPLoss(0.1, norm=3)
    with pytest.raises(ValueError, match="ramp must be finite and in"):
        CertifiedSchedule(eps=0.1, ramp=-1)
    with pytest.raises(ValueError, match="kappa_end must be finite and in"):
        CertifiedSchedule(eps=0.1, kappa_end=2)
    with pytest.raises(TypeError, match="loss must be a CrownIBPLoss or an IBPLoss, got MSELoss"):
        CertifiedSchedule(eps=0.1).apply(nn.MSELoss(), 0.0)
    loss = CrownIBPLoss(0.1)
    loss.beta = 2.0  # changed after construction: checked again when called
    with pytest.raises(ValueError, match=r"beta must be finite and in \[0, 1\], got 2.0"):
        loss(model, x, y)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module, got str"):
        certified_cross_entropy("model", x, y, 0.1)
    with pytest.raises(ValueError, match="target must have one entry per sample: 3 inputs"):
        certified_cross_entropy(model, x, y[:2], 0.1)
    with pytest.raises(ValueError, match="label 5 is out of range for 3 classes"):
        certified_cross_entropy(model, x, torch.tensor([0, 1, 5]), 0.1)
    binary = nn.Linear(4, 1).to(DT)
    with pytest.raises(ValueError, match=r"needs multiclass logits of shape \(N, C\) .*\(3, 1\)"):
        certified_cross_entropy(binary, x, torch.tensor([0, 1, 0]), 0.1)
    with pytest.raises(TypeError, match="differentiable must be True or False, got 1"):
        interval_bounds(model, x, 0.1, norm=INF, differentiable=1)
