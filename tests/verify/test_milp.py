"""`milp_verify` against brute force: linear regions in 2-D, one LP per activation pattern.

Every exact minimum is checked against an answer computed without lipnets' graph or
bounds (`tests.verify.brute`): the linear regions of two-input ReLU, LeakyReLU, MaxMin and
residual networks and of a CNN restricted to two pixels, and activation-pattern LPs for a
5-input MLP. Counterexamples are checked by a forward pass, verified points by sampling.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import lipnets
from lipnets.errors import InvalidModelError
from lipnets.verify import milp_verify
from tests.verify.brute import pattern_minima, region_minima, steps_of
from tests.verify.cases import GAP, verification_cases

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
EXACT = 1e-6
"""Agreement with brute force: the solver's tolerances (Note [What exact means])."""


def _activation(kind: str) -> nn.Module:
    return {"relu": nn.ReLU(), "leaky": nn.LeakyReLU(0.2), "maxmin": lipnets.MaxMin()}[kind]


def _mlp(seed: int, kind: str, d: int = 2, widths=(8, 8), classes: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(d, w), _activation(kind)]
        d = w
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers).to(DT).eval()


def _confirms(model: nn.Module, point: torch.Tensor, label: int) -> bool:
    """A forward pass at ``point`` (1, ...) gives the label a margin <= 0."""
    with torch.no_grad():
        scores = model(point)[0]
    return bool(scores[label] <= torch.cat([scores[:label], scores[label + 1 :]]).max())


def _check_against(model, result, s: int, exact: np.ndarray, label: int) -> None:
    """Sample ``s`` of a result against the exact minima ``exact`` (NaN at the label)."""
    got = result.margins[s].numpy()
    np.testing.assert_allclose(got, exact, atol=EXACT, rtol=0)
    lower = result.lower[s].numpy()
    others = ~np.isnan(exact)
    assert (lower[others] <= exact[others] + EXACT).all()
    assert (lower[others] >= exact[others] - 2 * EXACT).all()
    assert (result.crown[s].numpy()[others] <= exact[others] + 1e-9).all()  # CROWN is sound
    low = float(np.nanmin(exact))
    if low > 10 * EXACT:
        assert result.status[s] == "verified"
    elif low < 0:
        assert result.status[s] == "falsified"
        assert _confirms(model, result.counterexample[s : s + 1], label)


