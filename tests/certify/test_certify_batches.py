"""certify_crown in batches, and certification_report's CROWN passes (issue 20).

Batching and skipping must not change a single answer: the batches are bounded with the
same spec rows, misclassified samples are never certified, and in the report a sample
certified at a larger radius counts at every smaller one (its ball holds theirs).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lipnets
from lipnets import _progress
from lipnets.certify import certify_crown
from lipnets.propagation import crown_bounds

DT = torch.float64


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    ).to(DT).eval()  # fmt: skip


def _data(model: nn.Module, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 6, dtype=DT, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::5] = (y[::5] + 1) % 4  # every fifth label wrong: misclassified samples
    return x, y


def _one_by_one(model, x, y, eps, norm) -> torch.Tensor:
    """The definition: every margin's CROWN lower bound > 0, and classified correctly."""
    out = []
    for i in range(x.shape[0]):
        xi, yi = x[i : i + 1], y[i : i + 1]
        others = [j for j in range(4) if j != int(yi)]
        spec = torch.zeros(1, 3, 4, dtype=DT)
        spec[0, :, int(yi)] = 1
        spec[0, range(3), others] = -1
        lower = crown_bounds(model, xi, eps, norm=norm, spec=spec).lower
        with torch.no_grad():
            right = bool(model(xi).argmax(1) == yi)
        out.append(bool((lower > 0).all()) and right)
    return torch.tensor(out)


@pytest.mark.parametrize("norm", [2.0, float("inf")])
def test_batches_give_the_answers_of_one_sample_at_a_time(norm) -> None:
    model = _model()
    x, y = _data(model)
    eps = 0.5 if norm == 2.0 else 0.3
    expected = _one_by_one(model, x, y, eps, norm)
    assert 0 < int(expected.sum()) < int((y == model(x).argmax(1)).sum())  # a real mix
    for batch_size in (1, 7, 256):
        got = certify_crown(model, x, y, eps, norm=norm, batch_size=batch_size, progress=False)
        assert torch.equal(got, expected)
    assert not certify_crown(model, x, y, 0.0)[::5].any()  # misclassified: never


def test_per_sample_radii_follow_their_samples_into_batches() -> None:
    model = _model()
    x, y = _data(model)
    radii = torch.linspace(0.0, 0.2, x.shape[0], dtype=DT)
    whole = certify_crown(model, x, y, radii, batch_size=256)
    parts = certify_crown(model, x, y, radii, batch_size=3)
    assert torch.equal(whole, parts)
    singles = torch.stack([certify_crown(model, x[i : i + 1], y[i : i + 1], radii[i : i + 1])[0]
                           for i in range(x.shape[0])])  # fmt: skip
    assert torch.equal(whole, singles)


def test_batch_size_is_checked() -> None:
    model = _model()
    x, y = _data(model, 4)
    for bad in (0, -1, 1.5, True):
        with pytest.raises((TypeError, ValueError), match="batch_size"):
            certify_crown(model, x, y, 0.1, batch_size=bad)


def test_progress_over_batches_on_a_terminal(monkeypatch) -> None:
    bars = []
    real = _progress.progress_bar

    def spy(enabled, total, desc):
        bars.append((enabled, total, desc))
        return real(enabled, total, desc)

    monkeypatch.setattr("lipnets.certify.crown.progress_bar", spy)
    model = _model()
    x, y = _data(model, 12)
    certify_crown(model, x, y, 0.05, batch_size=4)
    certify_crown(model, x, y, 0.05, batch_size=256)  # one batch: no bar to show
    assert bars[0][0] is None and bars[0][1] == len(range(0, int((y == model(x).argmax(1))
                                                                .sum()), 4))  # fmt: skip
    assert bars[1][0] is False


def test_report_counts_larger_radius_certificates_at_smaller_radii() -> None:
    model = _model()
    x, y = _data(model)
    radii = [0.2, 1.0, 0.5]  # not sorted: the report's rows keep this order
    report = lipnets.certification_report(model, x, y, radii, attack=False, progress=False)
    per_radius = {e: certify_crown(model, x, y, e) for e in radii}
    for row in report.rows:
        larger = [per_radius[e] for e in radii if e >= row.eps]
        expected = torch.stack(larger).any(0)
        assert row.crown_count == int(expected.sum())
    assert [r.eps for r in report.rows] == radii
