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

The real-FFT symmetry of the matrices is kept by `lipnets.functional._fft_symmetry`
(Note [Real-FFT symmetry]); the hand-written backward passes are in
`lipnets.functional._fft_autograd` (Note [Frequency convolution backward], Note
[Hand-written backward and torch.func]); `fft_cayley_conv2d` runs the Cayley map and the
frequency products as one op, `lipnets.functional._fft_cayley_fused` (Note [Fused Cayley
convolution backward]), which computes the same function as the two composed.

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
front, which keeps every offset and makes them symmetric). The identity of
$I + U - U^H$ joins the tap at offset 0, whose phase is exactly 1 (and whose
skew part has an exactly zero diagonal), so the transform gives $I + A$ at once.
Only this one small tap transform is needed for a square kernel (the top block
$U$ itself is never used), plus one for the rows $V$ of a non-square one,
instead of a subtraction with a conjugate transpose over every frequency
matrix, forward and backward.

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
The same property lets the CPU invert by 2 x 2 blocks without pivoting, in batched
products, at half the cost of `torch.linalg.inv` (Note [Block inverse of the Cayley
denominators] in `lipnets.functional._fft_autograd`, used while $\|I + A\|_2 \le 16$).

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

from collections.abc import Sequence

import torch
from torch import Tensor

from lipnets._checks import check_int, check_int_pair, check_tensor
from lipnets.functional._fft_autograd import _frequency_conv, _FrequencyConv, _transforms_active
from lipnets.functional._fft_cayley_fused import _cayley_matrices, cayley_conv
from lipnets.functional._fft_symmetry import _make_hermitian
from lipnets.functional._fft_taps import _cayley_taps, _transfer_matrices
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


def _cayley_parts(kernel: Tensor, height: int, width: int) -> tuple[Tensor, Tensor | None, bool]:
    """$I + U - U^H$, the other rows $V$ (None if square) and whether the kernel is wide.

    The transfer matrices of Note [Cayley on the Stiefel manifold] for the tall
    orientation (a wide kernel is transposed), flat over the bins: (bins, k, k) and
    (bins, rows - k, k). The top block $U$ itself is never needed, only its skew part.
    """
    skew, rows, wide = _cayley_taps(kernel)
    m = _transfer_matrices(skew, height, width)
    v = None if rows is None else _transfer_matrices(rows, height, width)
    return m, v, wide


def _frequency_matrices(kernel: Tensor, size: int | Sequence[int], cayley: bool) -> Tensor:
    _check_kernel(kernel)
    height, width = check_int_pair(size, "size")
    with torch.autocast(_device_type(kernel), enabled=False):
        kernel = kernel.to(_compute_dtype(kernel.dtype))
        if cayley:
            z = _cayley_matrices(*_cayley_parts(kernel, height, width), height, width)
        else:
            z = _transfer_matrices(kernel, height, width)
            wide = z.shape[-2] < z.shape[-1]
            if wide:  # transposes keep the conjugate symmetry; fix the tall (non-view) result
                z = z.mT
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

    Examples:
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

    Examples:
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

    Examples:
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

    Examples:
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
    _check_kernel(kernel)
    height, width = x.shape[-2:]
    with torch.autocast(_device_type(kernel), enabled=False):
        kernel = kernel.to(_compute_dtype(kernel.dtype))
        y = cayley_conv(x.to(kernel.dtype), *_cayley_taps(kernel), height, width)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(-1, 1, 1)
    return y
