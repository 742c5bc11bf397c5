r"""The Cayley convolution as one autograd op, with a backward that reuses the forward's work.

Helpers of `lipnets.functional.fft_cayley`: the batched Cayley map of Note [Cayley on the
Stiefel manifold] (`_cayley_tall`, differentiable, used by `cayley_frequency_matrices`), and
`_CayleyConv`, which applies it to an input by FFT in one autograd op.

# Note [Fused Cayley convolution backward]

Composed from its parts (`cayley_frequency_matrices`, then `fft_conv2d`), a training step
of the Cayley convolution runs, per frequency, one inverse and five batched products: $Q
\hat X$ forward; backward $Q^H \hat G$ (the input gradient), $\hat G \hat X^H$ (the
gradient of $Q$) and two products with $R^H$ for the inverse's derivative $-R^H \bar Q
R^H$. Written as one op, the last three become one, because both factors of the
derivative are already at hand.

Tall orientation, $Q = [2R - I;\ -2VR]$ with $R = M^{-1}$, $M = I + S + V^H V$ ($S$
skew-Hermitian, Note [Cayley on the Stiefel manifold]). With $\hat G$ the output
gradient's `rfft2` and $w_f$ the weight of frequency $f$ (below), the gradient of $Q$ is
$w \hat G \hat X^H$, so that of $R$ is $2 w (\hat G_{\top} - V^H \hat G_{\bot}) \hat X^H$
and that of $M$ is

$$\bar M = -R^H \bar R R^H = -2 w\, \big(R^H (\hat G_\top - V^H \hat G_\bot)\big)\,
(R \hat X)^H .$$

Both factors come free: the forward's top block is $\hat Y_\top = 2 R \hat X - \hat X$, so
$R \hat X = (\hat Y_\top + \hat X) / 2$, and the input gradient's transform is $Q^H \hat G
= 2 R^H (\hat G_\top - V^H \hat G_\bot) - \hat G_\top$. Hence, with one product,

$$\bar M = -\tfrac{w}{2}\, (Q^H \hat G + \hat G_\top)\, (\hat Y_\top + \hat X)^H, \qquad
\bar V = -w\, \hat G_\bot (\hat Y_\top + \hat X)^H + V (\bar M + \bar M^H),$$

and $\bar S = \bar M$. A wide kernel applies $Q = Q_t^\top$; its gradient is $\bar Q_t =
w\, \overline{\hat X}\, \overline{\hat G}^H$, the tall case with $\overline{\hat X}$ in the
place of $\hat G$ and $\overline{\hat G}$ in the place of $\hat X$ (the top block now
being the first input channels), which gives, with $P = (Q^H \hat G)_\top + \hat G$,
$\bar M = -\tfrac{w}{2}\, \overline{(\hat Y + \hat X_\top)}\, P^\top$ and
$\bar V = -w\, \overline{\hat X_\bot}\, P^\top + V(\bar M + \bar M^H)$. The forward keeps
the conjugated sums (one pass over the spectrum), and the backward runs one `rfft2`,
$Q^H \hat G$, one `irfft2` (only if the input needs a gradient) and one product for
$\bar M$ and $\bar V$ together. (The code holds every spectrum transposed, Note
[Frequency-major layout]; the products are the same.)

The weights: `irfft2`'s adjoint in torch's convention scales by $1/(HW)$ and doubles the
columns that stand for two frequencies (Note [Frequency convolution backward]). In the
self-conjugate columns the matrices are made consistent (Note [Real-FFT symmetry]): a
mirrored bin holds the conjugate of its partner, whose matrix therefore also receives the
mirrored bin's gradient, conjugated. For real inputs the spectra are Hermitian too, so
that gradient equals the partner's own: the partner's weight doubles to $2/(HW)$, the
mirrored bin's is 0 (its raw matrix is never used), and a self-conjugate bin keeps
$1/(HW)$ (its matrices, phases and spectra are real). The tests compare every gradient
with autograd through the composed ops, and run `gradcheck` in float64.

A double backward (a backward with `create_graph=True`, as the power path of
`lipnets.estimators.jacobian_norm` takes) recomputes the op from the composed
differentiable parts and differentiates that instead; the saved factors above have no
history.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lipnets.functional._fft_autograd import (
    _conj,
    _frequency_conv,
    _FrequencyConv,
    _inverse,
    _matmul,
    _signal,
    _spectrum,
    _transforms_active,
)
from lipnets.functional._fft_symmetry import _fix_bins, _make_hermitian, _symmetry_tables


def _cayley_tall(m: Tensor, v: Tensor | None) -> Tensor:
    """Batched Cayley map of Note [Cayley on the Stiefel manifold] for the tall orientation.

    `m` holds $I + U - U^H$ for the top block $U$, computed in the tap domain (Note [Skew
    part in the tap domain]); `v` the other rows of the tall matrix, or None for a square
    one. Returns the (not yet Hermitian-consistent) matrices $[2R - I;\\ -2VR]$.
    """
    if v is not None:
        m = m + _matmul(_conj(v).mT, v)
    r = _inverse(m)
    top = 2 * r
    top.diagonal(dim1=-2, dim2=-1).sub_(1)  # 2R - I, in place on a fresh tensor
    if v is None:
        return top
    return torch.cat((top, -2 * _matmul(v, r)), dim=-2)


def _cayley_matrices(m: Tensor, v: Tensor | None, wide: bool, height: int, width: int) -> Tensor:
    """The Hermitian-consistent (H * (W//2 + 1), out, in) matrices, differentiable."""
    q = _make_hermitian(_cayley_tall(m, v), height, width)
    return q.mT if wide else q


def _bin_weights(height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """$-w_f / 2$ per `rfft2` bin, shape (bins, 1, 1) (Note [Fused Cayley convolution
    backward])."""
    mirrored, _, real = _symmetry_tables(height, width, device)
    weight = torch.full((height * (width // 2 + 1),), -1.0 / (height * width), dtype=dtype)
    weight = weight.to(device)
    weight[mirrored] = 0.0
    weight[real] = -0.5 / (height * width)
    return weight.reshape(-1, 1, 1)


class _CayleyConv(torch.autograd.Function):
    """$y = \\mathrm{irfft2}(Q\\, \\mathrm{rfft2}(x))$ with $Q$ the Cayley matrices of
    (`m`, `v`); Note [Fused Cayley convolution backward].

    `x` is (B, n, H, W) real; `m` (bins, k, k) and `v` (bins, r, k) or None are the tall
    orientation's parts, `wide` says whether the layer applies the transpose. The forward
    computes exactly what `cayley_frequency_matrices` and `fft_conv2d` compute.
    """

    @staticmethod
    def forward(ctx, x, m, v, wide, height, width):  # type: ignore[override]
        q = _cayley_tall(m, v)
        mirrored, partner, real = _symmetry_tables(height, width, q.device)
        _fix_bins(torch.view_as_real(q), mirrored, partner, real)
        q = q.mT if wide else q  # (bins, out, in)
        # Frequency-major, transposed blocks (Note [Frequency-major layout]): each
        # bin holds X^T (B, in) and Y^T = X^T Q^T (B, out).
        x_hat = _spectrum(x)
        y_hat = x_hat @ q.mT
        ctx.size, ctx.wide = (height, width), wide
        left = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # The conjugated sums of the note, one pass each: the tall orientation keeps
            # (Y_top + X)^*, the wide one [Y + X_top, 2 X_bot]^* (a wide kernel always has
            # rows v beyond its top block).
            k = m.shape[-1]
            if not wide:
                left = torch.add(y_hat[..., :k], x_hat).conj_physical_()
            else:
                top = torch.add(y_hat, x_hat[..., :k])
                left = torch.cat((top, 2 * x_hat[..., k:]), dim=-1).conj_physical_()
        ctx.save_for_backward(x, m, v, q, left)
        return _signal(y_hat, height, width)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, m, v, q, left = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # double backward: differentiate the composed parts
            return _recomputed_backward(ctx, grad, x, m, v, needs)
        return _fused_backward(ctx, grad, m, v, q, left, needs)


def _fused_backward(ctx, grad, m, v, q, left, needs):
    """The backward of Note [Fused Cayley convolution backward], from the saved factors."""
    height, width = ctx.size
    g_hat = _spectrum(grad)  # (bins, B, out)
    gx_hat = g_hat @ q.conj_physical()  # (Q^H G)^T: (bins, B, in)
    grad_x = _signal(gx_hat, height, width) if needs[0] else None
    grad_m = grad_v = None
    if needs[1] or needs[2]:
        k = m.shape[-1]
        weight = _bin_weights(height, width, q.real.dtype, q.device)
        if not ctx.wide:  # [Q^H G + G_top; 2 G_bot] (Y_top + X)^H
            if v is None:
                factor = torch.add(gx_hat, g_hat)
            else:
                factor = torch.cat((gx_hat + g_hat[..., :k], 2 * g_hat[..., k:]), dim=-1)
            both = factor.mul_(weight).mT @ left  # (bins, k + r, k)
        else:  # [Y + X_top; 2 X_bot]^* ((Q^H G)_top + G)^T
            factor = torch.add(gx_hat[..., :k], g_hat).mul_(weight)
            both = left.mT @ factor  # (bins, k + r, k)
        grad_m = both[:, :k]
        if v is not None and needs[2]:
            grad_v = both[:, k:] + v @ (grad_m + grad_m.mH)
        grad_m = grad_m if needs[1] else None
    return grad_x, grad_m, grad_v, None, None, None


def _recomputed_backward(ctx, grad, x, m, v, needs):
    """The backward through the composed differentiable ops, keeping its graph."""
    height, width = ctx.size
    inputs = [t for t, need in zip((x, m, v), needs, strict=True) if need]
    with torch.enable_grad():
        q = _cayley_matrices(m, v, ctx.wide, height, width)
        y = _FrequencyConv.apply(x, q.reshape(height, width // 2 + 1, *q.shape[-2:]))
        grads = iter(torch.autograd.grad(y, inputs, grad, create_graph=True))
    return (*(next(grads) if need else None for need in needs), None, None, None)


def cayley_conv(
    x: Tensor, m: Tensor, v: Tensor | None, wide: bool, height: int, width: int
) -> Tensor:
    """`_CayleyConv`, or under a torch.func transform the composed plain ops (Note
    [Hand-written backward and torch.func])."""
    if _transforms_active():
        q = _cayley_matrices(m, v, wide, height, width)
        return _frequency_conv(x, q.reshape(height, width // 2 + 1, *q.shape[-2:]))
    return _CayleyConv.apply(x, m, v, wide, height, width)
