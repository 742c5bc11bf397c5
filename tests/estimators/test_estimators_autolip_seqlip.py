"""AutoLip and SeqLip (Scaman & Virmaux 2018) against dense float64 truths.

Every expected value here is recomputed independently in the test: dense
operators of each layer (autograd Jacobians of float64 copies), their exact
spectral norms, brute-force maxima over all activation patterns, and the SeqLip
formula evaluated by hand from ``torch.linalg.svd``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as sn_param

import lipnets
from lipnets.errors import UnboundedModuleError
from lipnets.estimators import autolip, jacobian_norm, lower_bound, seqlip
from tests.helpers import as_float64, dense_jacobian, gnp_mlp, spectral_norm

F64 = torch.float64
# Power iteration run to convergence (the defaults stop at a relative change of 1e-7);
# float32 evaluations cannot resolve changes much below 1e-8, so they get a looser tol.
CONVERGED = {"iters": 3000, "tol": 1e-12}
CONVERGED32 = {"iters": 500, "tol": 1e-9}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dense(module: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """The float64 matrix of an affine module's linear part at input `shape` (batch 1)."""
    f64 = as_float64(module).eval()
    return dense_jacobian(f64, torch.zeros(shape, dtype=F64))


def _norm(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(matrix.to(F64), ord=2)


def _weight(layer: nn.Linear) -> torch.Tensor:
    return layer.weight.detach().to(F64)


def _patterns(n: int) -> torch.Tensor:
    """All 2^n vertices of {0, 1}^n, as a (2^n, n) float64 tensor."""
    return torch.tensor(list(itertools.product((0.0, 1.0), repeat=n)), dtype=F64)


def _vertex_max_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """max over sigma in {0, 1}^n of ||a diag(sigma) b||, every vertex, formed directly."""
    sigma = _patterns(a.shape[1])
    mats = torch.stack([a @ torch.diag(s) @ b for s in sigma])
    return _norm(mats).max()


def _greedy_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Best-improvement single flips from sigma = 1 (the paper's greedy SeqLip)."""
    n = a.shape[1]
    sigma = torch.ones(n, dtype=F64)
    best = _norm(a @ b)
    while True:
        candidates = []
        for j in range(n):
            s = sigma.clone()
            s[j] = 1 - s[j]
            candidates.append(_norm(a @ torch.diag(s) @ b))
        j = int(torch.argmax(torch.stack(candidates)))
        if not candidates[j] > best * (1 + 1e-12):
            return best
        best = candidates[j]
        sigma[j] = 1 - sigma[j]


def _seqlip_ref(matrices: list[torch.Tensor], search=_vertex_max_ref) -> torch.Tensor:
    """The SeqLip product from thin SVDs, written out from the formula."""
    svds = [torch.linalg.svd(m.to(F64), full_matrices=False) for m in matrices]
    k = len(svds)
    value = torch.ones((), dtype=F64)
    for i in range(k - 1):
        u, s, _ = svds[i]
        _, s_next, vh_next = svds[i + 1]
        s_tilde = s if i == 0 else s.sqrt()
        s_next_tilde = s_next if i + 1 == k - 1 else s_next.sqrt()
        left = torch.diag(s_next_tilde) @ vh_next
        right = u @ torch.diag(s_tilde)
        value = value * search(left, right)
    return value


def _brute_force_two_hidden(w1, w2, w3) -> torch.Tensor:
    """max over all D1, D2 in {0,1}^n of ||W3 D2 W2 D1 W1|| (every activation pattern)."""
    p1, p2 = _patterns(w1.shape[0]), _patterns(w2.shape[0])
    left = w3.unsqueeze(0) * p2.unsqueeze(1) @ w2  # W3 D2 W2, one per D2
    right = p1.unsqueeze(2) * w1.unsqueeze(0)  # D1 W1, one per D1
    return _norm(left.unsqueeze(1) @ right.unsqueeze(0)).max()


def _brute_force_one_hidden(w1, w2) -> torch.Tensor:
    p = _patterns(w1.shape[0])
    return _norm((w2.unsqueeze(0) * p.unsqueeze(1)) @ w1).max()


def _mlp(widths: list[int], act=nn.ReLU, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


def _randomise_bn(bn: nn.modules.batchnorm._BatchNorm, g: torch.Generator) -> nn.Module:
    with torch.no_grad():
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.3, 3.0, generator=g)
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.normal_(generator=g)
    return bn.eval()


# ---------------------------------------------------------------------------
# AutoLip
# ---------------------------------------------------------------------------

_AFFINE = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d)


def _product_of_layer_norms(model: nn.Sequential, shape: tuple[int, ...]) -> float:
    """Dense float64 norms of the affine layers times 1 for ReLU/GroupSort/MaxPool(2)/Flatten."""
    x = torch.zeros(shape)
    product = 1.0
    for layer in model:
        if isinstance(layer, _AFFINE):
            product *= spectral_norm(_dense(layer, tuple(x.shape)))
        else:
            assert isinstance(layer, (nn.ReLU, lipnets.GroupSort, nn.MaxPool2d, nn.Flatten))
        with torch.no_grad():
            x = layer(x)
    return product


def _conv_chain(padding_mode: str = "zeros") -> nn.Sequential:
    torch.manual_seed(10)
    g = _gen(11)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, stride=2, padding_mode=padding_mode),  # 8x8 -> 4x4
        _randomise_bn(nn.BatchNorm2d(4), g),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, padding_mode=padding_mode),
        nn.AvgPool2d(2),  # -> 2x2
        lipnets.GroupSort(2),
        nn.Conv2d(6, 4, 3, padding=1, padding_mode=padding_mode),
        nn.MaxPool2d(2),  # non-overlapping windows: constant 1; -> 1x1
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


