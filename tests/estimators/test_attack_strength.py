"""pgd_l2 against known answers: the exact decision-boundary distance of linear classifiers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lipnets.estimators import pgd_l2
from lipnets.functional import margin


def _linear(seed: int, classes: int = 5, dim: int = 10):
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(dim, classes).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(classes, dim, generator=gen, dtype=torch.float64))
        layer.bias.copy_(torch.randn(classes, generator=gen, dtype=torch.float64))
    x = torch.randn(200, dim, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x).argmax(dim=1)
    return layer, x, y


def _exact_distance(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """min over j != y of (f_y - f_j) / ||w_y - w_j||: the distance to the decision boundary."""
    with torch.no_grad():
        logits = layer(x)
    w = layer.weight.detach()
    gaps = logits.gather(1, y[:, None]) - logits
    norms = (w[y][:, None, :] - w[None]).norm(dim=2)
    dist = gaps / torch.where(norms > 0, norms, 1.0)
    return dist.scatter(1, y[:, None], math.inf).amin(dim=1)


@pytest.mark.parametrize("seed", [0, 1])
def test_finds_every_boundary_just_past_the_exact_distance(seed):
    layer, x, y = _linear(seed)
    d = _exact_distance(layer, x, y)
    gen = torch.Generator().manual_seed(seed)
    adv = pgd_l2(layer, x, y, 1.02 * d, steps=50, restarts=5, generator=gen)
    with torch.no_grad():
        assert bool((margin(layer(adv), y) < 0).all())
    assert bool(((adv - x).norm(dim=1) <= 1.02 * d * (1 + 1e-12)).all())
    # just inside the exact distance nothing can flip (a check of the check)
    inside = pgd_l2(layer, x, y, 0.98 * d, steps=50, restarts=2, generator=gen)
    with torch.no_grad():
        assert bool((margin(layer(inside), y) > 0).all())


def test_per_sample_radii_deterministic_and_side_effect_free():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double().train()
    x = torch.randn(20, 6, dtype=torch.float64)
    x_copy = x.clone()
    y = torch.randint(0, 3, (20,))
    eps = torch.linspace(0, 1, 20, dtype=torch.float64)
    a = pgd_l2(model, x, y, eps, steps=10, restarts=3, generator=torch.Generator().manual_seed(5))
    b = pgd_l2(model, x, y, eps, steps=10, restarts=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(x, x_copy)
    assert torch.equal(a[0], x[0])  # radius 0 keeps the input
    assert bool(((a - x).norm(dim=1) <= eps * (1 + 1e-9) + 1e-15).all())
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_binary_and_one_hot_labels():
    torch.manual_seed(1)
    model = nn.Linear(4, 1).double()
    x = torch.randn(30, 4, dtype=torch.float64)
    with torch.no_grad():
        scores = model(x)[:, 0]
    y = (scores > 0).long()
    dist = scores.abs() / model.weight.detach().norm()
    adv = pgd_l2(model, x, y, 1.01 * dist, steps=30, restarts=1)
    with torch.no_grad():
        assert bool((margin(model(adv), y) < 0).all())
    layer, x5, y5 = _linear(2)
    one_hot = torch.eye(5)[y5]
    gen = torch.Generator().manual_seed(0)
    a = pgd_l2(layer, x5, one_hot, 0.3, steps=10, restarts=2, generator=gen)
    b = pgd_l2(layer, x5, y5, 0.3, steps=10, restarts=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_bad_input_gets_clear_errors():
    layer, x, y = _linear(3)
    with pytest.raises(ValueError, match="eps"):
        pgd_l2(layer, x, y, -0.1)
    with pytest.raises(ValueError, match="eps"):
        pgd_l2(layer, x, y, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="steps"):
        pgd_l2(layer, x, y, 0.1, steps=0)
    with pytest.raises(ValueError, match="one entry per sample"):
        pgd_l2(layer, x, y[:5], 0.1)
