r"""Sorting activation modules: GroupSort, MaxMin and FullSort.

Each module is a shell around the function of the same name in
`lipnets.functional.activations`; the maths and the argument checks on the
input live there. Each module's `lipschitz_bound` is exactly 1 (l2 → l2) for
every input shape; the proof is in the docstrings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lipnets._checks import check_dim, check_int
from lipnets.functional.activations import full_sort, group_sort, max_min

__all__ = ["FullSort", "GroupSort", "MaxMin"]


def _unit_bound() -> Tensor:
    return torch.ones((), dtype=torch.float64)


class GroupSort(nn.Module):
    r"""Sort contiguous groups of `group_size` channels in ascending order.

    See `lipnets.functional.activations.group_sort` for the exact layout.
    With `group_size=2` this is MaxMin up to the order within each pair, and
    with `group_size` equal to the channel count it is `FullSort`.

    Args:
        group_size: Number $g \geq 1$ of channels per group; it must divide the
            channel count of every input.
        dim: Dimension holding the channels (`1` for NCHW, `-1` for NHWC).

    Raises:
        ValueError: If `group_size` is not an int $\geq 1$ (a bool is not
            accepted).
        TypeError: If `dim` is not an int.

    Examples:
        >>> act = GroupSort(group_size=2)
        >>> x = torch.randn(8, 6, 5, 5)
        >>> y = act(x)
        >>> # each group holds the same values as before, now in ascending order
        >>> groups_x = x.unflatten(1, (3, 2))
        >>> groups_y = y.unflatten(1, (3, 2))
        >>> bool(torch.equal(groups_y, groups_x.sort(dim=2).values))
        True
        >>> act.lipschitz_bound()
        tensor(1., dtype=torch.float64)

    References:
        Anil, C., Lucas, J. & Grosse, R. (2019). Sorting out Lipschitz function
        approximation. *Proceedings of the 36th International Conference on
        Machine Learning (ICML)*, PMLR 97:291-301.
    """

    def __init__(self, group_size: int = 2, dim: int = 1) -> None:
        super().__init__()
        self.group_size = check_int(group_size, "group_size")
        self.dim = check_dim(dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply `group_sort` along `self.dim`."""
        return group_sort(x, self.group_size, self.dim)

    def lipschitz_bound(self, input_shape: Sequence[int] | None = None) -> Tensor:
        r"""Return the l2 → l2 Lipschitz bound, exactly 1 for every input shape.

        Proof: for $x, y$ let $x_t = x + t(y - x)$, $t \in [0, 1]$. The
        function $f$ is continuous, and $[0, 1]$ splits into finitely many
        intervals on each of which the order within every group of $x_t$ is
        fixed (the order changes only where two entries of a group are equal,
        and two affine functions of $t$ are equal on an interval or at one
        point). On each interval $f$ is one fixed permutation $P$, so
        $\|f(x_{t_1}) - f(x_{t_0})\|_2 = \|P(x_{t_1} - x_{t_0})\|_2 =
        \|x_{t_1} - x_{t_0}\|_2$. Summing over the intervals with the triangle
        inequality gives $\|f(y) - f(x)\|_2 \leq \|y - x\|_2$. The bound is
        attained (any $x \neq y$ in one order region), so 1 is also tight.

        Args:
            input_shape: Ignored; the bound holds for every input shape.

        Returns:
            A 0-dim float64 CPU tensor equal to 1.
        """
        return _unit_bound()

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, dim={self.dim}"


class MaxMin(nn.Module):
    r"""Write the maximum then the minimum of each adjacent channel pair.

    Channels $(2i, 2i + 1)$ along `dim` become $(\max, \min)$ of the pair, so
    `MaxMin()(x)` equals `GroupSort(2)(x)` with the entries of every pair
    swapped (the documented order of `lipnets.functional.activations.max_min`).
    It uses comparisons and `torch.where`, not a sort, so it exports to ONNX
    without `TopK`/`Sort`, and its gradient is a permutation even at ties.

    Args:
        dim: Dimension holding the channels (`1` for NCHW, `-1` for NHWC); the
            channel count of every input must be even.

    Raises:
        TypeError: If `dim` is not an int.

    Examples:
        >>> act = MaxMin()
        >>> x = torch.randn(8, 6)
        >>> y = act(x)
        >>> pairs_x, pairs_y = x.unflatten(1, (3, 2)), y.unflatten(1, (3, 2))
        >>> bool(torch.equal(pairs_y[..., 0], pairs_x.amax(dim=2)))
        True
        >>> bool(torch.equal(pairs_y[..., 1], pairs_x.amin(dim=2)))
        True

    References:
        Chernodub, A. & Nowicki, D. (2016). Norm-preserving Orthogonal
        Permutation Linear Unit activation functions (OPLU). arXiv:1604.02313.

        Anil, C., Lucas, J. & Grosse, R. (2019). Sorting out Lipschitz function
        approximation. *Proceedings of the 36th International Conference on
        Machine Learning (ICML)*, PMLR 97:291-301.
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = check_dim(dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply `max_min` along `self.dim`."""
        return max_min(x, self.dim)

    def lipschitz_bound(self, input_shape: Sequence[int] | None = None) -> Tensor:
        r"""Return the l2 → l2 Lipschitz bound, exactly 1 for every input shape.

        Proof: MaxMin is GroupSort with groups of 2 followed by a fixed
        permutation (swap within each pair), and a fixed permutation is an
        isometry. GroupSort is 1-Lipschitz: along the segment $x_t = x + t(y -
        x)$ the order within each pair changes at finitely many $t$ (or the
        pair is equal on the whole segment), on each piece the map is a fixed
        permutation, which preserves distances, and the triangle inequality
        over the pieces gives $\|f(y) - f(x)\|_2 \leq \|y - x\|_2$.

        Args:
            input_shape: Ignored; the bound holds for every input shape.

        Returns:
            A 0-dim float64 CPU tensor equal to 1.
        """
        return _unit_bound()

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class FullSort(nn.Module):
    r"""Sort the whole channel dimension in ascending order.

    This is `GroupSort` with a single group holding every channel.

    Args:
        dim: Dimension to sort (`1` for NCHW, `-1` for NHWC).

    Raises:
        TypeError: If `dim` is not an int.

    Examples:
        >>> act = FullSort()
        >>> x = torch.randn(4, 7)
        >>> y = act(x)
        >>> bool((y[:, 1:] >= y[:, :-1]).all())  # sorted
        True
        >>> bool(torch.equal(y, x.sort(dim=1).values))  # a permutation of each row
        True

    References:
        Anil, C., Lucas, J. & Grosse, R. (2019). Sorting out Lipschitz function
        approximation. *Proceedings of the 36th International Conference on
        Machine Learning (ICML)*, PMLR 97:291-301.
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = check_dim(dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply `full_sort` along `self.dim`."""
        return full_sort(x, self.dim)

    def lipschitz_bound(self, input_shape: Sequence[int] | None = None) -> Tensor:
        r"""Return the l2 → l2 Lipschitz bound, exactly 1 for every input shape.

        Proof: along the segment $x_t = x + t(y - x)$, $t \in [0, 1]$, the
        order of the sorted dimension changes at finitely many $t$ (two affine
        functions of $t$ agree on the whole segment or at one point). On each
        piece the sort is a fixed permutation, which preserves distances; it
        is continuous, and the triangle inequality over the pieces gives
        $\|f(y) - f(x)\|_2 \leq \|y - x\|_2$.

        Args:
            input_shape: Ignored; the bound holds for every input shape.

        Returns:
            A 0-dim float64 CPU tensor equal to 1.
        """
        return _unit_bound()

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