def _linear_chain() -> nn.Sequential:
    torch.manual_seed(12)
    return nn.Sequential(
        nn.Linear(7, 12),
        nn.ReLU(),
        nn.Linear(12, 10),
        lipnets.GroupSort(2),
        nn.Linear(10, 10),
        nn.ReLU(),
        nn.Linear(10, 3),
    )


CHAINS = {
    "conv-zero-padding": (lambda: _conv_chain("zeros"), (1, 2, 8, 8)),
    "conv-circular": (lambda: _conv_chain("circular"), (1, 2, 8, 8)),
    "linear": (_linear_chain, (1, 7)),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_autolip_chain_is_product_of_dense_layer_norms(name: str) -> None:
    build, shape = CHAINS[name]
    model = build()
    value = autolip(model, shape, generator=_gen(), **CONVERGED32)  # float32 model
    assert value.dtype == F64 and value.ndim == 0 and value.device.type == "cpu"
    truth = _product_of_layer_norms(model, shape)
    assert abs(float(value) - truth) <= 1e-5 * truth


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_autolip_below_sound_bound_on_chains(name: str) -> None:
    build, shape = CHAINS[name]
    model = build()
    value = autolip(model, shape, generator=_gen(1))  # default iters and tol
    bound = lipnets.lipschitz_bound(model, shape)
    assert value <= bound * (1 + 1e-6)
    if name != "conv-zero-padding":
        # Every leaf bound of these chains is the exact norm (or constant) at that
        # shape: the two walks differ only by the power-iteration error.
        assert value >= bound * (1 - 1e-4)
    else:
        # Zero-padded convolutions get a strictly larger sound bound than their norm.
        assert value < bound


def test_autolip_keeps_known_constants_of_nonaffine_leaves() -> None:
    # Overlapping max pooling: constant sqrt(9) = 3 from the rule, not an estimate.
    pool = nn.MaxPool2d(3, stride=1)
    assert float(autolip(pool, (1, 2, 6, 6))) == 3.0
    assert float(autolip(lipnets.GroupSort(2), (1, 8))) == 1.0
    # A leaf that is affine gets its norm, not its sound bound (here 1/2, not the rule's).
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.MaxPool2d(3, stride=1))
    with torch.no_grad():
        model[0].weight.copy_(0.5 * torch.eye(4))
    value = autolip(model, (1, 2, 6, 4), generator=_gen())
    assert abs(float(value) - 1.5) <= 1e-6


def test_autolip_of_a_single_leaf_module() -> None:
    torch.manual_seed(13)
    layer = nn.Linear(9, 5).double()
    value = autolip(layer, (1, 9), generator=_gen(), **CONVERGED)
    truth = _norm(_weight(layer))
    assert torch.isclose(value, truth, rtol=1e-9, atol=0.0)
    assert value <= truth * (1 + 1e-9)


