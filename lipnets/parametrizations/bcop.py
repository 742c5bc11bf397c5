r"""`BCOPOrthogonal`: the parametrization behind `lipnets.nn.BCOPConv2d`.

It maps one raw tensor of $2k - 1$ square $c \times c$ matrices to a
convolution kernel: the matrices are orthogonalised together by one batched
Björck (`lipnets.parametrizations.orthogonal.polar`, with Note [Bjorck
reprojection]) and composed by `lipnets.functional.bcop.bcop_kernel` (Note
[BCOP block convolutions] in `lipnets.functional.bcop`). Nothing is cached
and there are no buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipnets._checks import check_instance, check_int
from lipnets.functional.bcop import bcop_kernel, strided_from_space_to_depth
from lipnets.parametrizations.orthogonal import BJORCK_DEFAULT, BjorckConfig, polar

__all__ = ["BCOPOrthogonal"]


class BCOPOrthogonal(nn.Module):
    r"""Parametrization: raw $(2k - 1, c, c)$ stack → an orthogonal BCOP convolution kernel.

    The polar factors of the raw matrices give an orthogonal $H$ (the first,
    of which the first `out_channels` rows are used) and the projector
    factors $Q_i$ (the first $\lfloor c/2 \rfloor$ columns of the others);
    `bcop_kernel` composes them into a $k \times k$ kernel with
    `in_channels` input channels. With `zero_slice` a zero first row and
    column are prepended (even $k$, Note [BCOP padding] in
    `lipnets.nn.bcop`), and with `stride` $s > 1$ the kernel is rewritten as
    the equivalent stride-$s$ kernel (Note [BCOP strided kernel]).

    Register it with `torch.nn.utils.parametrize.register_parametrization`
    and ``unsafe=True`` (the raw tensor and the kernel differ in shape), as
    `lipnets.nn.BCOPConv2d` does. `right_inverse` accepts only a raw stack of
    the registered shape: a kernel has no unique raw preimage.

    Args:
        out_channels: output channels $c_{out} \le c$ of the kernel.
        in_channels: input channels of the stride-1 kernel (after
            `space_to_depth`: $s^2$ times the layer's), $\le c$.
        kernel_size: $k \ge 1$, the number of taps per side.
        stride: $s \ge 1$.
        zero_slice: prepend a zero first row and column.
        config: a `BjorckConfig` preset.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> p = BCOPOrthogonal(out_channels=4, in_channels=4, kernel_size=3)
        >>> raw = torch.linalg.qr(torch.randn(5, 4, 4, dtype=torch.float64))[0]
        >>> kernel = p(raw)
        >>> kernel.shape
        torch.Size([4, 4, 3, 3])
        >>> x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
        >>> y = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), kernel)
        >>> bool(torch.isclose(y.norm(), x.norm()))  # orthogonal: norms are kept
        True
    """

    def __init__(
        self,
        *,
        out_channels: int,
        in_channels: int,
        kernel_size: int,
        stride: int = 1,
        zero_slice: bool = False,
        config: BjorckConfig = BJORCK_DEFAULT,
    ) -> None:
        super().__init__()
        check_instance(config, "config", BjorckConfig)
        self.out_channels = check_int(out_channels, "out_channels")
        self.in_channels = check_int(in_channels, "in_channels")
        self.kernel_size = check_int(kernel_size, "kernel_size")
        self.stride = check_int(stride, "stride")
        self.zero_slice = bool(zero_slice)
        self.config = config

    def forward(self, raw: Tensor) -> Tensor:
        # Note [Bjorck reprojection] in lipnets.parametrizations.orthogonal.
        ortho = polar(raw, self.config, training=self.training, name="BCOPConv2d.weight")
        with torch.autocast(raw.device.type, enabled=False):
            return self.kernel(ortho).to(raw.dtype)

    def kernel(self, ortho: Tensor) -> Tensor:
        """The layer's weight from the orthogonal stack (Notes [BCOP padding], [BCOP stride])."""
        c = ortho.shape[-1]
        h = ortho[0, : self.out_channels]
        qs = ortho[1:, :, : c // 2]
        kernel = bcop_kernel(h, qs, self.in_channels)
        if self.zero_slice:
            kernel = F.pad(kernel, (1, 0, 1, 0))
        if self.stride > 1:
            kernel = strided_from_space_to_depth(kernel, self.stride)
        return kernel

    def right_inverse(self, value: Tensor) -> Tensor:
        raw = getattr(self, "_raw_shape", None)
        if raw is not None and tuple(value.shape) != raw:
            raise ValueError(
                "BCOPConv2d.weight is built from raw matrices and cannot be assigned a kernel "
                f"of shape {tuple(value.shape)}; assign a raw stack of shape {raw} to "
                "parametrizations.weight.original instead"
            )
        self._raw_shape = tuple(value.shape)
        return value

    def extra_repr(self) -> str:
        return repr(self.config)
