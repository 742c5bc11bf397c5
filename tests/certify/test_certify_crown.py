"""CROWN certificates and the certification report.

certify_crown is checked against the exact distance to the decision boundary of linear
classifiers (l2 and l-inf, multiclass and binary), where it must be exact, and against
pgd_l2 on a MaxMin/BjorckLinear network trained on digits, where no certified point may be
broken. The report is checked against certified_accuracy and certify_crown themselves, and
against the invariant certified <= attack-robust <= clean accuracy.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import lipnets
from lipnets.certify import certified_accuracy, certify_crown
from lipnets.estimators import pgd_l2
from lipnets.functional import margin
from lipnets.reports import CertificationReport, CertificationRow, certification_report
from tests.helpers import as_float64, trained_digits_model

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# -- linear classifiers: certify_crown is the exact distance to the decision boundary --


def _linear(seed: int, classes: int = 5, dim: int = 6, n: int = 300):
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(dim, classes).to(DT)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(classes, dim, generator=gen, dtype=DT))
        layer.bias.copy_(torch.randn(classes, generator=gen, dtype=DT))
    x = torch.randn(n, dim, generator=gen, dtype=DT)
    return layer, x, gen


def _boundary_distance(layer: nn.Linear, x, y, dual: float) -> torch.Tensor:
    """min over j != y of (f_y - f_j) / ||w_y - w_j||_dual (negative when misclassified)."""
    with torch.no_grad():
        scores = layer(x)
    w = layer.weight.detach()
    gaps = scores.gather(1, y[:, None]) - scores
    norms = torch.linalg.vector_norm(w[y][:, None, :] - w[None], ord=dual, dim=2)
    dist = gaps / torch.where(norms > 0, norms, 1.0)
    return dist.scatter(1, y[:, None], math.inf).amin(dim=1)


@pytest.mark.parametrize("norm", [2, math.inf], ids=["l2", "linf"])
def test_linear_model_is_certified_exactly_up_to_the_boundary(norm):
    layer, x, gen = _linear(0)
    with torch.no_grad():
        y = layer(x).argmax(dim=1)
    y[::10] = torch.randint(0, 5, (30,), generator=gen)  # some misclassified points
    dual = 1.0 if norm == math.inf else 2.0  # the ball's dual norm
    dist = _boundary_distance(layer, x, y, dual)
    correct = dist > 0
    assert 10 < int((~correct).sum()) and int(correct.sum()) > 250
    radius = dist.clamp_min(0.0)
    # just inside the boundary: certified exactly when correctly classified
    inside = certify_crown(layer, x, y, radius * (1 - 1e-7), norm=norm)
    assert torch.equal(inside, correct)
    # just outside: never certified (a point of the ball is across the boundary)
    assert not bool(certify_crown(layer, x, y, radius * (1 + 1e-7), norm=norm).any())
    # one radius for all: certified exactly where the boundary is farther than eps
    eps = float(radius[correct].median())
    away = (radius - eps).abs() > 1e-6 * eps
    certified = certify_crown(layer, x, y, eps, norm=norm)
    assert torch.equal(certified[away], (radius > eps)[away])
    assert 0 < int(certified.sum()) < int(correct.sum())
    # one-hot labels and the "l2"/"linf" spellings mean the same
    onehot = nn.functional.one_hot(y, 5)
    spelled = "linf" if norm == math.inf else "l2"
    assert torch.equal(certify_crown(layer, x, onehot, eps, norm=spelled), certified)


def test_the_margin_is_bounded_directly_not_as_a_difference_of_bounds():
    # f = x: the boundary of class 0 vs 1 at (1, 0) is at distance 1/sqrt(2). Bounding
    # f_0 and f_1 separately certifies only eps < 1/2.
    layer = nn.Linear(2, 2, bias=False).to(DT)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2, dtype=DT))
    x, y = torch.tensor([[1.0, 0.0]], dtype=DT), torch.tensor([0])
    for eps in (0.45, 0.6, 0.7):
        assert certify_crown(layer, x, y, eps).item()
    assert not certify_crown(layer, x, y, 0.71).item()
    # IBP folds the margin into the layer (exact here); separate score bounds would stop at 1/2
    assert certify_crown(layer, x, y, 0.7, method="ibp").item()
    assert not certify_crown(layer, x, y, 0.71, method="ibp").item()


class _Squeezed(nn.Module):
    """One score per sample, shape (N,)."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x).squeeze(1)


