"""conv2d_spectral_norm_bound and the Conv1d/Conv2d bound rules.

Truths checked: the dense operator of torch's own nn.Conv2d (float64, autograd Jacobian)
and its SVD at 2-3 input sizes per kernel, for every padding mode, stride 2, dilation 2 and
groups 2 (PITFALLS rows 6, 7, 8, 17); the per-frequency SVD of the 2-D DFT for circular
convolutions on sizes too large for a dense operator (Sedghi et al. 2019).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

import lipnets
from lipnets.functional import _conv_symbol
from lipnets.functional.conv_norms import conv2d_spectral_norm_bound
from tests.helpers import dense_jacobian, spectral_norm

SVD_NOISE = 1e-9  # float64 SVD of the dense operator, relative


def make_conv(cin, cout, k, *, seed, **kwargs) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, bias=False, **kwargs).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
    return conv


def dense_norm(conv: nn.Module, cin: int, size: tuple[int, ...]) -> float:
    x = torch.zeros(1, cin, *size, dtype=torch.float64)
    with torch.no_grad():
        return spectral_norm(dense_jacobian(conv, x))


def bound_of(conv: nn.Conv2d, size=None) -> float:
    return float(
        conv2d_spectral_norm_bound(
            conv.weight,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            padding_mode=conv.padding_mode,
            input_size=size,
        )
    )


def circular_fft_norm(weight: torch.Tensor, size: tuple[int, int]) -> float:
    """Exact norm of the stride-1 circular convolution on a torus (Sedghi et al. 2019)."""
    w = weight.detach().double()
    co, ci, kh, kw = w.shape
    full = torch.zeros(co, ci, *size, dtype=torch.float64)
    for p in range(kh):
        for q in range(kw):
            full[:, :, p % size[0], q % size[1]] += w[:, :, p, q]
    symbol = torch.fft.fft2(full).permute(2, 3, 0, 1)
    return float(torch.linalg.svdvals(symbol).max())


# --- random kernels against the dense operator ------------------------------------------------


def _random_configs(count: int = 110) -> list[tuple]:
    rng = random.Random(0)
    configs = []
    for i in range(count):
        mode = ("zeros", "circular")[i % 2]
        k = (1, 2, 3, 5)[(i // 2) % 4]
        stride = (1, 2)[(i // 8) % 2]
        dilation = (1, 2)[(i // 16) % 2]
        groups = (1, 2)[(i // 32) % 2]
        cin, cout = ((1, 2), (2, 2), (3, 1))[i % 3]  # in < out, in = out, in > out
        choices = [(dilation * (k - 1)) // 2, 0, 1] + (["same"] if stride == 1 else [])
        padding = rng.choice(choices)
        kd = dilation * (k - 1) + 1
        pad = 0 if padding == "same" else padding
        low = max(3, kd - 2 * pad, pad)
        sizes = sorted({(rng.randint(low, 11), rng.randint(low, 11)) for _ in range(2)})
        configs.append(
            (
                mode,
                k,
                stride,
                dilation,
                groups,
                cin * groups,
                cout * groups,
                padding,
                sizes,
                1000 + i,
            )
        )
    return configs


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(
    ("mode", "k", "stride", "dilation", "groups", "cin", "cout", "padding", "sizes", "seed"),
    _random_configs(),
)
def test_bound_dominates_dense_operator(
    mode, k, stride, dilation, groups, cin, cout, padding, sizes, seed
):
    conv = make_conv(
        cin,
        cout,
        k,
        seed=seed,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=mode,
    )
    every_size = bound_of(conv)
    for size in sizes:
        exact = dense_norm(conv, cin, size)
        at_size = bound_of(conv, size)
        assert at_size >= exact * (1 - SVD_NOISE)
        assert every_size >= exact * (1 - SVD_NOISE)
        # At a given size the bound can only be tighter than the every-size one.
        assert at_size <= every_size * (1 + 1e-12)


def _circular_exact_configs() -> list[tuple]:
    out = []
    seed = 0
    for k in (1, 2, 3, 5):
        for stride in (1, 2):
            for dilation in (1, 2):
                for groups in (1, 2):
                    if k == 2 and stride == 2:
                        continue  # "same" needs stride 1
                    padding = "same" if k == 2 else dilation * (k - 1) // 2
                    seed += 1
                    out.append((k, stride, dilation, groups, padding, seed))
    return out


@pytest.mark.parametrize(
    ("k", "stride", "dilation", "groups", "padding", "seed"), _circular_exact_configs()
)
def test_circular_bound_is_exact(k, stride, dilation, groups, padding, seed):
    # Note [Circular padding at a given size]: p_t + p_b = K - 1 and s | N -> the exact norm,
    # strided too (Note [Polyphase form of a strided convolution]).
    cin, cout = 2 * groups, 3 * groups
    conv = make_conv(
        cin,
        cout,
        k,
        seed=seed,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode="circular",
    )
    for size in ((6, 8), (10, 4)):
        exact = dense_norm(conv, cin, size)
        bound = bound_of(conv, size)
        assert exact * (1 - SVD_NOISE) <= bound <= exact * (1 + 1e-8)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_circular_matches_fft_on_large_torus(k):
    conv = make_conv(5, 7, k, seed=k, padding="same", padding_mode="circular")
    for size in ((32, 32), (20, 28)):
        exact = circular_fft_norm(conv.weight, size)
        assert exact * (1 - SVD_NOISE) <= bound_of(conv, size) <= exact * (1 + 1e-8)


@pytest.mark.parametrize("size", [(1, 3), (1, 5), (3, 5)])
def test_zero_padding_can_exceed_the_circular_norm_at_the_same_size(size):
    # Note [Zero padding at a given size]: the torus must be larger than the input. With the
    # difference kernel [1, -1] and odd N the zero-padded layer exceeds the circular one.
    conv = nn.Conv2d(1, 1, (1, 2), padding=(0, 1), bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, -1.0]]]]))
    exact = dense_norm(conv, 1, size)
    assert exact > circular_fft_norm(conv.weight, size) * 1.01
    assert bound_of(conv, size) >= exact * (1 - SVD_NOISE)


@pytest.mark.parametrize(
    ("k", "stride", "dilation", "groups", "size"),
    [(3, 1, 1, 1, (5, 6)), (5, 2, 1, 1, (9, 7)), (3, 2, 2, 2, (8, 9)), (2, 3, 1, 2, (7, 4))],
)
def test_valid_convolution_is_exact(k, stride, dilation, groups, size):
    # Note [Output section at a given size]: without padding every output window lies in
    # the input, and the section is the layer's exact Gram matrix.
    conv = make_conv(
        2 * groups, 3 * groups, k, seed=k, stride=stride, dilation=dilation, groups=groups
    )
    exact = dense_norm(conv, 2 * groups, size)
    assert exact * (1 - SVD_NOISE) <= bound_of(conv, size) <= exact * (1 + 1e-9)


# --- the bound for every input size -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect", "replicate"])
@pytest.mark.parametrize(("k", "stride", "padding"), [(3, 1, 1), (2, 1, 0), (3, 2, 1), (5, 2, 2)])
def test_every_size_bound_dominates_many_sizes(mode, k, stride, padding):
    conv = make_conv(
        2, 3, k, seed=7 * k + stride, stride=stride, padding=padding, padding_mode=mode
    )
    bound = bound_of(conv)
    low = max(1, k - 2 * padding, padding + (mode == "reflect") if mode != "zeros" else 1)
    for n in range(low, 14, 2):
        assert bound >= dense_norm(conv, 2, (n, n + 1)) * (1 - SVD_NOISE)


@pytest.mark.parametrize(("k", "cin", "cout"), [(3, 4, 4), (5, 3, 6), (2, 6, 2)])
def test_every_size_bound_is_tight(k, cin, cout):
    # Note [Bound for every input size]: the bound is within 0.5% of the supremum of the
    # symbol, and a large torus samples that supremum to about 0.5% as well.
    conv = make_conv(cin, cout, k, seed=k, padding=k // 2)
    torus = circular_fft_norm(conv.weight, (64, 64))
    assert torus * (1 - SVD_NOISE) <= bound_of(conv) <= torus * 1.011


def test_strided_circular_needs_the_stride_1_symbol():
    # Note [Circular padding at a given size]: kernel [1, 1], stride 2, circular padding 1,
    # N = 3 reads y = (x2 + x0, x1 + x2): norm sqrt(3), above the polyphase symbol's sqrt(2)
    # (which is exact for zero padding).
    kwargs = dict(stride=(1, 2), padding=(0, 1), bias=False)
    circ = nn.Conv2d(1, 1, (1, 2), padding_mode="circular", **kwargs).double()
    zero = nn.Conv2d(1, 1, (1, 2), **kwargs).double()
    with torch.no_grad():
        circ.weight.fill_(1.0)
        zero.weight.fill_(1.0)
    exact = dense_norm(circ, 1, (1, 3))
    assert exact == pytest.approx(math.sqrt(3), rel=1e-12)
    assert bound_of(circ, (1, 3)) >= exact * (1 - SVD_NOISE)
    assert bound_of(circ) >= exact * (1 - SVD_NOISE)
    assert bound_of(zero) == pytest.approx(math.sqrt(2), rel=1e-9)
    assert bound_of(zero) >= dense_norm(zero, 1, (1, 3)) * (1 - SVD_NOISE)


# --- padding modes that copy entries ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
@pytest.mark.parametrize(("k", "stride", "padding"), [(3, 1, 1), (3, 2, 2), (5, 1, 2), (2, 2, 1)])
def test_copying_pads_dominate_dense_including_tiny_sizes(mode, k, stride, padding):
    conv = make_conv(2, 2, k, seed=k + padding, stride=stride, padding=padding, padding_mode=mode)
    every_size = bound_of(conv)
    low = max(1, k - 2 * padding, padding + 1 if mode == "reflect" else 1)
    for size in [(low, low), (low, low + 1), (low + 1, 5), (6, 7)]:
        exact = dense_norm(conv, 2, size)
        assert bound_of(conv, size) >= exact * (1 - SVD_NOISE)
        assert every_size >= exact * (1 - SVD_NOISE)


@pytest.mark.parametrize(
    ("mode", "padding", "size"),
    [
        ("replicate", 2, (1, 1)),  # one entry copied 25 times: norm 5
        ("replicate", (1, 3), (2, 5)),
        ("reflect", 2, (3, 3)),  # the middle entry is copied 3 times per dimension
        ("reflect", (1, 2), (4, 3)),
        ("circular", 2, (3, 2)),  # outputs wrap: Note [Circular padding at a given size]
        ("circular", (1, 3), (2, 3)),
    ],
)
def test_pad_operator_norm_is_exact(mode, padding, size):
    # Note [Reflect and replicate padding]: with a 1x1 identity kernel the layer *is* the pad
    # operator, whose norm is sqrt of the largest copy count; the bound must equal it.
    conv = nn.Conv2d(2, 2, 1, padding=padding, padding_mode=mode, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))
    exact = dense_norm(conv, 2, size)
    assert exact > 1.0
    assert bound_of(conv, size) == pytest.approx(exact, rel=1e-9)
    assert bound_of(conv) >= exact * (1 - SVD_NOISE)


def test_every_size_replicate_bound_is_the_worst_size():
    conv = nn.Conv2d(1, 1, 1, padding=(1, 2), padding_mode="replicate", bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1.0)
    # Worst size is 1 x 1: 3 * 5 copies of the single entry.
    assert bound_of(conv) == pytest.approx(math.sqrt(15), rel=1e-9)
    assert dense_norm(conv, 1, (1, 1)) == pytest.approx(math.sqrt(15), rel=1e-12)


# --- the certified eigenvalue routine ---------------------------------------------------------


def test_cholesky_certificate_path(monkeypatch):
    # Note [Certified largest eigenvalue]: force path (b) on a small side and compare with an
    # independent per-frequency SVD.
    conv = make_conv(12, 9, 3, seed=3, padding=1, padding_mode="circular")
    exact = circular_fft_norm(conv.weight, (12, 10))
    monkeypatch.setattr(_conv_symbol, "_DIRECT_EIG_MAX", 0)
    bound = bound_of(conv, (12, 10))
    assert exact * (1 - SVD_NOISE) <= bound <= exact * (1 + 1e-4)
    # Poor estimates: failed certificates, more rounds with larger shifts. Still sound.
    monkeypatch.setattr(_conv_symbol, "_SUBSPACE_ITERS", 1)
    assert bound_of(conv, (12, 10)) >= exact * (1 - SVD_NOISE)
    # Useless estimates: every certificate fails and eigvalsh decides. Sound and exact.
    monkeypatch.setattr(
        _conv_symbol, "_subspace_top", lambda gram, iters, gen: torch.zeros(gram.shape[0])
    )
    bound = bound_of(conv, (12, 10))
    assert exact * (1 - SVD_NOISE) <= bound <= exact * (1 + 1e-8)


@pytest.mark.parametrize("mode", ["zeros", "circular"])
def test_wide_layers_use_the_certificate_path(mode):
    # More than 16 channels on both sides: path (b) of Note [Certified largest eigenvalue] by
    # default, with stride 2 for the polyphase matrices.
    for stride in (1, 2):
        conv = make_conv(20, 24, 3, seed=stride, stride=stride, padding=1, padding_mode=mode)
        exact = dense_norm(conv, 20, (6, 4))
        bound = bound_of(conv, (6, 4))
        assert exact * (1 - SVD_NOISE) <= bound
        if mode == "circular":
            assert bound <= exact * (1 + 1e-4)
        assert bound_of(conv) >= exact * (1 - SVD_NOISE)


def test_zero_and_trivial_kernels():
    w = torch.zeros(3, 2, 3, 3)
    assert float(conv2d_spectral_norm_bound(w, padding=1)) == 0.0
    w = torch.zeros(4, 4, 1, 1)
    w[:, :, 0, 0] = torch.diag(torch.tensor([3.0, 1.0, 2.0, 0.5]))
    out = conv2d_spectral_norm_bound(w, stride=2)
    assert out.dtype == torch.float64 and out.ndim == 0 and out.device.type == "cpu"
    assert 3.0 <= float(out) <= 3.0 * (1 + 1e-12)


# --- bound rules and composition --------------------------------------------------------------


def test_lipschitz_bound_of_a_conv_network():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, stride=2, padding=1, padding_mode="circular"),
    ).double()
    shape = (1, 2, 8, 8)
    bound = float(lipnets.lipschitz_bound(model, input_shape=shape))
    product = bound_of(model[0], (8, 8)) * bound_of(model[2], (8, 8))
    assert bound == pytest.approx(product, rel=1e-12)
    every_size = float(lipnets.lipschitz_bound(model))
    assert every_size >= bound * (1 - 1e-12)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        jac = spectral_norm(dense_jacobian(model, x))
        assert bound >= jac * (1 - SVD_NOISE)


def test_rule_ignores_bias_and_uses_the_input_shape():
    conv = nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular").double()
    plain = bound_of(conv, (6, 6))
    assert float(lipnets.lipschitz_bound(conv, input_shape=(2, 3, 6, 6))) == pytest.approx(plain)
    assert float(lipnets.lipschitz_bound(conv, input_shape=(3, 6, 6))) == pytest.approx(plain)


@pytest.mark.parametrize(
    ("mode", "k", "stride", "padding", "dilation"),
    [
        ("zeros", 3, 1, 1, 1),
        ("circular", 3, 2, 1, 1),
        ("reflect", 4, 1, "same", 2),
        ("replicate", 5, 3, 2, 1),
        ("zeros", 3, 2, 0, 2),
    ],
)
def test_conv1d_rule(mode, k, stride, padding, dilation):
    torch.manual_seed(k + stride)
    conv = nn.Conv1d(
        3, 2, k, stride=stride, padding=padding, dilation=dilation, padding_mode=mode
    ).double()
    every_size = float(lipnets.lipschitz_bound(conv))
    for length in (9, 12):
        exact = dense_norm(conv, 3, (length,))
        at_size = float(lipnets.lipschitz_bound(conv, input_shape=(1, 3, length)))
        assert at_size >= exact * (1 - SVD_NOISE)
        assert every_size >= exact * (1 - SVD_NOISE)


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(weight=torch.full((2, 2, 3, 3), float("nan"))), ValueError, "NaN"),
        (dict(weight=torch.full((2, 2, 3, 3), float("inf"))), ValueError, "NaN or infinite"),
        (dict(weight=torch.ones(2, 2, 3)), ValueError, "4-D"),
        (dict(weight=torch.ones(2, 2, 3, 3, dtype=torch.int64)), TypeError, "floating"),
        (dict(padding_mode="symmetric"), ValueError, "padding_mode must be one of"),
        (dict(padding="full"), ValueError, "'same' or 'valid'"),
        (dict(padding="same", stride=2), ValueError, "stride 1"),
        (dict(padding=-1), ValueError, "padding must be an int >= 0 or a pair"),
        (dict(stride=0), ValueError, "stride must be an int >= 1 or a pair"),
        (dict(stride=1.5), TypeError, "stride must be an int"),
        (dict(dilation=(1, 2, 3)), ValueError, "dilation must be an int >= 1 or a pair"),
        (dict(groups=3), ValueError, "groups must divide out_channels"),
        (dict(groups=0), ValueError, "groups must be an int >= 1"),
        (dict(input_size=(2, 8)), ValueError, "input_size H=2 is too small"),
        (dict(input_size=(8, 0)), ValueError, "input_size must be an int >= 1 or a pair"),
        (dict(padding=2, padding_mode="reflect", input_size=(2, 8)), ValueError, "reflect"),
        (dict(padding=3, padding_mode="circular", input_size=(8, 2)), ValueError, "circular"),
    ],
)
def test_errors(kwargs, error, match):
    kwargs = {"weight": torch.ones(2, 2, 3, 3), **kwargs}
    with pytest.raises(error, match=match):
        conv2d_spectral_norm_bound(kwargs.pop("weight"), **kwargs)


def test_nan_weight_in_a_model_raises():
    conv = nn.Conv2d(2, 2, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lipnets.lipschitz_bound(conv)
