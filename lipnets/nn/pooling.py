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
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipnets.functional.reshape import _check_factor, space_to_depth

__all__ = ["InvertibleDownsample", "L2NormPool2d", "l2_norm_pool2d", "max_window_cover"]


def _unit_bound() -> Tensor:
    return torch.ones((), dtype=torch.float64)


def _sqrt_up(count: int) -> Tensor:
    """The square root of `count` as a 0-dim float64 tensor, rounded up."""
    # Note [Rounding the square root up]
    # A bound must not be below the true constant. math.sqrt is correctly
    # rounded, so its result is within half an ulp of sqrt(c) but may lie below
    # it; when c is not a perfect square the next float up is a sound bound.
    # Perfect squares (1, 4, ...) are exact and stay exact.
    root = math.isqrt(count)
    if root * root == count:
        return torch.tensor(float(root), dtype=torch.float64)
    return torch.tensor(math.nextafter(math.sqrt(count), math.inf), dtype=torch.float64)


def _check_int(value: object, name: str, minimum: int) -> int:
    """Return ``value`` as an int >= ``minimum``; a bool is not accepted."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _int_pair(value: object, name: str, minimum: int) -> tuple[int, int]:
    """Return ``value`` (an int or a pair of ints, each >= ``minimum``) as a pair."""
    items = (value, value) if not isinstance(value, Sequence) else tuple(value)
    ok = len(items) == 2 and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= minimum for v in items
    )
    if not ok:
        raise ValueError(
            f"{name} must be an int >= {minimum} or a pair of such ints, got {value!r}"
        )
    return int(items[0]), int(items[1])


def max_window_cover(
    kernel_size: int, stride: int, padding: int = 0, size: int | None = None
) -> int:
    r"""Largest number of pooling windows along one dimension that contain one input position.

    Windows start at $i s - p$ for $i = 0, \dots, n - 1$ with
    $n = \lfloor (N + 2p - k) / s \rfloor + 1$ (torch's output size without
    `ceil_mode`) and cover $k$ consecutive positions of the zero-padded input.
    With `size` $= N$ given the count is exact (a maximum over the $N$ real
    input positions); without it the result is $\lceil k / s \rceil$, the
    maximum over every input size: position $j$ lies in window $i$ iff
    $(j + p - k + 1) / s \le i \le (j + p) / s$, an interval of length
    $(k - 1) / s$ that holds at most $\lfloor (k - 1)/s \rfloor + 1 =
    \lceil k / s \rceil$ integers, and exactly that many for an interior
    position of a long enough input.

    Args:
        kernel_size: Window length $k \geq 1$.
        stride: Step $s \geq 1$ between windows.
        padding: Zeros $p \geq 0$ added on both sides.
        size: Input length $N$, or `None` for a count valid for every length.

    Returns:
        The count $c \geq 0$: 0 when the padded input is shorter than the
        window (torch's pooling would raise) or every window lies in the
        padding.

    Raises:
        ValueError: If an argument is not an int in range (`kernel_size`,
            `stride` and `size` $\geq 1$, `padding` $\geq 0$).

    Example:
        >>> max_window_cover(3, 1)  # each position in 3 windows
        3
        >>> max_window_cover(3, 1, size=4)  # only 2 windows fit in 4 positions
        2
        >>> max_window_cover(2, 2)  # disjoint windows
        1
    """
    k = _check_int(kernel_size, "kernel_size", 1)
    s = _check_int(stride, "stride", 1)
    p = _check_int(padding, "padding", 0)
    if size is None:
        return -(-k // s)
    size = _check_int(size, "size", 1)
    n = (size + 2 * p - k) // s + 1
    if n <= 0:
        return 0
    counts = [0] * size
    for i in range(n):
        for j in range(max(0, i * s - p), min(size, i * s - p + k)):
            counts[j] += 1
    return max(counts, default=0)


def l2_norm_pool2d(
    x: Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
) -> Tensor:
    r"""Euclidean norm of every pooling window: $y_w = \sqrt{\sum_{j \in w} x_j^2}$.

    Windows are those of `torch.nn.functional.avg_pool2d` with the same
    `kernel_size`, `stride` and `padding` (zeros, which add nothing to a norm;
    any padding $\geq 0$ is accepted), applied to each channel separately.

    The gradient at an all-zero window is 0, not `nan` (Note [L2 pool
    gradient at zero]); half-precision inputs are squared and summed in
    float32 (Note [L2 pool precision]).

    Args:
        x: Tensor of shape $(N, C, H, W)$ or $(C, H, W)$.
        kernel_size: Window size, an int or a pair `(kH, kW)` of ints $\geq 1$.
        stride: Step between windows, an int or a pair of ints $\geq 1$;
            `None` (default) means `kernel_size` (disjoint windows).
        padding: Zeros added on each side, an int or a pair of ints
            $\geq 0$.

    Returns:
        A tensor of shape $(N, C, H_{out}, W_{out})$ (or without $N$), with
        $H_{out} = \lfloor (H + 2 p_H - k_H) / s_H \rfloor + 1$, and the dtype
        of `x`.

    Raises:
        TypeError: If `x` is not a tensor.
        ValueError: If `kernel_size`, `stride` or `padding` is not an int (or
            pair) in range, or `x` is not 3- or 4-dimensional.

    Example:
        >>> x = torch.tensor([[[[3.0, 4.0], [0.0, 0.0]]]])
        >>> l2_norm_pool2d(x, 2)
        tensor([[[[5.]]]])

    References:
        Boureau, Y.-L., Ponce, J. & LeCun, Y. (2010). A theoretical analysis
        of feature pooling in visual recognition. *ICML*.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim not in (3, 4):
        raise ValueError(
            f"l2_norm_pool2d expects x of shape (N, C, H, W) or (C, H, W), "
            f"got x.ndim={x.ndim} (shape {tuple(x.shape)})"
        )
    kernel = _int_pair(kernel_size, "kernel_size", 1)
    step = kernel if stride is None else _int_pair(stride, "stride", 1)
    pad = _int_pair(padding, "padding", 0)
    # Note [L2 pool precision]
    # The sum of squares of a float16/bfloat16 input is computed in float32 and
    # the result cast back: squaring overflows float16 for |x| > 256 and loses
    # small entries to underflow.
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    squares = work * work
    if pad != (0, 0):
        # Explicit zero padding: avg_pool2d limits padding to half the kernel.
        squares = F.pad(squares, (pad[1], pad[1], pad[0], pad[0]))
    sums = F.avg_pool2d(squares, kernel, step, 0, divisor_override=1)
    # Note [L2 pool gradient at zero]
    # d y_w / d x_j = x_j / y_w has norm <= 1 but is 0/0 at an all-zero window,
    # where autograd through sqrt gives nan. Take the root of where(s > 0, s, 1)
    # and replace the result by 0 where s == 0: both branches and their
    # gradients are finite, and the gradient there is 0, a valid subgradient of
    # the norm at the origin.
    positive = sums > 0
    root = torch.sqrt(torch.where(positive, sums, torch.ones_like(sums)))
    out = torch.where(positive, root, torch.zeros_like(root))
    return out.to(x.dtype)


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

    Example:
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
        self.factor = _check_factor(factor)

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
    `l2_norm_pool2d`, which this module calls). The gradient at an all-zero
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

    Example:
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
        self.kernel_size = _int_pair(kernel_size, "kernel_size", 1)
        self.stride = self.kernel_size if stride is None else _int_pair(stride, "stride", 1)
        self.padding = _int_pair(padding, "padding", 0)

    def forward(self, x: Tensor) -> Tensor:
        """Apply `l2_norm_pool2d` with this module's window settings."""
        return l2_norm_pool2d(x, self.kernel_size, self.stride, self.padding)

    def lipschitz_bound(self, input_shape: Sequence[int] | None = None) -> Tensor:
        r"""Return the l2 → l2 Lipschitz constant $\sqrt{c}$, exact (and attained).

        $c$ is the largest number of windows that contain one input position:
        `max_window_cover` per spatial dimension, multiplied (windows form a
        product grid, so the windows containing $(j_1, j_2)$ are the pairs of
        1-D windows containing $j_1$ and $j_2$). It is exact for the input
        size in `input_shape`, and the maximum over all sizes when
        `input_shape` is `None`; 1 whenever `stride >= kernel_size`.

        Proof (upper bound): for one window, the reverse triangle inequality
        gives $|\|x_w\|_2 - \|x'_w\|_2| \le \|x_w - x'_w\|_2$ (padded zeros are
        equal in $x$ and $x'$ and add nothing). Summing the squares over all
        windows and channels,
        $\|f(x) - f(x')\|_2^2 \le \sum_w \|x_w - x'_w\|_2^2
        = \sum_j c_j (x_j - x'_j)^2 \le c \|x - x'\|_2^2$, where $c_j$ is the
        number of windows containing position $j$.

        Proof (attained): let $j$ be a position in $c$ windows and
        $x' = x + t e_j$ with $x = 0$. Every window containing $j$ outputs
        $|t|$ and every other outputs 0, so
        $\|f(x') - f(x)\|_2 = \sqrt{c}\,|t| = \sqrt{c}\,\|x' - x\|_2$.
        The square root is rounded up (Note [Rounding the square root up]).

        Args:
            input_shape: Shape $(N, C, H, W)$ or $(C, H, W)$ of the input (only
                $H, W$ are used), or `None` for a bound valid for every size.

        Returns:
            A 0-dim float64 CPU tensor.

        Raises:
            ValueError: If `input_shape` has fewer than 2 dimensions or a
                padded spatial size smaller than the kernel.
        """
        sizes: tuple[int | None, int | None] = (None, None)
        if input_shape is not None:
            shape = tuple(int(s) for s in input_shape)
            if len(shape) < 2:
                raise ValueError(
                    f"input_shape must end with the spatial size (H, W), got {tuple(input_shape)}"
                )
            sizes = (shape[-2], shape[-1])
        cover = 1
        for dim in range(2):
            k, s, p = self.kernel_size[dim], self.stride[dim], self.padding[dim]
            count = max_window_cover(k, s, p, sizes[dim])
            # No window at all is an error; windows that all lie in the padding
            # (count 0) make the layer constant: its bound is then 0.
            if sizes[dim] is not None and (sizes[dim] + 2 * p - k) // s + 1 <= 0:
                raise ValueError(
                    f"input_shape {tuple(input_shape or ())} is too small for kernel_size={k} "
                    f"with padding={p} along spatial dim {dim}: no window fits"
                )
            cover *= count
        return _sqrt_up(cover)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
