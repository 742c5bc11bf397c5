"""Sound Lipschitz bound rules for torch's power-average pooling and pixel shuffles.

Importing this module registers the rules (``lipnets.bounds`` imports it).

# Note [LPPool bound]
torch's ``LPPool{1,2,3}d(p, k, s, ceil_mode)`` computes, per channel and window
w, ``(sign(o) * relu(|o|) * K) ** (1/p)`` with ``o = avg_pool(x ** p)`` over the
unpadded input and ``K`` the kernel volume. The sign/relu wrapper is the identity
on real numbers (sign(o) |o| = o), so it rectifies nothing: for odd or
non-integer p a negative window sum (or a negative x ** p) gives ``nan``, and
p = 1 is the *signed* sum pooling. lipnets bounds only the cases that are norms:

* p even (2, 4, ...): avg_pool divides window w by its divisor d_w, the number
  of input positions it covers (< K only for the clipped last window of
  ``ceil_mode=True``), so y_w = a_w ** (1/p) ||x_w||_p with a_w = K / d_w. For
  p >= 2, | ||u||_p - ||v||_p | <= ||u - v||_p <= ||u - v||_2, hence
  ||f(x) - f(x')||^2 <= sum_w a_w ** (2/p) ||x_w - x'_w||^2
                     <= max_j (sum_{w contains j} a_w ** (2/p)) ||x - x'||^2.
* p = +inf (max of |x|) and p = -inf (min of |x|): each window map is
  1-Lipschitz for the max-norm, hence for l2, which is the formula with weight 1.

Windows and divisors are separable (a product grid; torch's divisor is the
product of the per-dimension counts when there is no padding), so the maximum
column sum is the product of per-dimension maxima. With the input size known
the per-dimension divisors are read from torch's own avg_pool on the identity,
and the bound is exact for p = 2 (the pair 0, e_j attains it). Without a size:
with ``ceil_mode=False`` every window is full (a_w = 1) and a position is in at
most ceil(k / s) windows. With ``ceil_mode=True`` only the last window can be
clipped: its start is the largest multiple of s that is <= N - k + s - 1 (and
< N), so it covers d >= max(1, k - s + 1) positions, and a position lies in it
and in at most ceil(k / s) - 1 full windows; the per-dimension maximum is at
most ceil(k / s) - 1 + (k / max(1, k - s + 1)) ** (2/p).

PixelShuffle, PixelUnshuffle and ChannelShuffle permute entries: exactly 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lipnets.bounds.registry import pair, register_bound
from lipnets.errors import UnboundedModuleError

__all__: list[str] = []

_EPS64 = torch.finfo(torch.float64).eps


@register_bound(nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
def _permutation(module: nn.Module, input_shape: torch.Size | None) -> float:
    # A fixed permutation of the entries of each sample: an isometry.
    return 1.0


def _lp_exponent(module: nn.Module) -> float:
    """The exponent 2/p of Note [LPPool bound] (0 for p = +-inf), or raise."""
    p = float(module.norm_type)
    if math.isinf(p):
        return 0.0
    if p >= 2 and p == math.floor(p) and int(p) % 2 == 0:
        return 2.0 / p
    raise UnboundedModuleError(
        f"{type(module).__name__}(norm_type={module.norm_type}) has no bound rule: lipnets "
        "bounds norm_type = 2, 4, 6, ... or +-inf; torch computes a signed sum for "
        "norm_type=1 and nan for negative window sums with odd or non-integer norm_type "
        "(Note [LPPool bound])"
    )


def _divisors_1d(size: int, k: int, s: int, ceil_mode: bool) -> list[int]:
    """Per-window divisors of torch's 1-D avg_pool (padding 0) on an input of ``size``."""
    eye = torch.eye(size, dtype=torch.float64).reshape(size, 1, size)
    op = F.avg_pool1d(eye, k, s, 0, ceil_mode=ceil_mode).reshape(size, -1).T  # (windows, inputs)
    divisors = []
    for row in op:
        nonzero = row[row != 0]
        # each entry is 1 / d_w with d_w a small integer, so rounding recovers it
        divisors.append(round(1.0 / float(nonzero[0])) if nonzero.numel() else 0)
    return divisors


def _max_column_sum_1d(size: int | None, k: int, s: int, ceil_mode: bool, exponent: float) -> float:
    if size is None:
        full = -(-k // s)
        if not ceil_mode:
            return float(full)
        return (full - 1) + (k / max(1, k - s + 1)) ** exponent
    if size + (s - 1 if ceil_mode else 0) < k:
        raise ValueError(
            f"an input of size {size} is too small for kernel_size={k} "
            f"(stride={s}, ceil_mode={ceil_mode}): no pooling window fits"
        )
    divisors = _divisors_1d(size, k, s, ceil_mode)
    columns = [0.0] * size
    for i, d in enumerate(divisors):
        if d == 0:
            continue
        weight = (k / d) ** exponent
        for j in range(i * s, min(size, i * s + k)):
            columns[j] += weight
    return max(columns)


def _lp_pool(module: nn.Module, input_shape: torch.Size | None) -> torch.Tensor:
    n = {nn.LPPool1d: 1, nn.LPPool2d: 2, nn.LPPool3d: 3}[
        next(c for c in (nn.LPPool1d, nn.LPPool2d, nn.LPPool3d) if isinstance(module, c))
    ]
    exponent = _lp_exponent(module)
    k = pair(module.kernel_size, n)
    s = pair(module.stride if module.stride is not None else module.kernel_size, n)
    sizes: Sequence[int | None] = (None,) * n
    if input_shape is not None:
        if len(input_shape) < n + 1:
            raise ValueError(
                f"{type(module).__name__} needs an input of rank >= {n + 1}, "
                f"got input_shape {tuple(input_shape)}"
            )
        sizes = tuple(int(v) for v in input_shape[-n:])
    total = 1.0
    for size, kk, ss in zip(sizes, k, s, strict=True):
        total *= _max_column_sum_1d(size, kk, ss, bool(module.ceil_mode), exponent)
    root = math.isqrt(int(total)) if total == int(total) else None
    if root is not None and root * root == total:
        return torch.tensor(float(root), dtype=torch.float64)
    # Rounding slack: a few correctly rounded operations per dimension.
    return torch.tensor(math.sqrt(total) * (1.0 + 16 * (n + 1) * _EPS64), dtype=torch.float64)


register_bound(nn.LPPool1d, nn.LPPool2d, nn.LPPool3d)(_lp_pool)
