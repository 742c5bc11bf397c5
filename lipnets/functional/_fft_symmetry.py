r"""Hermitian consistency of per-frequency matrices on an `rfft2` grid.

Helpers of `lipnets.functional.fft_cayley`: the bins that `irfft2` reads twice or as real,
and the autograd op that makes a stack of frequency matrices consistent there.

# Note [Real-FFT symmetry]

Real signals have Hermitian spectra, so `rfft2` keeps only the columns
$v = 0, \dots, \lfloor W/2 \rfloor$. Within the columns that are their own
conjugate ($v = 0$, and $v = W/2$ for even $W$) the rows $u$ and $-u \bmod H$
are both stored and must hold conjugate matrices, and the bins that are their
own conjugate ($u \in \{0, H/2\}$ there) must hold real matrices; otherwise
`irfft2` silently applies the Hermitian average $(Q_{u} +
\overline{Q_{-u}})/2$ (and $\mathrm{Re}\, Q_u$) instead of $Q_u$. Both are
averages of matrices of norm at most $\max \sigma$, so the bound would stay
sound, but the realised operator would not be the one described. The
matrices are therefore computed at every bin and then, in the self-conjugate
columns only (a few bins), the mirrored bin is overwritten with the exact
conjugate of its partner and the self-conjugate bins with their real part
(their phase tables are exactly real, so this changes nothing beyond
rounding). The matrices that `fft_conv2d` multiplies are then exactly the
blocks of a real linear operator, the one whose norm the bound describes.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lipnets.functional._fft_autograd import _transforms_active


@functools.lru_cache(maxsize=64)
def _symmetry_tables_cpu(height: int, width: int) -> tuple[Tensor, ...]:
    cols = width // 2 + 1
    u = torch.arange(height).unsqueeze(1).expand(height, cols)
    v = torch.arange(cols).unsqueeze(0).expand(height, cols)
    self_col = (v == 0) | (2 * v == width)
    partner_u = (-u) % height
    mirrored = self_col & (u > partner_u)
    real = self_col & (u == partner_u)
    return (
        (u * cols + v)[mirrored],
        (partner_u * cols + v)[mirrored],
        (u * cols + v)[real],
    )


def _symmetry_tables(height: int, width: int, device: torch.device) -> tuple[Tensor, ...]:
    """Flat bin indices of Note [Real-FFT symmetry] for an `rfft2` grid of (height, width).

    Returns `mirrored` (bins $(u, v)$ of a self-conjugate column with
    $u > -u \\bmod H$), `partner` (their conjugate partners, in the same order)
    and `real` (the bins that are their own conjugate). They depend on the size
    only, so they are built once per size on the CPU (no weights are cached).
    """
    return tuple(t.to(device) for t in _symmetry_tables_cpu(height, width))


def _fix_bins(parts: Tensor, mirrored: Tensor, partner: Tensor, real: Tensor) -> None:
    """In place on a real view (bins, ..., 2): mirrored := conj(partner), real bins := real."""
    conj = torch.tensor([1.0, -1.0], dtype=parts.dtype, device=parts.device)
    parts[mirrored] = parts[partner] * conj
    parts[real, ..., 1] = 0.0


class _Hermitian(torch.autograd.Function):
    """Note [Real-FFT symmetry] as an autograd op that edits only the few special bins.

    Written out because autograd's own in-place indexing copies the whole
    gradient several times in the backward pass. The forward edits `q` in
    place unless it is a view (then a copy); the backward copies the gradient
    once, sends each mirrored bin's gradient, conjugated, to its partner, and
    drops the imaginary gradient of the self-conjugate bins.
    """

    @staticmethod
    def forward(ctx, q, mirrored, partner, real):  # type: ignore[override]
        in_place = q._base is None
        out = q if in_place else q.clone()
        _fix_bins(torch.view_as_real(out), mirrored, partner, real)
        if in_place:
            ctx.mark_dirty(q)
        ctx.save_for_backward(mirrored, partner, real)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        mirrored, partner, real = ctx.saved_tensors
        parts = torch.view_as_real(grad.clone())
        conj = torch.tensor([1.0, -1.0], dtype=parts.dtype, device=parts.device)
        parts[partner] = parts[partner] + parts[mirrored] * conj
        parts[mirrored] = 0.0
        parts[real, ..., 1] = 0.0
        return torch.view_as_complex(parts), None, None, None


def _make_hermitian(q: Tensor, height: int, width: int) -> Tensor:
    """Mirrored bins := conjugate of their partner, self-conjugate bins := real part.

    `q` is a freshly computed (H * (W//2 + 1), m, n) complex tensor that no
    backward pass saved (Note [Real-FFT symmetry]).
    """
    mirrored, partner, real = _symmetry_tables(height, width, q.device)
    if not _transforms_active():
        return _Hermitian.apply(q, mirrored, partner, real)
    parts = torch.view_as_real(q)  # (bins, m, n, 2)
    conj = torch.tensor([1.0, -1.0], dtype=parts.dtype, device=parts.device)
    parts = parts.index_put((mirrored,), parts[partner] * conj)
    keep_imag = torch.ones(parts.shape[0], dtype=parts.dtype, device=parts.device)
    keep_imag = keep_imag.index_fill(0, real, 0.0)
    scale = torch.stack((torch.ones_like(keep_imag), keep_imag), dim=-1)
    parts = parts * scale.reshape(-1, *[1] * (parts.ndim - 2), 2)
    return torch.view_as_complex(parts.contiguous())
