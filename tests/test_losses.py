"""Losses: per-sample independence, label conventions, values against formulas, W1 estimates.

Truths used: a per-sample value is the value of that sample alone (PITFALLS
row 22); the hinge and Lipschitz cross-entropy against formulas written out
independently; a KR-trained 1-Lipschitz critic against the exact 1-D
Wasserstein distance of scipy (and random critics against POT's exact
transport cost in 2-D), which it may approach but never exceed.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipnets
from lipnets.losses import (
    HKRLoss,
    KRLoss,
    LipschitzCrossEntropyLoss,
    MulticlassHingeLoss,
    wasserstein_estimate,
)

LOSSES = {
    "hinge": lambda reduction: MulticlassHingeLoss(margin=0.7, reduction=reduction),
    "kr": lambda reduction: KRLoss(reduction=reduction, positive_fraction=0.3),
    "hkr": lambda reduction: HKRLoss(alpha=5.0, margin=0.7, reduction=reduction),
    "lce": lambda reduction: LipschitzCrossEntropyLoss(reduction=reduction),
}
BINARY_LOSSES = ("hinge", "kr", "hkr")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _multiclass(n: int = 23, c: int = 5, seed: int = 0, dtype=torch.float64):
    g = _gen(seed)
    return torch.randn(n, c, generator=g, dtype=dtype), torch.randint(0, c, (n,), generator=g)


def _binary(n: int = 23, seed: int = 0, dtype=torch.float64):
    g = _gen(seed)
    return torch.randn(n, generator=g, dtype=dtype), torch.randint(0, 2, (n,), generator=g)


def _cases():
    for name in LOSSES:
        yield name, "multiclass"
        if name in BINARY_LOSSES:
            yield name, "binary"


def _data(kind: str, **kwargs):
    return _multiclass(**kwargs) if kind == "multiclass" else _binary(**kwargs)


# ------------------------------------------------------- per-sample values, reductions


@pytest.mark.parametrize(("name", "kind"), list(_cases()))
def test_none_is_each_sample_alone_and_reductions_agree(name: str, kind: str) -> None:
    scores, labels = _data(kind)
    per_sample = LOSSES[name]("none")(scores, labels)
    assert per_sample.shape == (scores.shape[0],)
    assert per_sample.dtype == scores.dtype
    alone = torch.stack(
        [LOSSES[name]("none")(scores[i : i + 1], labels[i : i + 1])[0] for i in range(len(labels))]
    )
    torch.testing.assert_close(per_sample, alone, rtol=0, atol=0)
    torch.testing.assert_close(LOSSES[name]("mean")(scores, labels), per_sample.mean())
    torch.testing.assert_close(LOSSES[name]("sum")(scores, labels), per_sample.sum())
    assert LOSSES[name]("mean")(scores, labels).ndim == 0


@pytest.mark.parametrize(("name", "kind"), list(_cases()))
def test_batch_split_invariance(name: str, kind: str) -> None:
    scores, labels = _data(kind, n=41, seed=3)
    g = _gen(7)
    order = torch.randperm(len(labels), generator=g)
    cuts = sorted(torch.randperm(len(labels) - 1, generator=g)[:4].add(1).tolist())
    chunks = [order[a:b] for a, b in zip([0, *cuts], [*cuts, len(labels)], strict=True)]
    mean, total = LOSSES[name]("mean"), LOSSES[name]("sum")
    weighted = sum(len(i) * mean(scores[i], labels[i]) for i in chunks) / len(labels)
    torch.testing.assert_close(weighted, mean(scores, labels))
    torch.testing.assert_close(
        sum(total(scores[i], labels[i]) for i in chunks), total(scores, labels)
    )


@pytest.mark.parametrize(("name", "kind"), list(_cases()))
def test_dtype_kept(name: str, kind: str, dtype: torch.dtype) -> None:
    scores, labels = _data(kind, dtype=dtype)
    for reduction in ("none", "mean", "sum"):
        assert LOSSES[name](reduction)(scores, labels).dtype == dtype


# ------------------------------------------------------- label conventions


@pytest.mark.parametrize("name", BINARY_LOSSES)
def test_binary_label_conventions_agree(name: str) -> None:
    scores, labels01 = _binary(n=17, seed=1)
    loss = LOSSES[name]("none")
    reference = loss(scores, labels01)
    pm1 = labels01 * 2 - 1
    for labels in (
        pm1,
        labels01.bool(),
        labels01.double(),
        pm1.float(),
        labels01[:, None],
        pm1[:, None],
    ):
        torch.testing.assert_close(loss(scores, labels), reference, rtol=0, atol=0)
        torch.testing.assert_close(loss(scores[:, None], labels), reference, rtol=0, atol=0)


@pytest.mark.parametrize("name", BINARY_LOSSES)
def test_binary_mixed_zero_and_minus_one_refused(name: str) -> None:
    scores = torch.tensor([0.5, -1.0, 2.0])
    with pytest.raises(ValueError, match="mix 0 and -1"):
        LOSSES[name]("mean")(scores, torch.tensor([1, 0, -1]))
    with pytest.raises(ValueError, match="1 \\(positive\\) or 0 / -1"):
        LOSSES[name]("mean")(scores, torch.tensor([1, 2, 0]))


@pytest.mark.parametrize("name", list(LOSSES))
def test_multiclass_indices_and_one_hot_agree(name: str) -> None:
    scores, indices = _multiclass(n=19, c=4, seed=2)
    loss = LOSSES[name]("none")
    reference = loss(scores, indices)
    onehot = F.one_hot(indices, 4)
    for labels in (onehot, onehot.float(), onehot * 2 - 1, indices.double(), indices.int()):
        torch.testing.assert_close(loss(scores, labels), reference, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(LOSSES))
def test_bad_one_hot_refused(name: str) -> None:
    scores = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="exactly one 1 per row"):
        LOSSES[name]("mean")(scores, torch.tensor([[1, 1, 0], [0, 0, 1]]))


# ------------------------------------------------------- values against formulas


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_hinge_zero_exactly_when_margin_reaches_mu(mu: float) -> None:
    # Dyadic numbers, so every margin and every loss value is exact in float32.
    margins = torch.tensor([-1.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 2.0, 3.5])
    others = torch.tensor([0.5, -1.0, 0.25])  # best other class: 0.5
    scores = torch.cat([others.expand(len(margins), 3), (0.5 + margins)[:, None]], dim=1)
    labels = torch.full((len(margins),), 3)
    loss = MulticlassHingeLoss(margin=mu, reduction="none")
    values = loss(scores, labels)
    assert torch.equal(values == 0, margins >= mu)
    assert torch.equal(values, (mu - margins).clamp(min=0))
    # Binary: the margin is s * f.
    signs = torch.where(torch.arange(len(margins)) % 2 == 0, 1.0, -1.0)
    binary = loss(signs * margins, (signs > 0).long())
    assert torch.equal(binary == 0, margins >= mu)
    assert torch.equal(binary, (mu - margins).clamp(min=0))


def test_hinge_is_worst_pairwise_hinge() -> None:
    """Crammer–Singer: the hinge against the best other class is the worst pairwise hinge."""
    scores, labels = _multiclass(n=30, c=6, seed=4)
    values = MulticlassHingeLoss(margin=0.8, reduction="none")(scores, labels)
    for i in range(len(labels)):
        y = int(labels[i])
        pairwise = [max(0.0, 0.8 - float(scores[i, y] - scores[i, j])) for j in range(6) if j != y]
        assert float(values[i]) == pytest.approx(max(pairwise), abs=1e-12)


def _lce_written_out(scores: torch.Tensor, labels: torch.Tensor, offset: float, t: float):
    out = []
    for row, y in zip(scores.tolist(), labels.tolist(), strict=True):
        z = [(f - (offset if j == y else 0.0)) / t for j, f in enumerate(row)]
        top = max(z)
        lse = top + math.log(sum(math.exp(v - top) for v in z))
        out.append(t * (lse - z[y]))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(("offset", "temperature"), [(math.sqrt(2), 0.25), (0.5, 2.0), (3.0, 0.05)])
def test_lipschitz_cross_entropy_matches_formula(offset: float, temperature: float) -> None:
    scores, labels = _multiclass(n=25, c=7, seed=5)
    loss = LipschitzCrossEntropyLoss(offset=offset, temperature=temperature, reduction="none")
    torch.testing.assert_close(
        loss(scores, labels), _lce_written_out(scores, labels, offset, temperature)
    )


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_lipschitz_cross_entropy_plain_is_cross_entropy(reduction: str, dtype: torch.dtype) -> None:
    scores, labels = _multiclass(n=13, c=4, seed=6, dtype=dtype)
    plain = LipschitzCrossEntropyLoss(offset=0.0, temperature=1.0, reduction=reduction)
    torch.testing.assert_close(
        plain(scores, labels), F.cross_entropy(scores, labels, reduction=reduction)
    )


def test_lipschitz_cross_entropy_refuses_binary_scores() -> None:
    with pytest.raises(ValueError, match="multiclass scores of shape \\(N, C\\)"):
        LipschitzCrossEntropyLoss()(torch.zeros(4), torch.tensor([0, 1, 1, 0]))
    with pytest.raises(ValueError, match="multiclass scores"):
        LipschitzCrossEntropyLoss()(torch.zeros(4, 1), torch.tensor([0, 1, 1, 0]))


@pytest.mark.parametrize("p", [0.5, 0.25, 0.8])
def test_kr_binary_mean_is_dual_objective_at_matching_share(p: float) -> None:
    n_pos = round(20 * p)
    g = _gen(8)
    scores = torch.randn(20, generator=g, dtype=torch.float64)
    labels = torch.zeros(20, dtype=torch.long)
    labels[torch.randperm(20, generator=g)[:n_pos]] = 1
    value = KRLoss(positive_fraction=p)(scores, labels)
    expected = scores[labels == 0].mean() - scores[labels == 1].mean()
    torch.testing.assert_close(value, expected)
    per_sample = KRLoss(positive_fraction=p, reduction="none")(scores, labels)
    torch.testing.assert_close(per_sample[labels == 1], -scores[labels == 1] / p)
    torch.testing.assert_close(per_sample[labels == 0], scores[labels == 0] / (1 - p))


def test_kr_multiclass_is_one_vs_rest() -> None:
    scores, labels = _multiclass(n=15, c=5, seed=9)
    values = KRLoss(reduction="none")(scores, labels)
    for i in range(len(labels)):
        y = int(labels[i])
        rest = [float(scores[i, j]) for j in range(5) if j != y]
        assert float(values[i]) == pytest.approx(-(float(scores[i, y]) - sum(rest) / 4), abs=1e-12)


@pytest.mark.parametrize("kind", ["multiclass", "binary"])
def test_hkr_is_kr_plus_alpha_hinge(kind: str) -> None:
    scores, labels = _data(kind, seed=10)
    for alpha in (0.0, 0.5, 50.0):
        hkr = HKRLoss(alpha=alpha, margin=0.3, positive_fraction=0.4, reduction="none")
        kr = KRLoss(positive_fraction=0.4, reduction="none")
        hinge = MulticlassHingeLoss(margin=0.3, reduction="none")
        torch.testing.assert_close(
            hkr(scores, labels), kr(scores, labels) + alpha * hinge(scores, labels)
        )


# ------------------------------------------------------- gradients


@pytest.mark.parametrize(("name", "kind"), list(_cases()))
def test_gradients_finite_including_ties(name: str, kind: str, dtype: torch.dtype) -> None:
    scores, labels = _data(kind, n=9, dtype=dtype)
    ties = torch.zeros_like(scores)  # every logit equal; binary: on the decision boundary
    # Binary: scores sitting exactly at the hinge kink s * f = margin.
    kink = (labels * 2 - 1).to(dtype) * 0.7 if kind == "binary" else scores.clone()
    for values in (scores, ties, kink, scores * 1e4):
        x = values.clone().requires_grad_(True)
        LOSSES[name]("mean")(x, labels).backward()
        assert x.grad is not None and bool(torch.isfinite(x.grad).all())
        assert x.grad.dtype == dtype


@pytest.mark.parametrize(("name", "kind"), list(_cases()))
def test_gradcheck_float64(name: str, kind: str) -> None:
    scores, labels = _data(kind, n=6, seed=11)
    x = scores.clone().requires_grad_(True)  # random scores: no ties, no kinks
    assert torch.autograd.gradcheck(lambda s: LOSSES[name]("sum")(s, labels), (x,))


# ------------------------------------------------------- bad input


@pytest.mark.parametrize("name", list(LOSSES))
def test_bad_inputs_refused(name: str) -> None:
    loss = LOSSES[name]("mean")
    scores = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="one entry per sample"):
        loss(scores, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="out of range for 3 classes"):
        loss(scores, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="out of range"):
        loss(scores, torch.tensor([0, -1, 2, 1]))
    with pytest.raises(TypeError, match="floating-point"):
        loss(torch.zeros(4, 3, dtype=torch.long), torch.tensor([0, 1, 2, 1]))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        loss(scores, [0, 1, 2, 1])
    with pytest.raises(ValueError, match="NaN"):
        loss(torch.full((4, 3), math.nan), torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="reduction must be one of 'none', 'mean' or 'sum'"):
        LOSSES[name]("avg")
    with pytest.raises(ValueError, match="reduction"):
        LOSSES[name](None)


def test_bad_options_refused() -> None:
    with pytest.raises(ValueError, match=r"margin must be finite and in \(0, inf\), got -1"):
        MulticlassHingeLoss(margin=-1.0)
    with pytest.raises(ValueError, match="margin"):
        MulticlassHingeLoss(margin=0.0)
    with pytest.raises(ValueError, match="margin"):
        HKRLoss(margin=-0.5)
    with pytest.raises(ValueError, match=r"alpha must be finite and in \[0, inf\), got -2"):
        HKRLoss(alpha=-2.0)
    with pytest.raises(ValueError, match="alpha"):
        HKRLoss(alpha=math.inf)
    with pytest.raises(ValueError, match=r"temperature must be finite and in \(0, inf\), got 0"):
        LipschitzCrossEntropyLoss(temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        LipschitzCrossEntropyLoss(temperature=-1.0)
    with pytest.raises(ValueError, match="offset"):
        LipschitzCrossEntropyLoss(offset=-0.1)
    with pytest.raises(ValueError, match="offset"):
        LipschitzCrossEntropyLoss(offset=math.nan)
    for p in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match=r"positive_fraction must be finite and in \(0, 1\)"):
            KRLoss(positive_fraction=p)
        with pytest.raises(ValueError, match="positive_fraction"):
            HKRLoss(positive_fraction=p)
    with pytest.raises(TypeError, match="margin must be a real number, got str"):
        MulticlassHingeLoss(margin="1")
    with pytest.raises(TypeError, match="alpha must be a real number, got bool"):
        HKRLoss(alpha=True)


def test_extra_repr() -> None:
    assert (
        repr(MulticlassHingeLoss(margin=0.5)) == "MulticlassHingeLoss(margin=0.5, reduction='mean')"
    )
    assert "positive_fraction=0.25" in repr(KRLoss(positive_fraction=0.25))
    assert "alpha=3, margin=2, reduction='sum'" in repr(HKRLoss(3, 2, "sum"))
    assert "temperature=0.25" in repr(LipschitzCrossEntropyLoss())


# ------------------------------------------------------- Wasserstein estimates


def _critic(in_features: int = 1, width: int = 32) -> nn.Sequential:
    return nn.Sequential(
        lipnets.BjorckLinear(in_features, width),
        lipnets.GroupSort(2),
        lipnets.BjorckLinear(width, width),
        lipnets.GroupSort(2),
        lipnets.BjorckLinear(width, 1),
    )


def _gaussian_vs_bimodal(n: int = 500):
    g = _gen(0)
    x_p = torch.randn(n, 1, generator=g)
    side = torch.randint(0, 2, (n, 1), generator=g) * 2 - 1
    x_q = 2.5 * side + 0.5 * torch.randn(n, 1, generator=g)
    return x_p, x_q


def _two_gaussians(n: int = 500):
    g = _gen(1)
    return 2.0 * torch.randn(n, 1, generator=g), 1.5 + 0.5 * torch.randn(n, 1, generator=g)


@pytest.mark.parametrize("make", [_gaussian_vs_bimodal, _two_gaussians])
def test_kr_trained_critic_estimates_exact_1d_wasserstein(make) -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    x_p, x_q = make()
    exact = scipy_stats.wasserstein_distance(x_p[:, 0].numpy(), x_q[:, 0].numpy())
    torch.manual_seed(0)
    critic = _critic()
    x = torch.cat([x_p, x_q])
    y = torch.cat([torch.ones(len(x_p)), torch.zeros(len(x_q))])
    optimizer = torch.optim.Adam(critic.parameters(), lr=0.02)
    loss_fn = KRLoss()  # balanced: positive_fraction 0.5 is the real share
    # 150 full-batch steps on 1000 scalars: thread hand-offs cost more than the
    # maths, and slow down badly when other processes share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for _ in range(150):
            optimizer.zero_grad()
            loss_fn(critic(x), y).backward()
            optimizer.step()
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    estimate = wasserstein_estimate(critic, x_p, x_q)
    assert estimate <= exact * (1 + 1e-6)  # a lower bound, never above
    assert estimate >= exact * (1 - 0.02), (estimate, exact, elapsed)
    # Swapping the roles flips the sign: positive when the critic scores P higher.
    assert wasserstein_estimate(critic, x_q, x_p) == pytest.approx(-estimate, rel=1e-9)


def test_random_critics_never_exceed_exact_2d_wasserstein() -> None:
    ot = pytest.importorskip("ot")
    g = _gen(2)
    x_p = 0.6 * torch.randn(60, 2, generator=g)
    x_q = torch.randn(80, 2, generator=g) + torch.tensor([1.0, -0.5])
    cost = torch.cdist(x_p.double(), x_q.double()).numpy()
    exact = float(ot.emd2(np.full(60, 1 / 60), np.full(80, 1 / 80), cost))
    for seed in range(5):
        torch.manual_seed(seed)
        critic = _critic(2, 16)
        linear = nn.Linear(2, 1)
        for c in (critic, linear):
            assert abs(wasserstein_estimate(c, x_p, x_q)) <= exact * (1 + 1e-6)
    # The best linear critic, the direction of the mean difference, also stays below.
    direction = x_p.double().mean(0) - x_q.double().mean(0)
    best_linear = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        best_linear.weight.copy_(direction[None])
    estimate = wasserstein_estimate(best_linear, x_p.double(), x_q.double())
    # Its sound bound is the norm of the direction rounded up by a few ulps.
    assert estimate <= float(direction.norm())
    assert estimate == pytest.approx(float(direction.norm()), rel=1e-6)
    assert estimate <= exact * (1 + 1e-6)


class _Scaled(nn.Module):
    def __init__(self, inner: nn.Module, factor: float) -> None:
        super().__init__()
        self.inner = inner
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * self.inner(x)


def test_estimate_uses_the_bound_and_given_lipschitz() -> None:
    torch.manual_seed(3)
    critic = _critic()
    x_p, x_q = _two_gaussians(100)
    base = wasserstein_estimate(critic, x_p, x_q)
    assert wasserstein_estimate(_Scaled(critic, 3.0), x_p, x_q) == pytest.approx(base, rel=1e-5)
    assert wasserstein_estimate(_Scaled(critic, -3.0), x_p, x_q) == pytest.approx(-base, rel=1e-5)
    bound = lipnets.lipschitz_bound(critic.eval(), (1, 1))
    given = wasserstein_estimate(critic, x_p, x_q, lipschitz=2 * float(bound))
    assert given == pytest.approx(base / 2, rel=1e-9)
    assert wasserstein_estimate(critic, x_p, x_q, lipschitz=bound) == pytest.approx(base, rel=1e-9)


def test_estimate_is_independent_of_batch_size_and_score_shape() -> None:
    torch.manual_seed(4)
    critic = _critic()
    x_p, x_q = _gaussian_vs_bimodal(101)
    full = wasserstein_estimate(critic, x_p, x_q)
    assert wasserstein_estimate(critic, x_p, x_q, batch_size=7) == pytest.approx(full, rel=1e-6)
    flat = nn.Sequential(critic, nn.Flatten(0))  # scores of shape (N,)
    assert wasserstein_estimate(flat, x_p, x_q, lipschitz=1.0) == pytest.approx(
        wasserstein_estimate(critic, x_p, x_q, lipschitz=1.0), rel=1e-12
    )


def test_estimate_restores_modes_and_refuses_unbounded_critic() -> None:
    critic = nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.5), nn.Linear(4, 1))
    critic.train()
    critic[2].eval()  # mixed modes are restored module by module
    x_p, x_q = torch.randn(10, 2, generator=_gen(5)), torch.randn(12, 2, generator=_gen(6))
    first = wasserstein_estimate(critic, x_p, x_q)
    assert first == wasserstein_estimate(critic, x_p, x_q)  # eval mode: dropout is off
    assert [m.training for m in critic] == [True, True, False] and critic.training

    unbounded = nn.Sequential(nn.Linear(2, 4), nn.Softplus(), nn.Linear(4, 1)).train()
    with pytest.raises(lipnets.UnboundedModuleError, match="Softplus"):
        wasserstein_estimate(unbounded, x_p, x_q)
    assert all(m.training for m in unbounded.modules())
    # With a bound given by the user, lipnets does not need to bound it.
    assert math.isfinite(wasserstein_estimate(unbounded, x_p, x_q, lipschitz=10.0))
    assert all(m.training for m in unbounded.modules())


def test_estimate_bad_inputs_refused() -> None:
    critic = nn.Linear(3, 1)
    x = torch.randn(5, 3, generator=_gen(7))
    with pytest.raises(ValueError, match=r"same per-sample shape, got \(3,\) and \(4,\)"):
        wasserstein_estimate(critic, x, torch.randn(5, 4))
    with pytest.raises(ValueError, match="N >= 1"):
        wasserstein_estimate(critic, x, torch.randn(0, 3))
    with pytest.raises(TypeError, match=r"x_q must be a torch\.Tensor"):
        wasserstein_estimate(critic, x, x.tolist())
    with pytest.raises(TypeError, match=r"critic must be an nn\.Module"):
        wasserstein_estimate(lambda t: t.sum(1), x, x)
    with pytest.raises(ValueError, match=r"one score per sample.*got \(5, 2\)"):
        wasserstein_estimate(nn.Linear(3, 2), x, x)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="lipschitz must be finite"):
            wasserstein_estimate(critic, x, x, lipschitz=bad)
    with pytest.raises(TypeError, match="lipschitz must be a real number"):
        wasserstein_estimate(critic, x, x, lipschitz="1")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            wasserstein_estimate(critic, x, x, batch_size=bad)
