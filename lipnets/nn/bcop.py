r"""`BCOPConv2d`: an orthogonal convolution from block convolutions (Li et al. 2019).

The layer is an `nn.Conv2d` whose `weight` is a registered parametrization,
`lipnets.parametrizations.bcop.BCOPOrthogonal` (`torch.nn.utils.parametrize`):
every access builds the kernel from one raw tensor of $2k - 1$ square
matrices, orthogonalised together by `lipnets.functional.bjorck` and composed
by `lipnets.functional.bcop.bcop_kernel` (Note [BCOP block convolutions] in
`lipnets.functional.bcop`). Nothing is cached and there are no buffers.
`forward` is `nn.Conv2d.forward`, so the layer, its export (`to_vanilla`) and
the bound composer all see one plain convolution; `lipschitz_bound` is
computed from the realised kernel.

# Note [BCOP padding]

With circular padding the layer is an orthogonal operator only with "same"
padding: the output must have the input's size, or it is a crop (fewer
outputs: still at most 1-Lipschitz) or repeats wrapped entries (more outputs:
*not* 1-Lipschitz, refused). `padding=None` (or `"same"`) pads
$(k-1)/2$ on each side for odd $k$. For even $k$ the "centre" is asymmetric;
torch's convention for `padding="same"` pads $\lfloor (k-1)/2 \rfloor$ before
and $\lceil (k-1)/2 \rceil$ after. The layer realises exactly that with a
symmetric padding of $k/2$ and a $(k+1) \times (k+1)$ weight whose first row
and column are zero: cross-correlating $[0, K_0, \dots, K_{k-1}]$ with padding
$k/2$ is cross-correlating $K$ with padding $k/2 - 1$ before and $k/2$ after.
So `weight` and `kernel_size` then read $k + 1$, and the export stays one
plain `nn.Conv2d`. An integer padding is accepted for stride 1: any $p \ge 0$
with zero padding (the operator is a block of the linear convolution, at most
1-Lipschitz), and $2p \le k - 1$ with circular padding (a crop).

With zero padding the layer is never orthogonal (border outputs lose energy)
but at most 1-Lipschitz, at every input size (Note [BCOP block convolutions]).
Reflect and replicate padding are refused: they duplicate entries, which can
raise the norm.

# Note [BCOP stride]

A stride $s > 1$ is `space_to_depth(x, s)` followed by a stride-1 BCOP
convolution on $s^2 c_{in}$ channels, which lipnets writes as one stride-$s$
convolution with an $s k \times s k$ kernel and padding $s p$ (Note [BCOP
strided kernel]); $c = \max(c_{out}, s^2 c_{in})$. The two are the same map
for zero padding at every size, and for circular padding when $s$ divides the
input height and width, which `forward` therefore requires. For the usual
$c_{out} < s^2 c_{in}$ the layer has orthonormal rows: 1-Lipschitz, not norm
preserving (it cannot be: it has fewer outputs than inputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lipnets._checks import (
    check_choice,
    check_instance,
    check_int,
    check_spatial_shape,
    check_square,
)
from lipnets.functional.bcop import space_to_depth_from_strided
from lipnets.functional.conv_norms import conv2d_spectral_norm_bound
from lipnets.functional.fft_cayley import conv_frequency_matrices
from lipnets.functional.orthogonal import orthogonality_error
from lipnets.parametrizations.bcop import BCOPOrthogonal
from lipnets.parametrizations.orthogonal import BJORCK_DEFAULT, BjorckConfig, WeightConfig

__all__ = ["BCOPConv2d"]

_PADDING_MODES = ("circular", "zeros")


class BCOPConv2d(nn.Conv2d):
    r"""Orthogonal `nn.Conv2d` from block convolutions (BCOP).

    The $k \times k$ kernel is an orthogonal $c \times c$ matrix $H$ composed
    with $k - 1$ pairs of $1 \times 2$ and $2 \times 1$ block convolutions
    $[P, I - P]$, each $P = Q Q^\top$ a symmetric projector of rank
    $\lfloor c/2 \rfloor$ (Note [BCOP block convolutions] in
    `lipnets.functional.bcop`), with $c = \max(c_{out}, s^2 c_{in})$. $H$ and
    the $Q$'s are the polar factors of $2k - 1$ raw $c \times c$ matrices
    (one batched Björck; the $Q$'s are their first $\lfloor c/2 \rfloor$
    columns), kept on the orthogonal manifold in training so that one to three
    iterations suffice (Note [Bjorck reprojection]).

    What holds, up to the Björck tolerance and float rounding (measured by
    `lipschitz_bound` and `orthogonality_error`):

    * circular "same" padding, $c_{out} = s^2 c_{in}$: the layer is an
      orthogonal map at every input size (divisible by $s$);
    * circular, $c_{out} > s^2 c_{in}$: an isometry ($\|y\| = \|x\|$);
    * circular, $c_{out} < s^2 c_{in}$: orthonormal rows (1-Lipschitz, every
      nonzero singular value 1);
    * zero padding or a cropping padding: at most 1-Lipschitz, not orthogonal.

    See Note [BCOP padding] for the padding rules (even $k$ is handled
    exactly, with a zero first row and column: `weight` is then
    $(k+1) \times (k+1)$) and Note [BCOP stride] for strides.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        kernel_size: $k$, an int (or a pair of equal ints) $\ge 1$.
        stride: $s$, an int (or a pair of equal ints) $\ge 1$, realised as
            `space_to_depth` followed by a stride-1 BCOP convolution.
        padding: `None` or `"same"` (the default: output size = input size
            divided by the stride), or, for stride 1 only, `"valid"` or an int
            $p$ with $2p \le k - 1$ for circular padding, $p \ge 0$ for zeros.
        padding_mode: `"circular"` (orthogonal) or `"zeros"` (1-Lipschitz).
        bias: whether to learn an additive bias.
        config: a `lipnets.parametrizations.orthogonal.BjorckConfig` preset.
        device: as for `nn.Conv2d`.
        dtype: as for `nn.Conv2d`.

    Raises:
        ValueError: for a kernel size, stride, padding or padding mode not
            listed above, or channels < 1.
        TypeError: if `config` is not a `BjorckConfig`.

    Examples:
        >>> import torch
        >>> layer = BCOPConv2d(8, 8, 3, bias=False)
        >>> x = torch.randn(2, 8, 10, 10)
        >>> y = layer(x)
        >>> y.shape
        torch.Size([2, 8, 10, 10])
        >>> bool(torch.allclose(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-5))
        True
        >>> bool(abs(layer.lipschitz_bound(x.shape) - 1) <= 1e-4)
        True

    References:
        Li, Q., Haque, S., Anil, C., Lucas, J., Grosse, R. & Jacobsen, J.-H.
        (2019). Preventing gradient attenuation in Lipschitz constrained
        convolutional networks. *NeurIPS*.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] | None = None,
        padding_mode: str = "circular",
        bias: bool = True,
        *,
        config: BjorckConfig = BJORCK_DEFAULT,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        in_channels = check_int(in_channels, "in_channels")
        out_channels = check_int(out_channels, "out_channels")
        k = check_square(kernel_size, "kernel_size")
        s = check_square(stride, "stride")
        check_choice(
            padding_mode,
            "padding_mode",
            _PADDING_MODES,
            why=" (reflect and replicate padding can raise the norm)",
        )
        check_instance(config, "config", BjorckConfig)
        size, pad = self._resolve_padding(padding, k, s, padding_mode)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size=s * size,
            stride=s,
            padding=s * pad,
            padding_mode=padding_mode,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.bcop_kernel_size = k
        c = max(out_channels, s * s * in_channels)
        # The raw stack is (2k - 1, c, c); parametrize allows the shape change with unsafe=True.
        self.weight = nn.Parameter(torch.empty(2 * k - 1, c, c, device=device, dtype=dtype))
        parametrize.register_parametrization(
            self,
            "weight",
            BCOPOrthogonal(
                out_channels=out_channels,
                in_channels=s * s * in_channels,
                kernel_size=k,
                stride=s,
                zero_slice=size != k,
                config=config,
            ),
            unsafe=True,
        )
        self.reset_parameters()

    @staticmethod
    def _resolve_padding(padding: object, k: int, s: int, mode: str) -> tuple[int, int]:
        """(kernel size, padding) of the stride-1 convolution after space_to_depth."""
        if padding is None or padding == "same":
            return (k, (k - 1) // 2) if k % 2 else (k + 1, k // 2)
        if s != 1:
            raise ValueError(
                f"padding must be None or 'same' for stride {s} > 1 (Note [BCOP stride]), "
                f"got {padding!r}"
            )
        p = 0 if padding == "valid" else padding
        if isinstance(p, str):
            raise ValueError(f"padding must be None, 'same', 'valid' or an int, got {padding!r}")
        p = check_square(p, "padding", 0)
        if mode == "circular" and 2 * p > k - 1:
            raise ValueError(
                f"padding must satisfy 2 * padding <= kernel_size - 1 = {k - 1} with circular "
                f"padding (more would repeat wrapped entries and raise the norm), got {p}"
            )
        return k, p

    config = WeightConfig()

    def reset_parameters(self) -> None:
        """Raw matrices: independent random orthogonal ones; bias as in `nn.Conv2d`."""
        if not parametrize.is_parametrized(self, "weight"):
            return super().reset_parameters()  # called by nn.Conv2d.__init__
        raw = self.parametrizations.weight.original
        with torch.no_grad():
            for matrix in raw:
                nn.init.orthogonal_(matrix)
        if self.bias is not None:
            s = self.stride[0]
            bound = 1 / math.sqrt(self.in_channels * (s * self.bcop_kernel_size) ** 2)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor) -> Tensor:
        s = self.stride[0]
        if s > 1 and self.padding_mode == "circular":
            height, width = input.shape[-2:]
            if height % s or width % s:
                raise ValueError(
                    f"BCOPConv2d with stride {s} and circular padding needs the input height "
                    f"and width to be multiples of {s} (Note [BCOP stride]), got {height}x{width}"
                )
        return super().forward(input)

    def _input_size(self, input_shape: Sequence[int] | None) -> tuple[int, int] | None:
        if input_shape is None:
            return None
        shape = check_spatial_shape(input_shape)
        s = self.stride[0]
        if self.padding_mode == "circular" and (shape[-2] % s or shape[-1] % s):
            raise ValueError(
                f"input_shape must have H and W divisible by the stride {s} with circular "
                f"padding (Note [BCOP stride]), got {shape[-2]}x{shape[-1]}"
            )
        return shape[-2], shape[-1]

    def lipschitz_bound(self, input_shape: Sequence[int] | None = None) -> Tensor:
        """Sound l2 → l2 bound from the realised kernel, in float64.

        The kernel is computed now from the raw parameters (no cache) and
        bounded by `lipnets.functional.conv_norms.conv2d_spectral_norm_bound`
        with this layer's stride, padding and padding mode: at the input size
        when `input_shape` (ending with H, W) is given (exact for circular
        padding), for every size otherwise. A circular strided layer is
        bounded as the stride-1 convolution it is after `space_to_depth`, for
        the sizes it accepts (Note [BCOP stride]).

        Returns:
            A 0-dim float64 tensor, slightly above 1 for a circular
            orthogonal layer (by the rounding of the kernel), never a nominal 1.

        Raises:
            ValueError: for a circular strided layer and a size the stride does
                not divide (its `forward` refuses it too), or a NaN kernel.
        """
        size = self._input_size(input_shape)
        s = self.stride[0]
        with torch.no_grad():
            if s > 1 and self.padding_mode == "circular":
                # Note [BCOP stride]: the layer only runs on sizes s divides, where it is the
                # stride-1 convolution of the compact kernel after space_to_depth. The strided
                # bound for every size would also cover sizes s does not divide: ~2x looser.
                return conv2d_spectral_norm_bound(
                    space_to_depth_from_strided(self.weight, s),
                    padding=self.padding[0] // s,
                    padding_mode="circular",
                    input_size=None if size is None else (size[0] // s, size[1] // s),
                )
            return conv2d_spectral_norm_bound(
                self.weight,
                stride=self.stride,
                padding=self.padding,
                padding_mode=self.padding_mode,
                input_size=size,
            )

    def orthogonality_error(self, input_shape: Sequence[int]) -> Tensor:
        r"""$\max_i |\sigma_i - 1|$ of the kernel's circular convolution at this input size.

        The singular values are those of the circular convolution after
        `space_to_depth` (all $\min(c_{out}, s^2 c_{in})$ per frequency, from
        the FFT of the realised kernel in float64). With circular "same"
        padding that is the layer itself; with zero or cropping padding the
        layer is a block of it (and not orthogonal).

        Args:
            input_shape: the input's shape, ending with (H, W).

        Returns:
            A 0-dim float64 tensor, detached.
        """
        size = self._input_size(input_shape)
        if size is None:
            raise ValueError("input_shape is required, e.g. (1, C, H, W)")
        s = self.stride[0]
        nh, nw = -(-size[0] // s), -(-size[1] // s)  # zeros: an odd size is a block of the next
        with torch.no_grad():
            kernel = space_to_depth_from_strided(self.weight.detach(), s).double()
            return orthogonality_error(conv_frequency_matrices(kernel, (nh, nw)))

    def to_vanilla(self) -> nn.Conv2d:
        """A plain `nn.Conv2d` holding the realised kernel and the bias.

        Same kernel size, stride, padding and padding mode as this layer's
        `nn.Conv2d` view, so it computes the same function. The kernel is
        computed now from the raw parameters (correct right after
        `load_state_dict`, without a forward pass).
        """
        with torch.no_grad():
            weight = self.weight.detach().clone()
            conv = nn.Conv2d(
                self.in_channels,
                self.out_channels,
                kernel_size=self.kernel_size,
                stride=self.stride,
                padding=self.padding,
                padding_mode=self.padding_mode,
                bias=self.bias is not None,
                device=weight.device,
                dtype=weight.dtype,
            )
            conv.weight.copy_(weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.weight.requires_grad_(self.parametrizations.weight.original.requires_grad)
        if self.bias is not None:
            conv.bias.requires_grad_(self.bias.requires_grad)
        return conv.train(self.training)

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"{super().extra_repr()}, bcop_kernel_size={self.bcop_kernel_size}, "
            f"order={cfg.order}, tol={cfg.tol:g}"
        )
