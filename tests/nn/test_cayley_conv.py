"""CayleyConv2d and the Fourier-domain Cayley maths behind it (lipnets.functional.fft_cayley).

Truths checked: dense operators in float64 built from impulse responses and their SVD
(PITFALLS 6, 7, 17), a roll-based reference convolution, gradcheck, constraints after
optimiser steps (PITFALLS 13), export right after load (PITFALLS 11).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import lipnets
import lipnets.functional as LF
from lipnets.errors import ShapeRequiredError
from lipnets.functional import fft_cayley as FC
from lipnets.functional.reshape import space_to_depth
from lipnets.nn.cayley_conv import CayleyConv2d, FrequencyConv2d
from tests.helpers import as_float64, dense_jacobian

# (in_channels, out_channels, stride): in_eff = in * stride**2 vs out
CASES = [
    (4, 4, 1),  # square
    (3, 5, 1),  # in < out: orthonormal columns
    (6, 3, 1),  # in > out: orthonormal rows
    (2, 8, 2),  # in_eff = out
    (2, 12, 2),  # in_eff < out
    (3, 6, 2),  # in_eff > out
]
SIZES = {1: [(4, 4), (6, 6), (5, 7)], 2: [(4, 4), (6, 6), (8, 8)]}


def impulse_operator(fn, shape: tuple[int, ...]) -> torch.Tensor:
    """Dense float64 matrix of a linear (or affine: the offset is removed) map from its
    impulse responses, all in one batch: column j is fn(e_j) - fn(0)."""
    numel = math.prod(shape)
    basis = torch.eye(numel, dtype=torch.float64).reshape(numel, *shape)
    with torch.no_grad():
        out = fn(basis) - fn(torch.zeros(1, *shape, dtype=torch.float64))
    return out.reshape(numel, -1).T.double()


def realised_operator(layer: CayleyConv2d, size: tuple[int, int]) -> torch.Tensor:
    """Dense float64 operator of the matrices the float32 layer multiplies, FFTs in float64."""
    with torch.no_grad():
        q = layer.frequency_matrices(size).to(torch.complex128)
    s = layer.stride

    def fn(x):
        return FC.fft_conv2d(space_to_depth(x, s) if s > 1 else x, q)

    return impulse_operator(fn, (layer.in_channels, *size))


def circular_xcorr(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Reference for Note [Kernel transform]: y[h, w] = sum_ij K[i, j] x[h + i - s, w + j - s]."""
    kh, kw = kernel.shape[-2:]
    y = 0
    for i in range(kh):
        for j in range(kw):
            shift = (-(i - (kh - 1) // 2), -(j - (kw - 1) // 2))
            shifted = torch.roll(x, shifts=shift, dims=(2, 3))
            y = y + torch.einsum("oc,bchw->bohw", kernel[:, :, i, j], shifted)
    return y


# --- the maths -------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size", [(3, 3), (2, 4), (1, 1), (5, 3)])
@pytest.mark.parametrize("size", [(4, 4), (5, 7), (3, 2)])
def test_transfer_matrices_are_the_circular_convolution(kernel_size, size, dtype, tol):
    # Note [Kernel transform], including kernels larger than the grid (they wrap).
    g = torch.Generator().manual_seed(0)
    kernel = torch.randn(3, 2, *kernel_size, generator=g, dtype=torch.float64).to(dtype)
    x = torch.randn(2, 2, *size, generator=g, dtype=torch.float64).to(dtype)
    y = FC.fft_conv2d(x, FC.conv_frequency_matrices(kernel, size))
    assert y.dtype == dtype
    torch.testing.assert_close(y, circular_xcorr(x, kernel), rtol=0, atol=tol.atol)
    odd = kernel_size[0] % 2 == 1 and kernel_size[1] % 2 == 1
    if odd and size[0] >= kernel_size[0] and size[1] >= kernel_size[1]:
        # what nn.Conv2d with circular padding k // 2 computes, for odd k
        padding = (kernel_size[0] // 2, kernel_size[1] // 2)
        conv = nn.Conv2d(2, 3, kernel_size, padding=padding, padding_mode="circular").to(dtype)
        with torch.no_grad():
            conv.weight.copy_(kernel)
            conv.bias.zero_()
        torch.testing.assert_close(y, conv(x), rtol=0, atol=tol.atol)


@pytest.mark.parametrize("size", [(4, 4), (5, 6), (6, 7), (7, 5), (1, 2)])
@pytest.mark.parametrize("shape", [(5, 3), (3, 5)], ids=str)
def test_conjugate_frequencies_hold_exactly_conjugate_matrices(size, shape):
    # Note [Real-FFT symmetry]: bitwise, so irfft2 applies exactly these matrices.
    height, width = size
    kernels = [torch.randn(*shape, 3, 3), torch.randn(*shape, 3, 3, dtype=torch.float64)]
    for fn, kernel in itertools.product(
        (FC.cayley_frequency_matrices, FC.conv_frequency_matrices), kernels
    ):
        q = fn(kernel, size)
        columns = [0] + ([width // 2] if width % 2 == 0 else [])
        for v in columns:
            for u in range(height):
                partner = q[(-u) % height, v].conj().resolve_conj()
                assert torch.equal(q[u, v], partner), (fn.__name__, u, v)
                if u == (-u) % height:
                    assert torch.equal(q[u, v].imag, torch.zeros_like(q[u, v].imag))


def test_hermitian_fix_up_on_arbitrary_matrices():
    # Note [Real-FFT symmetry]: whatever the solver returns, the result is made consistent;
    # canonical bins are untouched, and the gradient is that of the fix-up.
    height, width = 6, 4
    cols = width // 2 + 1
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(height * cols, 2, 3, generator=g, dtype=torch.complex128)
    fixed = FC._make_hermitian(raw.clone(), height, width).reshape(height, cols, 2, 3)
    raw = raw.reshape(height, cols, 2, 3)
    for u in range(height):
        for v in range(cols):
            partner = (-u) % height
            if v not in (0, width // 2) or u < partner:
                assert torch.equal(fixed[u, v], raw[u, v])
            elif u == partner:
                assert torch.equal(fixed[u, v], raw[u, v].real.to(raw.dtype))
            else:
                assert torch.equal(fixed[u, v], raw[partner, v].conj())
    x = torch.randn(height * cols, 2, 3, generator=g, dtype=torch.complex128, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: FC._make_hermitian(t * 1, height, width), (x,))


@pytest.mark.parametrize("shape", [(6, 6), (7, 4), (4, 7)], ids=str)
def test_cayley_matrices_match_the_full_square_cayley_transform(shape):
    # Note [Cayley on the Stiefel manifold]: the leading block of (I + S)^-1 (I - S).
    m, n = shape
    kernel = torch.randn(m, n, 3, 3, dtype=torch.float64)
    size = (5, 6)
    z = FC.conv_frequency_matrices(kernel, size).reshape(-1, m, n)
    q = FC.cayley_frequency_matrices(kernel, size).reshape(-1, m, n)
    if m < n:
        z, q, m, n = z.mT, q.mT, n, m
    s = torch.zeros(z.shape[0], m, m, dtype=z.dtype)
    s[:, :n, :n] = z[:, :n] - z[:, :n].mH
    s[:, n:, :n] = z[:, n:]
    s[:, :n, n:] = -z[:, n:].mH
    eye = torch.eye(m, dtype=z.dtype)
    full = torch.linalg.solve(eye + s, eye - s)
    torch.testing.assert_close(q, full[:, :, :n], rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(24, 24), (21, 17), (17, 40), (64, 64)], ids=str)
def test_block_inverse_gives_the_cayley_transform_and_orthogonality(shape):
    # Note [Block inverse of the Cayley denominators]: sizes >= 16 with small kernels (as at
    # initialisation) take the block inverse; odd sizes split unevenly. float64: the full
    # square Cayley transform; float32: every singular value within 1e-6 of 1.
    m, n = shape
    g = torch.Generator().manual_seed(3)
    kernel = torch.rand(m, n, 3, 3, generator=g, dtype=torch.float64).sub(0.5) / (3 * n**0.5)
    size = (6, 5)
    z = FC.conv_frequency_matrices(kernel, size).reshape(-1, m, n)
    q = FC.cayley_frequency_matrices(kernel, size).reshape(-1, m, n)
    if m < n:
        z, q, m, n = z.mT, q.mT, n, m
    s = torch.zeros(z.shape[0], m, m, dtype=z.dtype)
    s[:, :n, :n] = z[:, :n] - z[:, :n].mH
    s[:, n:, :n] = z[:, n:]
    s[:, :n, n:] = -z[:, n:].mH
    eye = torch.eye(m, dtype=z.dtype)
    full = torch.linalg.solve(eye + s, eye - s)
    torch.testing.assert_close(q, full[:, :, :n], rtol=0, atol=1e-12)
    q32 = FC.cayley_frequency_matrices(kernel.float(), (32, 32))
    sigma = torch.linalg.svdvals(q32.to(torch.complex128))
    assert (sigma - 1).abs().max() <= 1e-6


def test_gradients_gradcheck_and_double_backward():
    # Note [Frequency convolution backward] and Note [Fused Cayley convolution backward]:
    # the hand-written backward passes, composed and fused, in float64; the fused op's
    # double backward recomputes through the composed ops.
    g = torch.Generator().manual_seed(0)
    for m, n, size, stride in [
        (2, 2, (4, 3), 1),
        (3, 2, (3, 4), 1),
        (2, 3, (2, 3), 1),
        (3, 1, (4, 2), 2),
    ]:
        kernel = 0.3 * torch.randn(m, n * stride**2, 3, 3, generator=g, dtype=torch.float64)
        kernel.requires_grad_()
        x = torch.randn(1, n, *size, generator=g, dtype=torch.float64, requires_grad=True)

        def composed(x, kernel, stride=stride):
            folded = space_to_depth(x, stride) if stride > 1 else x
            return FC.fft_conv2d(folded, FC.cayley_frequency_matrices(kernel, folded.shape[-2:]))

        def fused(x, kernel, stride=stride):
            return FC.fft_cayley_conv2d(x, kernel, stride=stride)

        if stride == 1:  # the full Jacobian check: a few seconds each
            assert torch.autograd.gradcheck(composed, (x, kernel))
            assert torch.autograd.gradgradcheck(composed, (x, kernel), fast_mode=True)
        # the fused op agrees with the composed one to 1e-12 (test_fused_op_is_the_composed_ops)
        assert torch.autograd.gradcheck(fused, (x, kernel), fast_mode=True)
        assert torch.autograd.gradgradcheck(fused, (x, kernel), fast_mode=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"in{c[0]}-out{c[1]}-s{c[2]}")
def test_fused_op_is_the_composed_ops(case, f64_tol):
    # Note [Fused Cayley convolution backward]: the one-op forward is bitwise the composed
    # ops' (so the export applies what the layer applies), and its gradients are autograd's
    # through the composed ops, with either input alone needing one. The sizes include odd
    # ones, a single row (every bin self-conjugate) and a single bin.
    cin, cout, stride = case
    g = torch.Generator().manual_seed(0)
    kernel = torch.randn(cout, cin * stride**2, 3, 3, generator=g, dtype=torch.float64)
    for size in [*SIZES[stride], (stride, 2 * stride), (stride, stride)]:
        x = torch.randn(3, cin, *size, generator=g, dtype=torch.float64)
        folded = space_to_depth(x, stride) if stride > 1 else x
        cot = torch.randn(3, cout, *folded.shape[-2:], generator=g, dtype=torch.float64)
        k, xs = kernel.clone().requires_grad_(), x.clone().requires_grad_()
        y = FC.fft_cayley_conv2d(xs, k, stride=stride)
        matrices = FC.cayley_frequency_matrices(k, folded.shape[-2:])
        ref = FC.fft_conv2d(space_to_depth(xs, stride) if stride > 1 else xs, matrices)
        assert torch.equal(y, ref), size
        want = torch.autograd.grad((ref * cot).sum(), (xs, k))
        got = torch.autograd.grad((y * cot).sum(), (xs, k))
        for a, b in zip(got, want, strict=True):
            f64_tol.assert_close(a, b)
        (grad_k,) = torch.autograd.grad((FC.fft_cayley_conv2d(x, k, stride=stride) * cot).sum(), k)
        f64_tol.assert_close(grad_k, want[1])
        y = FC.fft_cayley_conv2d(xs, kernel, stride=stride)
        (grad_x,) = torch.autograd.grad((y * cot).sum(), xs)
        f64_tol.assert_close(grad_x, want[0])
        # float32: still the same forward, bit for bit
        x32, k32 = x.float(), kernel.float()
        f32 = FC.cayley_frequency_matrices(k32, folded.shape[-2:])
        ref32 = FC.fft_conv2d(space_to_depth(x32, stride) if stride > 1 else x32, f32)
        assert torch.equal(FC.fft_cayley_conv2d(x32, k32, stride=stride), ref32)


def test_hand_written_backward_equals_autograd_through_plain_ops():
    g = torch.Generator().manual_seed(1)
    m, n, (height, width), batch = 3, 4, (5, 6), 2
    cols = width // 2 + 1
    kernel = torch.randn(m, n, 3, 3, generator=g, dtype=torch.float64)
    q = FC.cayley_frequency_matrices(kernel, (height, width)).detach().requires_grad_()
    x = torch.randn(batch, n, height, width, generator=g, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(batch, m, height, width, generator=g, dtype=torch.float64)

    def plain(x, q):
        freq = height * cols
        x_hat = torch.fft.rfft2(x).permute(2, 3, 1, 0).reshape(freq, n, batch)
        y_hat = (q.reshape(freq, m, n) @ x_hat).reshape(height, cols, m, batch)
        return torch.fft.irfft2(y_hat.permute(3, 2, 0, 1), s=(height, width))

    expected = torch.autograd.grad((plain(x, q) * cot).sum(), (x, q))
    got = torch.autograd.grad((FC.fft_conv2d(x, q) * cot).sum(), (x, q))
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [(5, 6), (3, 7), (4, 16), (2, 17), (3, 32)])
def test_fft_conv2d_is_irfft2_of_the_products_on_every_inverse_path(size):
    # Note [Frequency-major layout]: the inverse runs as an FFT along H, a transpose and a
    # real inverse along W (a matrix product for W <= 16 on the CPU, irfft above): the same
    # real operator as irfft2, also on matrices that are not Hermitian-consistent (whose
    # self-conjugate bins irfft2 reads in its own way), forward and backward.
    g = torch.Generator().manual_seed(2)
    (height, width), (m, n, batch) = size, (3, 2, 2)
    cols = width // 2 + 1
    q = torch.randn(height, cols, m, n, generator=g, dtype=torch.complex128, requires_grad=True)
    x = torch.randn(batch, n, height, width, generator=g, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(batch, m, height, width, generator=g, dtype=torch.float64)
    y_hat = torch.einsum("hvmn,bnhv->bmhv", q, torch.fft.rfft2(x))
    ref = torch.fft.irfft2(y_hat, s=(height, width))
    y = FC.fft_conv2d(x, q)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    want = torch.autograd.grad((ref * cot).sum(), (x, q))
    got = torch.autograd.grad((y * cot).sum(), (x, q))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_frequency_bound_and_error_on_known_matrices():
    m = torch.stack([torch.eye(3), torch.diag(torch.tensor([2.0, 1.0, 0.5]))]).to(torch.complex64)
    bound = LF.spectral_norm_bound(m)
    assert bound.dtype == torch.float64 and bound.ndim == 0
    assert 2.0 < bound <= 2.0 * (1 + 1e-12)
    assert LF.orthogonality_error(m) == 1.0
    with pytest.raises(ValueError, match="NaN or infinite"):
        LF.spectral_norm_bound(torch.full((2, 2, 2), math.nan))
    with pytest.raises(ValueError, match="stack of matrices"):
        LF.spectral_norm_bound(torch.ones(3))


# --- the layer: dense operators ----------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"in{c[0]}-out{c[1]}-s{c[2]}")
def test_dense_operator_is_orthogonal_and_bound_is_sound(case):
    # PITFALLS 6, 7, 17: dense SVD at three input sizes, stride 1 and 2, all channel ratios.
    cin, cout, stride = case
    torch.manual_seed(0)
    layer = CayleyConv2d(cin, cout, 3, stride=stride)
    in_eff = cin * stride * stride
    for size in SIZES[stride]:
        shape = (1, cin, *size)
        dense = realised_operator(layer, size)
        s = torch.linalg.svdvals(dense)
        pixels = size[0] * size[1] // stride**2
        assert s.numel() == min(in_eff, cout) * pixels  # every singular value, no zeros omitted
        assert (s - 1).abs().max() < 1e-4, (size, float(s.min()), float(s.max()))
        # the float32 layer computes this operator (up to float32 FFT rounding)
        computed = impulse_operator(lambda x: layer(x.float()), shape[1:])
        torch.testing.assert_close(computed, dense, atol=1e-5, rtol=0)
        bound = layer.lipschitz_bound(input_shape=shape)
        assert bound.dtype == torch.float64 and bound.ndim == 0 and not bound.requires_grad
        assert s.max() <= bound <= 1 + 1e-5
        assert float(bound) != 1.0  # measured, not nominal
        # the per-frequency singular values are exactly those of the dense operator
        torch.testing.assert_close(bound, s.max() * (1 + 10 * max(in_eff, cout) * 2.0**-52))
        torch.testing.assert_close(layer.orthogonality_error(shape), (s - 1).abs().max())
        # the float64 copy of the layer (the same kernel, Cayley in float64) is orthogonal too
        exact = torch.linalg.svdvals(impulse_operator(as_float64(layer), shape[1:]))
        assert (exact - 1).abs().max() < 1e-12
        assert exact.max() <= bound
    # the hand-written backward is the adjoint: the Jacobian from vector-Jacobian products
    size = SIZES[stride][0]
    with torch.no_grad():
        q = layer.frequency_matrices(size).to(torch.complex128)
    jac = dense_jacobian(
        lambda x: FC.fft_conv2d(space_to_depth(x, stride) if stride > 1 else x, q),
        torch.zeros(1, cin, *size),
    )
    torch.testing.assert_close(jac, realised_operator(layer, size), rtol=0, atol=1e-12)


def test_module_equals_functional():
    torch.manual_seed(0)
    layer = CayleyConv2d(3, 6, 4, stride=2)
    x = torch.randn(2, 3, 8, 6)
    expected = FC.fft_cayley_conv2d(x, layer.weight, layer.bias, stride=2)
    assert torch.equal(layer(x), expected)
    assert layer.weight.shape == (6, 12, 2, 2)  # ceil(4 / 2) taps on the folded grid


@pytest.mark.parametrize("size", [(5, 5), (7, 6), (3, 8), (1, 1)])
def test_odd_and_small_sizes_preserve_norms(size):
    torch.manual_seed(0)
    layer = CayleyConv2d(4, 6, 3, bias=False)
    x = torch.randn(3, 4, *size)
    y = layer(x)
    assert y.shape == (3, 6, *size)
    norms = (y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))
    torch.testing.assert_close(*norms, rtol=1e-5, atol=0)
    shape = (1, 4, *size)
    assert layer.orthogonality_error(shape) < 1e-5


def test_initial_operator_is_well_mixed():
    # Init as the paper's code (nn.Conv2d's): far from the identity at every frequency.
    # A Haar-random unitary has E ||Q - I||_F^2 / n = 2; the identity has 0.
    torch.manual_seed(0)
    layer = CayleyConv2d(8, 8, 3)
    with torch.no_grad():
        q = layer.frequency_matrices((8, 8)).to(torch.complex128)
    distance = (q - torch.eye(8, dtype=q.dtype)).abs().pow(2).sum((-2, -1)) / 8
    assert distance.mean() > 0.8 and distance.min() > 0.3


def test_float64_layer_and_unbatched_input():
    torch.manual_seed(0)
    layer = CayleyConv2d(2, 3, 3).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    y = layer(x)
    assert y.dtype == torch.float64 and y.shape == (3, 5, 4)
    torch.testing.assert_close(y, layer(x.unsqueeze(0))[0], rtol=0, atol=0)
    assert layer.orthogonality_error((2, 5, 4)) < 1e-13


# --- training, precision, state ----------------------------------------------------------------


@pytest.mark.parametrize("case", [(4, 4, 1), (2, 4, 2), (6, 3, 1)], ids=str)
def test_adamw_steps_keep_operator_orthogonal(case):
    # PITFALLS 13: sigma_min must not collapse under weight decay.
    cin, cout, stride = case
    torch.manual_seed(0)
    layer = CayleyConv2d(cin, cout, 3, stride=stride)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, weight_decay=1e-2)
    x = torch.randn(8, cin, 8, 8)
    target = torch.randn(8, cout, 8 // stride, 8 // stride)
    start = layer.weight.detach().clone()
    for _ in range(50):
        opt.zero_grad()
        nn.functional.mse_loss(layer(x), target).backward()
        opt.step()
    assert (layer.weight - start).abs().max() > 1e-2  # it did train
    s = torch.linalg.svdvals(realised_operator(layer, (8, 8)))
    assert (s - 1).abs().max() < 1e-4, (float(s.min()), float(s.max()))
    assert s.max() <= layer.lipschitz_bound((1, cin, 8, 8)) <= 1 + 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_and_backward(dtype):
    # PITFALLS 19: the Cayley transform and the FFTs run in float32 under autocast.
    torch.manual_seed(0)
    layer = CayleyConv2d(4, 4, 3)
    x = torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
        y_low = layer(x.to(dtype))
    assert y.dtype == torch.float32  # FFTs give float32 under autocast, as torch's own
    assert torch.equal(y, layer(x))
    torch.testing.assert_close(y_low, layer(x.to(dtype).float()), rtol=0, atol=0)
    (y.square().sum() + y_low.sum()).backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    # a low-precision layer computes in float32 and returns its own dtype
    low = CayleyConv2d(4, 4, 3).to(torch.bfloat16)
    out = low(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert low.orthogonality_error((1, 4, 6, 6)) < 1e-5  # the matrices are float32


def test_state_dict_round_trip_and_no_buffers():
    # PITFALLS 11 and 20
    torch.manual_seed(0)
    a = CayleyConv2d(3, 5, 3, stride=1)
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        a(torch.randn(2, 3, 6, 6)).sum().backward()
        opt.step()
    assert list(a.buffers()) == [] and set(a.state_dict()) == {"weight", "bias"}
    torch.manual_seed(1)
    b = CayleyConv2d(3, 5, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(b(x), a(x))
    torch.testing.assert_close(b.lipschitz_bound(x.shape), a.lipschitz_bound(x.shape))


# --- bounds, composition, export ---------------------------------------------------------------


def test_bound_needs_a_size():
    layer = CayleyConv2d(3, 3, 3)
    with pytest.raises(ShapeRequiredError, match=r"depends on the input size.*input_shape"):
        layer.lipschitz_bound()
    with pytest.raises(ShapeRequiredError):
        lipnets.lipschitz_bound(layer)
    with pytest.raises(ShapeRequiredError):
        layer.orthogonality_error()
    sized = CayleyConv2d(3, 3, 3, input_size=(6, 6))
    torch.testing.assert_close(sized.lipschitz_bound(), sized.lipschitz_bound((1, 3, 6, 6)))
    with pytest.raises(ValueError, match=r"built for input_size=\(6, 6\)"):
        sized.lipschitz_bound((1, 3, 8, 8))
    with pytest.raises(ValueError, match="expects 3 input channels"):
        layer.lipschitz_bound((1, 4, 6, 6))


def test_composed_bound_uses_the_layer_bound():
    torch.manual_seed(0)
    model = nn.Sequential(CayleyConv2d(2, 4, 3), lipnets.MaxMin(), CayleyConv2d(4, 8, 3, stride=2))
    shape = (1, 2, 6, 6)
    expected = model[0].lipschitz_bound(shape) * model[2].lipschitz_bound((1, 4, 6, 6))
    torch.testing.assert_close(lipnets.lipschitz_bound(model, shape), expected, rtol=1e-12, atol=0)
    assert abs(float(lipnets.lipschitz_bound(model, shape)) - 1) <= 1e-5


def test_to_vanilla_matches_and_is_frozen_for_one_size():
    torch.manual_seed(0)
    layer = CayleyConv2d(3, 6, 3, stride=2)
    with pytest.raises(ValueError, match=r"input_size=\(H, W\).*to_vanilla\(input_size"):
        layer.to_vanilla()
    frozen = layer.to_vanilla(input_size=(8, 6))
    assert isinstance(frozen, FrequencyConv2d)
    x = torch.randn(4, 3, 8, 6)
    torch.testing.assert_close(frozen(x), layer(x), rtol=0, atol=1e-5)
    assert torch.equal(frozen(x), layer(x))  # the same matrices, applied the same way
    torch.testing.assert_close(frozen.lipschitz_bound(), layer.lipschitz_bound(x.shape))
    with pytest.raises(ValueError, match="holds matrices for inputs of shape"):
        frozen(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="only accepts inputs of size"):
        frozen.lipschitz_bound((1, 3, 8, 8))
    assert set(frozen.state_dict()) == {"matrices", "bias"}
    assert frozen.matrices.is_contiguous()  # stored once in the order the products read
    torch.testing.assert_close(frozen.double()(x.double()), layer(x).double(), rtol=0, atol=1e-5)
    # a float64 layer exports its own float64 function, bit for bit, in every orientation
    for cin, cout, stride in CASES:
        layer64 = CayleyConv2d(cin, cout, 3, stride=stride, dtype=torch.float64)
        x64 = torch.randn(2, cin, 4 * stride, 6 * stride, dtype=torch.float64)
        frozen64 = layer64.to_vanilla(input_size=x64.shape[-2:])
        with torch.no_grad():
            assert torch.equal(frozen64(x64), layer64(x64)), (cin, cout, stride)


def test_export_right_after_load_without_forward():
    # PITFALLS 11: no stale state; the export protocol of lipnets.to_vanilla.
    torch.manual_seed(0)
    trained = CayleyConv2d(4, 4, 3, input_size=(6, 6))
    with torch.no_grad():
        trained.weight.add_(torch.randn_like(trained.weight))
    fresh = nn.Sequential(CayleyConv2d(4, 4, 3, input_size=(6, 6)), lipnets.MaxMin())
    fresh[0].load_state_dict(trained.state_dict())
    plain = lipnets.to_vanilla(fresh)
    assert type(plain[0]) is FrequencyConv2d and "input_size=(6, 6)" in repr(plain[0])
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(plain[0](x), trained(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="built for input_size"):
        trained(torch.randn(1, 4, 8, 8))


# --- errors ------------------------------------------------------------------------------------


def test_constructor_and_input_errors():
    for stride in (0, (2, 1), 1.5, True):
        with pytest.raises(ValueError, match="stride must be an int >= 1"):
            CayleyConv2d(2, 2, 3, stride=stride)
    with pytest.raises(ValueError, match="in_channels must be an int >= 1, got 0"):
        CayleyConv2d(0, 2, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        CayleyConv2d(2, 2, 0)
    with pytest.raises(ValueError, match="input_size must have height and width divisible by"):
        CayleyConv2d(2, 2, 3, stride=2, input_size=(6, 5))
    layer = CayleyConv2d(2, 4, 3, stride=2)
    with pytest.raises(ValueError, match="divisible by stride=2, got 5 x 6"):
        layer(torch.randn(1, 2, 5, 6))
    with pytest.raises(ValueError, match="expects 2 input channels, got 3"):
        layer(torch.randn(1, 3, 6, 6))
    with pytest.raises(ValueError, match=r"expects a \(B, C, H, W\)"):
        layer(torch.randn(6, 6))
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        FC.fft_cayley_conv2d(torch.randn(1, 2, 4, 4), torch.randn(2, 2, 3, 3), stride=0)


def test_nan_weights_raise():
    layer = CayleyConv2d(2, 2, 3)
    with torch.no_grad():
        layer.weight[0, 1, 1, 1] = math.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        layer(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="NaN or infinite"):
        layer.lipschitz_bound((1, 2, 4, 4))
    with pytest.raises(ValueError, match="NaN or infinite"):
        layer.to_vanilla(input_size=4)


def test_extra_repr():
    layer = CayleyConv2d(3, 8, 3, stride=2, bias=False, input_size=(8, 8))
    assert repr(layer) == (
        "CayleyConv2d(3, 8, kernel_size=(3, 3), stride=2, bias=False, input_size=(8, 8))"
    )


def test_torch_func_transforms_match_autograd():
    # Note [Hand-written backward and torch.func]: under vmap/jvp/jacrev the same
    # maths runs as plain ops; Jacobians and per-sample gradients must agree with
    # plain autograd through the hand-written backward passes.
    torch.manual_seed(0)
    m = lipnets.CayleyConv2d(3, 4, 3, input_size=(5, 6)).double()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    v = torch.randn_like(x)
    _, jv = torch.func.jvp(m, (x,), (v,))
    torch.testing.assert_close(
        jv, torch.autograd.functional.jvp(m, x, v)[1], rtol=1e-10, atol=1e-12
    )
    dense = torch.autograd.functional.jacobian(m, x)
    torch.testing.assert_close(torch.func.jacrev(m)(x), dense, rtol=1e-10, atol=1e-12)
    params = {k: p.detach() for k, p in m.named_parameters()}

    def loss(p, xi):
        return torch.func.functional_call(m, p, (xi.unsqueeze(0),)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for name, p in m.named_parameters():
        ref = torch.stack(
            [torch.autograd.grad(m(xi.unsqueeze(0)).square().sum(), p)[0] for xi in x]
        )
        torch.testing.assert_close(per_sample[name], ref, rtol=1e-10, atol=1e-12)
