r"""The base of the operations of a propagation graph: the `Op` contract, and `ReLU`.

A propagation graph (built by `lipnets.propagation.builder` from a traced model)
has one nonlinear operation, `ReLU`; every other node is *affine* in its
inputs (`lipnets.propagation.ops_affine`, `lipnets.propagation.ops_structural`).
Sorting activations (MaxMin, GroupSort, FullSort) are rewritten into
comparator layers made of two affine nodes around a ReLU
(`lipnets.propagation.ops_compare`, Note [Comparators as ReLUs] in
`lipnets.propagation.rules`).

Tensors are batched: a node's value has shape $(N, *S)$ with $S$ the
per-sample shape. A *coefficient* tensor of backward propagation has shape
$(N, K, *S)$: $K$ linear functions of the node's value per sample. Every
affine operation $y = W x + b$ answers:

* ``forward``: the value of the node from its inputs' values;
* ``interval``: bounds of the output from bounds of the inputs, by interval
  arithmetic (Note [Interval rules] in `lipnets.propagation.ops_affine`);
* ``backward``: given coefficients $A$ of the output, the coefficients
  $A W$ of each input and the constant $A b$ (the adjoint, applied to $K$
  rows per sample at once).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__: list[str] = []

Coeffs = tuple[list["Tensor | None"], "Tensor | None"]
"""What ``backward`` returns: one coefficient tensor per input (or None), and a constant."""


def _bias_term(a: Tensor, bias: Tensor | None) -> Tensor | None:
    """The constant sum_j A_kj b_j of coefficients (N, K, *S) and a bias broadcast to S."""
    if bias is None:
        return None
    return (a * bias).flatten(2).sum(-1)


def _rows(a: Tensor) -> tuple[int, int, Tensor]:
    """(N, K, *S) -> (N * K, *S) for an operation that treats rows as a batch."""
    n, k = a.shape[:2]
    return n, k, a.reshape(n * k, *a.shape[2:])


class Op:
    """One operation of a propagation graph (see the module docs)."""

    kind = "op"

    def __init__(self, in_shapes: Sequence[torch.Size], out_shape: torch.Size) -> None:
        self.in_shapes = [torch.Size(s) for s in in_shapes]
        self.out_shape = torch.Size(out_shape)

    def forward(self, xs: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def backward(self, a: Tensor) -> Coeffs:
        raise NotImplementedError


class ReLU(Op):
    """$y = \\max(x, 0)$, the only nonlinear operation; relaxed by the engine."""

    kind = "relu"

    def forward(self, xs: list[Tensor]) -> Tensor:
        return torch.relu(xs[0])

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        return torch.relu(lows[0]), torch.relu(ups[0])