class _Residual(nn.Module):
    def __init__(self, n: int, scale: float = 1.0) -> None:
        super().__init__()
        self.f = nn.Linear(n, n)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.f(x)


class _ReluResidual(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.f = nn.Linear(n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.f(x))


class _TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Sequential(nn.Linear(6, 5), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


def test_autolip_composes_over_the_graph() -> None:
    torch.manual_seed(14)
    model = nn.Sequential(
        nn.Linear(5, 6), _Residual(6, scale=0.5), nn.ReLU(), _TwoBranches(), nn.Linear(9, 3)
    ).double()
    value = autolip(model, (1, 5), generator=_gen(), **CONVERGED)
    n0 = _norm(_weight(model[0]))
    n_res = _norm(_weight(model[1].f))
    n_a, n_b = _norm(_weight(model[3].a)), _norm(_weight(model[3].b[0]))
    n_out = _norm(_weight(model[4]))
    expected = n0 * (1 + 0.5 * n_res) * torch.sqrt(n_a**2 + n_b**2) * n_out
    assert torch.isclose(value, expected, rtol=1e-7, atol=0.0)
    # Only leaf values differ from the sound walk, and these leaves are exact there.
    bound = lipnets.lipschitz_bound(model, (1, 5))
    assert bound * (1 - 1e-7) <= value <= bound * (1 + 1e-6)


def test_autolip_residual_is_composed_not_densified() -> None:
    # x + f(x) is affine as a whole, but it is no leaf: its graph gives 1 + ||W||,
    # strictly more than the norm ||I + W|| of the whole map.
    torch.manual_seed(15)
    block = _Residual(6).double()
    value = autolip(block, (1, 6), generator=_gen(), **CONVERGED)
    w = _weight(block.f)
    assert torch.isclose(value, 1 + _norm(w), rtol=1e-9, atol=0.0)
    assert value > _norm(torch.eye(6, dtype=F64) + w) * (1 + 1e-3)


def _bjorck_rectangular() -> nn.Sequential:
    return nn.Sequential(
        lipnets.BjorckLinear(10, 32),
        lipnets.GroupSort(2),
        lipnets.BjorckLinear(32, 32),
        lipnets.GroupSort(4),
        lipnets.BjorckLinear(32, 3),
    )


@pytest.mark.parametrize(
    ("build", "shape"), [(gnp_mlp, (1, 16)), (_bjorck_rectangular, (1, 10))], ids=["square", "rect"]
)
def test_autolip_of_orthogonal_groupsort_stacks_is_one(build, shape) -> None:
    torch.manual_seed(16)
    model = build()
    value = autolip(model, shape, generator=_gen())
    assert abs(float(value) - 1.0) <= 1e-5
    assert value <= lipnets.lipschitz_bound(model, shape) * (1 + 1e-6)


def test_autolip_is_deterministic_with_a_generator() -> None:
    model, shape = _conv_chain(), (1, 2, 8, 8)
    a = autolip(model, shape, iters=5, tol=0.0, generator=_gen(3))
    b = autolip(model, shape, iters=5, tol=0.0, generator=_gen(3))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# SeqLip
# ---------------------------------------------------------------------------


def test_seqlip_exact_above_every_activation_pattern() -> None:
    model = _mlp([4, 6, 6, 3], seed=20)
    w1, w2, w3 = (_weight(model[i]) for i in (0, 2, 4))
    exact = seqlip(model, (1, 4), method="exact")
    assert exact.dtype == F64 and exact.ndim == 0
    brute = _brute_force_two_hidden(w1, w2, w3)
    assert exact >= brute * (1 - 1e-12)
    # Every Jacobian of the network is one of those patterns, so the brute-force
    # maximum is above any slope the network really has.
    x = torch.randn(8, 4, generator=_gen(21), dtype=F64)
    lower = lower_bound(model, x, steps=30, restarts=2, generator=_gen(22)).value
    assert 0 < lower <= brute * (1 + 1e-9)
    # SeqLip never exceeds the product of the layer norms.
    assert exact <= autolip(model, (1, 4), generator=_gen(), **CONVERGED) * (1 + 1e-6)
    assert exact <= _norm(w1) * _norm(w2) * _norm(w3) * (1 + 1e-12)
    # ... and it is the formula, computed here by hand.
    assert torch.isclose(exact, _seqlip_ref([w1, w2, w3]), rtol=1e-10, atol=0.0)


@pytest.mark.parametrize("seed", range(3))
def test_seqlip_exact_is_the_true_maximum_with_one_hidden_layer(seed: int) -> None:
    # With two matrices SeqLip's single factor is max_D ||W2 D W1|| itself.
    model = _mlp([5, 9, 4], seed=30 + seed)
    w1, w2 = _weight(model[0]), _weight(model[2])
    exact = seqlip(model, (1, 5), method="exact")
    assert torch.isclose(exact, _brute_force_one_hidden(w1, w2), rtol=1e-10, atol=0.0)
    greedy = seqlip(model, (1, 5), method="greedy")
    assert greedy <= exact * (1 + 1e-12)
    assert greedy >= _norm(w2 @ w1) * (1 - 1e-12)  # greedy starts at sigma = 1


@pytest.mark.parametrize("seed", range(4))
def test_seqlip_greedy_below_exact(seed: int) -> None:
    model = _mlp([6, 8, 7, 8, 3], seed=40 + seed)
    exact = seqlip(model, (1, 6), method="exact")
    greedy = seqlip(model, (1, 6), method="greedy")
    assert greedy <= exact * (1 + 1e-12)
    weights = [_weight(model[i]) for i in (0, 2, 4, 6)]
    assert torch.isclose(greedy, _seqlip_ref(weights, _greedy_ref), rtol=1e-9, atol=0.0)


def test_seqlip_greedy_matches_reference_on_wider_layers() -> None:
    model = _mlp([10, 20, 16, 4], seed=45)
    weights = [_weight(model[i]) for i in (0, 2, 4)]
    greedy = seqlip(model, (1, 10), method="greedy")
    assert torch.isclose(greedy, _seqlip_ref(weights, _greedy_ref), rtol=1e-9, atol=0.0)
    # "auto" enumerates narrow layers and searches wide ones.
    assert torch.equal(seqlip(model, (1, 10), exact_width=4), greedy)


def test_seqlip_auto_switches_at_exact_width() -> None:
    model = _mlp([5, 8, 8, 3], seed=46)
    exact = seqlip(model, (1, 5), method="exact")
    greedy = seqlip(model, (1, 5), method="greedy")
    assert torch.equal(seqlip(model, (1, 5)), exact)  # width 8 <= 12
    assert torch.equal(seqlip(model, (1, 5), exact_width=8), exact)
    assert torch.equal(seqlip(model, (1, 5), exact_width=7), greedy)


def test_seqlip_greedy_leaves_sigma_one_when_it_pays() -> None:
    # W2 D W1 = D_a - D_b for W1 = [I; I], W2 = [I, -I]: zero at sigma = 1, and 1
    # after any single flip, which is the maximum. Greedy must move off sigma = 1.
    n = 4
    eye = torch.eye(n, dtype=F64)
    model = nn.Sequential(nn.Linear(n, 2 * n, bias=False), nn.ReLU(), nn.Linear(2 * n, n))
    model.double()
    with torch.no_grad():
        model[0].weight.copy_(torch.cat([eye, eye], dim=0))
        model[2].weight.copy_(torch.cat([eye, -eye], dim=1))
    for method in ("greedy", "exact"):
        assert torch.isclose(seqlip(model, (1, n), method=method), torch.tensor(1.0, dtype=F64))
    assert float(autolip(model, (1, n), generator=_gen())) > 1.9  # sqrt(2) * sqrt(2)


def test_seqlip_greedy_can_stop_below_exact(f64_tol) -> None:
    # One input, one output: the factor is max |sum_j sigma_j c_j| with c = [10, 3, -6, -6].
    # From sigma = 1 (sum 1) the best single flip drops the 10 (|-9| beats the 7 of
    # dropping a -6); greedy then ends on the negative side at 12, while keeping only
    # the positive entries gives 13.
    model = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[2].weight.copy_(torch.tensor([[10.0, 3.0, -6.0, -6.0]]))
    exact = seqlip(model, (1, 1), method="exact")
    greedy = seqlip(model, (1, 1), method="greedy")
    f64_tol.assert_close(exact, torch.tensor(13.0, dtype=F64))
    f64_tol.assert_close(greedy, torch.tensor(12.0, dtype=F64))
    assert torch.equal(seqlip(model, (1, 1)), exact)  # auto enumerates width 4


@pytest.mark.parametrize("method", ["auto", "greedy", "exact"])
def test_seqlip_of_one_linear_layer_is_its_norm(method: str) -> None:
    torch.manual_seed(50)
    layer = nn.Linear(30, 25).double()
    truth = _norm(_weight(layer))
    assert torch.isclose(seqlip(layer, (1, 30), method=method), truth, rtol=1e-12, atol=0.0)
    wrapped = nn.Sequential(nn.Sequential(layer))
    assert torch.isclose(seqlip(wrapped, (1, 30), method=method), truth, rtol=1e-12, atol=0.0)


def test_seqlip_of_no_layers_or_only_activations_is_one() -> None:
    assert float(seqlip(nn.Sequential(), (1, 3))) == 1.0
    assert torch.isclose(
        seqlip(nn.Sequential(nn.ReLU(), nn.Tanh()), (1, 3)), torch.tensor(1.0, dtype=F64)
    )


def test_seqlip_leading_and_trailing_activations_stay_sound(f64_tol) -> None:
    torch.manual_seed(51)
    l1, l2 = nn.Linear(5, 6).double(), nn.Linear(6, 3).double()
    w1, w2 = _weight(l1), _weight(l2)
    core = seqlip(nn.Sequential(l1, nn.ReLU(), l2), (1, 5), method="exact")
    brute = _brute_force_one_hidden(w1, w2)
    assert torch.isclose(core, brute, rtol=1e-10, atol=0.0)
    product = _norm(w1) * _norm(w2)
    for model in (
        nn.Sequential(nn.ReLU(), l1, nn.ReLU(), l2),
        nn.Sequential(l1, nn.ReLU(), l2, nn.ReLU()),
        nn.Sequential(nn.ReLU(), l1, nn.ReLU(), l2, nn.ReLU()),
    ):
        value = seqlip(model, (1, 5), method="exact")
        # The leading / trailing D ranges over [0, 1] too, and D = I is one choice.
        assert brute * (1 - 1e-12) <= value <= product * (1 + 1e-12)
    # A single activation next to one matrix: max_D ||W D|| = max_D ||D W|| = ||W||.
    for model in (nn.Sequential(nn.ReLU(), l1), nn.Sequential(l1, nn.ReLU())):
        f64_tol.assert_close(seqlip(model, (1, 5), method="exact"), _norm(w1))


def test_seqlip_leading_activation_costs_nothing() -> None:
    torch.manual_seed(51)
    l1, l2 = nn.Linear(5, 6).double(), nn.Linear(6, 3).double()
    core = seqlip(nn.Sequential(l1, nn.ReLU(), l2), (1, 5), method="exact")
    lead = seqlip(nn.Sequential(nn.ReLU(), l1, nn.ReLU(), l2), (1, 5), method="exact")
    trail = seqlip(nn.Sequential(l1, nn.ReLU(), l2, nn.Tanh()), (1, 5), method="exact")
    assert torch.isclose(lead, core, rtol=1e-10)
    assert torch.isclose(trail, core, rtol=1e-10)


def test_seqlip_merges_consecutive_affine_layers() -> None:
    torch.manual_seed(52)
    model = nn.Sequential(
        nn.Linear(4, 7), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)
    ).double()
    w = [_weight(model[i]) for i in (0, 1, 3, 5)]
    merged = [w[1] @ w[0], w[2], w[3]]
    exact = seqlip(model, (1, 4), method="exact")
    assert torch.isclose(exact, _seqlip_ref(merged), rtol=1e-10, atol=0.0)
    # Not the same as treating the two first layers as separate factors.
    assert not torch.isclose(exact, _seqlip_ref([w[0], w[1], w[2], w[3]]), rtol=1e-6)
    # Two-matrix case: the merged factor is the brute-force maximum.
    two = nn.Sequential(model[0], model[1], nn.ReLU(), model[3])
    brute = _brute_force_one_hidden(merged[0], w[2])
    assert torch.isclose(seqlip(two, (1, 4), method="exact"), brute, rtol=1e-10, atol=0.0)
    # Consecutive activations merge into one pattern too (ReLU then Tanh).
    doubled = nn.Sequential(model[0], model[1], nn.ReLU(), nn.Tanh(), model[3])
    assert torch.isclose(seqlip(doubled, (1, 4), method="exact"), brute, rtol=1e-10, atol=0.0)


def test_seqlip_on_a_convolutional_network() -> None:
    torch.manual_seed(53)
    conv = nn.Conv2d(1, 2, 3, padding=1)
    head = nn.Linear(8, 3)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), head)
    shape = (1, 1, 2, 2)
    m1 = _dense(conv, shape)  # (8, 4), flattened in (C, H, W) order
    m2 = _weight(head)
    exact = seqlip(model, shape, method="exact")
    assert torch.isclose(exact, _brute_force_one_hidden(m1, m2), rtol=1e-5, atol=0.0)
    assert exact <= autolip(model, shape, generator=_gen(), **CONVERGED32) * (1 + 1e-6)