@pytest.mark.parametrize("kind", ["relu", "leaky", "maxmin"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_input_networks_match_their_linear_regions(kind: str, seed: int) -> None:
    model = _mlp(seed, kind)
    x = torch.randn(3, 2, dtype=DT, generator=torch.Generator().manual_seed(seed))
    y = model(x).argmax(1)
    eps = torch.tensor([0.1, 0.4, 1.0], dtype=DT)  # one radius per sample
    result = milp_verify(model, x, y, eps)
    steps = steps_of(model, (2,))
    for s in range(3):
        r = float(eps[s])
        exact = region_minima(steps, x[s].numpy(), np.eye(2), [-r, -r], [r, r], int(y[s]))
        _check_against(model, result, s, exact, int(y[s]))
    # A dense grid never goes below the exact minimum, and reaches it closely.
    g = torch.linspace(-1.0, 1.0, 201, dtype=DT)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        scores = model(x[2] + grid)
    sampled = scores[:, y[2] : y[2] + 1] - scores
    for j in range(3):
        if j != int(y[2]):
            assert float(sampled[:, j].min()) >= float(result.margins[2, j]) - 1e-9


class Residual(nn.Module):
    """lift -> h + relu(W h + b) -> head: not an nn.Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.lift, self.inner, self.head = nn.Linear(2, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lift(x)
        return self.head(h + torch.relu(self.inner(h)))


def test_residual_network_matches_its_linear_regions() -> None:
    torch.manual_seed(3)
    model = Residual().to(DT).eval()
    x = torch.randn(2, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    y = model(x).argmax(1)
    result = milp_verify(model, x, y, 0.8)
    w = lambda m: m.weight.detach().numpy()  # noqa: E731
    b = lambda m: m.bias.detach().numpy()  # noqa: E731
    steps = [
        ("affine", w(model.lift), b(model.lift)),
        ("affine", np.vstack([np.eye(4), w(model.inner)]), np.r_[np.zeros(4), b(model.inner)]),
        ("leaky", 0.0, range(4, 8)),
        ("affine", np.hstack([np.eye(4), np.eye(4)]), np.zeros(4)),
        ("affine", w(model.head), b(model.head)),
    ]  # fmt: skip
    for s in range(2):
        exact = region_minima(steps, x[s].numpy(), np.eye(2), [-0.8] * 2, [0.8] * 2, int(y[s]))
        _check_against(model, result, s, exact, int(y[s]))


def test_five_input_mlp_matches_activation_pattern_lps() -> None:
    model = _mlp(4, "relu", d=5, widths=(6, 5), classes=3)
    x = torch.randn(2, 5, dtype=DT, generator=torch.Generator().manual_seed(4))
    y = model(x).argmax(1)
    eps = 0.15
    result = milp_verify(model, x, y, eps)
    layers = [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in model[::2]]
    for s in range(2):
        xs = x[s].numpy()
        exact = pattern_minima(layers, xs - eps, xs + eps, int(y[s]))
        _check_against(model, result, s, exact, int(y[s]))
    assert int(result.binaries.max()) > 0  # the balls leave ReLUs unstable


def _cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)
    ).to(DT).eval()  # fmt: skip


def test_cnn_on_two_free_pixels_matches_its_linear_regions() -> None:
    # The domain pins every pixel but two to the input: a 2-D problem through conv, ReLU,
    # max pooling (comparators) and a linear head.
    model = _cnn(5)
    x = torch.randn(1, 1, 4, 4, dtype=DT, generator=torch.Generator().manual_seed(5))
    y = model(x).argmax(1)
    free = [(1, 1), (2, 3)]
    lo, hi = x.clone(), x.clone()
    for i, j in free:
        lo[0, 0, i, j], hi[0, 0, i, j] = -math.inf, math.inf
    eps = 1.5
    result = milp_verify(model, x, y, eps, domain=(lo, hi))
    directions = np.zeros((16, 2))
    for k, (i, j) in enumerate(free):
        directions[4 * i + j, k] = 1.0
    steps = steps_of(model, (1, 4, 4))
    exact = region_minima(steps, x.reshape(-1).numpy(), directions, [-eps] * 2, [eps] * 2, int(y))
    _check_against(model, result, 0, exact, int(y))


def test_cnn_over_the_whole_ball_is_sound_and_confirmed() -> None:
    model = _cnn(6)
    x = torch.randn(4, 1, 4, 4, dtype=DT, generator=torch.Generator().manual_seed(6))
    y = model(x).argmax(1)
    eps = torch.tensor([0.02, 0.1, 0.3, 1.0], dtype=DT)
    result = milp_verify(model, x, y, eps)
    assert set(result.status) <= {"verified", "falsified"}
    assert "falsified" in result.status
    gen = torch.Generator().manual_seed(7)
    for s in range(4):
        signs = torch.randint(0, 2, (4000, 1, 4, 4), generator=gen, dtype=DT) * 2 - 1
        uniform = 2 * torch.rand(2000, 1, 4, 4, generator=gen, dtype=DT) - 1
        points = x[s] + eps[s] * torch.cat([signs, uniform])
        with torch.no_grad():
            scores = model(points)
        sampled = (scores[:, y[s] : y[s] + 1] - scores).amin(0)
        solved = ~torch.isnan(result.margins[s])
        assert bool((sampled[solved] >= result.margins[s][solved] - 1e-9).all())
        if result.status[s] == "falsified":
            point = result.counterexample[s : s + 1]
            assert bool(((point - x[s]).abs() <= eps[s]).all())
            assert _confirms(model, point, int(y[s]))
        else:
            assert bool(torch.isnan(result.counterexample[s]).all())


def test_binary_classifier_has_one_margin_column() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 1)).to(DT).eval()
    x = torch.randn(3, 2, dtype=DT, generator=torch.Generator().manual_seed(8))
    labels = (model(x)[:, 0] > 0).long()  # 1 positive, 0 negative
    result = milp_verify(model, x, labels, 0.5)
    assert result.margins.shape == (3, 1)
    # The margin s f is the two-class margin of the scores (f, 0) for the label 1 - label.
    steps = [*steps_of(model, (2,)), ("affine", np.array([[1.0], [0.0]]), np.zeros(2))]
    for s in range(3):
        flip = 1 - int(labels[s])
        exact = region_minima(steps, x[s].numpy(), np.eye(2), [-0.5] * 2, [0.5] * 2, flip)
        np.testing.assert_allclose(result.margins[s, 0].item(), np.nanmin(exact), atol=EXACT)


def test_counterexamples_lie_in_the_ball_and_the_domain() -> None:
    model = _mlp(9, "relu", d=6, widths=(8,), classes=4)
    x = torch.rand(5, 6, dtype=DT, generator=torch.Generator().manual_seed(9))
    y = model(x).argmax(1)
    result = milp_verify(model, x, y, 0.3, domain=(0.0, 1.0))
    assert result.falsified.any()
    for s in torch.nonzero(result.falsified).flatten().tolist():
        point = result.counterexample[s]
        assert bool(((point - x[s]).abs() <= 0.3).all())
        assert bool(((point >= 0) & (point <= 1)).all())
        assert _confirms(model, point[None], int(y[s]))
    # The domain only removes points: every minimum is at least the one over the whole ball.
    free = milp_verify(model, x, y, 0.3)
    solved = ~torch.isnan(free.margins)
    assert bool((result.margins[solved] >= free.margins[solved] - EXACT).all())


def test_deciding_mode_agrees_with_the_exact_minima() -> None:
    model = _mlp(10, "maxmin", d=4, widths=(8, 8), classes=4)
    x = torch.randn(6, 4, dtype=DT, generator=torch.Generator().manual_seed(10))
    y = model(x).argmax(1)
    exact = milp_verify(model, x, y, 0.25)
    fast = milp_verify(model, x, y, 0.25, all_margins=False, tighten=False)
    assert exact.status == fast.status
    assert len(set(exact.status)) == 2  # both answers occur
    solved = ~torch.isnan(fast.margins)
    torch.testing.assert_close(fast.margins[solved], exact.margins[solved], atol=EXACT, rtol=0)
    known = ~torch.isnan(exact.margins)
    assert bool((fast.lower[known] <= exact.margins[known] + EXACT).all())


def test_seeded_cases_are_decided_away_from_zero() -> None:
    cases = verification_cases(8, seed=1)
    assert len(cases) == 8 and {c.status for c in cases} == {"verified", "falsified"}
    for case in cases:
        result = milp_verify(case.model, case.x, case.y, case.eps, domain=case.domain)
        low = float(result.min_margin[0])
        assert result.status[0] == case.status
        assert low > GAP if case.status == "verified" else low < -GAP


def test_margins_within_tol_of_zero_are_not_called_verified() -> None:
    # Scores (x1, x2) at (1, 0): the margin's minimum over the l-infinity ball is 1 - 2 eps.
    model = nn.Linear(2, 2, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x, y = torch.tensor([[1.0, 0.0]], dtype=DT), torch.tensor([0])
    close = milp_verify(model, x, y, 0.5 - 1e-7)  # minimum 2e-7 < tol
    assert close.status == ("unknown",) and "within tol" in close.reason[0]
    assert milp_verify(model, x, y, 0.5 - 1e-7, tol=0.0).status == ("verified",)
    tie = milp_verify(model, x, y, 0.5)  # a tie at the corner (0.5, 0.5) is a counterexample
    assert tie.status == ("falsified",)
    assert _confirms(model, tie.counterexample, 0)


def test_time_limit_gives_unknown() -> None:
    model = _mlp(11, "relu", d=4)
    x = torch.randn(2, 4, dtype=DT, generator=torch.Generator().manual_seed(11))
    result = milp_verify(model, x, model(x).argmax(1), 0.3, time_limit=1e-9)
    assert result.status == ("unknown", "unknown")
    assert all("limit" in r for r in result.reason)
    assert bool(torch.isinf(result.lower[~torch.isnan(result.lower)]).all())


def test_model_and_input_are_left_unchanged() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.ReLU(), nn.Linear(4, 2)).to(DT)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, dtype=DT)
    copy = x.clone()
    milp_verify(model, x, torch.tensor([0, 1]), 0.1)
    assert model.training and torch.equal(x, copy)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"norm": 2}, ValueError, "norm=float\\('inf'\\) only"),
        ({"norm": "l3"}, ValueError, "norm must be"),
        ({"eps": -0.1}, ValueError, "eps must be"),
        ({"y": torch.tensor([0, 1, 2])}, ValueError, "one entry per sample"),
        ({"y": torch.tensor([0, 5])}, ValueError, "out of range|label"),
        ({"y": [0, 1]}, TypeError, "labels must be a torch.Tensor"),
        ({"domain": (0.5, 0.4)}, ValueError, "lo <= hi"),
        ({"domain": (2.0, 3.0)}, ValueError, "lie in the domain"),
        ({"domain": 1.0}, TypeError, "domain must be"),
        ({"domain": (torch.zeros(5), 1.0)}, ValueError, "does not broadcast"),
        ({"time_limit": 0.0}, ValueError, "time_limit"),
        ({"node_limit": -1}, ValueError, "node_limit"),
        ({"tol": -1e-3}, ValueError, "tol"),
        ({"all_margins": 1}, TypeError, "all_margins must be a bool"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match) -> None:
    model = _mlp(12, "relu", d=3, widths=(4,))
    args = {"x": torch.zeros(2, 3, dtype=DT), "y": torch.tensor([0, 1]), "eps": 0.1, **kwargs}
    x, y, eps = args.pop("x"), args.pop("y"), args.pop("eps")
    with pytest.raises(error, match=match):
        milp_verify(model, x, y, eps, **args)


def test_smooth_activation_is_refused_naming_the_node() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    with pytest.raises(InvalidModelError, match=r"node 1 \(Tanh\) is tanh"):
        milp_verify(model, torch.zeros(1, 2, dtype=DT), torch.tensor([0]), 0.1)


def test_float32_model_gets_float32_counterexamples() -> None:
    model = _mlp(13, "relu").float()
    x = torch.randn(2, 2, generator=torch.Generator().manual_seed(13))
    result = milp_verify(model, x, model(x).argmax(1), 2.0)
    assert result.counterexample.dtype == torch.float32
    for s in torch.nonzero(result.falsified).flatten().tolist():
        point = result.counterexample[s]
        assert bool(((point - x[s]).abs() <= 2.0).all())
