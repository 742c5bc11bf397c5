r"""The comparator layers of a propagation graph, and the sorting networks they build.

A comparator layer is a `Difference`, a `ReLU` and a `Compare` node (Note
[Comparators as ReLUs] in `lipnets.propagation.rules`); `sorting_network`
gives the layers that sort a group of wires. See `lipnets.propagation.ops_base`
for the contract of an operation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lipnets.propagation.ops_base import Coeffs, Op

__all__: list[str] = []


class Difference(Op):
    """$d_p = x_{lo_p} - x_{hi_p}$ along one per-sample dim (a comparator's input)."""

    kind = "difference"

    def __init__(self, in_shape, out_shape, dim: int, lo: Tensor, hi: Tensor):
        super().__init__([in_shape], out_shape)
        self.dim, self.lo, self.hi = dim, lo, hi

    def forward(self, xs: list[Tensor]) -> Tensor:
        x, d = xs[0], self.dim + 1
        return x.index_select(d, self.lo) - x.index_select(d, self.hi)

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        d = self.dim + 1
        lo, up = lows[0], ups[0]
        return (
            lo.index_select(d, self.lo) - up.index_select(d, self.hi),
            up.index_select(d, self.lo) - lo.index_select(d, self.hi),
        )

    def backward(self, a: Tensor) -> Coeffs:
        n, k, d = a.shape[0], a.shape[1], self.dim + 2
        a_in = a.new_zeros((n, k, *self.in_shapes[0]))
        a_in.index_add_(d, self.lo, a)
        a_in.index_add_(d, self.hi, -a)
        return [a_in], None


class Compare(Op):
    """One comparator layer: $y = x$ except $y_{lo} = x_{lo} - r$, $y_{hi} = x_{hi} + r$.

    Its second input is $r = \\mathrm{relu}(x_{lo} - x_{hi})$ (a `Difference`
    then a `ReLU` of the same $x$), so $y_{lo} = \\min(x_{lo}, x_{hi})$ and
    $y_{hi} = \\max(x_{lo}, x_{hi})$: the pairs are disjoint. The interval rule
    uses that identity directly: min and max are nondecreasing in each
    argument, so $[\\min(l_{lo}, l_{hi}), \\min(u_{lo}, u_{hi})]$ (and the same
    for max) is exact for a box.
    """

    kind = "compare"

    def __init__(self, in_shape, dim: int, lo: Tensor, hi: Tensor):
        super().__init__([in_shape, _with(in_shape, dim, lo.numel())], in_shape)
        self.dim, self.lo, self.hi = dim, lo, hi

    def forward(self, xs: list[Tensor]) -> Tensor:
        x, r = xs
        d = self.dim + 1
        return x.index_add(d, self.lo, -r).index_add(d, self.hi, r)

    def _sorted(self, x: Tensor) -> Tensor:
        d = self.dim + 1
        a, b = x.index_select(d, self.lo), x.index_select(d, self.hi)
        return x.index_copy(d, self.lo, torch.minimum(a, b)).index_copy(
            d, self.hi, torch.maximum(a, b)
        )

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self._sorted(lows[0]), self._sorted(ups[0])

    def backward(self, a: Tensor) -> Coeffs:
        d = self.dim + 2
        return [a, a.index_select(d, self.hi) - a.index_select(d, self.lo)], None


def _with(shape: torch.Size, dim: int, size: int) -> torch.Size:
    dims = list(shape)
    dims[dim] = size
    return torch.Size(dims)


def sorting_network(n: int) -> list[list[tuple[int, int]]]:
    """Comparator layers that sort ``n`` wires ascending: (i, j), i < j, puts the min at i.

    Batcher's merge exchange (Knuth, TAOCP vol. 3, Algorithm 5.2.2M), valid
    for every ``n``; its comparators are scheduled greedily into layers of
    disjoint pairs, each as early as the comparators before it on its two
    wires allow (which keeps the order of the comparators on each wire, so the
    network computes the same function).
    """
    if n < 2:
        return []
    t = (n - 1).bit_length()
    comparators: list[tuple[int, int]] = []
    p = 1 << (t - 1)
    while p > 0:
        q, r, d = 1 << (t - 1), 0, p
        while True:
            comparators.extend((i, i + d) for i in range(n - d) if i & p == r)
            if q == p:
                break
            d, q, r = q - p, q >> 1, p
        p >>= 1
    depth = [0] * n
    layers: list[list[tuple[int, int]]] = []
    for i, j in comparators:
        level = max(depth[i], depth[j])
        if level == len(layers):
            layers.append([])
        layers[level].append((i, j))
        depth[i] = depth[j] = level + 1
    return layers