def test_seqlip_refuses_modules_not_known_to_be_affine() -> None:
    # An affine custom block is still refused: only known types count as affine
    # (Note [Affinity probe]); no finite probe can certify affinity.
    torch.manual_seed(54)
    model = nn.Sequential(nn.Linear(4, 6), _Residual(6), nn.ReLU(), nn.Linear(6, 3)).double()
    with pytest.raises(ValueError, match=r"derivatives in \[0, 1\]"):
        seqlip(model, (1, 4))


class _SkipSequential(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


class _BigKink(nn.Module):
    """Linear on any moderate probe, bends at 1e3; has a sound bound of its own."""

    def forward(self, x):
        return x + 49 * torch.relu(x - 1e3)

    def lipschitz_bound(self, input_shape=None):
        return torch.tensor(50.0, dtype=torch.float64)


def test_sequential_subclasses_and_reused_modules() -> None:
    torch.manual_seed(56)
    # A Sequential subclass with a skip connection is one element, not flattened.
    skip = nn.Sequential(nn.Linear(8, 8), _SkipSequential(nn.Linear(8, 8), nn.ReLU()))
    with pytest.raises(ValueError, match="_SkipSequential"):
        seqlip(skip, (1, 8))
    # A module used twice runs twice: both uses enter the product.
    lin = nn.Linear(8, 8).double()
    with torch.no_grad():
        lin.weight.mul_(3)
    twice = nn.Sequential(lin, nn.ReLU(), lin)
    w = _weight(lin)
    brute = _brute_force_one_hidden(w, w)
    assert torch.isclose(seqlip(twice, (1, 8), method="exact"), brute, rtol=1e-9, atol=0.0)
    x = torch.randn(8, 8, generator=_gen(57), dtype=F64)
    low = lower_bound(twice, x, steps=10, generator=_gen(58)).value
    assert low <= seqlip(twice, (1, 8)) * (1 + 1e-6)


def test_nonlinear_modules_that_look_linear_near_zero() -> None:
    torch.manual_seed(59)
    model = nn.Sequential(nn.Linear(8, 8), _BigKink(), nn.Linear(8, 4))
    # autolip keeps the module's sound constant, so it stays above real slopes
    # found where the module bends.
    product = spectral_norm(_weight(model[0])) * 50 * spectral_norm(_weight(model[2]))
    assert float(autolip(model, (1, 8), generator=_gen())) == pytest.approx(product, rel=1e-5)
    far = 1e4 * torch.randn(4, 8, generator=_gen(60))
    assert jacobian_norm(model, far).max() <= autolip(model, (1, 8), generator=_gen())
    for module in (nn.Threshold(-1e4, 5.0), nn.Hardshrink(1e-9), _BigKink()):
        with pytest.raises(ValueError, match=r"derivatives in \[0, 1\]"):
            seqlip(nn.Sequential(nn.Linear(8, 8), module, nn.Linear(8, 4)), (1, 8))


def test_seqlip_ignores_biases_and_activation_type(f64_tol) -> None:
    model = _mlp([5, 7, 6, 3], seed=55)
    reference = seqlip(model, (1, 5), method="exact")
    shifted = _mlp([5, 7, 6, 3], seed=55)
    with torch.no_grad():
        for layer in shifted:
            if isinstance(layer, nn.Linear):
                layer.bias.add_(3.0)
    f64_tol.assert_close(seqlip(shifted, (1, 5), method="exact"), reference)
    for act in (nn.Tanh, nn.Sigmoid, lambda: nn.LeakyReLU(0.1), lambda: nn.ELU(0.5)):
        other = _mlp([5, 7, 6, 3], act=act, seed=55)
        f64_tol.assert_close(seqlip(other, (1, 5), method="exact"), reference)


def _spectral_mlp(n_linear: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    widths = [64] + [32] * (n_linear - 1) + [10]
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        layers.append(sn_param(nn.Linear(n_in, n_out)))
        if i < n_linear - 1:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    with torch.no_grad():  # a few training-mode passes settle the power iterations
        for _ in range(5):
            model(torch.randn(2, 64))
    return model.eval()


def _train_on_digits(model: nn.Module, steps: int = 60) -> None:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    g = _gen(63)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (128,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("trained", [False, True], ids=["random", "digits"])
@pytest.mark.parametrize("n_linear", [4, 10])
def test_seqlip_below_autolip_on_spectral_normalised_mlps(n_linear: int, trained: bool) -> None:
    model = _spectral_mlp(n_linear, seed=60 + n_linear)
    if trained:  # briefly trained on scikit-learn's digits (64 inputs, 10 classes)
        _train_on_digits(model)
    value = seqlip(model, (1, 64))  # width 32 > exact_width: greedy
    auto = autolip(model, (1, 64), generator=_gen())
    assert value < auto * (1 - 1e-2)
    assert value <= lipnets.lipschitz_bound(model, (1, 64))
    x = torch.randn(4, 64, generator=_gen(61))
    lower = lower_bound(model, x, steps=20, restarts=2, generator=_gen(62)).value
    assert lower <= value


@pytest.mark.parametrize(
    "act",
    [
        lambda: nn.LeakyReLU(0.1),
        nn.Tanh,
        nn.Sigmoid,
        lambda: nn.ELU(0.5),
        nn.ReLU6,
        nn.Hardtanh,
        nn.Softsign,
        lambda: nn.CELU(1.0),
    ],
    ids=["leaky0.1", "tanh", "sigmoid", "elu0.5", "relu6", "hardtanh", "softsign", "celu1"],
)
def test_seqlip_accepts_unit_slope_activations(act) -> None:
    model = _mlp([4, 5, 3], act=act, seed=70)
    value = seqlip(model, (1, 4), method="exact")
    w1, w2 = _weight(model[0]), _weight(model[2])
    assert torch.isclose(value, _brute_force_one_hidden(w1, w2), rtol=1e-10, atol=0.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.LeakyReLU(2.0),
        lambda: nn.LeakyReLU(-0.5),
        lambda: nn.ELU(2.0),
        lambda: lipnets.GroupSort(2),
        nn.GELU,
        nn.SiLU,
        lambda: _ReluResidual(6),
        lambda: nn.MaxPool1d(2),
    ],
    ids=["leaky2", "leaky-neg", "elu2", "groupsort", "gelu", "silu", "residual", "maxpool"],
)
def test_seqlip_rejects_other_modules(make) -> None:
    torch.manual_seed(71)
    model = nn.Sequential(nn.Linear(4, 6), make(), nn.Linear(6, 3)).double()
    if isinstance(model[1], nn.MaxPool1d):
        model = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (1, 6)), model[1], nn.Flatten())
    with pytest.raises(ValueError, match=r"derivatives in \[0, 1\]"):
        seqlip(model, (1, 4))