@pytest.mark.parametrize("norm", [2, math.inf], ids=["l2", "linf"])
def test_binary_scores_are_certified_up_to_the_boundary(norm):
    layer, x, _ = _linear(1, classes=1)
    with torch.no_grad():
        score = layer(x)[:, 0]
    labels01 = (score > 0).long()
    labels01[::9] = 1 - labels01[::9]  # some misclassified points
    dual = 1.0 if norm == math.inf else 2.0
    signs = labels01.to(DT) * 2 - 1
    dist = signs * score / torch.linalg.vector_norm(layer.weight.detach()[0], ord=dual)
    correct = dist > 0
    radius = dist.clamp_min(0.0)
    for model in (layer, _Squeezed(layer)):  # scores (N, 1) and (N,)
        for labels in (labels01, labels01 * 2 - 1, labels01.bool(), labels01[:, None]):
            inside = certify_crown(model, x, labels, radius * (1 - 1e-7), norm=norm)
            assert torch.equal(inside, correct)
            outside = certify_crown(model, x, labels, radius * (1 + 1e-7), norm=norm)
            assert not bool(outside.any())


def test_misclassified_and_tied_points_are_never_certified():
    layer, x, _ = _linear(2, classes=3)
    with torch.no_grad():
        layer.weight[2] = layer.weight[1]  # classes 1 and 2 always tie
        layer.bias[2] = layer.bias[1]
        scores = layer(x)
    y = scores.argmax(dim=1)
    tied = y != 0
    assert int(tied.sum()) > 20 and int((~tied).sum()) > 20
    for method in ("crown", "ibp"):
        certified = certify_crown(layer, x, y, 0.0, method=method)
        assert torch.equal(certified, ~tied)  # at eps = 0 exactly the correct, untied ones
        wrong = certify_crown(layer, x, (y + 1) % 3, 0.0, method=method)
        assert not bool(wrong.any())


def _relu_mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    ).to(DT)


def test_ibp_certifies_a_subset_of_crown_and_crown_is_sound_by_sampling():
    model = _relu_mlp(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=gen, dtype=DT)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    strictly_more = 0
    for norm, eps in ((2, 0.05), (2, 0.15), (math.inf, 0.02), (math.inf, 0.05)):
        crown = certify_crown(model, x, y, eps, norm=norm)
        ibp = certify_crown(model, x, y, eps, norm=norm, method="ibp")
        assert not bool((ibp & ~crown).any()), "IBP certified a point CROWN did not"
        strictly_more += int((crown & ~ibp).sum())
        assert int(crown.sum()) > 20
        # no sampled point of a certified ball (sphere, corners) changes the prediction
        xc, yc = x[crown], y[crown]
        for _ in range(20):
            if norm == 2:
                d = torch.randn(xc.shape, generator=gen, dtype=DT)
                d = d / d.norm(dim=1, keepdim=True)
            else:
                d = torch.randint(0, 2, xc.shape, generator=gen).to(DT) * 2 - 1
            with torch.no_grad():
                assert bool((margin(model(xc + eps * d), yc) > 0).all())
    assert strictly_more > 0


