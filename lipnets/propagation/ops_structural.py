r"""The multi-input and structural affine operations of a propagation graph.

`Gather` picks entries (reshapes, permutations, slicing, cat, padding: Note
[Index operations] in `lipnets.propagation.builder`), `LinearCombination`
adds inputs with constant coefficients, `Reduce` sums over per-sample dims.
See `lipnets.propagation.ops_base` for the contract of an operation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lipnets.propagation.ops_base import Coeffs, Op, _bias_term

__all__: list[str] = []


class Gather(Op):
    """Entries picked from the inputs (reshapes, permutations, slicing, cat, padding).

    Output entry $i$ of each sample is entry ``index[i]`` of input
    ``source[i]`` of the same sample, or the constant ``const[:, i]`` where
    ``source[i] == -1``. Entries may be picked more than once (``expand``,
    reflect padding): the adjoint sums them.
    """

    kind = "gather"

    def __init__(self, in_shapes, out_shape, source: Tensor, index: Tensor, const: Tensor | None):
        super().__init__(in_shapes, out_shape)
        self.source, self.index = source, index
        self.const = const  # (N or 1, M) or None
        self.parts = []  # per input: (output positions, input positions)
        for k in range(len(in_shapes)):
            where = torch.nonzero(source == k).flatten()
            self.parts.append((where, index[where]))
        m = out_shape.numel()
        self.reshape_only = (
            len(in_shapes) == 1
            and const is None
            and in_shapes[0].numel() == m
            and bool((source == 0).all())
            and bool(torch.equal(index, torch.arange(m, device=index.device)))
        )

    def _pick(self, xs: list[Tensor]) -> Tensor:
        n = xs[0].shape[0]
        if self.reshape_only:
            return xs[0].reshape(n, *self.out_shape)
        first = xs[0]
        if self.const is not None:
            out = self.const.to(first.dtype).expand(n, -1).clone()
        else:
            out = first.new_zeros((n, self.out_shape.numel()))
        for x, (where, idx) in zip(xs, self.parts, strict=True):
            out[:, where] = x.reshape(n, -1)[:, idx]
        return out.reshape(n, *self.out_shape)

    def forward(self, xs: list[Tensor]) -> Tensor:
        return self._pick(xs)

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self._pick(lows), self._pick(ups)

    def backward(self, a: Tensor) -> Coeffs:
        n, k = a.shape[:2]
        if self.reshape_only:
            return [a.reshape(n, k, *self.in_shapes[0])], None
        flat = a.reshape(n, k, -1)
        outs: list[Tensor | None] = []
        for shape, (where, idx) in zip(self.in_shapes, self.parts, strict=True):
            a_in = flat.new_zeros((n, k, shape.numel()))
            a_in.index_add_(2, idx, flat[:, :, where])
            outs.append(a_in.reshape(n, k, *shape))
        bias = None
        if self.const is not None:
            bias = (flat * self.const.to(a.dtype).unsqueeze(1)).sum(-1)
        return outs, bias

    def multiplicities(self) -> list[int]:
        """For each input, the largest number of times one of its entries is picked."""
        return [int(torch.bincount(idx).max()) if idx.numel() else 0 for _, idx in self.parts]


class LinearCombination(Op):
    """$y = \\sum_k a_k \\odot x_k + c$ with constant coefficients (add, sub, mul, div, neg).

    The inputs have the output's shape (a dependent operand is never
    broadcast); coefficient tensors and the constant have shape $(N, *S)$
    (broadcast views), scalar coefficients are floats.
    """

    kind = "combination"

    def __init__(self, in_shapes, out_shape, coeffs: list[Tensor | float], const: Tensor | None):
        super().__init__(in_shapes, out_shape)
        self.coeffs = coeffs
        self.const = const

    def forward(self, xs: list[Tensor]) -> Tensor:
        out = sum(c * x for c, x in zip(self.coeffs, xs, strict=True))
        return out if self.const is None else out + self.const

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        lo = up = None
        for c, low, high in zip(self.coeffs, lows, ups, strict=True):
            if isinstance(c, Tensor):
                pos, neg = c.clamp_min(0), c.clamp_max(0)
                term_lo, term_up = pos * low + neg * high, pos * high + neg * low
            else:
                term_lo, term_up = (c * low, c * high) if c >= 0 else (c * high, c * low)
            lo = term_lo if lo is None else lo + term_lo
            up = term_up if up is None else up + term_up
        assert lo is not None and up is not None
        if self.const is not None:
            lo, up = lo + self.const, up + self.const
        return lo, up

    def backward(self, a: Tensor) -> Coeffs:
        outs: list[Tensor | None] = [
            a * (c.unsqueeze(1) if isinstance(c, Tensor) else c) for c in self.coeffs
        ]
        const = None if self.const is None else self.const.unsqueeze(1)
        return outs, _bias_term(a, const)

    def scales(self) -> list[float]:
        """$\\max |a_k|$ for each input."""
        return [
            float(c.abs().max()) if isinstance(c, Tensor) else abs(float(c)) for c in self.coeffs
        ]


class Reduce(Op):
    """Sum (times ``scale``: 1 for ``sum``, 1/count for ``mean``) over per-sample dims."""

    kind = "reduce"

    def __init__(self, in_shape, out_shape, dims: tuple[int, ...], keepdim: bool, scale: float):
        super().__init__([in_shape], out_shape)
        self.dims = dims  # per-sample dims (0-based, without the batch)
        self.keepdim = keepdim
        self.scale = scale
        self.count = math.prod(in_shape[d] for d in dims)

    def forward(self, xs: list[Tensor]) -> Tensor:
        dims = tuple(d + 1 for d in self.dims)
        return xs[0].sum(dim=dims, keepdim=self.keepdim) * self.scale

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self.forward(lows), self.forward(ups)

    def backward(self, a: Tensor) -> Coeffs:
        n, k = a.shape[:2]
        if not self.keepdim:
            for d in sorted(self.dims):
                a = a.unsqueeze(d + 2)
        return [(a * self.scale).expand(n, k, *self.in_shapes[0])], None