# ---------------------------------------------------------------------------
# Errors, modes, side effects
# ---------------------------------------------------------------------------


class _LongOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x).long()


@pytest.mark.parametrize("estimator", [autolip, seqlip])
@pytest.mark.parametrize("shape", [(8,), (2, 8), (1,), "18", (1, 8.0), (1, 0)])
def test_bad_input_shapes(estimator, shape) -> None:
    with pytest.raises(ValueError, match="input_shape"):
        estimator(nn.Sequential(nn.Linear(8, 4)), shape)


@pytest.mark.parametrize("estimator", [autolip, seqlip])
def test_shape_mismatch_is_a_value_error(estimator) -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError) as info:
        estimator(model, (1, 9))
    assert isinstance(info.value.__cause__, RuntimeError)  # the model's error is chained


def test_seqlip_shape_mismatch_on_a_bare_layer() -> None:
    with pytest.raises(ValueError, match=r"fails on inputs of shape \(1, 9\)"):
        seqlip(nn.Linear(8, 4), (1, 9))


# The model itself is an affine leaf (nn.Linear has a bound rule): its failure on
# the shape is still the documented ValueError, with the layer's error chained.
def test_autolip_shape_mismatch_on_a_bare_layer() -> None:
    with pytest.raises(ValueError, match=r"fails on inputs of shape \(1, 9\)") as info:
        autolip(nn.Linear(8, 4), (1, 9))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_integer_outputs() -> None:
    with pytest.raises(UnboundedModuleError, match="int64"):
        autolip(_LongOutput(), (1, 8))
    with pytest.raises(TypeError, match="floating-point"):
        seqlip(_LongOutput(), (1, 8))
    with pytest.raises(TypeError, match="floating-point"):
        seqlip(nn.Sequential(nn.Linear(8, 8), _LongOutput()), (1, 8))