def test_bad_inputs_get_clear_errors():
    layer, x, _ = _linear(3, classes=3)
    y = torch.tensor([0, 1, 2]).repeat(100)
    with pytest.raises(ValueError, match="one entry per sample"):
        certify_crown(layer, x, y[:10], 0.1)
    with pytest.raises(ValueError, match="out of range"):
        certify_crown(layer, x, y + 1, 0.1)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        certify_crown(layer, x, y, -0.1)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        certify_crown(layer, x, y, float("nan"))
    with pytest.raises(ValueError, match="eps must be a float or a real tensor of shape"):
        certify_crown(layer, x, y, torch.full((7,), 0.1))
    with pytest.raises(ValueError, match="norm must be 2 or float"):
        certify_crown(layer, x, y, 0.1, norm=1)
    with pytest.raises(ValueError, match="method must be 'crown', 'alpha-crown' or 'ibp'"):
        certify_crown(layer, x, y, 0.1, method="milp")
    with pytest.raises(TypeError, match="floating-point"):
        certify_crown(layer, x.long(), y, 0.1)
    with pytest.raises(TypeError, match="dtype"):
        certify_crown(layer, x.float(), y, 0.1)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        certify_crown(lambda t: t, x, y, 0.1)
    with pytest.raises(ValueError, match="scores must have shape"):
        certify_crown(nn.Unflatten(1, (2, 3)), x, y, 0.1)


def test_modes_and_buffers_are_restored_and_the_eval_function_is_certified():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)
    ).to(DT)
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.train()
    model[1].eval()  # partly in eval mode: each flag comes back as it was
    modes = [m.training for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(64, 6, dtype=DT)
    y = torch.randint(0, 3, (64,))
    certified = certify_crown(model, x, y, 0.01)
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    model.eval()
    with torch.no_grad():
        correct = margin(model(x), y) > 0
    assert torch.equal(certified & ~correct, torch.zeros_like(certified))
    assert int(certified.sum()) > 5  # the eval function (no dropout) was certified


# -- the certification report on small models --


def _small_gnp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        lipnets.BjorckLinear(6, 16), lipnets.MaxMin(), lipnets.BjorckLinear(16, 16),
        lipnets.MaxMin(), lipnets.BjorckLinear(16, 3),
    )  # fmt: skip
    return as_float64(model.eval())


def _small_data(model: nn.Module, seed: int = 0, n: int = 80):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen, dtype=DT)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    y[::8] = (y[::8] + 1) % 3  # some misclassified points
    return x, y


def _check_invariants(report: CertificationReport) -> None:
    for row in report.rows:
        assert row.lipschitz_certified <= report.clean_accuracy
        assert row.crown_certified <= report.clean_accuracy
        if row.attack_robust is not None:
            assert row.lipschitz_certified <= row.attack_robust <= report.clean_accuracy
            assert row.crown_certified <= row.attack_robust
            assert row.broken_certified == 0


def test_report_matches_certified_accuracy_and_certify_crown():
    model = _small_gnp()
    x, y = _small_data(model)
    eps = (0.5, 0.05, 0.2)  # out of order: rows keep the order given
    gen = torch.Generator().manual_seed(0)
    report = certification_report(
        model, x, y, eps, attack_steps=20, attack_restarts=2, generator=gen, batch_size=30
    )
    assert [row.eps for row in report.rows] == list(eps)
    assert report.samples == 80 and report.norm == 2.0 and report.model == "Sequential"
    assert report.lipschitz_bound == float(lipnets.lipschitz_bound(model, (1, 6)))
    assert report.clean_accuracy == certified_accuracy(model, x, y, 0.0)[0.0]
    assert report.clean_count == round(report.clean_accuracy * 80)
    lip = certified_accuracy(model, x, y, list(eps))
    for row in report.rows:
        assert row.lipschitz_certified == lip[row.eps]
        assert row.crown_count == int(certify_crown(model, x, y, row.eps).sum())
        assert row.crown_certified == row.crown_count / 80
        assert row.lipschitz_certified == row.lipschitz_count / 80
        assert row.attack_robust == row.attack_count / 80
    _check_invariants(report)
    # a point broken at a radius stays broken at larger ones
    robust = [row.attack_robust for row in sorted(report.rows, key=lambda r: r.eps)]
    assert robust == sorted(robust, reverse=True)
    assert report.rows[0].attack_robust < report.clean_accuracy  # the attack is not a no-op
    assert set(report.seconds) == {"lipschitz", "crown", "attack"}


