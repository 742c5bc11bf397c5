"""BCOPConv2d and the BCOP kernel maths.

Truths checked: singular values of dense float64 operators (the layer frozen at
its realised kernel, at several input sizes), polar factors from the SVD,
gradients by gradcheck, constraints after optimiser steps. The maths is in
Note [BCOP block convolutions], Note [Bjorck pre-scaling] and Note [BCOP strided
kernel] (lipnets.functional.bcop), Note [BCOP padding] and Note [BCOP stride]
(lipnets.nn.bcop).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lipnets.bounds.compose import lipschitz_bound
from lipnets.errors import LipnetsWarning
from lipnets.export import to_vanilla
from lipnets.functional.bcop import (
    bcop_kernel,
    space_to_depth_from_strided,
    strided_from_space_to_depth,
)
from lipnets.functional.orthogonal import bjorck, bjorck_retraction
from lipnets.functional.reshape import space_to_depth
from lipnets.nn.bcop import BCOPConv2d
from lipnets.parametrizations import BCOPOrthogonal
from lipnets.parametrizations.orthogonal import BJORCK_DEFAULT, BjorckConfig
from tests.helpers import as_float64, dense_jacobian

TOL = 1e-4  # orthogonium's bar for sigma_min and sigma_max of the realised operator
SIZES = (6, 8, 10)


pytestmark = pytest.mark.usefixtures("one_thread")  # small dense SVDs: LAPACK spins


def orthonormal(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(*shape, generator=g, dtype=torch.float64))[0]


def dense(module: nn.Module, channels: int, n: int) -> torch.Tensor:
    """Dense float64 operator of `module` (frozen at its realised kernel) on (channels, n, n).

    The layer is affine, so its operator is read off the images of the standard
    basis, minus the image of zero (the bias); `test_dense_operator_is_the_jacobian`
    checks this against `helpers.dense_jacobian`.
    """
    f64 = as_float64(module.eval())
    size = channels * n * n
    basis = torch.eye(size, dtype=torch.float64).reshape(size, channels, n, n)
    with torch.no_grad():
        images = f64(basis) - f64(torch.zeros(1, channels, n, n, dtype=torch.float64))
    return images.reshape(size, -1).mT


def svd64(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.double())


def raw(layer: BCOPConv2d) -> torch.Tensor:
    return layer.parametrizations.weight.original


# --- the maths -------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 1, 3, 6])
@pytest.mark.parametrize("pairs", [1, 2])
def test_block_convolutions_are_orthogonal_for_any_projector_rank(pairs, rank):
    # Note [BCOP block convolutions]: [P, I - P] is unitary in every symbol, for every rank.
    c = 6
    h = orthonormal(c, c, seed=0)
    qs = orthonormal(2 * pairs, c, max(rank, 1), seed=1)[..., :rank]
    kernel = bcop_kernel(h, qs)
    assert kernel.shape == (c, c, pairs + 1, pairs + 1)
    for n in (4, 5):
        op = dense_jacobian(
            lambda t: F.conv2d(F.pad(t, (0, pairs, 0, pairs), mode="circular"), kernel),
            torch.zeros(1, c, n, n),
        )
        s = svd64(op)
        assert (s - 1).abs().max() < 1e-12


def test_bcop_kernel_is_the_documented_composition():
    # H after R_1, C_1, R_2, C_2 (the right-most acts first), each a circular block conv.
    c, n = 4, 6
    h = orthonormal(c, c, seed=2)
    qs = orthonormal(4, c, 2, seed=3)
    p = qs @ qs.mT
    eye = torch.eye(c, dtype=torch.float64)
    x = torch.randn(2, c, n, n, dtype=torch.float64)

    def block(t, proj, dim):
        taps = torch.stack([proj, eye - proj], dim=-1)  # (c, c, 2): [P, I - P]
        if dim == 1:  # along the width, 1 x 2
            return F.conv2d(F.pad(t, (0, 1, 0, 0), mode="circular"), taps[:, :, None, :])
        return F.conv2d(F.pad(t, (0, 0, 0, 1), mode="circular"), taps[:, :, :, None])

    y = block(block(x, p[3], 0), p[2], 1)  # C_2 first, then R_2
    y = block(block(y, p[1], 0), p[0], 1)
    y = F.conv2d(y, h[:, :, None, None])
    kernel = bcop_kernel(h, qs)
    torch.testing.assert_close(F.conv2d(F.pad(x, (0, 2, 0, 2), mode="circular"), kernel), y)
    # A list of factors is the same as a stacked tensor.
    torch.testing.assert_close(bcop_kernel(h, list(qs)), kernel)


@pytest.mark.parametrize(("cin", "cout"), [(3, 5), (5, 3)])
def test_leading_block_kernels(cin, cout):
    # Note [BCOP block convolutions]: isometry for c_out >= c_in, orthonormal rows otherwise.
    c = max(cin, cout)
    h = orthonormal(c, c, seed=4)[:cout]
    kernel = bcop_kernel(h, orthonormal(4, c, c // 2, seed=5), in_channels=cin)
    assert kernel.shape == (cout, cin, 3, 3)
    op = dense_jacobian(
        lambda t: F.conv2d(F.pad(t, (1, 1, 1, 1), mode="circular"), kernel),
        torch.zeros(1, cin, 5, 5),
    )
    gram = op.mT @ op if cout >= cin else op @ op.mT
    torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=torch.float64))


def test_bcop_kernel_rejects_bad_input():
    h, qs = orthonormal(4, 4, seed=0), orthonormal(2, 4, 2, seed=1)
    with pytest.raises(ValueError, match="even number of factors"):
        bcop_kernel(h, qs[:1])
    with pytest.raises(ValueError, match="c_out <= c"):
        bcop_kernel(h[:, :3], qs)  # 4 x 3: more rows than columns
    with pytest.raises(ValueError, match="in_channels must be an int in"):
        bcop_kernel(h, qs, in_channels=5)
    with pytest.raises(TypeError, match="floating-point"):
        bcop_kernel(h.long(), qs)


@pytest.mark.parametrize("shape", [(3, 6, 6), (2, 7, 4), (2, 4, 7)])
def test_bjorck_is_the_polar_factor_of_each_matrix(shape):
    # Note [Bjorck pre-scaling]: per-matrix pre-scaling, so wildly different scales converge.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    w = w * torch.logspace(-3, 3, shape[0], dtype=torch.float64)[:, None, None]
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    for order in (1, 2):
        q = bjorck(w, order=order, tol=1e-8)
        torch.testing.assert_close(q, u @ vh, rtol=0, atol=1e-10)


def test_batched_retraction_gradcheck_at_orthogonal_points():
    w = orthonormal(3, 5, 3, seed=6).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: bjorck_retraction(t, tol=1e-8), (w,))
    # Wide matrices take the transposed projection.
    v = orthonormal(2, 5, 3, seed=7).mT.contiguous().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: bjorck_retraction(t, tol=1e-8), (v,))


def test_bjorck_rejects_bad_input():
    w = torch.randn(2, 3, 3)
    with pytest.raises(ValueError, match="NaN or infinite"):
        bjorck(torch.where(torch.arange(3) == 1, float("nan"), w))
    with pytest.raises(ValueError, match="all-zero matrix"):
        bjorck(torch.cat([w, torch.zeros(1, 3, 3)]))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        bjorck(torch.ones(3))
    with pytest.raises(ValueError, match="order must be one of"):
        bjorck(w, order=3)
    with pytest.warns(LipnetsWarning, match="did not converge"):
        bjorck(torch.diag_embed(torch.tensor([[1.0, 1e-30, 1.0]])), max_iterations=2)


@pytest.mark.parametrize("mode", ["zeros", "circular"])
@pytest.mark.parametrize("factor", [2, 3])
def test_strided_kernel_equals_space_to_depth_then_conv(factor, mode):
    # Note [BCOP strided kernel].
    g = torch.Generator().manual_seed(0)
    kernel = torch.randn(3, 2 * factor * factor, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(2, 2, 4 * factor, 5 * factor, generator=g, dtype=torch.float64)
    pad = "constant" if mode == "zeros" else mode
    expected = F.conv2d(F.pad(space_to_depth(x, factor), (1, 1, 1, 1), mode=pad), kernel)
    w = strided_from_space_to_depth(kernel, factor)
    assert w.shape == (3, 2, 3 * factor, 3 * factor)
    p = factor
    got = F.conv2d(F.pad(x, (p, p, p, p), mode=pad), w, stride=factor)
    torch.testing.assert_close(got, expected)
    assert torch.equal(space_to_depth_from_strided(w, factor), kernel)


# --- the layer: dense operators -----------------------------------------------------------------


def test_dense_operator_is_the_jacobian():
    layer = BCOPConv2d(3, 2, 2, stride=2, padding_mode="zeros")
    f64 = as_float64(layer.eval())
    torch.testing.assert_close(
        dense(layer, 3, 6), dense_jacobian(f64, torch.zeros(1, 3, 6, 6)), rtol=0, atol=1e-14
    )


# (in, out, k, stride): square, tall, wide, even k, stride 2 square / tall / wide.
CIRCULAR = [
    (4, 4, 3, 1),
    (3, 5, 3, 1),
    (5, 3, 3, 1),
    (4, 4, 2, 1),
    (3, 3, 4, 1),
    (4, 4, 1, 1),
    (1, 1, 3, 1),
    (2, 8, 3, 2),
    (1, 6, 2, 2),
    (3, 4, 3, 2),
]


@pytest.mark.parametrize(("cin", "cout", "k", "s"), CIRCULAR)
def test_circular_layer_is_orthogonal_at_several_sizes(cin, cout, k, s):
    layer = BCOPConv2d(cin, cout, k, stride=s, bias=True)
    with torch.no_grad():
        layer.bias.uniform_(-1, 1)  # the dense operator must not see the bias
    bound_any = layer.lipschitz_bound()
    for n in SIZES if s == 1 else (6, 8):
        op = dense(layer, cin, n)
        assert op.shape == (cout * (n // s) ** 2, cin * n * n)
        sigma = svd64(op)
        # All singular values of an isometry (tall) or of orthonormal rows (wide).
        top = sigma[: min(op.shape)]
        assert (top - 1).abs().max() < TOL, (top.max(), top.min())
        # The bound is sound at this size and for every size, and tight.
        bound = layer.lipschitz_bound((2, cin, n, n))
        assert sigma[0] <= bound <= sigma[0] + TOL
        assert sigma[0] <= bound_any
        assert bound_any <= 1.01  # every-size bound: certified grid slack, not the stride
        # orthogonality_error is exactly the dense operator's deviation.
        torch.testing.assert_close(
            layer.orthogonality_error((1, cin, n, n)), (top - 1).abs().max(), rtol=0, atol=1e-9
        )


@pytest.mark.parametrize(
    ("cin", "cout", "k", "s", "padding"),
    [(4, 4, 3, 1, None), (3, 5, 3, 1, 0), (5, 3, 2, 1, None), (4, 4, 3, 1, 3), (2, 3, 3, 2, None)],
)
def test_zero_padding_is_one_lipschitz(cin, cout, k, s, padding):
    # Note [BCOP padding]: a block of the linear convolution, never above 1.
    layer = BCOPConv2d(cin, cout, k, stride=s, padding=padding, padding_mode="zeros")
    bound_any = layer.lipschitz_bound()
    for n in (6, 7, 8):
        op = dense(layer, cin, n)
        sigma_max = svd64(op)[0]
        assert sigma_max <= 1 + TOL
        assert sigma_max <= layer.lipschitz_bound((1, cin, n, n))
        assert sigma_max <= bound_any
    if padding is None:
        # "Same" zero padding is not orthogonal: border outputs lose energy.
        assert svd64(dense(layer, cin, 6))[-1] < 1 - 10 * TOL


def test_circular_crop_padding_is_one_lipschitz():
    layer = BCOPConv2d(4, 4, 5, padding=1)  # 2p < k - 1: a crop of the orthogonal map
    for n in (6, 8):
        op = dense(layer, 4, n)
        assert op.shape == (4 * (n - 2) ** 2, 4 * n * n)
        sigma = svd64(op)
        assert sigma[0] <= layer.lipschitz_bound((1, 4, n, n))
        assert (sigma - 1).abs().max() < TOL  # rows of an orthogonal operator


@settings(max_examples=12, deadline=None)
@given(
    cin=st.integers(1, 5),
    cout=st.integers(1, 5),
    k=st.integers(1, 4),
    s=st.integers(1, 2),
    n=st.sampled_from([4, 6]),
)
def test_shapes_and_orthogonality_property(cin, cout, k, s, n):
    layer = BCOPConv2d(cin, cout, k, stride=s)
    x = torch.randn(2, cin, n, n)
    assert layer(x).shape == (2, cout, n // s, n // s)
    assert layer.orthogonality_error(x.shape) < TOL


def test_layer_gradient_is_exact_at_orthogonal_raw_matrices():
    # Note [Bjorck reprojection]: in training the gradient comes from the tangent projection
    # (bjorck_retraction); at an orthogonal raw stack it equals autograd through the
    # iterations, which eval mode uses.
    cfg = BjorckConfig(tol=1e-10, dtype=torch.float64)
    layer = BCOPConv2d(3, 4, 3, config=cfg, dtype=torch.float64)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    cot = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    grads = []
    for mode in (True, False):
        layer.train(mode)
        raw(layer).grad = None
        (layer(x) * cot).sum().backward()
        grads.append(raw(layer).grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-9)


def test_module_matches_functional():
    # The layer's nn.Conv2d view (even k, stride 2) against space_to_depth + bcop_kernel.
    layer = BCOPConv2d(3, 5, 2, stride=2).eval()
    x = torch.randn(2, 3, 8, 8)
    ortho = bjorck(raw(layer).detach())
    c = ortho.shape[-1]
    kernel = bcop_kernel(ortho[0, :5], ortho[1:, :, : c // 2], in_channels=12)
    z = F.pad(space_to_depth(x, 2), (0, 1, 0, 1), mode="circular")  # torch's even "same"
    expected = F.conv2d(z, kernel, layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("k", "s"), [(3, 1), (2, 2)])
def test_layer_weight_is_the_bcop_parametrization(k, s):
    # The module is a shell: its weight is BCOPOrthogonal applied to the raw stack.
    layer = BCOPConv2d(3, 5, k, stride=s).eval()
    param = layer.parametrizations.weight[0]
    assert isinstance(param, BCOPOrthogonal)
    standalone = BCOPOrthogonal(
        out_channels=5,
        in_channels=3 * s * s,
        kernel_size=k,
        stride=s,
        zero_slice=k % 2 == 0,
        config=layer.config,
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(standalone(raw(layer)), layer.weight, rtol=0, atol=0)


# --- the layer: training, export, numerics -----------------------------------------------------


def test_adamw_keeps_the_constraints():
    torch.manual_seed(0)
    layer = BCOPConv2d(8, 8, 3)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, weight_decay=1e-2)
    x = torch.randn(4, 8, 8, 8)
    target = torch.randn(4, 8, 8, 8)
    start = layer.weight.detach().clone()
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = (layer(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # it learns
    assert (layer.weight.detach() - start).abs().max() > 1e-2
    # Note [Bjorck reprojection]: the raw matrices stay orthogonal, σ_min does not collapse.
    sigma = torch.linalg.svdvals(raw(layer).detach().double())
    assert (sigma - 1).abs().max() < 1e-2
    for n in (6, 8):
        s = svd64(dense(layer, 8, n))
        assert (s - 1).abs().max() < TOL
        assert s[0] <= layer.lipschitz_bound((1, 8, n, n))


@pytest.mark.parametrize(
    ("k", "s", "mode"), [(3, 1, "circular"), (2, 2, "circular"), (3, 2, "zeros")]
)
def test_to_vanilla_right_after_load_state_dict(k, s, mode):
    torch.manual_seed(1)
    trained = BCOPConv2d(3, 6, k, stride=s, padding_mode=mode)
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        opt.zero_grad()
        trained(x).square().mean().backward()
        opt.step()
    fresh = BCOPConv2d(3, 6, k, stride=s, padding_mode=mode)
    fresh.load_state_dict(trained.state_dict())
    plain = fresh.to_vanilla()  # no forward pass in between
    assert type(plain) is nn.Conv2d
    assert (plain.stride, plain.padding, plain.padding_mode) == (
        trained.stride,
        trained.padding,
        mode,
    )
    with torch.no_grad():
        torch.testing.assert_close(plain(x), trained.eval()(x), rtol=1e-5, atol=1e-5)
    # The export protocol of the package uses the method.
    model = to_vanilla(nn.Sequential(fresh, nn.ReLU()))
    assert type(model[0]) is nn.Conv2d


def test_bf16_autocast_forward_and_backward():
    layer = BCOPConv2d(4, 4, 3)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    grads = [p.grad for p in layer.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    opt.step()
    # The kernel is built in float32 under autocast: still orthogonal after the step.
    assert layer.orthogonality_error((1, 4, 8, 8)) < TOL


def test_float64_layer():
    layer = BCOPConv2d(3, 3, 3, dtype=torch.float64, config=BjorckConfig(tol=1e-8))
    assert layer.weight.dtype == torch.float64
    assert layer.orthogonality_error((1, 3, 6, 6)) < 1e-12


def test_eval_is_deterministic_and_does_not_touch_raw():
    layer = BCOPConv2d(4, 4, 3)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer(torch.randn(1, 4, 6, 6)).sum().backward()
    opt.step()  # raw is now off the manifold by one step
    layer.eval()
    before = raw(layer).detach().clone()
    x = torch.randn(2, 4, 6, 6)
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)
    assert torch.equal(raw(layer), before)


def test_state_dict_has_no_cached_tensors():
    layer = BCOPConv2d(4, 6, 3, stride=2)
    assert set(layer.state_dict()) == {"bias", "parametrizations.weight.original"}
    assert list(layer.buffers()) == []
    assert raw(layer).shape == (5, 16, 16)  # 2k - 1 matrices of c = max(6, 4 * 4)
    nobias = BCOPConv2d(4, 4, 1, bias=False)
    assert set(nobias.state_dict()) == {"parametrizations.weight.original"}


def test_composer_uses_the_layer_bound():
    layer = BCOPConv2d(4, 4, 3)
    model = nn.Sequential(layer, nn.ReLU())
    torch.testing.assert_close(
        lipschitz_bound(model, (1, 4, 8, 8)), layer.lipschitz_bound((1, 4, 8, 8))
    )
    torch.testing.assert_close(lipschitz_bound(model), layer.lipschitz_bound())


def test_config_property():
    layer = BCOPConv2d(2, 2, 3)
    assert layer.config is BJORCK_DEFAULT
    layer.config = BjorckConfig(order=2)
    assert layer.config.order == 2
    assert "order=2" in repr(layer)
    with pytest.raises(TypeError, match="config must be a BjorckConfig"):
        layer.config = {"order": 2}


def test_errors():
    with pytest.raises(ValueError, match="kernel_size must be an int >= 1"):
        BCOPConv2d(2, 2, 0)
    with pytest.raises(ValueError, match="kernel_size must be an int >= 1"):
        BCOPConv2d(2, 2, (3, 5))
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        BCOPConv2d(2, 2, 3, stride=(1, 2))
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        BCOPConv2d(2, 2, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding must be None or 'same' for stride"):
        BCOPConv2d(2, 2, 3, stride=2, padding=1)
    with pytest.raises(ValueError, match="2 \\* padding <= kernel_size - 1"):
        BCOPConv2d(2, 2, 3, padding=2)
    with pytest.raises(ValueError, match="padding must be None, 'same', 'valid' or an int"):
        BCOPConv2d(2, 2, 3, padding="full")
    with pytest.raises(ValueError, match="in_channels must be an int >= 1"):
        BCOPConv2d(0, 2, 3)
    with pytest.raises(TypeError, match="config must be a BjorckConfig"):
        BCOPConv2d(2, 2, 3, config=None)
    layer = BCOPConv2d(2, 2, 3, stride=2)
    with pytest.raises(ValueError, match="multiples of 2"):
        layer(torch.randn(1, 2, 7, 8))
    with pytest.raises(ValueError, match="divisible by the stride"):
        layer.lipschitz_bound((1, 2, 7, 7))
    with pytest.raises(ValueError, match="cannot be assigned a kernel"):
        layer.weight = torch.zeros_like(layer.weight)
    with torch.no_grad():
        raw(layer)[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        layer(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="NaN or infinite"):
        layer.lipschitz_bound()


def test_zero_padding_with_stride_accepts_odd_sizes():
    # Note [BCOP stride]: an odd size is a block of the next even one.
    layer = BCOPConv2d(2, 3, 3, stride=2, padding_mode="zeros")
    assert layer(torch.randn(1, 2, 7, 7)).shape == (1, 3, 3, 3)
    sigma_max = svd64(dense(layer, 2, 7))[0]
    assert sigma_max <= layer.lipschitz_bound((1, 2, 7, 7))


def test_no_warning_in_normal_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = BCOPConv2d(6, 6, 3)
        layer(torch.randn(1, 6, 6, 6)).sum().backward()
    assert math.isfinite(float(layer.lipschitz_bound()))
