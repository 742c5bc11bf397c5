r"""Hand-written autograd for the Fourier-domain Cayley convolution.

Helpers of `lipnets.functional.fft_cayley`: a batched inverse and a batched complex product
whose backward passes take conjugates physically, and the frequency-domain convolution
$y = \mathrm{irfft2}(Q\, \mathrm{rfft2}(x))$ with its adjoint written out. Under a
torch.func transform the same maths runs as plain torch ops (Note [Hand-written backward
and torch.func], in `_transforms_active`).

# Note [Frequency convolution backward]

With Hermitian-consistent matrices the map $x \mapsto \mathrm{irfft2}(Q\,
\mathrm{rfft2}(x))$ is a real operator $T = F^{-1} D F$ ($D$ the full
block-diagonal of $Q$ and its conjugates), so $T^\top = F^{-1} D^H F$: the
input gradient is the same convolution with every $Q^H$. This costs one real
FFT each way, where autograd through `rfft2` pads to the full spectrum and
runs a complex FFT. The gradient of $Q$ is $\hat G\, \hat X^H$ per frequency,
with $\hat G$ = `rfft2` of the output gradient scaled as torch's `irfft2`
backward scales it ($1/(HW)$, doubled off the self-conjugate columns), so it
equals what autograd would give. Conjugates are taken physically, once:
batched products with conjugate views copy every matrix separately on CPU.
The tests compare both gradients with autograd through the plain ops and run
`gradcheck` in float64.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor


def _transforms_active() -> bool:
    """Whether a torch.func transform (vmap, jvp, jacrev, ...) is running.

    # Note [Hand-written backward and torch.func]

    The autograd Functions of this module only make the backward pass cheaper
    (fewer copies, conjugates taken physically); they have no forward-mode or
    vmap rule. Under a torch.func transform the same maths runs as plain torch
    ops instead, which every transform supports: the function computed is the
    same, only the backward's memory traffic differs.
    """
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def _conj(t: Tensor) -> Tensor:
    """The conjugate, physical for the hand-written products, lazy under torch.func."""
    return t.conj() if _transforms_active() else t.conj_physical()


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    return a @ b if _transforms_active() else _Matmul.apply(a, b)


def _inverse(m: Tensor) -> Tensor:
    """Inverse of the Cayley denominators $I + A$ (Hermitian part $\\succeq I$)."""
    return torch.linalg.inv(m) if _transforms_active() else _Inverse.apply(m)


_LAPACK_BELOW = 16  # matrix size below which the block inverse calls LAPACK (on the CPU)


def _block_inverse(m: Tensor) -> Tensor:
    r"""Row-major inverse of a (batch, n, n) stack whose Hermitian parts are $\succeq I$.

    # Note [Block inverse of the Cayley denominators]

    With $M = \begin{bmatrix} A & B \\ C & D \end{bmatrix}$ (halves of the size),
    $X = A^{-1} B$, $Y = C A^{-1}$ and the Schur complement $S = D - C X$,

    $$M^{-1} = \begin{bmatrix} A^{-1} + X S^{-1} Y & -X S^{-1} \\ -S^{-1} Y & S^{-1}
    \end{bmatrix},$$

    so one inverse of size $n$ is two of size $n/2$ (inverted the same way, down to
    LAPACK below 16) and six batched products of size $n/2$: about $n^3$ complex
    multiply-adds in all, against $4/3\, n^3$ for `torch.linalg.inv` (an LU factorisation
    and a solve with the identity), and most of them at GEMM speed. On one CPU thread it
    costs half of `torch.linalg.inv` for sizes 32 to 128 (544 complex matrices of size
    64: 30 against 60 ms), which takes a CayleyConv2d training step at 64 channels,
    $32 \times 32$, batch 64 from about 3.0x to 2.4x a circular `nn.Conv2d`.

    Block elimination without pivoting is safe here because every matrix it meets has
    Hermitian part $\succeq I$, so $\sigma_{\min} \ge 1$: the Cayley denominators $M =
    I + U - U^H + V^H V$ do (Note [Cayley on the Stiefel manifold]), so do their
    transposes (the Hermitian part transposed), their leading blocks $A$ (principal
    submatrices) and the Schur complements: for $w = (-X z, z)$, $M w = (0, S z)$, hence
    $\mathrm{Re}\, z^H S z = \mathrm{Re}\, w^H M w \ge \|w\|^2 \ge \|z\|^2$. No pivot is
    small and every inverse has norm at most 1.

    Its rounding error still grows faster with $\|M\|_2$ than that of pivoted LU: the
    float32 orthogonality error of $2R - I$ (largest $|\sigma - 1|$, 64 channels, 256
    frequencies) is the same as LAPACK's or smaller up to $\max \|M\|_2 \approx 14$ (7e-7
    against 8e-7 at the layer's initialisation, where $\|M\|_2 \approx 2$; 2e-6 against
    3e-6 at 14) and larger beyond (5e-6 against 4e-6 at 20, 3e-5 against 6e-6 at 70).
    So the block inverse is used only when the cheap bound $\|M\|_2 \le 1 + \|M -
    I\|_F$ is at most 16 for every frequency; otherwise `torch.linalg.inv` runs, as
    before. The choice changes rounding only, never the function.
    """
    n = m.shape[-1]
    if n < _LAPACK_BELOW:
        return torch.linalg.inv(m)
    h = n // 2
    a, b, c, d = m[:, :h, :h], m[:, :h, h:], m[:, h:, :h], m[:, h:, h:]
    a_inv = _block_inverse(a)
    x = a_inv @ b
    s_inv = _block_inverse(torch.baddbmm(d, c, x, alpha=-1))
    out = m.new_empty(m.shape)
    lower = torch.bmm(s_inv, c @ a_inv)  # S^{-1} Y
    out[:, :h, :h] = torch.baddbmm(a_inv, x, lower)
    torch.neg(lower, out=out[:, h:, :h])
    torch.neg(x @ s_inv, out=out[:, :h, h:])
    out[:, h:, h:] = s_inv
    return out


_BLOCK_NORM_LIMIT = 16.0  # Note [Block inverse of the Cayley denominators]


def _cayley_inverse(m: Tensor) -> Tensor:
    r"""`torch.linalg.inv` of the Cayley denominators; on the CPU, for sizes of at least
    16 and $\|M\|_2 \le 16$, Note [Block inverse of the Cayley denominators] (in the
    same column-major layout)."""
    if m.device.type != "cpu" or m.ndim != 3 or m.shape[-1] < _LAPACK_BELOW:
        return torch.linalg.inv(m)
    # ||M||_2 <= 1 + ||M - I||_F, with ||M - I||_F^2 = ||M||_F^2 - 2 Re tr M + n.
    # (The squared Frobenius norms as one batched dot product of the real views: 4 ms
    # for 544 matrices of size 64, where complex `vector_norm` takes 40.)
    parts = (torch.view_as_real(m) if m.is_complex() else m).reshape(m.shape[0], 1, -1)
    excess = (parts @ parts.mT).reshape(-1)
    excess = excess - 2 * m.diagonal(dim1=-2, dim2=-1).real.sum(-1) + m.shape[-1]
    if not bool(excess.max() <= (_BLOCK_NORM_LIMIT - 1) ** 2):
        return torch.linalg.inv(m)
    return _block_inverse(m.mT).mT


class _Inverse(torch.autograd.Function):
    """Batched matrix inverse whose backward avoids conjugate views.

    The derivative is the usual $-R^H G R^H$; the conjugate is taken once,
    physically, so the batched products see plain transposed operands (a
    conjugate view makes torch copy every matrix of the batch separately on
    CPU). The backward is built from differentiable ops, so double backward
    works.
    """

    @staticmethod
    def forward(ctx, m):  # type: ignore[override]
        r = _cayley_inverse(m)
        ctx.save_for_backward(r)
        return r

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (r,) = ctx.saved_tensors
        rh = r.conj_physical().mT if r.is_complex() else r.mT
        return (rh @ (grad @ rh)).neg_()  # a fresh product: negate in place


class _Matmul(torch.autograd.Function):
    """Batched complex product whose backward takes conjugates physically (see `_Inverse`)."""

    @staticmethod
    def forward(ctx, a, b):  # type: ignore[override]
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        a, b = ctx.saved_tensors
        grad_a = grad @ b.conj_physical().mT if ctx.needs_input_grad[0] else None
        grad_b = a.conj_physical().mT @ grad if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def _frequency_conv(x: Tensor, q: Tensor) -> Tensor:
    """The forward of `_FrequencyConv` in plain torch ops (Note [Hand-written backward and
    torch.func])."""
    height, width = x.shape[-2:]
    x_hat = torch.fft.rfft2(x)  # (B, n, H, C)
    y_hat = torch.einsum("hcmn,bnhc->bmhc", q, x_hat)
    return torch.fft.irfft2(y_hat, s=(height, width))


def _spectrum(x: Tensor) -> Tensor:
    r"""`rfft2` of a real (B, C, H, W) tensor as (H * (W//2 + 1), B, C), contiguous.

    # Note [Frequency-major layout]

    The batched products need each frequency's (B, C) block contiguous, and `rfft2`
    over the last two dimensions gives the bins innermost, (B, C, bins).
    Laid out as (bins, B, C) the change is the transpose of one (B C, bins) matrix,
    which torch copies with its blocked 2-D transpose (about 3x faster on CPU than the
    permuted copy to (bins, C, B)), for the same products (with the matrices on the
    right, $\hat Y^\top = \hat X^\top Q^\top$). (`rfft2` over the first two dimensions
    of the permuted (H, W, B C) view writes that layout itself, the same numbers bit for
    bit; alone it took 5.5 against 8.5 ms at 64 channels, $32 \times 32$, batch 64, one
    CPU thread, but inside a training step it made the step slower, so it is not used.)

    The inverse (`_signal`) runs the two 1-D transforms separately so that it too costs
    one 2-D transpose: the inverse FFT along $H$ reads the (H, W//2 + 1, B C) spectrum
    in place and writes $H$ innermost, (W//2 + 1, B C, H); one transpose makes that
    (B C, H, W//2 + 1), and the real inverse along $W$ reads it contiguously. `irfft2`
    straight from the permuted (bins, B, C) view reads every transform strided and cost
    2.5x as much (32 channels, $16 \times 16$, batch 64, one CPU thread: 2.1 ms
    against 0.8 ms). For $W \le 16$ on the CPU the last, real transform is one matrix
    product with the $(2 (W//2 + 1)) \times W$ matrix of `irfft` (`_c2r_matrix_cpu`): at
    $W = 16$ it costs half of torch's complex-to-real FFT, at $W = 32$ more. It is the
    same real operator (the imaginary parts of the self-conjugate columns are ignored,
    as `irfft` ignores them) and the same normalisation.
    """
    batch, channels = x.shape[:2]
    x_hat = torch.fft.rfft2(x).contiguous()
    return x_hat.reshape(batch * channels, -1).t().contiguous().reshape(-1, batch, channels)


@functools.lru_cache(maxsize=32)
def _c2r_matrix_cpu(width: int, dtype: torch.dtype) -> Tensor:
    """The (2 (W//2 + 1), W) real matrix of `irfft` along one axis (Note [Frequency-major
    layout]): rows (v, Re) and (v, Im), angles reduced modulo W in integers."""
    cols = width // 2 + 1
    residue = (torch.arange(cols).unsqueeze(1) * torch.arange(width)) % width
    angle = residue.to(torch.float64) * (2 * math.pi / width)
    cos = torch.where(residue == 0, 1.0, torch.cos(angle))
    cos = torch.where(2 * residue == width, -1.0, cos)
    sin = torch.where((residue == 0) | (2 * residue == width), 0.0, torch.sin(angle))
    weight = torch.full((cols, 1), 2.0 / width, dtype=torch.float64)
    weight[0] = 1.0 / width
    if width % 2 == 0:
        weight[-1] = 1.0 / width
    matrix = torch.stack((weight * cos, -weight * sin), dim=1)  # (cols, 2, W)
    return matrix.reshape(2 * cols, width).to(dtype)


def _signal(pending: list[Tensor], height: int, width: int) -> Tensor:
    """`irfft2` of frequencies laid out as (H * (W//2 + 1), B, C), as (B, C, H, W).

    Note [Frequency-major layout]: the inverse FFT along H, one 2-D transpose, then the
    real inverse along W (a matrix product for W <= 16 on the CPU). `pending` holds the
    spectrum and is emptied (Note [Spectra freed early]).
    """
    y_hat = pending.pop()
    bins, batch, channels = y_hat.shape
    cols = bins // height
    on_cpu, dtype = y_hat.device.type == "cpu", y_hat.real.dtype
    along_h = torch.fft.ifft(y_hat.reshape(height, cols, batch * channels), dim=0)
    del y_hat  # the transpose below can take its memory
    along_h = along_h.permute(2, 0, 1).contiguous()  # (B C, H, cols)
    if width <= 16 and on_cpu:
        matrix = _c2r_matrix_cpu(width, dtype)
        y = torch.view_as_real(along_h).reshape(-1, 2 * cols) @ matrix
    else:
        y = torch.fft.irfft(along_h, n=width, dim=-1)
    return y.reshape(batch, channels, height, width)


class _FrequencyConv(torch.autograd.Function):
    """$y = \\mathrm{irfft2}(Q\\, \\mathrm{rfft2}(x))$ with a hand-written adjoint.

    See Note [Frequency convolution backward] and Note [Frequency-major layout].
    The backward is built from differentiable ops (itself included), so double
    backward works.
    """

    @staticmethod
    def forward(ctx, x, q):  # type: ignore[override]
        height, width = x.shape[-2:]
        freq = q.shape[0] * q.shape[1]
        q_flat = q.reshape(freq, *q.shape[2:])
        x_hat = _spectrum(x)  # (bins, B, n)
        pending = [x_hat @ q_flat.mT]  # (bins, B, m)
        keep = ctx.needs_input_grad[1]
        ctx.save_for_backward(x if keep else None, x_hat if keep else None, q)
        ctx.width = width
        del x_hat
        return _signal(pending, height, width)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, x_hat, q = ctx.saved_tensors
        height, cols, m, n = q.shape
        width = ctx.width
        freq = height * cols
        differentiable = torch.is_grad_enabled()  # double backward: build from tracked ops
        grad_x = grad_q = None
        g_hat = None
        if ctx.needs_input_grad[1] or not differentiable:
            g_hat = _spectrum(grad)  # (bins, B, m)
        if ctx.needs_input_grad[0]:
            # The adjoint of the real operator: the same map with Q^H.
            if differentiable:
                grad_x = _FrequencyConv.apply(grad, q.conj_physical().mT)
            else:
                pending = [g_hat @ q.reshape(freq, m, n).conj_physical()]  # (bins, B, n)
                grad_x = _signal(pending, height, width)
        if ctx.needs_input_grad[1]:
            if differentiable:  # x_hat must depend on x
                x_hat = _spectrum(x)
            grad_q = (g_hat.mT @ x_hat.conj_physical()).reshape(height, cols, m, n)
            # irfft2's adjoint in torch's convention: 1/(HW), doubled off the
            # self-conjugate columns (those are stored once for two frequencies).
            weight = torch.full((cols,), 2.0, dtype=grad_q.real.dtype, device=q.device)
            weight[0] = 1.0
            if width % 2 == 0:
                weight[-1] = 1.0
            grad_q = grad_q * (weight / (height * width)).reshape(1, cols, 1, 1)
        return grad_x, grad_q
