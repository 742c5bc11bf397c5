r"""Orthogonal circular convolutions by the Cayley transform in the Fourier domain.

A circular (periodic) convolution from $n$ to $m$ channels on an $H \times W$
grid is block-diagonalised by the 2-D discrete Fourier transform: frequency
$(u, v)$ of the output is a complex $m \times n$ matrix $\hat K_{uv}$ times
frequency $(u, v)$ of the input. With the unitary DFT, the convolution's
singular values are exactly those of all the $\hat K_{uv}$ together, so the
convolution is orthogonal if and only if every $\hat K_{uv}$ is. Trockman &
Kolter (2021) make each one orthogonal by a Cayley transform; this module
computes those matrices (`cayley_frequency_matrices`), applies them
(`fft_conv2d`); `lipnets.functional.spectral_norm_bound` and
`orthogonality_error` measure them (they accept stacks of complex
matrices). `lipnets.nn.CayleyConv2d` is the module.

# Note [Kernel transform]

The raw kernel $K$ of shape $(m, n, k_h, k_w)$ means what it means for
`nn.Conv2d` with circular padding $k // 2$ (odd $k$): tap $(i, j)$ acts at offset
$(i - s_h, j - s_w)$, $s = (k - 1) // 2$, and
$y_{h,w} = \sum_{i,j} K_{:,:,i,j}\, x_{(h + i - s_h) \bmod H,\, (w + j - s_w) \bmod W}$.
Its transfer matrix at frequency $(u, v)$ is
$\hat K_{uv} = \sum_{i,j} K_{:,:,i,j}\, e^{2\pi i (u (i - s_h)/H + v (j - s_w)/W)}$,
computed as a direct, separable DFT of the $k_h \times k_w$ taps (two small
products with phase tables; no FFT of a kernel zero-padded to $H \times W$).
The phases are periodic, so taps that land on the same cell of the
$H \times W$ torus add up and a kernel larger than the grid is still the right
circular operator. The Cayley transform is applied to these matrices, so the
raw kernel is the convolution whose Cayley image the layer applies.

# Note [Skew part in the tap domain]

The skew-Hermitian part $U(\omega) - U(\omega)^H$ is formed before the
transform. With $U(\omega) = \sum_d U_d e^{i \omega d}$ over centred tap
offsets $d$, $U(\omega)^H = \sum_d U_{-d}^\top e^{i \omega d}$, so it is the
transfer matrix of the taps $S_d = U_d - U_{-d}^\top$: the kernel minus its
flipped, channel-transposed self (an even tap count first gets a zero tap in
front, which keeps every offset and makes them symmetric). That costs one more
small tap transform instead of a subtraction with a conjugate transpose over
every frequency matrix, forward and backward.

# Note [Cayley on the Stiefel manifold]

For a tall $m \times n$ matrix $Z = [U; V]$ ($U$ its top $n \times n$ block,
$V$ the other $m - n$ rows) let $A = U - U^H + V^H V$. Then

$$Q = \begin{bmatrix} (I + A)^{-1}(I - A) \\ -2 V (I + A)^{-1} \end{bmatrix}$$

is the first $n$ columns of the Cayley transform $(I + S)^{-1}(I - S)$ of the
$m \times m$ skew-Hermitian $S = \begin{bmatrix} U - U^H & -V^H \\ V & 0
\end{bmatrix}$ (eliminate the lower block of $(I + S) X = (I - S) E_n$), so its
columns are orthonormal. Only an $n \times n$ system is solved, and the free
parameters ($n^2$ for the skew part, $2 (m - n) n$ for $V$) match the real
dimension $2mn - n^2$ of the complex Stiefel manifold. With
$R = (I + A)^{-1}$, $(I + A)^{-1}(I - A) = 2R - I$, so one batched inverse
gives both blocks. A wide $Z$ uses the transpose: $Q^\top$ has orthonormal
rows exactly when $Q$ has orthonormal columns.

The inverse is well conditioned: $\mathrm{Re}\, z^H (I + A) z = \|z\|^2 +
\|V z\|^2 \ge \|z\|^2$, so $\sigma_{\min}(I + A) \ge 1$ and
$\|R\|_2 \le 1$; the rounding error of $Q$ grows with $1 + \|A\|_2$ only.

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

# Note [Sound frequency bound]

The operator realised by `fft_conv2d` with given matrices (in exact
arithmetic for the FFTs) is block-diagonal in the unitary DFT basis with those
blocks (Note [Real-FFT symmetry]), so its spectral norm is the largest
singular value over all frequencies. Each matrix is cast exactly to
complex128 and its singular values are computed by LAPACK, backward stable as
in Note [Sound spectral norm in float64] of `lipnets.functional.norms`; the
largest is multiplied by $1 + 10 \max(m, n)\, \varepsilon_{64}$. The FFT
rounding of a float32 forward pass is not part of the operator (it is
arithmetic noise of relative size about $\log_2(HW)\, \varepsilon_{32}$, the
same as in any float32 convolution).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lipnets._checks import check_int, check_int_pair, check_tensor
from lipnets.functional.reshape import space_to_depth

__all__ = [
    "cayley_frequency_matrices",
    "conv_frequency_matrices",
    "fft_cayley_conv2d",
    "fft_conv2d",
]


def _check_kernel(kernel: Tensor, *, finite: bool = True) -> None:
    check_tensor(kernel, "kernel", floating=True)
    if kernel.ndim != 4 or kernel.numel() == 0:
        raise ValueError(
            "kernel must have shape (out_channels, in_channels, kh, kw) with no zero size, "
            f"got {tuple(kernel.shape)}"
        )
    if finite and not bool(torch.isfinite(kernel).all()):
        raise ValueError("kernel contains NaN or infinite entries; it has no Cayley transform")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or the given dtype when it is more precise."""
    return torch.promote_types(dtype, torch.float32)


