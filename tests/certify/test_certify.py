"""Certified radii and accuracy: exact values on linear models, soundness against attacks.

A certificate is checked three ways: against the exact minimal adversarial distance of a
linear classifier (where it must be attained, not only respected), against pgd_l2 at the
certified radius of every certified point of a trained 1-Lipschitz network on digits, and
against random sampling inside the same balls.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lipnets
from lipnets.certify import certified_accuracy, certified_radius
from lipnets.estimators import pgd_l2
from lipnets.functional import margin
from tests.helpers import trained_digits_model


def test_tied_logits_certify_nothing():
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.3, 2.0, 2.0], [5.0, 5.0, 5.0]])
    labels = torch.tensor([0, 1, 2])
    for mode in ("vector", "per_logit"):
        assert certified_radius(logits, labels, 1.0, mode=mode).tolist() == [0.0, 0.0, 0.0]
    weight = torch.randn(3, 4, dtype=torch.float64)
    radius = certified_radius(logits, labels, 1.0, mode="last_layer", last_layer=weight)
    assert radius.tolist() == [0.0, 0.0, 0.0]
    # binary: a zero score is a tie
    assert certified_radius(torch.zeros(2), torch.tensor([1, 0]), 1.0).tolist() == [0.0, 0.0]


def test_misclassified_points_get_radius_zero():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, -1.0, 0.0]])
    radius = certified_radius(logits, torch.tensor([0, 1]), 0.5)
    assert radius.tolist() == [0.0, 0.0]


def test_radius_uses_every_class_not_a_runner_up_picked_in_advance():
    # the second-largest logit is class 1 for the first point, class 3 for the second
    logits = torch.tensor([[4.0, 3.0, -1.0, 0.0], [4.0, 0.0, -1.0, 3.5]])
    radius = certified_radius(logits, torch.tensor([0, 0]), 2.0)
    expected = torch.tensor([1.0, 0.5], dtype=torch.float64) / (math.sqrt(2) * 2.0)
    torch.testing.assert_close(radius, expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("mode", ["vector", "per_logit", "last_layer"])
def test_radius_is_invariant_to_a_constant_added_to_every_logit(mode, f64_tol):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 7, (200,), generator=gen)
    weight = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    extra = {"last_layer": weight} if mode == "last_layer" else {}
    base = certified_radius(logits, labels, 1.3, mode=mode, **extra)
    for shift in (-3.0, 0.25, 100.0):
        shifted = certified_radius(logits + shift, labels, 1.3, mode=mode, **extra)
        f64_tol.assert_close(shifted, base)
    assert bool((base > 0).any()) and bool((base == 0).any())


def test_divisors_vector_per_logit_and_binary():
    logits = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    label = torch.tensor([0])
    assert certified_radius(logits, label, 2.0).item() == pytest.approx(2 / (math.sqrt(2) * 2))
    assert certified_radius(logits, label, 2.0, mode="per_logit").item() == pytest.approx(0.5)
    # binary: margin s * f over L, with 0/1 and -1/+1 labels meaning the same
    scores = torch.tensor([1.5, -0.5, 0.2])
    for labels in (torch.tensor([1, 0, 0]), torch.tensor([1, -1, -1])):
        radius = certified_radius(scores, labels, 0.5)
        torch.testing.assert_close(radius, torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))


def test_linf_radius_is_l2_radius_over_sqrt_dim():
    logits = torch.randn(50, 4, dtype=torch.float64)
    labels = logits.argmax(dim=1)
    l2 = certified_radius(logits, labels, 1.0)
    linf = certified_radius(logits, labels, 1.0, norm=float("inf"), input_dim=16)
    torch.testing.assert_close(linf, l2 / 4)
    assert torch.equal(certified_radius(logits, labels, 1.0, norm="inf", input_dim=16), linf)


def _linear_classifier(seed: int, classes: int = 6, dim: int = 5):
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(dim, classes).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(classes, dim, generator=gen, dtype=torch.float64))
        layer.bias.copy_(torch.randn(classes, generator=gen, dtype=torch.float64))
    x = torch.randn(300, dim, generator=gen, dtype=torch.float64)
    return layer, x


def test_last_layer_radius_is_the_exact_distance_to_the_decision_boundary():
    # f(x) = W x + b, the rest is the identity (L = 1): the radius is attained.
    layer, x = _linear_classifier(1)
    with torch.no_grad():
        logits = layer(x)
    y = logits.argmax(dim=1)
    radius = certified_radius(logits, y, 1.0, mode="last_layer", last_layer=layer)
    w = layer.weight.detach()
    for i in range(x.shape[0]):
        gaps = logits[i, y[i]] - logits[i]
        dirs = w[y[i]] - w
        dist = gaps / dirs.norm(dim=1)
        dist[y[i]] = math.inf
        j = int(dist.argmin())
        assert radius[i].item() == pytest.approx(dist[j].item(), rel=1e-12)
        # a step just past the radius towards class j changes the prediction: not over-stated
        step = dirs[j] / dirs[j].norm() * radius[i] * (1 + 1e-9)
        with torch.no_grad():
            moved = layer(x[i] - step)
        assert moved[j] >= moved[y[i]]
    # the vector radius of the same model (L = sigma_max(W)) is never larger
    sigma = torch.linalg.matrix_norm(w, 2)
    vector = certified_radius(logits, y, sigma)
    assert bool((vector <= radius * (1 + 1e-12)).all())
    assert bool((vector < radius * 0.99).any())


def test_last_layer_never_below_vector_for_a_bjorck_head():
    torch.manual_seed(0)
    model = nn.Sequential(
        lipnets.BjorckLinear(12, 16), lipnets.GroupSort(2), nn.Linear(16, 16),
        lipnets.MaxMin(), lipnets.BjorckLinear(16, 5),
    ).eval()  # fmt: skip
    x = torch.randn(400, 12)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(dim=1)
    y[::7] = torch.randint(0, 5, (y[::7].shape[0],))  # some misclassified points
    whole = lipnets.lipschitz_bound(model, input_shape=(1, 12))
    rest = lipnets.lipschitz_bound(model[:-1], input_shape=(1, 12))
    vector = certified_radius(logits, y, whole)
    last = certified_radius(logits, y, rest, mode="last_layer", last_layer=model[-1])
    assert bool((last >= vector).all())
    assert bool((vector > 0).sum() > 200)
    acc_vector = certified_accuracy(model, x, y, [0.0, 0.05, 0.2])
    acc_last = certified_accuracy(model, x, y, [0.0, 0.05, 0.2], mode="last_layer")
    assert all(acc_last[e] >= acc_vector[e] for e in acc_vector)


def test_per_logit_bound_is_not_treated_as_a_vector_bound():
    # Each logit of x -> (x1, -x1) is 1-Lipschitz, the map as a vector is sqrt(2)-Lipschitz:
    # the per-logit radius (margin / 2L with L = 1) is exact, the vector formula would not be.
    w = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)  # rows of norm 1
    x = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    logits = x @ w.T
    radius = certified_radius(logits, torch.tensor([0]), 1.0, mode="per_logit")
    assert radius.item() == pytest.approx(0.5)  # exact: x1 = 0 is the boundary
    # treating the per-logit constant 1 as a vector constant would certify sqrt(2)/2 > 0.5
    assert certified_radius(logits, torch.tensor([0]), 1.0).item() > 0.5


def test_certified_accuracy_computes_the_bound_and_never_assumes_one():
    layer, x = _linear_classifier(2, classes=4, dim=6)
    with torch.no_grad():
        layer.weight.mul_(3.0)
        y = layer(x).argmax(dim=1)
    sigma = torch.linalg.matrix_norm(layer.weight.detach(), 2)
    eps = [0.0, 0.05, 0.1, 0.3]
    computed = certified_accuracy(layer, x, y, eps)
    given = certified_accuracy(layer, x, y, eps, lipschitz=float(sigma))
    assumed_one = certified_accuracy(layer, x, y, eps, lipschitz=1.0)
    assert computed == pytest.approx(given)
    assert computed[0.0] == 1.0
    assert all(computed[e] <= assumed_one[e] for e in eps)
    assert any(computed[e] < assumed_one[e] for e in eps)
    with torch.no_grad():
        radius = certified_radius(layer(x), y, sigma)
    assert computed[0.1] == pytest.approx(float((radius > 0.1).double().mean()))


def test_certified_accuracy_refuses_a_model_without_a_bound():
    model = nn.Sequential(nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 3))
    with pytest.raises(lipnets.UnboundedModuleError, match="Softplus"):
        certified_accuracy(model, torch.randn(8, 4), torch.zeros(8, dtype=torch.long), 0.1)


def test_certified_accuracy_on_a_dataloader_matches_tensors_and_restores_mode():
    torch.manual_seed(3)
    model = nn.Sequential(lipnets.BjorckLinear(6, 8), nn.BatchNorm1d(8), lipnets.MaxMin(),
                          nn.Dropout(0.5), nn.Linear(8, 3))  # fmt: skip
    model[1].running_var.uniform_(0.5, 2.0)
    model.train()
    x, y = torch.randn(103, 6), torch.randint(0, 3, (103,))
    eps = (0.0, 0.01, 0.1)
    direct = certified_accuracy(model, x, y, eps, batch_size=10)
    loader = DataLoader(TensorDataset(x, y), batch_size=17)
    assert certified_accuracy(model, loader, eps=eps) == pytest.approx(direct)
    assert all(m.training for m in model.modules())
    # the eval-mode function and bound were used (dropout off, running statistics)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    radius = certified_radius(logits, y, lipnets.lipschitz_bound(model, (1, 6)))
    assert direct[0.01] == pytest.approx(float((radius > 0.01).double().mean()))
    assert direct[0.0] == pytest.approx(float((logits.argmax(1) == y).double().mean()))


def test_bad_inputs_get_clear_errors():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="one entry per sample"):
        certified_radius(logits, labels[:3], 1.0)
    with pytest.raises(ValueError, match="out of range"):
        certified_radius(logits, torch.tensor([0, 1, 3, 0]), 1.0)
    with pytest.raises(ValueError, match="out of range"):
        certified_radius(logits, torch.tensor([0, -1, 2, 0]), 1.0)
    with pytest.raises(ValueError, match="positive"):
        certified_radius(logits, labels, 0.0)
    with pytest.raises(ValueError, match="positive"):
        certified_radius(logits, labels, float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        certified_radius(torch.full((4, 3), float("nan")), labels, 1.0)
    with pytest.raises(ValueError, match="mode"):
        certified_radius(logits, labels, 1.0, mode="pairwise")
    with pytest.raises(ValueError, match="norm"):
        certified_radius(logits, labels, 1.0, norm=1)
    with pytest.raises(ValueError, match="input_dim"):
        certified_radius(logits, labels, 1.0, norm=float("inf"))
    with pytest.raises(TypeError, match="last_layer"):
        certified_radius(logits, labels, 1.0, mode="last_layer")
    with pytest.raises(ValueError, match="4 outputs"):
        certified_radius(logits, labels, 1.0, mode="last_layer", last_layer=torch.randn(4, 2))
    with pytest.raises(ValueError, match="mix 0 and -1"):
        certified_radius(torch.randn(3), torch.tensor([1, 0, -1]), 1.0)
    model = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        certified_accuracy(model, x, labels, -0.1)
    with pytest.raises(ValueError, match="same length"):
        certified_accuracy(model, x, labels[:2], 0.1)
    with pytest.raises(ValueError, match="labels are required"):
        certified_accuracy(model, x, eps=0.1)
    # The last layer is found in the traced graph: the output must be a trusted nn.Linear's.
    with pytest.raises(ValueError, match=r"final nn\.Linear"):
        certified_accuracy(nn.Sequential(model, nn.ReLU()), x, labels, 0.1, mode="last_layer")
    hooked = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3))
    hooked[2].register_forward_hook(lambda m, i, o: 5 * o)
    with pytest.raises(lipnets.errors.UnboundedModuleError, match="hooks"):
        certified_accuracy(hooked, x, labels, 0.1, mode="last_layer")
    with pytest.raises(lipnets.errors.UnboundedModuleError, match="hook"):
        certified_radius(logits, labels, 1.0, mode="last_layer", last_layer=hooked[2])
    with pytest.raises(ValueError, match="empty"):
        certified_accuracy(model, x[:0], labels[:0], 0.1)


# -- a trained 1-Lipschitz network on digits: certificates against attacks and sampling --


@pytest.fixture(scope="module")
def digits_model():
    """BjorckLinear/GroupSort(2), hinge margin 0.5, 900 training digits (897 held out)."""
    return trained_digits_model(lambda: lipnets.GroupSort(2), margin=0.5, train_size=900)


def test_pgd_never_breaks_a_certified_point_on_digits(digits_model):
    model, x, y = digits_model
    bound = lipnets.lipschitz_bound(model, input_shape=(1, 64))
    assert 0.99 < float(bound) < 1.01  # the realised Björck weights, measured
    with torch.no_grad():
        radius = certified_radius(model(x), y, bound)
    certified = radius > 0
    assert int(certified.sum()) >= 500
    xc, yc, rc = x[certified], y[certified], radius[certified]
    gen = torch.Generator().manual_seed(0)
    adv = pgd_l2(model, xc, yc, rc, steps=50, restarts=4, generator=gen)
    assert bool(((adv - xc).flatten(1).norm(dim=1) <= rc * (1 + 1e-9)).all())
    with torch.no_grad():
        adv_margin = margin(model(adv), yc)
    assert bool((adv_margin > 0).all()), "an attack broke a certified point"
    # the certificates are nearly tight and the attack is not a no-op: at twice the
    # radius it breaks almost every one of these points (measured: all of them)
    far = pgd_l2(model, xc, yc, 2 * rc, steps=50, restarts=1, generator=gen)
    with torch.no_grad():
        broken = margin(model(far), yc) <= 0
    assert float(broken.double().mean()) > 0.9


def test_random_sampling_in_certified_balls_agrees(digits_model):
    model, x, y = digits_model
    bound = lipnets.lipschitz_bound(model, input_shape=(1, 64))
    with torch.no_grad():
        logits = model(x)
    radius = certified_radius(logits, y, bound)
    linf = certified_radius(logits, y, bound, norm=float("inf"), input_dim=64)
    keep = radius > 0
    xc, yc, rc, lc = x[keep], y[keep], radius[keep], linf[keep]
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        direction = torch.randn(xc.shape, generator=gen, dtype=torch.float64)
        direction = direction / direction.norm(dim=1, keepdim=True)
        scale = torch.rand(xc.shape[0], 1, generator=gen, dtype=torch.float64)
        for points in (xc + direction * rc[:, None], xc + direction * rc[:, None] * scale):
            with torch.no_grad():
                assert bool((margin(model(points), yc) > 0).all())
        corners = torch.randint(0, 2, xc.shape, generator=gen).double() * 2 - 1
        with torch.no_grad():
            assert bool((margin(model(xc + corners * lc[:, None]), yc) > 0).all())


def test_certified_accuracy_bounds_each_input_size_separately():
    # a circular convolution's norm depends on the input size: each size gets its own bound
    torch.manual_seed(4)
    conv = nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular", bias=False)
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    small, large = torch.randn(16, 1, 4, 4), torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        ys, yl = model(small).argmax(1), model(large).argmax(1)
    eps = [0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    one = certified_accuracy(model, small, ys, eps)
    two = certified_accuracy(model, large, yl, eps)
    both = certified_accuracy(model, [(small, ys), (large, yl)], eps=eps)
    assert both == pytest.approx({e: (one[e] + two[e]) / 2 for e in eps})
    # the check is sensitive: the 4x4 bound on the 8x8 inputs gives other numbers
    bound_4 = lipnets.lipschitz_bound(model, input_shape=(1, 1, 4, 4))
    assert certified_accuracy(model, large, yl, eps, lipschitz=bound_4) != two