def test_report_without_crown_leaves_its_column_out():
    """crown=False: the Lipschitz and attack columns are the same numbers, no CROWN column,
    no CROWN time, and a note says why."""
    model = _small_gnp()
    x, y = _small_data(model)
    kwargs = {"attack_steps": 5, "attack_restarts": 1}
    full = certification_report(model, x, y, [0.1, 0.3], **kwargs,
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
    fast = certification_report(model, x, y, [0.1, 0.3], crown=False, **kwargs,
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
    for a, b in zip(full.rows, fast.rows, strict=True):
        assert (a.lipschitz_count, a.attack_count) == (b.lipschitz_count, b.attack_count)
        assert b.crown_certified is None and b.crown_count is None
    assert set(fast.seconds) == {"lipschitz", "attack"}
    text = str(fast)
    assert "CROWN-certified" not in text and "no CROWN column: crown=False" in text
    assert "Lipschitz-certified" in text and "attack-robust" in text


def test_long_calls_show_progress_only_on_a_terminal(monkeypatch):
    """progress=None (the default) shows a bar when stderr is a terminal, never in a pipe."""
    from lipnets import _progress

    assert _progress.progress_bar(None, 3, "x") is None  # pytest captures stderr
    monkeypatch.setattr(_progress, "_terminal", lambda: True)
    bar = _progress.progress_bar(None, 3, "x")
    assert bar is not None and bar.total == 3
    bar.close()
    assert _progress.progress_bar(False, 3, "x") is None


def test_report_is_frozen_and_renders_a_labelled_table():
    model = _small_gnp()
    x, y = _small_data(model)
    report = certification_report(
        model, x, y, [0.1, 0.3], attack_steps=5, attack_restarts=1,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert isinstance(report, lipnets.CertificationReport)
    assert all(isinstance(row, CertificationRow) for row in report.rows)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.samples = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.rows[0].crown_certified = 1.0
    fields = {f.name for f in dataclasses.fields(CertificationRow)}
    assert {"eps", "lipschitz_certified", "crown_certified", "attack_robust"} <= fields
    text = str(report)
    for header in ("eps (l2)", "Lipschitz-certified", "CROWN-certified", "attack-robust"):
        assert header in text
    assert text.count("(sound)") >= 2 and "(empirical)" in text
    assert "pgd_l2, 5 steps x 1 restarts" in text
    assert f"({report.rows[1].crown_count})" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if "Lipschitz-certified" in line)
    body = lines[header : header + 5]  # two header lines, a rule, two rows: aligned columns
    assert len({len(line) for line in body}) == 1, body


def test_report_linf_skips_the_attack_with_a_note():
    model = _small_gnp()
    x, y = _small_data(model)
    report = certification_report(model, x, y, [0.01, 0.05], norm=float("inf"))
    assert report.norm == math.inf and report.attack is None
    assert all(row.attack_robust is None and row.broken_certified is None for row in report.rows)
    assert any("pgd_l2 searches l2 balls" in note for note in report.notes)
    lip = certified_accuracy(model, x, y, [0.01, 0.05], norm="inf")
    for row in report.rows:
        assert row.lipschitz_certified == lip[row.eps]
        assert row.crown_count == int(certify_crown(model, x, y, row.eps, norm="inf").sum())
    _check_invariants(report)
    text = str(report)
    assert "eps (l-inf)" in text and "l-inf balls" in text and "note: no attack column" in text
    assert "attack-robust" not in text and "(empirical)" not in text
    off = certification_report(model, x, y, 0.01, attack=False)
    assert off.attack is None and off.rows[0].attack_robust is None and not off.notes
    assert "attack-robust" not in str(off) and "CROWN-certified" in str(off)


def test_report_uses_the_sound_bound_never_an_assumed_one():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(DT)
    with torch.no_grad():
        model[0].weight.mul_(4.0)
    x, y = _small_data(model)
    bound = float(lipnets.lipschitz_bound(model, (1, 6)))
    assert bound > 2.0
    eps = [0.02, 0.1]
    computed = certification_report(model, x, y, eps, attack=False)
    assumed = certification_report(model, x, y, eps, attack=False, lipschitz=1.0)
    assert computed.lipschitz_bound == bound and assumed.lipschitz_bound == 1.0
    assert not computed.notes and any("was given" in note for note in assumed.notes)
    assert all(
        a.lipschitz_count >= c.lipschitz_count
        for a, c in zip(assumed.rows, computed.rows, strict=True)
    )
    assert any(
        a.lipschitz_count > c.lipschitz_count
        for a, c in zip(assumed.rows, computed.rows, strict=True)
    )
    with pytest.raises(lipnets.UnboundedModuleError, match="Softplus"):
        hard = nn.Sequential(nn.Linear(6, 4), nn.Softplus(), nn.Linear(4, 3)).to(DT)
        certification_report(hard, x, y, 0.1)


def test_report_bad_inputs_and_modes():
    model = _small_gnp()
    x, y = _small_data(model)
    with pytest.raises(ValueError, match="same length"):
        certification_report(model, x, y[:5], 0.1)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        certification_report(model, x, y, [0.1, -1.0])
    with pytest.raises(ValueError, match="attack_steps must be an int >= 1"):
        certification_report(model, x, y, 0.1, attack_steps=0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        certification_report(model, x, y, 0.1, batch_size=0)
    with pytest.raises(ValueError, match="norm must be 2"):
        certification_report(model, x, y, 0.1, norm=1)
    with pytest.raises(TypeError, match="floating-point"):
        certification_report(model, x.long(), y, 0.1)
    model.train()
    certification_report(model, x, y, 0.1, attack_steps=2, attack_restarts=1)
    assert all(m.training for m in model.modules())


# -- must-show: a MaxMin/BjorckLinear network trained on digits --


@pytest.fixture(scope="module")
def digits():
    """BjorckLinear/MaxMin, hinge margin 1.0, 1200 training digits (597 held out)."""
    return trained_digits_model(lipnets.MaxMin, margin=1.0, train_size=1200)


def test_pgd_never_breaks_a_crown_certified_point_on_digits(digits):
    model, x, y = digits
    with torch.no_grad():
        correct = margin(model(x), y) > 0
    assert int(correct.sum()) > 500
    gen = torch.Generator().manual_seed(0)
    counts = {}
    for eps in (0.1, 0.25, 0.5):
        certified = certify_crown(model, x, y, eps)
        counts[eps] = int(certified.sum())
        xc, yc = x[certified], y[certified]
        if xc.shape[0]:
            adv = pgd_l2(model, xc, yc, eps, steps=100, restarts=5, generator=gen)
            assert bool(((adv - xc).norm(dim=1) <= eps * (1 + 1e-12)).all())
            with torch.no_grad():
                broken = margin(model(adv), yc) <= 0
            assert int(broken.sum()) == 0, f"the attack broke {int(broken.sum())} at eps={eps}"
    # not vacuous: hundreds of certified points at the two smaller radii
    assert counts[0.1] >= 300 and counts[0.25] >= 200, counts
    # the attack is not a no-op: at eps = 1 it breaks most correctly classified points
    xs, ys = x[correct], y[correct]
    adv = pgd_l2(model, xs, ys, 1.0, steps=50, restarts=2, generator=gen)
    with torch.no_grad():
        broken = margin(model(adv), ys) <= 0
    assert float(broken.double().mean()) > 0.5


def test_report_on_digits_lipschitz_vs_crown_vs_attack(digits):
    model, x, y = digits
    eps = (0.1, 0.25, 0.5, 1.0)
    report = certification_report(model, x, y, eps, generator=torch.Generator().manual_seed(1))
    print(report)  # pytest -s shows the table (docs/propagation.md quotes it)
    _check_invariants(report)
    assert 0.99 < report.lipschitz_bound < 1.01  # the realised Björck weights, measured
    rows = {row.eps: row for row in report.rows}
    # CROWN certifies a sizeable share of what the Lipschitz bound certifies at small radii
    assert rows[0.1].crown_count >= 0.9 * rows[0.1].lipschitz_count
    assert rows[0.25].crown_count >= 0.5 * rows[0.25].lipschitz_count
    assert rows[0.1].lipschitz_count >= 300
    # the attack breaks a substantial fraction of the correct points at the largest radius
    assert rows[1.0].attack_robust < 0.5 * report.clean_accuracy
