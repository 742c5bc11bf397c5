r"""Downsampling modules with proven l2 → l2 Lipschitz constants.

* `InvertibleDownsample` folds $f \times f$ spatial blocks into channels
  (`lipnets.functional.reshape.space_to_depth`): a permutation of entries,
  orthogonal, Lipschitz constant exactly 1 and no loss of gradient norm.
* `L2NormPool2d` replaces every window by its Euclidean norm. Each window map
  is 1-Lipschitz; windows that overlap share input entries, so the layer's
  constant is $\sqrt{c}$, where $c$ is the largest number of windows that
  contain one input position (1 when `stride >= kernel_size`). The constant is
  computed exactly from the kernel, stride, padding and, when given, the input
  size.

Both are shells: the maths is in `lipnets.functional.reshape` and
`lipnets.functional.pooling`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lipnets._checks import check_int, check_int_pair, check_spatial_shape
from lipnets.functional.pooling import (
    l2_norm_pool2d,
    l2_norm_pool2d_lipschitz_bound,
    max_window_cover,
)
from lipnets.functional.reshape import space_to_depth

# l2_norm_pool2d and max_window_cover live in lipnets.functional.pooling; they
# stay importable from here.
__all__ = ["InvertibleDownsample", "L2NormPool2d", "l2_norm_pool2d", "max_window_cover"]


def _unit_bound() -> Tensor:
    return torch.ones((), dtype=torch.float64)


class InvertibleDownsample(nn.Module):
    r"""Fold every $f \times f$ spatial block into channels, an orthogonal downsampling.

    Maps $(*, C, H, W)$ to $(*, C f^2, H / f, W / f)$ with
    `lipnets.functional.reshape.space_to_depth` (input channel $c$ at
    $(h f + i, w f + j)$ goes to channel $c f^2 + i f + j$ at $(h, w)$). This
    is exactly `torch.nn.PixelUnshuffle(f)`, which `to_vanilla` returns.
    Unlike a strided convolution or pooling it discards nothing, so a network
    built from it stays gradient-norm preserving.

    Args:
        factor: Block size $f$, an int $\geq 1$ dividing $H$ and $W$ of
            every input.

    Raises:
        ValueError: If `factor` is not an int $\geq 1$.

    Examples:
        >>> down = InvertibleDownsample(2)
        >>> x = torch.randn(4, 3, 8, 8)
        >>> y = down(x)
        >>> y.shape
        torch.Size([4, 12, 4, 4])
        >>> # a permutation of entries: the norm of every difference is kept
        >>> z = torch.randn(4, 3, 8, 8)
        >>> bool(torch.isclose((down(z) - y).norm(), (z - x).norm()))
        True
        >>> down.lipschitz_bound()
        tensor(1., dtype=torch.float64)

    References:
        Jacobsen, J.-H., Smeulders, A. & Oyallon, E. (2018). i-RevNet: Deep
        invertible networks. *ICLR*.

        Trockman, A. & Kolter, J. Z. (2021). Orthogonalizing convolutional
        layers with the Cayley transform. *ICLR*.
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = check_int(factor, "factor")

    def forward(self, x: Tensor) -> Tensor:
        """Apply `space_to_depth(x, self.factor)`."""
        return space_to_depth(x, self.factor)

    def lipschitz_bound(self, input_shape: Sequence[int] | None = None) -> Tensor:
        r"""Return the l2 → l2 Lipschitz bound, exactly 1 for every input shape.

        Proof: the map sends entry $(c, h f + i, w f + j)$ of each sample to
        entry $(c f^2 + i f + j, h, w)$, a bijection between index sets of the
        same size, so it is a linear map $P x$ with $P$ a permutation matrix.
        $P^\top P = I$, hence $\|P x - P y\|_2 = \|x - y\|_2$ for all $x, y$:
        the constant is exactly 1 (attained by every pair), and so are all
        singular values.

        Args:
            input_shape: Ignored; the bound holds for every input shape.

        Returns:
            A 0-dim float64 CPU tensor equal to 1.
        """
        return _unit_bound()

    def to_vanilla(self) -> nn.PixelUnshuffle:
        """Return `torch.nn.PixelUnshuffle(factor)`, the same operation with the same order."""
        return nn.PixelUnshuffle(self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class L2NormPool2d(nn.Module):
    r"""L2-norm pooling: every window becomes its Euclidean norm.

    $y_{c,w} = \sqrt{\sum_{j \in w} x_{c,j}^2}$ over the windows of
    `torch.nn.AvgPool2d(kernel_size, stride, padding)` (see
    `lipnets.functional.pooling.l2_norm_pool2d`, which this module calls).
    The gradient at an all-zero
    window is 0, not `nan` (Note [L2 pool gradient at zero]).

    With `padding=0` this is `torch.nn.LPPool2d(2, kernel_size, stride)` (the
    tests check it); `LPPool2d` has no padding, and `lipnets.bounds` bounds it
    by a rule in `lipnets.bounds.pool_rules`.

    Args:
        kernel_size: Window size, an int or a pair `(kH, kW)` of ints $\geq 1$.
        stride: Step between windows, an int or a pair of ints $\geq 1$;
            `None` (default) means `kernel_size`.
        padding: Zeros added on each side, an int or a pair of ints $\geq 0$.

    Raises:
        ValueError: If an argument is not an int (or pair) in range.

    Examples:
        >>> pool = L2NormPool2d(2, stride=1)
        >>> x = torch.tensor([[[[1.0, 2.0, 1.0, 2.0, 1.0]] * 2]])
        >>> pool(x).shape
        torch.Size([1, 1, 1, 4])
        >>> pool.lipschitz_bound()  # each input position lies in up to 2 x 2 windows
        tensor(2., dtype=torch.float64)
        >>> L2NormPool2d(2).lipschitz_bound()  # disjoint windows
        tensor(1., dtype=torch.float64)

    References:
        Boureau, Y.-L., Ponce, J. & LeCun, Y. (2010). A theoretical analysis
        of feature pooling in visual recognition. *ICML*.
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.kernel_size = check_int_pair(kernel_size, "kernel_size", 1)
        self.stride = self.kernel_size if stride is None else check_int_pair(stride, "stride", 1)
        self.padding = check_int_pair(padding, "padding", 0)

    def forward(self, x: Tensor) -> Tensor:
        """Apply `l2_norm_pool2d` with this module's window settings."""
        return l2_norm_pool2d(x, self.kernel_size, self.stride, self.padding)

    def lipschitz_bound(self, input_shape: Sequence[int] | None = None) -> Tensor:
        r"""Return the l2 → l2 Lipschitz constant $\sqrt{c}$, exact (and attained).

        `lipnets.functional.pooling.l2_norm_pool2d_lipschitz_bound` with this
        module's window settings: $c$ is the largest number of windows that
        contain one input position (the proofs are there).

        Args:
            input_shape: Shape $(N, C, H, W)$ or $(C, H, W)$ of the input (only
                $H, W$ are used), or `None` for a bound valid for every size.

        Returns:
            A 0-dim float64 CPU tensor.

        Raises:
            ValueError: If `input_shape` is not a sequence of positive ints
                ending with $(H, W)$ or has a padded spatial size smaller than
                the kernel.
        """
        size = None if input_shape is None else check_spatial_shape(input_shape)[-2:]
        return l2_norm_pool2d_lipschitz_bound(self.kernel_size, self.stride, self.padding, size)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