def test_argument_errors() -> None:
    model = _mlp([4, 21, 2], seed=80)
    with pytest.raises(ValueError, match="method must be"):
        seqlip(model, (1, 4), method="random")
    with pytest.raises(ValueError, match=r"2\^21"):
        seqlip(model, (1, 4), method="exact")
    assert seqlip(model, (1, 4)) > 0  # auto: greedy at width 21
    # an exact_width above 20 is refused when the arguments are checked
    with pytest.raises(ValueError, match="exact_width must be at most 20"):
        seqlip(model, (1, 4), exact_width=25)
    with pytest.raises(ValueError, match="max_width=16"):
        seqlip(model, (1, 4), max_width=16)
    seqlip(model, (1, 4), max_width=21)
    with pytest.raises(ValueError, match="exact_width must be an int >= 0"):
        seqlip(model, (1, 4), exact_width=-1)
    with pytest.raises(ValueError, match="max_width must be an int >= 1"):
        seqlip(model, (1, 4), max_width=0)
    with pytest.raises(ValueError, match="iters must be an int >= 1"):
        autolip(model, (1, 4), iters=0)
    with pytest.raises(ValueError, match="tol must be"):
        autolip(model, (1, 4), tol=-1.0)
    with pytest.raises(ValueError, match="tol must be"):
        autolip(model, (1, 4), tol=math.nan)
    for estimator in (autolip, seqlip):
        with pytest.raises(TypeError, match=r"must be an nn\.Module"):
            estimator(lambda x: 2 * x, (1, 4))


def _bn_model() -> nn.Sequential:
    torch.manual_seed(90)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3)
    )
    _randomise_bn(model[1], _gen(91))
    return model


@pytest.mark.parametrize("estimator", [autolip, seqlip])
def test_modes_restored_no_side_effects(estimator) -> None:
    model = _bn_model()
    expected = estimator(model.eval(), (1, 4))
    model.train()
    model[3].eval()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    value = estimator(model, (1, 4))
    # Evaluated in eval mode (BatchNorm on running statistics, Dropout off) ...
    assert torch.isclose(value, expected, rtol=1e-5)
    # ... and every flag, buffer and gradient is as it was.
    assert [m.training for m in model.modules()] == [True, True, True, True, False, True]
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert all(p.grad is None for p in model.parameters())


def test_seqlip_with_batchnorm_uses_running_statistics() -> None:
    model = _bn_model().double().eval()
    w0, w4 = _weight(model[0]), _weight(model[4])
    bn = model[1]
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    m1 = scale.unsqueeze(1) * w0
    exact = seqlip(model, (1, 4), method="exact")
    assert torch.isclose(exact, _brute_force_one_hidden(m1, w4), rtol=1e-10, atol=0.0)
