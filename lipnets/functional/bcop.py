r"""BCOP kernels: orthogonal convolutions from block convolutions (Li et al. 2019).

A $k \times k$ convolution kernel with $c$ input and $c$ output channels is
built from one orthogonal $c \times c$ matrix $H$ and $2(k-1)$ symmetric
projectors $P_i = Q_i Q_i^\top$ ($Q_i$ a $c \times r$ matrix with orthonormal
columns). `bcop_kernel` composes them (the raw matrices are orthogonalised as
one stack by `lipnets.functional.bjorck`); `strided_from_space_to_depth`
turns a kernel that acts after `space_to_depth` into the equivalent strided
kernel.

# Note [BCOP block convolutions]

A circular convolution of $c$-channel signals on an $n_h \times n_w$ torus is
orthogonal exactly when its symbol $\hat K(\omega) = \sum_{p,q} K_{p,q}\,
z_1^p z_2^q$ ($z_j = e^{-2\pi i \omega_j / n_j}$, $K_{p,q}$ the $c \times c$
tap at $(p, q)$) is unitary at every frequency; the operator's singular values
are those of the symbols. For a symmetric projector $P$ the two-tap kernel
$[P, I - P]$ has symbol $P + z (I - P)$, and
$(P + \bar z (I - P))(P + z (I - P)) = P + (I - P) = I$ because $P(I-P) = 0$
and $|z| = 1$: it is unitary for every $z$, of any rank of $P$. Composing
convolutions multiplies symbols, so $H$ followed by $k - 1$ pairs of a
$1 \times 2$ block convolution $[P, I - P]$ (along the width) and a
$2 \times 1$ one (along the height) is an orthogonal $k \times k$
convolution, at every input size. With cross-correlation (what `F.conv2d`
computes), applying the two-tap kernel $B$ before $M$ gives the kernel
$C_j = M_j P + M_{j-1}(I - P) = M_{j-1} + (M_j - M_{j-1})\,Q Q^\top$, which
`bcop_kernel` evaluates with two thin products per tap and never forms $P$.
Each projector has rank $r = \lfloor c/2 \rfloor$ in lipnets' layers, the
choice of Li et al.

Different channel counts use a leading block. With $c = \max(c_{in},
c_{out})$, an $c_{out} \times c$ matrix $H$ with orthonormal rows and the
first $c_{in}$ input channels of the square construction, the operator is the
orthogonal $c$-channel convolution between an isometric embedding of the input
(zero channels appended) and an orthogonal projection of the output (channels
dropped): every singular value is 1 when $c_{out} \ge c_{in}$ (the layer
preserves norms) and the nonzero ones are 1 otherwise (orthonormal rows). The
same holds, with the nonzero singular values only, on zero padding's
non-periodic domain: the zero-padded operator is a block of the linear
(Toeplitz) convolution, whose norm is $\sup_\omega \|\hat K(\omega)\|_2 = 1$,
so it is at most 1-Lipschitz, but not orthogonal.

The realised kernel is exactly orthogonal only up to the Björck tolerance and
float rounding (a projector built from a $Q$ whose columns are orthonormal to
$\delta$ moves the symbol's singular values by $O(\delta)$ per factor), which
is why the layers measure their bound from the realised kernel.

# Note [BCOP strided kernel]

A stride-$f$ layer is a stride-1 convolution with kernel $K$ (shape
$c_{out} \times f^2 c_{in} \times k \times k$, padding $p$) applied after
`space_to_depth(x, f)`, an orthogonal permutation. Writing the channel of
`space_to_depth` as $(c, i, j)$ for entry $(f h + i, f w + j)$ of channel $c$,
output $y_{h,w} = \sum K_{(c,i,j),u,v}\, x_{c,\, f(h + u - p) + i,\,
f(w + v - p) + j}$ is the stride-$f$ convolution with padding $f p$ and the
$f k \times f k$ kernel $W_{c,\, f u + i,\, f v + j} = K_{(c,i,j),u,v}$. Zero
padding maps to zero padding; circular padding maps to circular padding when
$f$ divides the input size (the wrap modulo $n/f$ of the small grid is the
wrap modulo $n$ of the big one). So the strided layer is a single plain
`nn.Conv2d`, and its Lipschitz constant is that of $K$ at the input size
divided by $f$.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from lipnets._checks import check_int, check_tensor

__all__ = [
    "bcop_kernel",
    "space_to_depth_from_strided",
    "strided_from_space_to_depth",
]


def _block_conv(kernel: Tensor, q: Tensor, dim: int) -> Tensor:
    """Kernel (taps first) of `kernel` after the two-tap block convolution [QQ^T, I - QQ^T]."""
    # F.pad lists (low, high) pairs from the last dimension: (c, c_out, kw, kh).
    after = (0, 0, 0, 0, 0, 1, 0, 0) if dim == 1 else (0, 0, 0, 0, 0, 0, 0, 1)
    before = (0, 0, 0, 0, 1, 0, 0, 0) if dim == 1 else (0, 0, 0, 0, 0, 0, 1, 0)
    unshifted = F.pad(kernel, after)  # M_j, zero at j = len
    shifted = F.pad(kernel, before)  # M_{j-1}, zero at j = 0
    # Note [BCOP block convolutions]: C_j = M_{j-1} + (M_j - M_{j-1}) Q Q^T.
    return shifted + ((unshifted - shifted) @ q) @ q.mT


def bcop_kernel(h: Tensor, qs: Tensor | Sequence[Tensor], in_channels: int | None = None) -> Tensor:
    r"""Orthogonal convolution kernel from an orthogonal matrix and projector factors.

    With $c \times c$ taps throughout, the kernel is the composition
    $H \circ R_1 \circ C_1 \circ \dots \circ R_{m} \circ C_{m}$ read as
    operators (the right-most acts first), where $R_i$ is the $1 \times 2$
    block convolution $[P, I - P]$ along the width with $P = Q_{2i-1}
    Q_{2i-1}^\top$, and $C_i$ the $2 \times 1$ one along the height with
    $P = Q_{2i} Q_{2i}^\top$ (Note [BCOP block convolutions]). The result is
    a $(m + 1) \times (m + 1)$ kernel in `F.conv2d` layout; its first
    `in_channels` input channels are returned.

    If `h` has orthonormal rows and each `qs[i]` orthonormal columns, the
    kernel's circular convolution is orthogonal at every input size for
    `h` square and `in_channels` $= c$, an isometry when `h` is square and
    `in_channels` $< c$, and has orthonormal rows when `h` is wide.

    Args:
        h: an $c_{out} \times c$ matrix with orthonormal rows, $c_{out} \le c$.
        qs: the $2m$ factors $Q_i$, each $c \times r$ with orthonormal columns
            (any rank $0 \le r \le c$), as a tensor of shape $(2m, c, r)$ or a
            sequence of $c \times r$ tensors; $m = 0$ gives a $1 \times 1$ kernel.
        in_channels: input channels to keep, $1 \le$ `in_channels` $\le c$
            (default $c$).

    Returns:
        A kernel of shape $(c_{out}, \text{in\_channels}, m + 1, m + 1)$, the
        dtype and device of `h`, differentiable in `h` and `qs`.

    Raises:
        TypeError: if `h` or `qs` is not a floating-point tensor.
        ValueError: for inconsistent shapes or an odd number of factors.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> g = torch.Generator().manual_seed(0)
        >>> h = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
        >>> qs = torch.linalg.qr(torch.randn(2, 4, 2, generator=g, dtype=torch.float64))[0]
        >>> kernel = bcop_kernel(h, qs)
        >>> kernel.shape
        torch.Size([4, 4, 2, 2])
        >>> x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
        >>> y = F.conv2d(F.pad(x, (0, 1, 0, 1), mode="circular"), kernel)
        >>> bool(torch.isclose(y.norm(), x.norm()))
        True

    References:
        Li, Q., Haque, S., Anil, C., Lucas, J., Grosse, R. & Jacobsen, J.-H.
        (2019). Preventing gradient attenuation in Lipschitz constrained
        convolutional networks. *NeurIPS*.
        Xiao, L. et al. (2018). Dynamical isometry and a mean field theory of
        CNNs. *ICML* (block orthogonal convolutions).
    """
    check_tensor(h, "h", floating=True)
    if not isinstance(qs, Tensor):
        if not all(isinstance(q, Tensor) for q in qs):
            raise TypeError("qs must be a tensor or a sequence of tensors")
        qs = torch.stack(list(qs)) if len(qs) else h.new_zeros(0, h.shape[-1], 0)
    check_tensor(qs, "qs", floating=True)
    if h.ndim != 2 or h.shape[0] > h.shape[1] or h.shape[0] == 0:
        raise ValueError(f"h must be a c_out x c matrix with 1 <= c_out <= c, got {tuple(h.shape)}")
    c = h.shape[1]
    if qs.ndim != 3 or qs.shape[1] != c or qs.shape[0] % 2:
        raise ValueError(
            f"qs must have shape (2m, c, r) with c = h.shape[1] = {c} and an even number of "
            f"factors, got {tuple(qs.shape)}"
        )
    in_channels = c if in_channels is None else check_int(in_channels, "in_channels", maximum=c)
    kernel = h[None, None]  # taps first: (kh, kw, c_out, c)
    for i in range(0, qs.shape[0], 2):
        kernel = _block_conv(kernel, qs[i], dim=1)
        kernel = _block_conv(kernel, qs[i + 1], dim=0)
    return kernel[..., :in_channels].permute(2, 3, 0, 1)


def _check_kernel_factor(kernel: Tensor, factor: int) -> int:
    if not isinstance(kernel, Tensor) or kernel.ndim != 4:
        shape = tuple(kernel.shape) if isinstance(kernel, Tensor) else type(kernel).__name__
        raise ValueError(f"kernel must be a 4-D tensor (out, in, kh, kw), got {shape}")
    return check_int(factor, "factor")


def strided_from_space_to_depth(kernel: Tensor, factor: int) -> Tensor:
    r"""The stride-`factor` kernel equal to `kernel` applied after `space_to_depth`.

    For `kernel` of shape $(c_{out}, f^2 c_{in}, k_h, k_w)$, returns $W$ of
    shape $(c_{out}, c_{in}, f k_h, f k_w)$ with
    $W_{o, c, f u + i, f v + j} = K_{o, c f^2 + i f + j, u, v}$, so that
    `F.conv2d(x, W, stride=f, padding=f * p)` equals
    `F.conv2d(space_to_depth(x, f), K, padding=p)` for zero padding, and for
    circular padding when $f$ divides the input size (Note [BCOP strided
    kernel]). A permutation of entries.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> k = torch.randn(3, 8, 3, 3, dtype=torch.float64)
        >>> x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
        >>> y = F.conv2d(F.pixel_unshuffle(x, 2), k, padding=1)
        >>> w = strided_from_space_to_depth(k, 2)
        >>> bool(torch.allclose(F.conv2d(x, w, stride=2, padding=2), y))
        True
    """
    factor = _check_kernel_factor(kernel, factor)
    if kernel.shape[1] % (factor * factor):
        raise ValueError(
            f"kernel must have a multiple of factor**2 = {factor * factor} input channels, "
            f"got {kernel.shape[1]}"
        )
    return rearrange(kernel, "o (c i j) u v -> o c (u i) (v j)", i=factor, j=factor)


def space_to_depth_from_strided(kernel: Tensor, factor: int) -> Tensor:
    r"""Inverse of `strided_from_space_to_depth`: the kernel acting after `space_to_depth`.

    Examples:
        >>> import torch
        >>> k = torch.randn(3, 8, 3, 3)
        >>> bool(torch.equal(space_to_depth_from_strided(strided_from_space_to_depth(k, 2), 2), k))
        True
    """
    factor = _check_kernel_factor(kernel, factor)
    if kernel.shape[2] % factor or kernel.shape[3] % factor:
        raise ValueError(
            f"kernel's spatial size must be a multiple of factor = {factor}, "
            f"got {tuple(kernel.shape[2:])}"
        )
    return rearrange(kernel, "o c (u i) (v j) -> o (c i j) u v", i=factor, j=factor)
