r"""The kernel's transfer matrices per frequency, and their adjoint.

Helpers of `lipnets.functional.fft_cayley` (Note [Kernel transform], Note [Skew part in the
tap domain] there): the direct, separable DFT of a kernel's taps onto an `rfft2` grid, its
adjoint (the gradient of the taps, for `lipnets.functional._fft_cayley_fused`), and the taps
whose transfer matrices are the parts of the Cayley map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _phases(size: int, taps: int, count: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    r"""Phase table $e^{2\pi i\, u (t - s) / N}$ for $u <$ `count`, $t <$ `taps`: (count, taps).

    Angles are reduced modulo $N$ in integers and evaluated in float64; where
    the phase is $\pm 1$ its imaginary part is exactly zero.
    """
    offsets = torch.arange(taps) - (taps - 1) // 2
    residue = (torch.arange(count).unsqueeze(1) * offsets) % size
    angle = residue.to(torch.float64) * (2 * math.pi / size)  # on the CPU: float64 everywhere
    real = torch.where(residue == 0, 1.0, torch.cos(angle))
    real = torch.where(2 * residue == size, -1.0, real)
    imag = torch.where((residue == 0) | (2 * residue == size), 0.0, torch.sin(angle))
    return torch.complex(real, imag).to(dtype).to(device)


def _transfer_matrices(kernel: Tensor, height: int, width: int) -> Tensor:
    r"""Flat (H * (W//2 + 1), m, n) transfer matrices of Note [Kernel transform].

    A direct DFT of the $k_h \times k_w$ taps, separable: two small complex
    products instead of an FFT of the kernel zero-padded to $H \times W$; the
    phases are periodic, so taps beyond the grid wrap around by themselves.
    """
    m, n, kh, kw = kernel.shape
    cols = width // 2 + 1
    complex_dtype = kernel.dtype.to_complex()
    phase_h = _phases(height, kh, height, complex_dtype, kernel.device)  # (H, kh)
    phase_w = _phases(width, kw, cols, complex_dtype, kernel.device)  # (cols, kw)
    taps = kernel.permute(2, 3, 0, 1).reshape(kh, kw, m * n).to(complex_dtype)
    along_w = phase_w @ taps  # (kh, cols, m n)
    full = phase_h @ along_w.reshape(kh, cols * m * n)  # (H, cols m n)
    return full.reshape(height * cols, m, n)


def _skew_taps(taps: Tensor) -> Tensor:
    """Taps whose transfer matrices are $I + U - U^H$ (Note [Skew part in the tap domain]).

    `taps` is the kernel in the tall orientation, (rows, k, kh, kw) with rows >= k; $U$ is
    its top block.
    """
    n = taps.shape[1]
    u = taps[:n]
    # Odd tap counts are centred; an even count gets a zero tap in front, which
    # keeps every tap's offset (t - (k - 1) // 2) and makes the offsets symmetric.
    u = F.pad(u, (1 - u.shape[-1] % 2, 0, 1 - u.shape[-2] % 2, 0))
    skew = u - u.flip(-2, -1).transpose(0, 1)
    centre = skew[:, :, (skew.shape[-2] - 1) // 2, (skew.shape[-1] - 1) // 2]
    centre.diagonal().add_(1)  # the identity, at offset 0 (phase exactly 1); a fresh tensor
    return skew


def _transfer_adjoint(grad: Tensor, shape: torch.Size, height: int, width: int) -> Tensor:
    """The gradient of the real taps of `shape` (m, n, kh, kw) from that of their flat
    (bins, m, n) transfer matrices: the adjoint of `_transfer_matrices`, in autograd's
    convention (conjugate-transposed phase tables, then the real part)."""
    m, n, kh, kw = shape
    cols = width // 2 + 1
    phase_h = _phases(height, kh, height, grad.dtype, grad.device)  # (H, kh)
    phase_w = _phases(width, kw, cols, grad.dtype, grad.device)  # (cols, kw)
    along_w = phase_h.mH @ grad.reshape(height, cols * m * n)  # (kh, cols m n)
    taps = phase_w.mH @ along_w.reshape(kh, cols, m * n)  # (kh, kw, m n)
    return taps.real.reshape(kh, kw, m, n).permute(2, 3, 0, 1)


def _cayley_taps(kernel: Tensor) -> tuple[Tensor, Tensor | None, bool]:
    """Taps of $I + U - U^H$, of the other rows $V$ (None if square), and whether the
    kernel is wide: the tall orientation (a wide kernel is transposed) of Note [Cayley on
    the Stiefel manifold]. The top block $U$ itself is never needed, only its skew part."""
    wide = kernel.shape[0] < kernel.shape[1]
    taps = kernel.transpose(0, 1) if wide else kernel
    k = taps.shape[1]
    return _skew_taps(taps), (taps[k:] if taps.shape[0] > k else None), wide
