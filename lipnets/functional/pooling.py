r"""L2-norm pooling: every pooling window becomes its Euclidean norm, with its exact bound.

`l2_norm_pool2d` computes the pooling; `l2_norm_pool2d_lipschitz_bound` its
l2 → l2 Lipschitz constant $\sqrt{c}$, where $c$ is the largest number of
windows that contain one input position (`max_window_cover` per spatial
dimension, multiplied). Each window map is 1-Lipschitz; windows that overlap
share input entries, which is why the constant exceeds 1 when the stride is
smaller than the kernel. `lipnets.nn.L2NormPool2d` is the module shell.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lipnets._checks import check_int, check_int_pair, check_tensor

__all__ = ["l2_norm_pool2d", "l2_norm_pool2d_lipschitz_bound", "max_window_cover"]

_Pair = tuple[int, int]


def _windows(kernel_size: object, stride: object, padding: object) -> tuple[_Pair, _Pair, _Pair]:
    """(kernel, stride, padding) as pairs; a stride of `None` means the kernel size."""
    kernel = check_int_pair(kernel_size, "kernel_size", 1)
    step = kernel if stride is None else check_int_pair(stride, "stride", 1)
    return kernel, step, check_int_pair(padding, "padding", 0)


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

    Examples:
        >>> max_window_cover(3, 1)  # each position in 3 windows
        3
        >>> max_window_cover(3, 1, size=4)  # only 2 windows fit in 4 positions
        2
        >>> max_window_cover(2, 2)  # disjoint windows
        1
    """
    k = check_int(kernel_size, "kernel_size", 1)
    s = check_int(stride, "stride", 1)
    p = check_int(padding, "padding", 0)
    if size is None:
        return -(-k // s)
    size = check_int(size, "size", 1)
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

    Examples:
        >>> import torch
        >>> x = torch.tensor([[[[3.0, 4.0], [0.0, 0.0]]]])
        >>> l2_norm_pool2d(x, 2)
        tensor([[[[5.]]]])

    References:
        Boureau, Y.-L., Ponce, J. & LeCun, Y. (2010). A theoretical analysis
        of feature pooling in visual recognition. *ICML*.
    """
    x = check_tensor(x, "x")
    if x.ndim not in (3, 4):
        raise ValueError(
            f"l2_norm_pool2d expects x of shape (N, C, H, W) or (C, H, W), "
            f"got x.ndim={x.ndim} (shape {tuple(x.shape)})"
        )
    kernel, step, pad = _windows(kernel_size, stride, padding)
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


def l2_norm_pool2d_lipschitz_bound(
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    input_size: int | tuple[int, int] | None = None,
) -> Tensor:
    r"""The l2 → l2 Lipschitz constant $\sqrt{c}$ of `l2_norm_pool2d`, exact (and attained).

    $c$ is the largest number of windows that contain one input position:
    `max_window_cover` per spatial dimension, multiplied (windows form a
    product grid, so the windows containing $(j_1, j_2)$ are the pairs of
    1-D windows containing $j_1$ and $j_2$). It is exact for the input
    size `input_size`, and the maximum over all sizes when `input_size` is
    `None`; 1 whenever `stride >= kernel_size`.

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
        kernel_size: Window size, an int or a pair `(kH, kW)` of ints $\geq 1$.
        stride: Step between windows, an int or a pair of ints $\geq 1$;
            `None` (default) means `kernel_size`.
        padding: Zeros added on each side, an int or a pair of ints $\geq 0$.
        input_size: Spatial size $(H, W)$ of the input (an int for a square),
            or `None` for a bound valid for every size.

    Returns:
        A 0-dim float64 CPU tensor.

    Raises:
        ValueError: If an argument is not an int (or pair) in range, or a
            padded spatial size is smaller than the kernel.

    Examples:
        >>> l2_norm_pool2d_lipschitz_bound(2, stride=1)  # up to 2 x 2 windows per position
        tensor(2., dtype=torch.float64)
        >>> l2_norm_pool2d_lipschitz_bound(3, stride=1, input_size=(3, 9))  # one row
        tensor(1.7321, dtype=torch.float64)
    """
    kernel, step, pad = _windows(kernel_size, stride, padding)
    sizes: tuple[int | None, int | None] = (None, None)
    if input_size is not None:
        sizes = check_int_pair(input_size, "input_size", 1)
    cover = 1
    for dim in range(2):
        k, s, p, n = kernel[dim], step[dim], pad[dim], sizes[dim]
        # No window at all is an error; windows that all lie in the padding
        # (count 0) make the layer constant: its bound is then 0.
        if n is not None and (n + 2 * p - k) // s + 1 <= 0:
            raise ValueError(
                f"input_size {sizes} is too small for kernel_size={k} with padding={p} "
                f"along spatial dim {dim}: no window fits"
            )
        cover *= max_window_cover(k, s, p, n)
    return _sqrt_up(cover)