def _device_type(tensor: object) -> str:
    return tensor.device.type if isinstance(tensor, Tensor) else "cpu"


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


def _cayley_tall(z: Tensor, skew: Tensor) -> Tensor:
    """Batched Cayley map of Note [Cayley on the Stiefel manifold] for tall (..., m, n).

    `skew` is $U - U^H$ for the top block $U$ of `z`, computed in the tap
    domain (Note [Skew part in the tap domain]).
    """
    n = z.shape[-1]
    v = z[..., n:, :]
    m = skew
    if v.shape[-2] > 0:
        m = m + _matmul(_conj(v).mT, v)
    m.diagonal(dim1=-2, dim2=-1).add_(1)  # I + A, in place on a fresh tensor
    r = _inverse(m)
    top = 2 * r
    top.diagonal(dim1=-2, dim2=-1).sub_(1)  # 2R - I
    if v.shape[-2] == 0:
        return top
    return torch.cat((top, -2 * _matmul(v, r)), dim=-2)


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


def _skew_taps(kernel: Tensor, wide: bool) -> Tensor:
    """Taps whose transfer matrices are $U - U^H$ (Note [Skew part in the tap domain])."""
    taps = kernel.transpose(0, 1) if wide else kernel  # the tall orientation
    n = taps.shape[1]
    u = taps[:n]
    # Odd tap counts are centred; an even count gets a zero tap in front, which
    # keeps every tap's offset (t - (k - 1) // 2) and makes the offsets symmetric.
    u = F.pad(u, (1 - u.shape[-1] % 2, 0, 1 - u.shape[-2] % 2, 0))
    return u - u.flip(-2, -1).transpose(0, 1)


