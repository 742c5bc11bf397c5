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
the sums, formed in place in the input's spectrum, and the backward runs one `rfft2`,
$Q^H \hat G$, one `irfft2` (only if the input needs a gradient) and one product for
$\bar M$ and $\bar V$ together. The backward holds $\overline{\hat G}$, so that
$\overline{Q^H \hat G}$ is a product with $Q$ itself, forms the conjugated factors in place
and conjugates the product's result once. (The code holds every spectrum transposed, Note
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

# Note [Spectra freed early]

Every full-size complex buffer of the op (one (bins, B, C) spectrum or one stack of
frequency matrices: 17.8 MB at 64 channels, $32 \times 32$, batch 64) that is alive at the
training step's peak is memory the allocator takes fresh from the kernel and gives back
when the step ends, and on the CPU its first touch costs a page fault per 4 KiB page
(measured on this project's machine at about 1.6 µs, 7 ms per buffer). So the op keeps as
few alive at once as it can: it takes the kernel's taps (`_cayley_taps`) rather than their
transfer matrices and keeps only the taps for the backward (which recomputes $V$ where it
needs it, by two small products, and applies the tap transform's adjoint,
`_transfer_adjoint`); it forms its sums in place in buffers it owns; it holds the
backward's spectra conjugated, so that no conjugate copy of $Q$ is made; and it hands each
spectrum to `_signal` in a one-element list that `_signal` empties, so the spectrum is
freed once its first inverse transform is taken and the transpose after it reuses the
memory. At 64 channels, $32 \times 32$, batch 64, one CPU thread, forward and backward of
the op went from about 39 000 page faults and 219 ms to 13 000 and 170 ms, with the same
outputs and gradients bit for bit.

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
from lipnets.functional._fft_taps import _transfer_adjoint, _transfer_matrices


def _cayley_tall(m: Tensor, v: Tensor | None) -> Tensor:
    """Batched Cayley map of Note [Cayley on the Stiefel manifold] for the tall orientation.

    `m` holds $I + U - U^H$ for the top block $U$, computed in the tap domain (Note [Skew
    part in the tap domain]); `v` the other rows of the tall matrix, or None for a square
    one. Returns the (not yet Hermitian-consistent) matrices $[2R - I;\\ -2VR]$.
    """
    if v is not None:
        m = m + _matmul(_conj(v).mT, v)
    r = _inverse(m)
    bottom = None if v is None else -2 * _matmul(v, r)
    # 2R - I; in place on R when nothing differentiates through it (inside the fused op)
    top = 2 * r if r.requires_grad or _transforms_active() else r.mul_(2)
    top.diagonal(dim1=-2, dim2=-1).sub_(1)  # a fresh tensor either way
    if bottom is None:
        return top
    return torch.cat((top, bottom), dim=-2)


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
    r"""$y = \mathrm{irfft2}(Q\, \mathrm{rfft2}(x))$ with $Q$ the Cayley matrices of the
    taps (`skew`, `rows`); Note [Fused Cayley convolution backward].

    `x` is (B, n, H, W) real; `skew` (k, k, kh, kw) and `rows` (r, k, kh, kw) or None are
    the taps of the tall orientation's parts (`_cayley_taps`), `wide` says whether the layer
    applies the transpose. The forward computes exactly what `cayley_frequency_matrices`
    and `fft_conv2d` compute. Only the taps are kept for the backward, not their transfer
    matrices (Note [Spectra freed early]).
    """

    @staticmethod
    def forward(ctx, x, skew, rows, wide, height, width):  # type: ignore[override]
        m, v = _parts(skew, rows, height, width)
        q = _cayley_tall(m, v)
        del m, v
        mirrored, partner, real = _symmetry_tables(height, width, q.device)
        _fix_bins(torch.view_as_real(q), mirrored, partner, real)
        q = q.mT if wide else q  # (bins, out, in)
        # Frequency-major, transposed blocks (Note [Frequency-major layout]): each
        # bin holds X^T (B, in) and Y^T = X^T Q^T (B, out).
        x_hat = _spectrum(x)
        pending = [x_hat @ q.mT]  # Note [Spectra freed early]
        y_hat = pending[0]
        ctx.size, ctx.wide = (height, width), wide
        left = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # The sums of the note, formed in place in X's spectrum: the tall orientation
            # keeps Y_top + X, the wide one [Y + X_top, 2 X_bot] (a wide kernel always has
            # rows v beyond its top block); the backward works with conjugates.
            k = skew.shape[0]
            if not wide:
                left = x_hat.add_(y_hat[..., :k])
            else:
                x_hat[..., :k].add_(y_hat)
                x_hat[..., k:].mul_(2)
                left = x_hat
        ctx.save_for_backward(x, skew, rows, q, left)
        del x_hat, y_hat
        return _signal(pending, height, width)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, skew, rows, q, left = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # double backward: differentiate the composed parts
            return _recomputed_backward(ctx, grad, x, skew, rows, needs)
        return _fused_backward(ctx, grad, skew, rows, q, left, needs)


def _parts(skew: Tensor, rows: Tensor | None, height: int, width: int):
    """The transfer matrices $I + U - U^H$ and $V$ (None for a square kernel) of the taps."""
    v = None if rows is None else _transfer_matrices(rows, height, width)
    return _transfer_matrices(skew, height, width), v


def _fused_backward(ctx, grad, skew, rows, q, left, needs):
    """The backward of Note [Fused Cayley convolution backward], from the saved factors.

    Every spectrum is held conjugated (the products then need no conjugate of $Q$, whose
    physical copy would be one more full-size buffer), and the sums are formed in place.
    """
    height, width = ctx.size
    g_hat = _spectrum(grad).conj_physical_()  # conjugated: (bins, B, out)
    gx_hat = g_hat @ q  # (Q^H G)^T, conjugated: (bins, B, in)
    grad_skew = grad_rows = None
    if needs[1] or needs[2]:
        v = _transfer_matrices(rows, height, width) if needs[2] else None
        parts = (g_hat, gx_hat, v, q, left)
        grad_m, grad_v = _kernel_grads(ctx.wide, skew.shape[0], height, width, *parts)
        if needs[1]:
            grad_skew = _transfer_adjoint(grad_m, skew.shape, height, width)
        if needs[2]:
            grad_rows = _transfer_adjoint(grad_v, rows.shape, height, width)
    del g_hat  # Note [Spectra freed early]
    grad_x = None
    if needs[0]:
        pending = [gx_hat.conj_physical_()]
        del gx_hat
        grad_x = _signal(pending, height, width)
    return grad_x, grad_skew, grad_rows, None, None, None


def _kernel_grads(wide, k, height, width, g_hat, gx_hat, v, q, left):
    """Gradients of $M$ ($k \times k$) and (if `v` is given) $V$ from the conjugated
    spectra; overwrites `g_hat`."""
    weight = _bin_weights(height, width, q.real.dtype, q.device)
    if not wide:  # [Q^H G + G_top; 2 G_bot] (Y_top + X)^H
        g_hat[..., :k].add_(gx_hat)
        g_hat[..., k:].mul_(2)
        both = g_hat.mul_(weight).mT @ left  # (bins, k + r, k), conjugated
    else:  # [Y + X_top; 2 X_bot]^* ((Q^H G)_top + G)^T
        both = left.mT @ g_hat.add_(gx_hat[..., :k]).mul_(weight)  # conjugated
    grad_m = both.conj_physical_()[:, :k]
    grad_v = None if v is None else both[:, k:] + v @ (grad_m + grad_m.mH)
    return grad_m, grad_v


def _recomputed_backward(ctx, grad, x, skew, rows, needs):
    """The backward through the composed differentiable ops, keeping its graph."""
    height, width = ctx.size
    inputs = [t for t, need in zip((x, skew, rows), needs, strict=True) if need]
    with torch.enable_grad():
        q = _cayley_matrices(*_parts(skew, rows, height, width), ctx.wide, height, width)
        y = _FrequencyConv.apply(x, q.reshape(height, width // 2 + 1, *q.shape[-2:]))
        grads = iter(torch.autograd.grad(y, inputs, grad, create_graph=True))
    return (*(next(grads) if need else None for need in needs), None, None, None)


def cayley_conv(
    x: Tensor, skew: Tensor, rows: Tensor | None, wide: bool, height: int, width: int
) -> Tensor:
    """`_CayleyConv` of the taps from `_cayley_taps`, or under a torch.func transform the
    composed plain ops (Note [Hand-written backward and torch.func])."""
    if _transforms_active():
        q = _cayley_matrices(*_parts(skew, rows, height, width), wide, height, width)
        return _frequency_conv(x, q.reshape(height, width // 2 + 1, *q.shape[-2:]))
    return _CayleyConv.apply(x, skew, rows, wide, height, width)
