"""Tests for space_to_depth / depth_to_space, InvertibleDownsample, L2NormPool2d and
the LPPool / pixel-shuffle bound rules.

PITFALLS row 9: overlapping pooling is not 1-Lipschitz; the counter-example
[1, 2, 1, 2, 1] with kernel 2, stride 1 is checked, and every bound is compared
with analytic pairs, gradient ascent and Jacobian norms, and shown to be
attained (Note [LPPool bound], Note [Rounding the square root up]). Row 1: the
analytic pairs (x, x + t e_j) are the adversarial pairs of these layers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lipnets.bounds.pool_rules  # noqa: F401  (registers the LPPool and shuffle rules)
from lipnets.bounds import lipschitz_bound
from lipnets.errors import UnboundedModuleError
from lipnets.export import to_vanilla
from lipnets.functional.pooling import (
    l2_norm_pool2d,
    l2_norm_pool2d_lipschitz_bound,
    max_window_cover,
)
from lipnets.functional.reshape import depth_to_space, space_to_depth
from lipnets.nn.pooling import InvertibleDownsample, L2NormPool2d
from tests.helpers import dense_jacobian, lipschitz_ascent, max_jacobian_norm, spectral_norm

PROPERTY = settings(max_examples=40, deadline=None)
REL = 1e-12  # float64 agreement for quantities computed two ways


def randn(*shape, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def within(estimate: float, bound: float, numel: int) -> bool:
    """estimate <= bound up to the float64 rounding of the estimate itself (10 n eps)."""
    return estimate <= bound * (1 + 10 * numel * torch.finfo(torch.float64).eps)


def is_permutation_matrix(m: torch.Tensor) -> bool:
    ones = m == 1
    return bool(((m == 0) | ones).all() and (ones.sum(0) == 1).all() and (ones.sum(1) == 1).all())


def max_basis_response(fn, shape: tuple[int, ...]) -> float:
    """max_j ||f(e_j) - f(0)||: the ratio on the analytic pairs (0, e_j)."""
    numel = math.prod(shape)
    basis = torch.eye(numel, dtype=torch.float64).reshape(numel, *shape[1:])
    zero = fn(torch.zeros(1, *shape[1:], dtype=torch.float64))
    return float((fn(basis) - zero).reshape(numel, -1).norm(dim=1).max())


# ---------------------------------------------------------------------------
# space_to_depth / depth_to_space
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_space_to_depth_channel_order(factor):
    # channel index = c * f^2 + i * f + j, written out entry by entry
    c_in, h, w = 2, 2 * factor, 3 * factor
    x = torch.arange(c_in * h * w, dtype=torch.float64).reshape(1, c_in, h, w)
    y = space_to_depth(x, factor)
    assert y.shape == (1, c_in * factor**2, h // factor, w // factor)
    for c in range(c_in):
        for i in range(factor):
            for j in range(factor):
                got = y[0, c * factor**2 + i * factor + j]
                assert torch.equal(got, x[0, c, i::factor, j::factor])


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_space_to_depth_is_pixel_unshuffle(factor):
    x = randn(3, 5, 4 * factor, 2 * factor)
    assert torch.equal(space_to_depth(x, factor), F.pixel_unshuffle(x, factor))
    y = randn(3, 5 * factor**2, 4, 2)
    assert torch.equal(depth_to_space(y, factor), F.pixel_shuffle(y, factor))


@st.composite
def blocks(draw):
    factor = draw(st.integers(1, 4))
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    c, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return factor, (*lead, c, h * factor, w * factor)


@PROPERTY
@given(blocks(), st.integers(0, 2**31 - 1))
def test_round_trip_and_norm_preservation(case, seed):
    factor, shape = case
    x, z = randn(*shape, seed=seed), randn(*shape, seed=seed + 1)
    y = space_to_depth(x, factor)
    assert torch.equal(depth_to_space(y, factor), x)
    assert torch.equal(space_to_depth(depth_to_space(y, factor), factor), y)
    # a permutation of entries: same multiset of values, every difference keeps its norm
    assert torch.equal(y.flatten().sort().values, x.flatten().sort().values)
    diff_out = torch.linalg.vector_norm(space_to_depth(z, factor) - y)
    assert math.isclose(diff_out, torch.linalg.vector_norm(z - x), rel_tol=REL)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2", None])
def test_factor_errors(bad):
    with pytest.raises(ValueError, match="factor must be an int >= 1"):
        space_to_depth(torch.zeros(1, 1, 4, 4), bad)
    with pytest.raises(ValueError, match="factor must be an int >= 1"):
        depth_to_space(torch.zeros(1, 4, 2, 2), bad)
    with pytest.raises(ValueError, match="factor must be an int >= 1"):
        InvertibleDownsample(bad)


def test_shape_errors():
    with pytest.raises(ValueError, match=r"factor=2.*H=5 and W=4"):
        space_to_depth(torch.zeros(1, 1, 5, 4), 2)
    with pytest.raises(ValueError, match=r"factor=3.*H=6 and W=4"):
        space_to_depth(torch.zeros(1, 1, 6, 4), 3)
    with pytest.raises(ValueError, match=r"factor\*\*2=4.*C=6"):
        depth_to_space(torch.zeros(1, 6, 2, 2), 2)
    with pytest.raises(ValueError, match=r"x\.ndim=2"):
        space_to_depth(torch.zeros(4, 4), 2)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        space_to_depth([[1.0]], 1)


# ---------------------------------------------------------------------------
# InvertibleDownsample
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_invertible_downsample_is_orthogonal(factor):
    layer = InvertibleDownsample(factor)
    bound = layer.lipschitz_bound()
    assert bound.dtype == torch.float64 and bound.ndim == 0 and float(bound) == 1.0
    assert float(layer.lipschitz_bound((2, 3, 6, 6))) == 1.0
    jac = dense_jacobian(layer, randn(1, 2, 3 * factor, 2 * factor))
    assert is_permutation_matrix(jac)
    svals = torch.linalg.svdvals(jac)
    assert torch.equal(svals, torch.ones_like(svals))
    assert float(lipschitz_bound(layer)) == 1.0


def test_invertible_downsample_module_matches_function_and_export():
    layer = InvertibleDownsample(2)
    assert repr(layer) == "InvertibleDownsample(factor=2)"
    for shape in [(2, 3, 4, 6), (3, 4, 2), (2, 2, 1, 4, 4)]:
        x = randn(*shape)
        assert torch.equal(layer(x), space_to_depth(x, 2))
        assert torch.equal(layer.to_vanilla()(x), layer(x))
    net = nn.Sequential(InvertibleDownsample(2), nn.ReLU())
    plain = to_vanilla(net)
    assert type(plain[0]) is nn.PixelUnshuffle and plain[0].downscale_factor == 2
    x = randn(2, 3, 8, 8)
    assert torch.equal(plain(x), net(x))
    # the exported module is bounded by the registered permutation rule
    assert float(lipschitz_bound(plain, (2, 3, 8, 8))) == 1.0


@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.PixelUnshuffle(2), (1, 2, 4, 4)),
        (nn.PixelShuffle(2), (1, 8, 2, 3)),
        (nn.ChannelShuffle(3), (1, 6, 2, 2)),
    ],
)
def test_permutation_rules(module, shape):
    jac = dense_jacobian(module, randn(*shape))
    assert is_permutation_matrix(jac)
    assert float(lipschitz_bound(module)) == 1.0 == spectral_norm(jac)


# ---------------------------------------------------------------------------
# L2NormPool2d
# ---------------------------------------------------------------------------


def reference_l2_pool(x, kernel, stride, padding):
    """Independent reference: unfold the zero-padded input and take window norms."""
    n, c, h, w = x.shape
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    cols = F.unfold(xp.reshape(n * c, 1, *xp.shape[-2:]), kernel, stride=stride)
    h_out = (h + 2 * padding[0] - kernel[0]) // stride[0] + 1
    w_out = (w + 2 * padding[1] - kernel[1]) // stride[1] + 1
    return cols.pow(2).sum(1).sqrt().reshape(n, c, h_out, w_out)


# (kernel, stride, padding, (H, W)): disjoint, overlapping, padded, rectangular
CONFIGS = [
    ((2, 2), (2, 2), (0, 0), (4, 6)),
    ((2, 2), (1, 1), (0, 0), (4, 5)),
    ((3, 3), (1, 1), (1, 1), (5, 5)),
    ((3, 2), (2, 1), (1, 0), (6, 5)),
    ((3, 3), (2, 2), (1, 1), (7, 7)),
    ((1, 2), (1, 1), (0, 0), (1, 5)),
    ((2, 3), (3, 3), (0, 2), (5, 4)),
]


@pytest.mark.parametrize("kernel, stride, padding, size", CONFIGS)
def test_l2_pool_matches_reference(kernel, stride, padding, size):
    layer = L2NormPool2d(kernel, stride, padding)
    x = randn(2, 3, *size)
    ref = reference_l2_pool(x, kernel, stride, padding)
    torch.testing.assert_close(layer(x), ref, rtol=REL, atol=0)
    torch.testing.assert_close(l2_norm_pool2d(x, kernel, stride, padding), ref, rtol=REL, atol=0)
    torch.testing.assert_close(layer(x[0]), ref[0], rtol=REL, atol=0)  # unbatched


@pytest.mark.parametrize("kernel, stride, padding, size", CONFIGS)
def test_l2_pool_module_is_a_shell_over_functional(kernel, stride, padding, size):
    # Function first, module as a shell: forward and bound are the functional ones.
    layer = L2NormPool2d(kernel, stride, padding)
    x = randn(2, 3, *size)
    assert torch.equal(layer(x), l2_norm_pool2d(x, kernel, stride, padding))
    for shape, input_size in [((2, 3, *size), size), ((3, *size), size), (None, None)]:
        assert torch.equal(
            layer.lipschitz_bound(shape),
            l2_norm_pool2d_lipschitz_bound(kernel, stride, padding, input_size),
        )
    assert torch.equal(
        L2NormPool2d(kernel).lipschitz_bound(), l2_norm_pool2d_lipschitz_bound(kernel)
    )
    down = InvertibleDownsample(2)
    z = randn(2, 3, 4, 6)
    assert torch.equal(down(z), space_to_depth(z, 2))


def test_pooling_functions_stay_importable_from_nn_pooling():
    import lipnets.functional
    import lipnets.nn.pooling

    assert lipnets.nn.pooling.l2_norm_pool2d is l2_norm_pool2d
    assert lipnets.nn.pooling.max_window_cover is max_window_cover
    assert lipnets.functional.l2_norm_pool2d is l2_norm_pool2d


@pytest.mark.parametrize("kernel, stride", [(2, None), (3, 1), ((2, 3), (1, 2))])
def test_l2_pool_equals_torch_lppool2d(kernel, stride):
    x = randn(2, 3, 7, 8)
    torch.testing.assert_close(
        L2NormPool2d(kernel, stride)(x), nn.LPPool2d(2, kernel, stride)(x), rtol=1e-12, atol=0
    )


def test_l2_pool_gradient_at_zero_windows_is_finite():
    # Note [L2 pool gradient at zero]
    x = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    x[0, 0, :2, :2] = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    x.requires_grad_(True)
    layer = L2NormPool2d(2, stride=1, padding=1)
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[0, 1], torch.zeros(4, 4, dtype=torch.float64))
    # away from zero the gradient is x_j / y_w summed over windows: gradcheck in float64
    z = randn(1, 2, 4, 5).requires_grad_(True)
    assert torch.autograd.gradcheck(layer, (z,))


def test_l2_pool_half_precision_does_not_overflow():
    # Note [L2 pool precision]: 300^2 overflows float16
    x = torch.full((1, 1, 2, 2), 300.0, dtype=torch.float16)
    y = L2NormPool2d(2)(x)
    assert y.dtype == torch.float16 and float(y) == 600.0


def test_overlapping_counter_example():
    # PITFALLS row 9: the ratio of [1, 2, 1, 2, 1] (against 0) exceeds 1 with kernel 2, stride 1
    layer = L2NormPool2d((1, 2), stride=1)
    x = torch.tensor([[[[1.0, 2.0, 1.0, 2.0, 1.0]]]], dtype=torch.float64)
    ratio = float(layer(x).norm() / x.norm())
    assert ratio > 1.0
    assert ratio <= float(layer.lipschitz_bound(x.shape))
    assert float(layer.lipschitz_bound(x.shape)) == float(layer.lipschitz_bound()) > 1.0


@pytest.mark.parametrize("kernel, stride, padding, size", CONFIGS)
def test_l2_pool_bound_is_sound_and_attained(kernel, stride, padding, size):
    layer = L2NormPool2d(kernel, stride, padding)
    shape = (1, 2, *size)
    bound = layer.lipschitz_bound(shape)
    assert bound.dtype == torch.float64 and bound.ndim == 0
    # the analytic pairs (0, e_j) attain the bound (Note [Rounding the square root up])
    attained = max_basis_response(layer, shape)
    assert attained <= float(bound) <= attained * (1 + 4 * REL)
    # gradient ascent and Jacobian norms never exceed it
    numel = math.prod(shape)
    assert within(lipschitz_ascent(layer, shape, starts=6, steps=30), float(bound), numel)
    assert within(max_jacobian_norm(layer, randn(3, *shape[1:])), float(bound), numel)
    # a bound for every size is at least the bound for this size
    assert float(layer.lipschitz_bound()) >= float(bound)
    # the composed bound uses the module's own method
    assert float(lipschitz_bound(layer, shape)) == float(bound)


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 0), (3, 2, 1), (4, 3, 2), (2, 5, 0)])
def test_window_cover_without_size_is_the_supremum_over_sizes(kernel, stride, padding):
    # brute force over windows on a long line: the shape-free count is attained and never beaten
    counts = [max_window_cover(kernel, stride, padding, n) for n in range(1, 40)]
    assert max(counts) == max_window_cover(kernel, stride, padding) == -(-kernel // stride)


def test_l2_pool_bound_values():
    assert float(L2NormPool2d(2).lipschitz_bound()) == 1.0
    assert float(L2NormPool2d(3, stride=4).lipschitz_bound()) == 1.0
    assert float(L2NormPool2d(3, stride=1).lipschitz_bound()) == 3.0
    two = float(L2NormPool2d((2, 1), stride=1).lipschitz_bound())
    assert two >= math.sqrt(2) and two * two >= 2.0  # rounded up, never below sqrt(2)


def test_l2_pool_repr_and_errors():
    assert repr(L2NormPool2d(3, 1, 1)) == (
        "L2NormPool2d(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))"
    )
    for kwargs, name in [
        ({"kernel_size": 0}, "kernel_size"),
        ({"kernel_size": (2, 2, 2)}, "kernel_size"),
        ({"kernel_size": True}, "kernel_size"),
        ({"kernel_size": 2, "stride": 0}, "stride"),
        ({"kernel_size": 2, "padding": -1}, "padding"),
        ({"kernel_size": 2, "padding": 1.5}, "padding"),
    ]:
        with pytest.raises(ValueError, match=rf"{name} must be an int >= \d.*got"):
            L2NormPool2d(**kwargs)
    with pytest.raises(ValueError, match=r"x\.ndim=2"):
        L2NormPool2d(2)(torch.zeros(4, 4))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        l2_norm_pool2d([[1.0]], 2)
    with pytest.raises(ValueError, match=r"stride must be an int >= 1.*got 0"):
        max_window_cover(3, 0)
    with pytest.raises(ValueError, match=r"size must be an int >= 1.*got 0"):
        max_window_cover(3, 1, 0, size=0)
    with pytest.raises(ValueError, match="no window fits"):
        L2NormPool2d(3).lipschitz_bound((1, 1, 2, 5))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        L2NormPool2d(3).lipschitz_bound((5,))


# ---------------------------------------------------------------------------
# torch's LPPool: the registered rule (Note [LPPool bound])
# ---------------------------------------------------------------------------

LP_CASES = [
    (nn.LPPool1d, 3, 1, (1, 2, 7)),
    (nn.LPPool1d, 3, 2, (1, 2, 8)),
    (nn.LPPool2d, 2, None, (1, 2, 5, 5)),
    (nn.LPPool2d, (3, 2), (2, 1), (1, 2, 6, 5)),
    (nn.LPPool2d, 3, 2, (1, 1, 6, 7)),
    (nn.LPPool3d, 2, 1, (1, 1, 3, 3, 4)),
]


@pytest.mark.parametrize("p", [2, 4, math.inf])
@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("cls, kernel, stride, shape", LP_CASES)
def test_lppool_rule_is_sound(cls, kernel, stride, shape, ceil_mode, p):
    module = cls(p, kernel, stride, ceil_mode=ceil_mode)
    bound = float(lipschitz_bound(module, shape))
    attained = max_basis_response(module, shape)
    assert within(attained, bound, math.prod(shape))
    if p == 2:  # exact: the pairs (0, e_j) attain it, clipped ceil_mode windows included
        assert bound <= attained * (1 + 1e-12)
    numel = math.prod(shape)
    assert within(max_jacobian_norm(module, randn(2, *shape[1:])), bound, numel)
    assert within(lipschitz_ascent(module, shape, starts=4, steps=20), bound, numel)
    assert float(lipschitz_bound(module)) >= bound


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_lppool_rule_min_of_abs(ceil_mode):
    # norm_type = -inf: the min of |x| over each window, 1-Lipschitz per window
    module, shape = nn.LPPool2d(-math.inf, 3, 2, ceil_mode=ceil_mode), (1, 2, 6, 7)
    bound = float(lipschitz_bound(module, shape))
    assert within(max_basis_response(module, shape), bound, math.prod(shape))
    assert within(max_jacobian_norm(module, randn(2, *shape[1:])), bound, math.prod(shape))
    x, y = randn(64, *shape[1:], seed=1), randn(64, *shape[1:], seed=2)
    ratios = (module(x) - module(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert within(float(ratios.max()), bound, math.prod(shape))


def test_lppool_ceil_mode_clipped_window_exceeds_one():
    # torch rescales a clipped window by K / d: a 2x2 pool on 5x5 with ceil_mode has a
    # 1-position corner window that outputs 2|x|; the rule must see it
    module = nn.LPPool2d(2, 2, ceil_mode=True)
    x = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    x[0, 0, 4, 4] = 1.0
    assert float(module(x).norm()) == 2.0
    assert float(lipschitz_bound(module, (1, 1, 5, 5))) == 2.0
    assert float(lipschitz_bound(module)) >= 2.0


@pytest.mark.parametrize("k, s", [(2, 2), (3, 1), (3, 2), (4, 3), (2, 5)])
@pytest.mark.parametrize("p", [2, 4])
def test_lppool_shape_free_bound_covers_every_size(k, s, p):
    free = float(lipschitz_bound(nn.LPPool1d(p, k, s, ceil_mode=True)))
    for n in range(max(1, k - s + 1), 30):
        assert float(lipschitz_bound(nn.LPPool1d(p, k, s, ceil_mode=True), (1, 1, n))) <= free


@pytest.mark.parametrize("p", [1, 3, 2.5, 0.5])
def test_lppool_rule_refuses_non_norms(p):
    with pytest.raises(UnboundedModuleError, match=f"norm_type={p}"):
        lipschitz_bound(nn.LPPool2d(p, 2), (1, 1, 4, 4))


def test_lppool_non_norm_behaviour_documented_in_rule():
    # Note [LPPool bound]: the sign/relu wrapper rectifies nothing
    x = -torch.ones(1, 1, 2, 2)
    assert torch.isnan(nn.LPPool2d(3, 2)(x)).all()
    assert float(nn.LPPool2d(1, 2)(x)) == -4.0


def test_windows_entirely_in_padding_give_a_constant_map():
    # Stride 4 with padding 1 on 3 positions: windows start at -1 and 3, both in the padding.
    pool = L2NormPool2d(kernel_size=1, stride=4, padding=1)
    x = torch.randn(2, 3, 3, 3)
    assert torch.equal(pool(x), torch.zeros_like(pool(x)))
    assert float(pool.lipschitz_bound((1, 3, 3, 3))) == 0.0
    assert pool.lipschitz_bound() >= 1
