r"""Orthogonal circular convolution by the Cayley transform: `CayleyConv2d`.

`CayleyConv2d` is the orthogonal convolution of Trockman & Kolter (2021): the
kernel's transfer matrix at each frequency of the input's 2-D Fourier
transform is mapped to an orthogonal matrix by a Cayley transform, and the
convolution is applied in the Fourier domain. The maths lives in
`lipnets.functional.fft_cayley`; this module is a shell around
`fft_cayley_conv2d`. Because the frequencies depend on the input size, the
operator, its bound and its export are defined per input size; nothing is
cached between calls. `FrequencyConv2d` is the frozen export (`to_vanilla`).

# Note [Cayley convolution export]

`to_vanilla` freezes the per-frequency matrices for one input size into a
`FrequencyConv2d`, which applies them by FFT exactly as the layer does (same
matrices, same products, same layout: Note [Frequency-major layout]), so it
computes the same function, bit for bit, and costs one `rfft2` and one transpose,
one batched complex product, and the inverse (an FFT along $H$, one transpose, a
real inverse along $W$), with no Cayley transform. On one CPU thread (32 channels,
$16 \times 16$, batch 64) these take about 0.7 + 0.3, 1.0 and 0.5 + 0.3 + 0.3 ms
against 1.7 to 2 ms for the circular `nn.Conv2d` on an idle core: the batched
product alone (MKL's complex GEMM, 75 MFLOP) is half the convolution's time, so the
export stays above `nn.Conv2d` at small channel counts on that machine, and the
ratio moves with the CPU and the load on the shared cores: on an AMD EPYC, where the
convolution is slower, the export costs 0.60 to 1.17 times `nn.Conv2d`
(benchmarks/results/conv-cpu.md).

A plain circular `nn.Conv2d` cannot replace it exactly: the Cayley image of a
$k \times k$ kernel is a rational function of the frequency, so its realised
kernel fills the whole $H \times W$ torus. Measured at 64 channels,
$32 \times 32$, at initialisation: outside the central $3 \times 3$ taps lies
12% of the kernel's energy, outside $9 \times 9$ 2e-4, outside $25 \times 25$
8e-12 (largest tap there 3e-7, float32 rounding). An exact export is therefore
the full $H \times W$ kernel (cross-correlation after circular padding by
$H - 1$, $W - 1$), which agrees with the FFT export to 1.5e-13 in float64 but
has $HW$ taps per channel pair: at 64 channels, $32 \times 32$, batch 8, one
CPU thread, 2.2 s per batch against 22 ms for the FFT export. A truncated one
is neither the layer's function nor orthogonal.
The FFT export is used. Its matrices are stored contiguous (they come out of
the batched inverse in column-major order), so no forward pass copies them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lipnets._checks import check_int, check_int_pair, check_spatial_shape, check_square
from lipnets.errors import ShapeRequiredError
from lipnets.functional.fft_cayley import (
    cayley_frequency_matrices,
    fft_cayley_conv2d,
    fft_conv2d,
)
from lipnets.functional.norms import spectral_norm_bound
from lipnets.functional.orthogonal import orthogonality_error
from lipnets.functional.reshape import space_to_depth

__all__ = ["CayleyConv2d", "FrequencyConv2d"]


def _stride(value: object) -> int:
    why = " (the stride is applied by space_to_depth, which folds square blocks)"
    return check_square(value, "stride", why=why)


def _check_divisible(size: tuple[int, int], stride: int, what: str) -> None:
    if size[0] % stride or size[1] % stride:
        raise ValueError(
            f"{what} must have height and width divisible by stride={stride}, "
            f"got {size[0]} x {size[1]}"
        )


def _size_from_shape(input_shape: Sequence[int], channels: int, name: str) -> tuple[int, int]:
    """(H, W) from an input shape (..., C, H, W), checking C."""
    dims = check_spatial_shape(input_shape)
    if len(dims) >= 3 and dims[-3] != channels:
        raise ValueError(
            f"{name} expects {channels} input channels, but input_shape={tuple(dims)} has "
            f"{dims[-3]}"
        )
    return int(dims[-2]), int(dims[-1])


def _output_dtype(x: Tensor, y: Tensor) -> Tensor:
    """Back to the input's dtype, except under autocast, where FFTs give float32 (like torch's)."""
    if torch.is_autocast_enabled(x.device.type):
        return y
    return y.to(x.dtype)


class CayleyConv2d(nn.Module):
    r"""Orthogonal circular 2-D convolution, by the Cayley transform in the Fourier domain.

    For an input of spatial size $(H, W)$ the layer takes the 2-D Fourier
    transform of the input, multiplies each frequency by the Cayley transform
    of the kernel's transfer matrix there (orthonormal columns when
    $n \le m$, rows otherwise; $m$ = `out_channels`, $n$ = `in_channels`
    $\cdot s^2$), transforms back and adds the bias. The linear part is
    therefore orthogonal (norm preserving when $n \le m$) at every input size,
    with periodic (circular) boundaries; see `lipnets.functional.fft_cayley`
    for the maths and notes. The frequency matrices are recomputed from the
    kernel on every call, for the size seen.

    With stride $s > 1$ the input is first folded by `space_to_depth(x, s)`
    (an orthogonal permutation: each $s \times s$ block becomes $s^2$
    channels), and the Cayley convolution acts on $n = C s^2$ channels with a
    kernel of $\lceil k / s \rceil$ taps per side, the smallest whose
    footprint on the input covers $k$ pixels (the paper's code uses
    $\lfloor k / 2 \rfloor$, a $1 \times 1$ kernel for $k = 3$).

    The raw kernel (`weight`, shape $(m, n, \lceil k_h/s \rceil, \lceil k_w/s
    \rceil)$) starts like `nn.Conv2d`'s, uniform in $\pm 1/\sqrt{\text{fan-in}}$
    as in the paper's code: the per-frequency skew-Hermitian parts then have
    spectral norms around 1.5, so the initial orthogonal operator rotates
    every frequency by large angles (well mixed: $\|Q - I\|_F^2 / n$ is
    about 1.2 on average, against 2 for a random unitary matrix) while the
    Cayley inverse stays well conditioned. The paper's code also rescales the
    kernel by a learnable scalar (weight normalisation); here the kernel is
    free, and weight decay pulls it towards zero, whose image is the identity
    at every frequency: still orthogonal, never collapsed.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        kernel_size: kernel size on the input grid (int or pair).
        stride: an int >= 1 (or a pair of equal ints), applied by
            `space_to_depth`; input height and width must be divisible by it.
        bias: whether to learn an additive bias.
        input_size: if given, the only input size $(H, W)$ the layer accepts;
            `lipschitz_bound()`, `orthogonality_error()` and `to_vanilla()` then
            need no size.
        device: as for `nn.Conv2d`.
        dtype: as for `nn.Conv2d`.

    Examples:
        >>> layer = CayleyConv2d(8, 8, 3, bias=False)
        >>> x = torch.randn(2, 8, 6, 6)
        >>> bool(torch.allclose(layer(x).norm(), x.norm(), rtol=1e-5))
        True
        >>> bound = layer.lipschitz_bound(input_shape=(1, 8, 6, 6))
        >>> bool(abs(bound - 1) <= 1e-5)  # measured: may sit just below 1
        True

    References:
        Trockman, A. & Kolter, J. Z. (2021). Orthogonalizing convolutional
        layers with the Cayley transform. *ICLR*.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        bias: bool = True,
        *,
        input_size: int | tuple[int, int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = check_int(in_channels, "in_channels")
        self.out_channels = check_int(out_channels, "out_channels")
        self.kernel_size = check_int_pair(kernel_size, "kernel_size")
        self.stride = _stride(stride)
        self.input_size = None if input_size is None else check_int_pair(input_size, "input_size")
        if self.input_size is not None:
            _check_divisible(self.input_size, self.stride, "input_size")
        s = self.stride
        shape = (
            self.out_channels,
            self.in_channels * s * s,
            math.ceil(self.kernel_size[0] / s),
            math.ceil(self.kernel_size[1] / s),
        )
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kernel and bias uniform in $\\pm 1/\\sqrt{\\text{fan-in}}$, as `nn.Conv2d`."""
        fan_in = self.weight[0].numel()
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim not in (3, 4):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"CayleyConv2d expects a (B, C, H, W) or (C, H, W) input, got {shape}")
        unbatched = x.ndim == 3
        xb = x.unsqueeze(0) if unbatched else x
        self._check_input(tuple(xb.shape[1:]))
        y = fft_cayley_conv2d(xb, self.weight, self.bias, self.stride)
        y = _output_dtype(x, y)
        return y.squeeze(0) if unbatched else y

    def _check_input(self, chw: tuple[int, ...]) -> None:
        channels, size = chw[0], (chw[1], chw[2])
        if channels != self.in_channels:
            raise ValueError(
                f"CayleyConv2d expects {self.in_channels} input channels, got {channels}"
            )
        if self.input_size is not None and size != self.input_size:
            raise ValueError(
                f"this CayleyConv2d was built for input_size={self.input_size}, got an input "
                f"of size {size}; build it with input_size=None to accept any size"
            )
        _check_divisible(size, self.stride, "the input")

    def _resolve_size(self, size: tuple[int, int] | None, method: str) -> tuple[int, int]:
        if size is None:
            if self.input_size is None:
                raise ShapeRequiredError(
                    f"CayleyConv2d.{method} depends on the input size (its operator is defined "
                    "per frequency of the input's Fourier transform): pass input_shape, e.g. "
                    f"layer.{method}(input_shape=(1, {self.in_channels}, H, W)), or build the "
                    "layer with input_size=(H, W)"
                )
            return self.input_size
        self._check_input((self.in_channels, *size))
        return size

    def frequency_matrices(self, input_size: int | tuple[int, int] | None = None) -> Tensor:
        """The per-frequency orthogonal matrices the layer applies to inputs of `input_size`.

        Shape $(H/s, \\lfloor W/(2s) \\rfloor + 1, m, n)$, complex, computed now
        from the kernel (with gradients, if enabled).
        """
        size = None if input_size is None else check_int_pair(input_size, "input_size")
        height, width = self._resolve_size(size, "frequency_matrices")
        s = self.stride
        return cayley_frequency_matrices(self.weight, (height // s, width // s))

    def lipschitz_bound(self, input_shape: Sequence[int] | None = None) -> Tensor:
        r"""Sound $\ell_2 \to \ell_2$ bound for inputs of shape `input_shape`, in float64.

        The largest singular value over the realised per-frequency matrices
        (`lipnets.functional.spectral_norm_bound`, Note [Sound
        frequency bound]); `space_to_depth` and the bias do not change it.

        Args:
            input_shape: the input's shape, $(B, C, H, W)$ or any sequence ending
                in $(H, W)$; may be omitted when the layer was built with
                `input_size`.

        Returns:
            A 0-dim float64 tensor, slightly above 1 (by the rounding of the
            matrices), never a nominal 1.

        Raises:
            ShapeRequiredError: if no size is known.
            ValueError: for a size the layer does not accept, or a kernel with
                NaN or infinite entries.
        """
        size = self._shape_to_size(input_shape, "lipschitz_bound")
        with torch.no_grad():
            return spectral_norm_bound(
                self.frequency_matrices(size), name="CayleyConv2d frequency matrices"
            )

    def orthogonality_error(self, input_shape: Sequence[int] | None = None) -> Tensor:
        r"""$\max |\sigma_i - 1|$ over all frequency matrices for inputs of `input_shape`."""
        size = self._shape_to_size(input_shape, "orthogonality_error")
        with torch.no_grad():
            return orthogonality_error(
                self.frequency_matrices(size), name="CayleyConv2d frequency matrices"
            )

    def _shape_to_size(self, input_shape: Sequence[int] | None, method: str) -> tuple[int, int]:
        if input_shape is None:
            return self._resolve_size(None, method)
        return self._resolve_size(
            _size_from_shape(input_shape, self.in_channels, f"CayleyConv2d.{method}"), method
        )

    def to_vanilla(self, input_size: int | tuple[int, int] | None = None) -> FrequencyConv2d:
        """A `FrequencyConv2d` computing the same function for one input size.

        The matrices are computed now from the kernel (so the export is
        correct right after `load_state_dict`, with no forward pass) and frozen; see
        Note [Cayley convolution export]. The size is `input_size`, or the
        one the layer was built with.

        Raises:
            ValueError: if neither gives a size.
        """
        size = None if input_size is None else check_int_pair(input_size, "input_size")
        if size is None and self.input_size is None:
            raise ValueError(
                "CayleyConv2d.to_vanilla needs an input size, because the exported matrices "
                "are per frequency of one input size: build the layer with input_size=(H, W) "
                "or call layer.to_vanilla(input_size=(H, W))"
            )
        size = self._resolve_size(size, "to_vanilla")
        with torch.no_grad():
            matrices = self.frequency_matrices(size).detach().clone()
            bias = None if self.bias is None else self.bias.detach().clone()
        frozen = FrequencyConv2d(matrices, bias, stride=self.stride, input_size=size)
        if self.bias is not None:
            frozen.bias.requires_grad_(self.bias.requires_grad)
        return frozen.train(self.training)

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, bias={self.bias is not None}"
        )
        if self.input_size is not None:
            text += f", input_size={self.input_size}"
        return text


class FrequencyConv2d(nn.Module):
    r"""A circular convolution frozen as per-frequency matrices for one input size.

    What `CayleyConv2d.to_vanilla` returns (Note [Cayley convolution
    export]): the input is folded by `space_to_depth(x, stride)` when
    `stride > 1`, multiplied frequency by frequency by the stored matrices
    (`lipnets.functional.fft_conv2d`), and the bias is added. The matrices are
    a buffer (stored as a real view, shape $(\ldots, 2)$, so `.double()` and
    `state_dict` treat them like any float tensor), not a parameter: training
    them would not keep them orthogonal.

    Args:
        matrices: complex tensor of shape $(H/s, \lfloor W/(2s) \rfloor + 1, m, n)$.
        bias: tensor of shape $(m,)$ or None.
        stride: the space-to-depth factor $s$.
        input_size: the input size $(H, W)$ the matrices are for.

    Examples:
        >>> import torch
        >>> from lipnets.nn.cayley_conv import CayleyConv2d
        >>> layer = CayleyConv2d(3, 4, 3, stride=2, input_size=(8, 8))
        >>> frozen = layer.to_vanilla()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> bool(torch.allclose(frozen(x), layer(x), atol=1e-6))
        True
    """

    def __init__(
        self,
        matrices: Tensor,
        bias: Tensor | None,
        *,
        stride: int,
        input_size: tuple[int, int],
    ) -> None:
        super().__init__()
        if not isinstance(matrices, Tensor) or not matrices.is_complex() or matrices.ndim != 4:
            raise TypeError("matrices must be a complex tensor of shape (H, W // 2 + 1, out, in)")
        self.stride = _stride(stride)
        self.input_size = check_int_pair(input_size, "input_size")
        _check_divisible(self.input_size, self.stride, "input_size")
        rows, cols, m, n = matrices.shape
        height, width = (d // self.stride for d in self.input_size)
        if (rows, cols) != (height, width // 2 + 1) or n % (self.stride**2):
            raise ValueError(
                f"matrices of shape {tuple(matrices.shape)} do not fit input_size="
                f"{self.input_size} with stride={self.stride}"
            )
        self.in_channels = n // self.stride**2
        self.out_channels = m
        # contiguous once here, so that no forward pass copies it (the Cayley matrices come
        # out of the batched inverse in column-major order)
        stored = torch.view_as_real(matrices.resolve_conj().contiguous()).clone()
        self.register_buffer("matrices", stored)
        if bias is not None:
            if bias.shape != (m,):
                raise ValueError(f"bias must have shape ({m},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("bias", None)

    def _complex(self) -> Tensor:
        return torch.view_as_complex(self.matrices.contiguous())

    def forward(self, x: Tensor) -> Tensor:
        if (
            not isinstance(x, Tensor)
            or x.ndim != 4
            or tuple(x.shape[1:])
            != (
                self.in_channels,
                *self.input_size,
            )
        ):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"FrequencyConv2d holds matrices for inputs of shape (B, {self.in_channels}, "
                f"{self.input_size[0]}, {self.input_size[1]}), got {shape}; export the "
                "CayleyConv2d again with to_vanilla(input_size=...) for another size"
            )
        xs = space_to_depth(x, self.stride) if self.stride > 1 else x
        y = fft_conv2d(xs, self._complex())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype).reshape(-1, 1, 1)
        return _output_dtype(x, y)

    def lipschitz_bound(self, input_shape: Sequence[int] | None = None) -> Tensor:
        """Sound bound from the stored matrices (Note [Sound frequency bound])."""
        if input_shape is not None:
            size = _size_from_shape(input_shape, self.in_channels, "FrequencyConv2d")
            if size != self.input_size:
                raise ValueError(
                    f"this FrequencyConv2d only accepts inputs of size {self.input_size}, but "
                    f"input_shape={tuple(input_shape)}"
                )
        return spectral_norm_bound(self._complex(), name="FrequencyConv2d.matrices")

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, "
            f"input_size={self.input_size}, bias={self.bias is not None}"
        )
