"""Tests for `lipnets.estimators.pgd_l2`: strength on known answers, the ball, hygiene.

Strength is checked against truths, not golden numbers: the exact minimal
margin of an affine classifier over an l2 ball (closed form), exhaustive-ish
random sampling of the ball of a small 2-D network, and certified radii that
no attack may cross (Note [PGD points stay in the ball], Note [PGD step
schedule] in lipnets/estimators/attack.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lipnets
from lipnets.estimators import pgd_l2
from lipnets.functional import margin
from tests.helpers import gnp_mlp


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _norms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample l2 norms over every non-batch dimension, in float64."""
    return t.detach().double().flatten(1).norm(dim=1)


def _margin_at(model, x_adv, y) -> torch.Tensor:
    with torch.no_grad():
        return margin(model(x_adv), y)


def _affine(d: int, c: int, seed: int) -> nn.Linear:
    g = _gen(seed)
    model = nn.Linear(d, c).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(c, d, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    return model


def _exact_affine(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor | None):
    """For f(x) = W x + b: d* = min_j m_j / ||w_y - w_j|| and min over the eps-ball of the margin.

    The margin over the ball is min_j (m_j - <w_y - w_j, delta>), minimised by
    delta = eps (w_y - w_j) / ||w_y - w_j|| for each j: min_j (m_j - eps ||w_y - w_j||).
    """
    with torch.no_grad():
        f = model(x)
        m = f.gather(1, y[:, None]) - f  # (N, C): m_j = f_y - f_j
        gaps = (model.weight[y][:, None, :] - model.weight[None, :, :]).norm(dim=2)
        own = torch.nn.functional.one_hot(y, f.shape[1]).bool()
        d_star = (m / gaps).masked_fill(own, math.inf).amin(dim=1)
        if eps is None:
            return d_star, None
        lowest = (m - eps[:, None] * gaps).masked_fill(own, math.inf).amin(dim=1)
        return d_star, lowest


def _affine_problem(seed: int = 0):
    """A random 5-class affine classifier on R^10; 30 of 40 points correctly classified."""
    model = _affine(10, 5, seed)
    g = _gen(seed + 1)
    x = torch.randn(40, 10, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    y[30:] = (y[30:] + 1 + torch.randint(0, 4, (10,), generator=g)) % 5  # wrong labels
    return model, x, y


def test_affine_flips_just_beyond_the_exact_distance_and_reaches_the_exact_minimum():
    model, x, y = _affine_problem()
    d_star, _ = _exact_affine(model, x, y, None)
    correct = d_star > 0
    assert int(correct.sum()) == 30
    eps = torch.where(correct, 1.02 * d_star, torch.full_like(d_star, 0.3))
    _, lowest = _exact_affine(model, x, y, eps)
    x_adv = pgd_l2(model, x, y, eps, generator=_gen())
    reached = _margin_at(model, x_adv, y)
    assert bool((reached < 0).all())  # every correct point flips, the wrong ones stay wrong
    # The attack reaches the exact minimum and never goes below it (it stays in the ball).
    assert torch.allclose(reached, lowest, rtol=1e-7, atol=1e-9)
    assert bool((reached >= lowest - 1e-9).all())


def test_affine_flips_nothing_short_of_the_exact_distance():
    model, x, y = _affine_problem()
    d_star, _ = _exact_affine(model, x, y, None)
    correct = d_star > 0
    eps = torch.where(correct, 0.98 * d_star, torch.zeros_like(d_star))
    _, lowest = _exact_affine(model, x, y, eps)
    reached = _margin_at(model, pgd_l2(model, x, y, eps, generator=_gen()), y)
    assert bool((reached[correct] > 0).all())
    assert bool((reached >= lowest - 1e-9).all())
    assert torch.allclose(reached, lowest, rtol=1e-7, atol=1e-9)


def _sampled_minimum(model, x, y, eps: float, samples: int, g: torch.Generator) -> torch.Tensor:
    """Lowest margin over `samples` random points per ball: half inside, half on the sphere."""
    lowest = []
    with torch.no_grad():
        for xi, yi in zip(x, y, strict=True):
            u = torch.randn(samples, x.shape[1], generator=g, dtype=x.dtype)
            u = u / u.norm(dim=1, keepdim=True)
            r = torch.rand(samples, 1, generator=g, dtype=x.dtype) ** (1 / x.shape[1])
            r[samples // 2 :] = 1.0
            points = xi + eps * r * u
            lowest.append(margin(model(points), yi.expand(samples)).min())
    return torch.stack(lowest)


@pytest.mark.parametrize("activation", ["relu", "groupsort"])
def test_nonlinear_beats_dense_random_sampling_of_the_ball(activation):
    torch.manual_seed(0)

    def act() -> nn.Module:
        return nn.ReLU() if activation == "relu" else lipnets.GroupSort(2)

    model = nn.Sequential(nn.Linear(2, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 3))
    model = model.double()
    g = _gen(1)
    x = torch.randn(20, 2, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    eps = 0.5
    sampled = _sampled_minimum(model, x, y, eps, 20_000, g)
    x_adv = pgd_l2(model, x, y, eps, generator=_gen(2))
    reached = _margin_at(model, x_adv, y)
    assert bool((_norms(x_adv - x) <= eps).all())
    assert bool((reached <= sampled).all()), (reached - sampled).max()
    assert bool((sampled < 0).any()) and bool((sampled > 0).any())  # a non-trivial case


def test_no_flip_inside_certified_radii_of_a_lipschitz_network():
    # A gradient-norm-preserving network: margin / (sqrt(2) L) is a certified radius.
    torch.manual_seed(0)
    model = gnp_mlp(16)
    x = torch.randn(32, 16, generator=_gen(1))
    with torch.no_grad():
        scores = model(x)
    y = scores.argmax(dim=1)
    bound = float(lipnets.lipschitz_bound(model))
    radius = margin(scores, y) / (math.sqrt(2) * bound)
    kw = {"restarts": 4, "generator": _gen()}
    inside = _margin_at(model, pgd_l2(model, x, y, 0.999 * radius, **kw), y)
    assert bool((inside > 0).all())
    # ... and the attack is not vacuous: a few radii out, labels flip.
    outside = _margin_at(model, pgd_l2(model, x, y, 3 * radius, **kw), y)
    assert bool((outside < 0).any())
    assert bool((outside < inside).all())


def test_per_sample_radii_are_respected_on_image_shaped_inputs():
    # [B, 1, H, W] inputs: norms over all non-batch dims (PITFALLS row 16).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    x = torch.randn(6, 1, 4, 4, generator=_gen(1))
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    eps = torch.tensor([0.0, 0.1, 0.5, 1.0, 0.0, 2.0])
    x_adv = pgd_l2(model, x, y, eps, steps=8, restarts=2, generator=_gen())
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    dist = _norms(x_adv - x)
    assert bool((dist <= eps.double() * (1 + 1e-6)).all()), dist
    assert torch.equal(x_adv[0], x[0]) and torch.equal(x_adv[4], x[4])
    assert bool((dist[[2, 3, 5]] > 0.9 * eps[[2, 3, 5]]).all())  # the search does use the ball
    assert torch.equal(pgd_l2(model, x, y, 0.0, steps=2, restarts=2), x)


def test_deterministic_and_hygienic():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)
    )
    model.train()
    model[1].eval()  # mixed modes must come back exactly
    modes = [m.training for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(10, 4, generator=_gen(1)).requires_grad_()
    x_copy = x.detach().clone()
    y = torch.randint(0, 3, (10,), generator=_gen(2))
    first = pgd_l2(model, x, y, 0.7, steps=6, restarts=3, generator=_gen(5))
    second = pgd_l2(model, x, y, 0.7, steps=6, restarts=3, generator=_gen(5))
    assert torch.equal(first, second)
    assert not first.requires_grad and first.grad_fn is None
    assert torch.equal(x.detach(), x_copy) and x.grad is None
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k


def test_parametrized_model_gets_no_gradients_and_keeps_working():
    torch.manual_seed(0)
    model = gnp_mlp(8)
    x = torch.randn(5, 8, generator=_gen(1))
    y = torch.arange(5)
    x_adv = pgd_l2(model, x, y, 0.5, steps=10, restarts=2, generator=_gen())
    assert all(p.grad is None for p in model.parameters())
    assert bool((_norms(x_adv - x) <= 0.5 * (1 + 1e-6)).all())
    assert model.training  # restored


def test_binary_model_with_one_score_per_sample():
    g = _gen(3)
    w = torch.randn(6, generator=g, dtype=torch.float64)
    model = nn.Linear(6, 1).double()
    with torch.no_grad():
        model.weight.copy_(w[None])
        model.bias.fill_(0.3)
    x = torch.randn(25, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        f = model(x)[:, 0]
    y01 = (f > 0).long()
    d_star = f.abs() / w.norm()  # exact distance to the decision boundary
    kw = {"steps": 50, "restarts": 2}

    def attack(fn, labels, eps):
        return pgd_l2(fn, x, labels, eps, generator=_gen(), **kw)

    flipped = attack(model, y01, 1.02 * d_star)
    assert bool((_margin_at(model, flipped, y01) < 0).all())
    assert bool((_margin_at(model, attack(model, y01, 0.98 * d_star), y01) > 0).all())
    # ±1 labels mean the same as 0/1; a (N,) output works like (N, 1).
    assert torch.equal(attack(model, 2 * y01 - 1, 1.02 * d_star), flipped)
    assert torch.equal(attack(lambda t: model(t)[:, 0], y01, 1.02 * d_star), flipped)


def test_one_hot_labels_match_class_indices():
    model, x, y = _affine_problem()
    one_hot = torch.nn.functional.one_hot(y, 5)
    a = pgd_l2(model, x, y, 0.4, steps=20, restarts=3, generator=_gen())
    b = pgd_l2(model, x, one_hot, 0.4, steps=20, restarts=3, generator=_gen())
    assert torch.equal(a, b)


def test_progress_bar(capsys):
    pytest.importorskip("tqdm")
    model, x, y = _affine_problem()
    pgd_l2(model, x, y, 0.1, steps=2, restarts=3, progress=True)
    assert "pgd_l2" in capsys.readouterr().err


def _small():
    return nn.Linear(3, 2), torch.randn(4, 3, generator=_gen()), torch.tensor([0, 1, 0, 1])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eps": -0.1}, ValueError, "eps must be >= 0"),
        ({"eps": torch.tensor([0.1, -1.0, 0.1, 0.1])}, ValueError, "eps must be >= 0"),
        ({"eps": float("nan")}, ValueError, "eps must be finite"),
        ({"eps": math.inf}, ValueError, "eps must be finite"),
        ({"eps": torch.ones(5)}, ValueError, r"shape \(4,\)"),
        ({"eps": "0.1"}, TypeError, "eps must be a number or a tensor"),
        ({"steps": 0}, ValueError, "steps must be an int >= 1, got 0"),
        ({"steps": 2.5}, ValueError, "steps must be an int >= 1"),
        ({"restarts": 0}, ValueError, "restarts must be an int >= 1, got 0"),
        ({"step_size": 0.0}, ValueError, "step_size must be a finite number > 0"),
        ({"y": torch.tensor([0, 1, 0])}, ValueError, "labels must have one entry per sample"),
        ({"y": torch.tensor([0, 1, 2, 0])}, ValueError, "out of range"),
        ({"x": torch.ones(4, 3, dtype=torch.long)}, TypeError, "x must be a floating-point"),
        ({"x": torch.ones(4)}, ValueError, "batch dimension"),
        ({"generator": 0}, TypeError, "generator must be a torch.Generator"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model, x, y = _small()
    args = {"x": x, "y": y, "eps": 0.1} | kwargs
    with pytest.raises(error, match=match):
        pgd_l2(model, args.pop("x"), args.pop("y"), args.pop("eps"), **args)


def test_bad_models():
    _, x, y = _small()
    with pytest.raises(TypeError, match=r"model must be an nn\.Module or a callable"):
        pgd_l2("model", x, y, 0.1)
    with pytest.raises(ValueError, match="N inputs to N outputs"):
        pgd_l2(lambda t: torch.zeros(2, 2), x, y, 0.1)
    with pytest.raises(TypeError, match="floating-point scores"):
        pgd_l2(lambda t: t.long(), x, y, 0.1)

    def detached(t: torch.Tensor) -> torch.Tensor:
        return t[:, :2].detach()

    with pytest.raises(RuntimeError, match="does not depend on its input"):
        pgd_l2(detached, x, y, 0.1)