def _frequency_matrices(kernel: Tensor, size: int | Sequence[int], cayley: bool) -> Tensor:
    _check_kernel(kernel)
    height, width = check_int_pair(size, "size")
    with torch.autocast(_device_type(kernel), enabled=False):
        kernel = kernel.to(_compute_dtype(kernel.dtype))
        z = _transfer_matrices(kernel, height, width)
        wide = z.shape[-2] < z.shape[-1]
        if wide:  # transposes keep the conjugate symmetry; fix the tall (non-view) result
            z = z.mT
        if cayley:
            z = _cayley_tall(z, _transfer_matrices(_skew_taps(kernel, wide), height, width))
        z = _make_hermitian(z, height, width)
        if wide:
            z = z.mT
        return z.reshape(height, width // 2 + 1, *z.shape[-2:])


def conv_frequency_matrices(kernel: Tensor, size: int | Sequence[int]) -> Tensor:
    r"""Per-frequency transfer matrices of the circular convolution with `kernel`.

    The circular cross-correlation of Note [Kernel transform] (what
    `nn.Conv2d` with circular padding $k // 2$ computes for an odd kernel
    size $k$) on an input of spatial size `size` $= (H, W)$ multiplies
    frequency $(u, v)$ of the input by the returned matrix $\hat K_{uv}$.
    Conjugate frequencies hold exactly conjugate matrices (Note [Real-FFT
    symmetry]), so `fft_conv2d(x, conv_frequency_matrices(kernel, size))` is
    that convolution, and `spectral_norm_bound` of the result bounds
    its norm. Computed in float32 or better with autocast disabled.

    Args:
        kernel: real tensor of shape (out_channels, in_channels, kh, kw).
        size: the spatial size $(H, W)$ (an int for a square size).

    Returns:
        A complex tensor of shape $(H, \lfloor W/2 \rfloor + 1, m, n)$.

    Raises:
        TypeError: if `kernel` is not a floating-point tensor.
        ValueError: for a kernel that is not 4-D or holds NaN or infinite
            entries, or a bad `size`.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> kernel, x = torch.randn(5, 3, 3, 3), torch.randn(2, 3, 6, 7)
        >>> y = fft_conv2d(x, conv_frequency_matrices(kernel, (6, 7)))
        >>> ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), kernel)
        >>> bool(torch.allclose(y, ref, atol=1e-5))
        True
    """
    return _frequency_matrices(kernel, size, cayley=False)


def cayley_frequency_matrices(kernel: Tensor, size: int | Sequence[int]) -> Tensor:
    r"""Per-frequency orthogonal matrices of the Cayley convolution with `kernel`.

    For an input of spatial size `size` $= (H, W)$, returns for every `rfft2`
    frequency $(u, v)$, $0 \le v \le \lfloor W/2 \rfloor$, the Cayley
    transform (Note [Cayley on the Stiefel manifold]) of the kernel's transfer
    matrix (Note [Kernel transform]): an $m \times n$ complex matrix with
    orthonormal columns when $m \ge n$ and orthonormal rows otherwise, for
    `kernel` of shape $(m, n, k_h, k_w)$. Conjugate frequencies hold exactly
    conjugate matrices and self-conjugate ones exactly real matrices (Note
    [Real-FFT symmetry]). Computed in float32 or better (the kernel's dtype if
    more precise), with autocast disabled; gradients flow to `kernel`.

    Args:
        kernel: real tensor of shape (out_channels, in_channels, kh, kw).
        size: the spatial size $(H, W)$ the convolution acts on (an int for
            a square size).

    Returns:
        A complex tensor of shape $(H, \lfloor W/2 \rfloor + 1, m, n)$.

    Raises:
        TypeError: if `kernel` is not a floating-point tensor.
        ValueError: for a kernel that is not 4-D or holds NaN or infinite
            entries, or a bad `size`.

    Example:
        >>> import torch
        >>> q = cayley_frequency_matrices(torch.randn(6, 4, 3, 3), (5, 8))
        >>> q.shape
        torch.Size([5, 5, 6, 4])
        >>> gram = q.mH @ q
        >>> bool(torch.allclose(gram, torch.eye(4, dtype=gram.dtype).expand_as(gram), atol=1e-5))
        True

    References:
        Trockman, A. & Kolter, J. Z. (2021). Orthogonalizing convolutional
        layers with the Cayley transform. *ICLR*.
    """
    return _frequency_matrices(kernel, size, cayley=True)


def _frequency_conv(x: Tensor, q: Tensor) -> Tensor:
    """The forward of `_FrequencyConv` in plain torch ops (Note [Hand-written backward and
    torch.func])."""
    height, width = x.shape[-2:]
    x_hat = torch.fft.rfft2(x)  # (B, n, H, C)
    y_hat = torch.einsum("hcmn,bnhc->bmhc", q, x_hat)
    return torch.fft.irfft2(y_hat, s=(height, width))


class _FrequencyConv(torch.autograd.Function):
    """$y = \\mathrm{irfft2}(Q\\, \\mathrm{rfft2}(x))$ with a hand-written adjoint.

    See Note [Frequency convolution backward]. The backward is built from
    differentiable ops (itself included), so double backward works.
    """

    @staticmethod
    def forward(ctx, x, q):  # type: ignore[override]
        batch, n, height, width = x.shape
        cols, m = q.shape[1], q.shape[2]
        freq = height * cols
        x_hat = torch.fft.rfft2(x).permute(2, 3, 1, 0).reshape(freq, n, batch).contiguous()
        y_hat = q.reshape(freq, m, n) @ x_hat
        y_hat = y_hat.reshape(height, cols, m, batch).permute(3, 2, 0, 1)
        keep = ctx.needs_input_grad[1]
        ctx.save_for_backward(x if keep else None, x_hat if keep else None, q)
        ctx.width = width
        return torch.fft.irfft2(y_hat, s=(height, width))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, x_hat, q = ctx.saved_tensors
        height, cols, m, n = q.shape
        width = ctx.width
        batch = grad.shape[0]
        freq = height * cols
        differentiable = torch.is_grad_enabled()  # double backward: build from tracked ops
        grad_x = grad_q = None
        g_hat = None
        if ctx.needs_input_grad[1] or not differentiable:
            g_hat = torch.fft.rfft2(grad).permute(2, 3, 1, 0).reshape(freq, m, batch).contiguous()
        if ctx.needs_input_grad[0]:
            # The adjoint of the real operator: the same map with Q^H.
            q_h = q.conj_physical().mT
            if differentiable:
                grad_x = _FrequencyConv.apply(grad, q_h)
            else:
                gx_hat = q_h.reshape(freq, n, m) @ g_hat
                gx_hat = gx_hat.reshape(height, cols, n, batch).permute(3, 2, 0, 1)
                grad_x = torch.fft.irfft2(gx_hat, s=(height, width))
        if ctx.needs_input_grad[1]:
            if differentiable:  # x_hat must depend on x
                x_hat = torch.fft.rfft2(x).permute(2, 3, 1, 0).reshape(freq, n, batch)
            grad_q = (g_hat @ x_hat.conj_physical().mT).reshape(height, cols, m, n)
            # irfft2's adjoint in torch's convention: 1/(HW), doubled off the
            # self-conjugate columns (those are stored once for two frequencies).
            weight = torch.full((cols,), 2.0, dtype=grad_q.real.dtype, device=q.device)
            weight[0] = 1.0
            if width % 2 == 0:
                weight[-1] = 1.0
            grad_q = grad_q * (weight / (height * width)).reshape(1, cols, 1, 1)
        return grad_x, grad_q


def fft_conv2d(x: Tensor, matrices: Tensor) -> Tensor:
    r"""Circular convolution given by its per-frequency matrices, applied by FFT.

    Computes $y = \mathrm{irfft2}(\hat K_{uv}\, \mathrm{rfft2}(x)_{uv})$ for an
    input of shape $(B, n, H, W)$ and matrices of shape
    $(H, \lfloor W/2 \rfloor + 1, m, n)$ (as from `cayley_frequency_matrices`),
    in the real dtype of `matrices` with autocast disabled. The frequency
    products are one batched matrix product over all frequencies; the
    backward pass is hand-written (Note [Frequency convolution backward]).

    Args:
        x: real tensor of shape (B, n, H, W); cast to the real dtype of
            `matrices`.
        matrices: complex tensor of shape (H, W // 2 + 1, m, n).

    Returns:
        A real tensor of shape (B, m, H, W), in the real dtype of `matrices`.

    Raises:
        TypeError: if `matrices` is not complex or `x` not floating-point.
        ValueError: if the shapes do not fit together.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 3, 4, 6)
        >>> eye = torch.eye(3, dtype=torch.complex64).expand(4, 4, 3, 3)
        >>> bool(torch.allclose(fft_conv2d(x, eye), x, atol=1e-6))
        True
    """
    if not isinstance(matrices, Tensor) or not matrices.is_complex():
        raise TypeError(f"matrices must be a complex tensor, got {type(matrices).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
    if x.ndim != 4 or matrices.ndim != 4:
        raise ValueError(
            f"x must be (B, C, H, W) and matrices (H, W // 2 + 1, out, in), got x "
            f"{tuple(x.shape)} and matrices {tuple(matrices.shape)}"
        )
    _, channels, height, width = x.shape
    rows, cols, _, n = matrices.shape
    if (rows, cols, n) != (height, width // 2 + 1, channels):
        raise ValueError(
            f"matrices of shape {tuple(matrices.shape)} do not fit an input of shape "
            f"{tuple(x.shape)}: expected ({height}, {width // 2 + 1}, out, {channels})"
        )
    with torch.autocast(x.device.type, enabled=False):
        x, q = x.to(matrices.real.dtype), matrices.resolve_conj()
        if _transforms_active():
            return _frequency_conv(x, q)
        return _FrequencyConv.apply(x, q)


def fft_cayley_conv2d(
    x: Tensor, kernel: Tensor, bias: Tensor | None = None, stride: int = 1
) -> Tensor:
    r"""Orthogonal circular convolution: Cayley transform per frequency, applied by FFT.

    With stride $s > 1$ the input is first folded by
    `lipnets.functional.reshape.space_to_depth` (an orthogonal permutation),
    so `kernel` has $C s^2$ input channels for an input of $C$ channels. The
    frequency matrices are `cayley_frequency_matrices(kernel, (H/s, W/s))`,
    recomputed on every call for the size of `x`; the bias is added after.
    The map $x \mapsto y - b$ has every singular value 1 (orthonormal columns
    when $m \ge n$, rows otherwise; $n = C s^2$), up to float rounding.

    Args:
        x: real tensor of shape (B, C, H, W), H and W divisible by `stride`.
        kernel: real tensor of shape (m, C * stride**2, kh, kw).
        bias: optional tensor of shape (m,).
        stride: an int >= 1.

    Returns:
        A tensor of shape (B, m, H / s, W / s) in the compute dtype (float32,
        or the kernel's dtype if more precise).

    Raises:
        ValueError: for a stride that is not an int >= 1, a spatial size not
            divisible by it, or mismatched channels.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 4, 8, 8)
        >>> y = fft_cayley_conv2d(x, torch.randn(16, 16, 2, 2), stride=2)
        >>> y.shape
        torch.Size([2, 16, 4, 4])
        >>> bool(torch.allclose(y.norm(), x.norm(), rtol=1e-5))  # norm preserving
        True
    """
    _check_kernel(kernel, finite=False)  # cayley_frequency_matrices checks the values
    stride = check_int(stride, "stride")
    if not isinstance(x, Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a (B, C, H, W) tensor, got {shape}")
    height, width = x.shape[-2:]
    if height % stride or width % stride:
        raise ValueError(
            f"with stride={stride} the input height and width must be divisible by {stride}, "
            f"got {height} x {width}"
        )
    if stride > 1:
        x = space_to_depth(x, stride)
    if x.shape[1] != kernel.shape[1]:
        raise ValueError(
            f"kernel has {kernel.shape[1]} input channels but the input has {x.shape[1]} "
            f"(after space_to_depth with stride={stride})"
        )
    matrices = cayley_frequency_matrices(kernel, tuple(x.shape[-2:]))
    y = fft_conv2d(x, matrices)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(-1, 1, 1)
    return y
