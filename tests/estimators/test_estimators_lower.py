"""lower_bound: a slope the model really has, below every sound bound."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import lipnets
from lipnets.estimators import autolip, jacobian_norm, seqlip
from lipnets.estimators.lower import LowerBound, lower_bound
from tests.helpers import as_float64, dense_jacobian, gnp_mlp, spectral_norm


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bjorck_net() -> nn.Sequential:
    return nn.Sequential(
        lipnets.BjorckLinear(10, 32),
        lipnets.GroupSort(2),
        lipnets.BjorckLinear(32, 32),
        lipnets.GroupSort(2),
        lipnets.BjorckLinear(32, 32),
        lipnets.GroupSort(4),
        lipnets.BjorckLinear(32, 3),
    )


MODELS = {
    "groupsort-mlp": (
        lambda: nn.Sequential(nn.Linear(10, 24), lipnets.GroupSort(2), nn.Linear(24, 4)),
        (10,),
    ),
    "relu-mlp": (
        lambda: nn.Sequential(
            nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
        ),
        (10,),
    ),
    "bjorck-groupsort": (_bjorck_net, (10,)),
    "conv-relu": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64, 3),
        ),
        (2, 8, 8),
    ),
    "tanh-mlp": (lambda: nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2)), (6,)),
}


def _recomputed(model: nn.Module, est: LowerBound) -> float:
    """The slope at the witness, computed here independently (float64 copy, dense Jacobian)."""
    f64 = as_float64(model).eval()
    if est.kind == "pair":
        with torch.no_grad():
            num = (f64(est.y.double()) - f64(est.x.double())).norm()
        return float(num / (est.y.double() - est.x.double()).norm())
    jac = dense_jacobian(f64, est.x)
    v = est.direction.double().reshape(-1)
    return float((jac @ v).norm() / v.norm())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_below_bound_and_reproduced_at_witness(name):
    torch.manual_seed(0)
    build, sample_shape = MODELS[name]
    model = build()
    x = torch.randn(6, *sample_shape, generator=_gen(1))
    est = lower_bound(model, x, steps=25, restarts=3, generator=_gen(2))
    bound = lipnets.lipschitz_bound(model, (1, *sample_shape))
    assert est.value.dtype == torch.float64 and est.value.ndim == 0
    assert 0 < est.value <= bound * (1 + 1e-9)
    # lower <= max Jacobian norm (data and witness) <= bound; AutoLip, and SeqLip where
    # it applies, at least the lower bound up to the power-iteration tolerance.
    jac = jacobian_norm(as_float64(model), torch.cat([x.double(), est.x, est.y])).max()
    assert est.value <= jac * (1 + 1e-9) and jac <= bound * (1 + 1e-9)
    one = (1, *sample_shape)
    assert autolip(model, one, generator=_gen(3)) >= est.value * (1 - 1e-4)
    if name in ("relu-mlp", "tanh-mlp"):
        assert seqlip(model, one) >= est.value * (1 - 1e-4)
    assert est.x.shape == est.y.shape == (1, *sample_shape)
    assert torch.isclose(
        torch.tensor(_recomputed(model, est), dtype=torch.float64), est.value, rtol=1e-9, atol=1e-12
    )
    if est.kind == "jacobian":
        assert torch.equal(est.x, est.y)
        assert torch.isclose(est.direction.double().norm(), torch.tensor(1.0, dtype=torch.float64))
        # A Jacobian-norm point is never above that point's dense Jacobian 2-norm.
        assert est.value <= spectral_norm(dense_jacobian(as_float64(model), est.x)) * (1 + 1e-9)
    else:
        assert est.direction is None and not torch.equal(est.x, est.y)


def test_linear_map_reaches_spectral_norm():
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=_gen(3), dtype=torch.float64))
    linear = nn.Linear(12, 12)
    with torch.no_grad():
        linear.weight.copy_(q * 1.3)
    est = lower_bound(linear, torch.randn(4, 12, generator=_gen(4)), steps=5, generator=_gen(5))
    assert 0.999 * 1.3 <= est.value <= 1.3 * (1 + 1e-5)


def test_linear_map_with_spread_singular_values():
    g = _gen(6)
    u, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(12, 10, generator=g, dtype=torch.float64))
    linear = nn.Linear(12, 10)
    with torch.no_grad():
        linear.weight.copy_(u * torch.linspace(1.3, 0.2, 10, dtype=torch.float64) @ w.T)
    sigma = spectral_norm(linear.weight.detach())
    est = lower_bound(linear, torch.randn(4, 12, generator=g), steps=10, generator=_gen(7))
    assert 0.999 * sigma <= est.value <= sigma * (1 + 1e-9)


def test_pair_witness_when_the_jacobian_sees_nothing():
    # Autodiff gives round() a zero Jacobian; only pairs see the jumps.
    def f(t):
        return torch.round(4 * t)

    est = lower_bound(f, torch.randn(4, 3, generator=_gen(19)), steps=10, generator=_gen(20))
    assert est.kind == "pair" and est.direction is None and est.value > 0
    ratio = (f(est.y) - f(est.x)).norm() / (est.y - est.x).norm()
    assert torch.isclose(ratio, est.value, rtol=1e-12)


def test_gradient_norm_preserving_net_is_tight():
    torch.manual_seed(1)
    model = gnp_mlp()
    est = lower_bound(model, torch.randn(4, 16, generator=_gen(8)), steps=5, generator=_gen(9))
    bound = lipnets.lipschitz_bound(model, (1, 16))
    assert 0.99 * bound <= est.value <= bound


def test_gradient_norm_preserving_conv_net_is_tight():
    # BCOP convolutions (circular padding: isometries, as no layer reduces the
    # channels) and MaxMin: every Jacobian is an isometry, so the slope found must
    # reach the bound. (A last layer that drops channels would make the true
    # constant the cosine of an angle between subspaces, below 1.)
    torch.manual_seed(3)
    model = nn.Sequential(
        lipnets.BCOPConv2d(4, 8, 3),
        lipnets.MaxMin(),
        lipnets.BCOPConv2d(8, 8, 3),
        lipnets.MaxMin(),
        lipnets.BCOPConv2d(8, 8, 3),
    )
    x = torch.randn(3, 4, 6, 6, generator=_gen(10))
    est = lower_bound(model, x, steps=5, restarts=2, generator=_gen(11))
    bound = lipnets.lipschitz_bound(model, (1, 4, 6, 6))
    assert 0.99 * bound <= est.value <= bound


def test_float32_evaluation_of_the_model_itself():
    torch.manual_seed(2)
    model = gnp_mlp()
    x = torch.randn(4, 16, generator=_gen(10))
    est = lower_bound(model, x, steps=5, dtype=None, generator=_gen(11))
    assert est.x.dtype == torch.float32 and est.value.dtype == torch.float64
    assert 0.99 * lipnets.lipschitz_bound(model, (1, 16)) <= est.value


def test_pairs_with_zero_steps_are_exact_ratios():
    torch.manual_seed(3)
    model = MODELS["relu-mlp"][0]()
    est = lower_bound(model, torch.randn(3, 10, generator=_gen(12)), steps=0, generator=_gen(13))
    assert est.value > 0
    assert abs(_recomputed(model, est) - float(est.value)) <= 1e-9 * float(est.value)


def test_ascent_improves_on_the_starting_points():
    torch.manual_seed(4)
    model = MODELS["relu-mlp"][0]()
    x = torch.randn(4, 10, generator=_gen(14))
    start = lower_bound(model, x, steps=0, generator=_gen(15))
    ascended = lower_bound(model, x, steps=40, generator=_gen(15))
    assert ascended.value >= start.value


def test_mode_restored_and_no_parameter_gradients():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 2))
    model.train()
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for dtype in (torch.float64, None):
        est = lower_bound(model, torch.randn(3, 4), steps=3, dtype=dtype, generator=_gen(16))
        assert est.value <= lipnets.lipschitz_bound(model.eval(), (1, 4)) * (1 + 1e-9)
        model.train()
        model[1].eval()
        assert [m.training for m in model.modules()] == [True, True, False, True, True]
        assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_result_is_frozen_and_deterministic():
    torch.manual_seed(6)
    model = MODELS["groupsort-mlp"][0]()
    x = torch.randn(3, 10)
    a = lower_bound(model, x, steps=5, generator=_gen(17))
    b = lower_bound(model, x, steps=5, generator=_gen(17))
    assert torch.equal(a.value, b.value) and float(a) == float(a.value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.value = torch.tensor(0.0)  # type: ignore[misc]


def test_plain_function_is_accepted():
    est = lower_bound(lambda t: 3 * t.sin(), torch.randn(4, 5), steps=10, generator=_gen(18))
    assert 2.9 <= est.value <= 3 * (1 + 1e-12)


def test_progress_bar_runs(capsys):
    import tqdm  # noqa: F401  (a dev dependency: the progress bar must work)

    lower_bound(nn.Linear(3, 2), torch.randn(2, 3), steps=2, progress=True)
    assert "it" in capsys.readouterr().err  # tqdm's bar went to stderr


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": torch.randn(8)}, ValueError, r"ndim >= 2, got shape \(8,\)"),
        ({"x": torch.randn(0, 4)}, ValueError, "at least one non-empty sample"),
        ({"x": torch.ones(2, 4, dtype=torch.int64)}, TypeError, "floating-point.*int64"),
        ({"x": [[1.0, 2.0]]}, TypeError, "x must be a torch.Tensor, got list"),
        ({"x": torch.randn(2, 5)}, ValueError, r"failed on x of shape \(2, 5\)"),
        ({"steps": -1}, ValueError, "steps must be an int >= 0, got -1"),
        ({"restarts": 0}, ValueError, "restarts must be an int >= 1, got 0"),
        ({"lr": 0.0}, ValueError, "lr must be a finite float > 0, got 0.0"),
        ({"dtype": torch.int32}, ValueError, "dtype must be a floating-point"),
    ],
)
def test_errors(kwargs, error, match):
    args = {"x": torch.randn(2, 4), **kwargs}
    with pytest.raises(error, match=match):
        lower_bound(nn.Linear(4, 2), **args)


def test_shape_mismatch_chains_the_model_error():
    with pytest.raises(ValueError, match="matches the model's input shape") as info:
        lower_bound(nn.Linear(4, 2), torch.randn(2, 5))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_non_floating_output_rejected():
    with pytest.raises(TypeError, match=r"output must be floating point.*int64"):
        lower_bound(lambda t: t.argmax(dim=1, keepdim=True), torch.randn(2, 4))


def test_non_callable_and_batch_changing_models_rejected():
    with pytest.raises(TypeError, match=r"model must be an nn\.Module or a callable, got int"):
        lower_bound(3, torch.randn(2, 4))
    with pytest.raises(ValueError, match="B samples to B outputs"):
        lower_bound(lambda t: t.sum(dim=0), torch.randn(2, 4))
