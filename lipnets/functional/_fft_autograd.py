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
    return torch.linalg.inv(m) if _transforms_active() else _Inverse.apply(m)


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
        r = torch.linalg.inv(m)
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

    The batched products need each frequency's (B, C) block contiguous, and
    `rfft2` gives them frequency-innermost, (B, C, bins). Laid out as
    (bins, B, C) the change is the transpose of one (B C, bins) matrix, which
    torch copies with its blocked 2-D transpose: about 3x faster on CPU than
    the permuted copy to (bins, C, B), for the same products (with the
    matrices on the right, $\hat Y^\top = \hat X^\top Q^\top$). The inverse
    transform reads the (bins, B, C) result through a permuted view.
    """
    batch, channels = x.shape[:2]
    x_hat = torch.fft.rfft2(x).contiguous()
    return x_hat.reshape(batch * channels, -1).t().contiguous().reshape(-1, batch, channels)


def _signal(y_hat: Tensor, height: int, width: int) -> Tensor:
    """`irfft2` of frequencies laid out as (H * (W//2 + 1), B, C), as (B, C, H, W)."""
    bins, batch, channels = y_hat.shape
    y_hat = y_hat.reshape(height, bins // height, batch, channels).permute(2, 3, 0, 1)
    return torch.fft.irfft2(y_hat, s=(height, width))


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
        y_hat = x_hat @ q_flat.mT  # (bins, B, m)
        keep = ctx.needs_input_grad[1]
        ctx.save_for_backward(x if keep else None, x_hat if keep else None, q)
        ctx.width = width
        return _signal(y_hat, height, width)

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
                gx_hat = g_hat @ q.reshape(freq, m, n).conj_physical()  # (bins, B, n)
                grad_x = _signal(gx_hat, height, width)
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
