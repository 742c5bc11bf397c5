"""lipnets.report: the sound bound next to the estimates that check it, per layer and whole."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import lipnets
from lipnets.errors import UnboundedModuleError
from tests.helpers import spectral_norm


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gnp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        lipnets.BjorckLinear(8, 8),
        lipnets.GroupSort(2),
        lipnets.BjorckLinear(8, 8),
        lipnets.GroupSort(2),
        lipnets.BjorckLinear(8, 4),
    )


def _relu_mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    ).eval()


class _Twice(nn.Module):
    """One Linear called twice: two rows, one per call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.lin(self.act(self.lin(x)))


def test_gradient_norm_preserving_net():
    model = _gnp()
    r = lipnets.report(model, torch.randn(8, 8, generator=_gen(0)), steps=10, generator=_gen(1))
    assert r.bound == float(lipnets.lipschitz_bound(model, (1, 8)))
    assert r.input_shape == (1, 8) and r.model == "Sequential"
    assert [(row.name, row.kind) for row in r.layers] == [
        ("0", "BjorckLinear"),
        ("1", "GroupSort"),
        ("2", "BjorckLinear"),
        ("3", "GroupSort"),
        ("4", "BjorckLinear"),
    ]
    assert [row.estimator for row in r.layers] == ["power iteration", "lower bound"] * 2 + [
        "power iteration"
    ]
    for row in r.layers:
        assert row.estimate <= row.bound * (1 + 1e-6)
        assert row.ratio == pytest.approx(1.0, abs=1e-4)
    assert 0.99 * r.bound <= r.lower_bound <= r.bound
    assert r.tightness == pytest.approx(r.lower_bound / r.bound)
    assert r.autolip == pytest.approx(r.bound, rel=1e-5)
    assert r.seqlip is None
    assert any("SeqLip does not apply" in note and "GroupSort" in note for note in r.notes)


def test_relu_mlp_per_layer_values_are_what_they_claim():
    model = _relu_mlp()
    r = lipnets.report(model, torch.randn(6, 10, generator=_gen(2)), steps=20, generator=_gen(3))
    for row in r.layers:
        module = model.get_submodule(row.name)
        if isinstance(module, nn.Linear):
            sigma = spectral_norm(module.weight.detach())
            assert row.estimator == "power iteration"
            assert row.bound >= sigma * (1 - 1e-12)
            assert row.estimate == pytest.approx(sigma, rel=1e-5)
            assert row.estimate <= sigma * (1 + 1e-6)
            assert row.input_shape == (1, module.in_features)
        else:  # ReLU: a lower bound from the inputs it sees, which it reaches (slope 1)
            assert row.estimator == "lower bound" and row.bound == 1.0
            assert row.estimate == pytest.approx(1.0, abs=1e-9)
    assert r.lower_bound <= r.seqlip * (1 + 1e-4)
    assert r.seqlip < r.autolip <= r.bound * (1 + 1e-6)
    assert r.notes == ()


def test_table_and_timings():
    model = _relu_mlp()
    r = lipnets.report(model, torch.randn(4, 10, generator=_gen(4)), steps=5, generator=_gen(5))
    text = str(r)
    for needle in ("layer", "bound", "estimate", "est/bound", "sound bound (certifies)"):
        assert needle in text
    for name in ("AutoLip (estimate)", "SeqLip (estimate)", "lower bound (estimate)"):
        assert name in text
    assert f"{r.bound:.8g}" in text
    assert set(r.seconds) == {"bound", "autolip", "seqlip", "layers", "lower_bound"}
    assert all(t >= 0 and math.isfinite(t) for t in r.seconds.values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.bound = 0.0  # type: ignore[misc]


def test_conv_model_and_a_module_called_twice():
    torch.manual_seed(6)
    conv = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3)
    ).eval()
    r = lipnets.report(conv, torch.randn(3, 2, 4, 4, generator=_gen(7)), steps=5)
    kinds = [row.kind for row in r.layers]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear"]
    assert r.layers[0].input_shape == (1, 2, 4, 4) and r.layers[4].input_shape == (1, 16)
    assert r.seqlip is None and r.autolip <= r.bound * (1 + 1e-6)

    twice = _Twice()
    r = lipnets.report(twice, torch.randn(3, 6, generator=_gen(8)), steps=5)
    assert [row.name for row in r.layers] == ["lin", "act", "lin"]
    sigma = spectral_norm(twice.lin.weight.detach())
    assert r.bound == pytest.approx(sigma**2, rel=1e-9)
    assert r.layers[0].estimate == pytest.approx(r.layers[2].estimate, rel=1e-6)


def test_modes_restored_and_no_gradients():
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Linear(5, 5), nn.BatchNorm1d(5), nn.Dropout(0.2), nn.ReLU(), nn.Linear(5, 2)
    )
    model.train()
    model[1].eval()  # a mixed state the report must leave as it found it
    modes = [m.training for m in model.modules()]
    stats = model[1].running_mean.clone()
    r = lipnets.report(model, torch.randn(4, 5), steps=2)
    # The bound is about the function in the current mode (Dropout scales by 1/0.8 in
    # training); the estimates run in eval mode and stay below it.
    assert r.bound == float(lipnets.lipschitz_bound(model, (1, 5)))
    assert r.lower_bound <= r.bound and r.autolip <= r.bound
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[1].running_mean, stats)
    assert all(p.grad is None for p in model.parameters())


def test_progress_bar(capsys):
    pytest.importorskip("tqdm")
    lipnets.report(_relu_mlp(), torch.randn(2, 10), steps=2, progress=True)
    assert "lipnets.report" in capsys.readouterr().err


class _LongOutput(nn.Module):
    def forward(self, x):
        return (3 * x).long()


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.randn(10), ValueError, "batch"),
        (torch.randn(0, 10), ValueError, "non-empty"),
        (torch.ones(2, 10, dtype=torch.long), TypeError, "floating-point"),
        (torch.full((2, 10), float("nan")), ValueError, "NaN"),
        (torch.randn(2, 9), ValueError, r"shape \(1, 9\)"),
        ([[0.0] * 10], TypeError, "floating-point tensor"),
    ],
)
def test_bad_inputs(x, error, match):
    with pytest.raises(error, match=match):
        lipnets.report(_relu_mlp(), x, steps=2)


def test_bad_models():
    with pytest.raises(UnboundedModuleError, match="int64"):
        lipnets.report(_LongOutput(), torch.randn(2, 4), steps=2)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        lipnets.report(lambda t: t, torch.randn(2, 4))  # type: ignore[arg-type]


def test_reporting_is_an_alias_of_reports():
    """``lipnets.reporting`` (deprecated) re-exports ``lipnets.reports``; ``lipnets.report``
    stays the function, not the package."""
    import lipnets.reporting
    import lipnets.reports

    assert callable(lipnets.report) and lipnets.report is lipnets.reports.report
    assert lipnets.certification_report is lipnets.reports.certification_report
    for name in lipnets.reports.__all__:
        assert getattr(lipnets.reporting, name) is getattr(lipnets.reports, name)
        if name in lipnets.__all__:
            assert getattr(lipnets, name) is getattr(lipnets.reports, name)
