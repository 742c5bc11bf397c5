r"""The base of the operations of a propagation graph: the `Op` contract, `Elementwise`, `ReLU`.

A propagation graph (built by `lipnets.propagation.builder` from a traced model)
is made of *affine* operations (`lipnets.propagation.ops_affine`,
`lipnets.propagation.ops_structural`) and *elementwise* ones (`Elementwise`):
a scalar function applied entry by entry, which the propagation relaxes by
two lines per entry. `ReLU` is the one every rewrite uses; the smooth
activations are in `lipnets.propagation.ops_elementwise`. Sorting activations
(MaxMin, GroupSort, FullSort), ``torch.maximum``/``minimum`` and max pooling
are rewritten into comparator layers made of two affine nodes around a ReLU
(`lipnets.propagation.ops_compare`, Note [Comparators as ReLUs] in
`lipnets.propagation.rules`); LeakyReLU into a ReLU and an affine node.

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

An elementwise operation answers ``forward``, ``interval`` and, instead of
``backward``, ``relaxation`` (its lines, which `lipnets.propagation.propagator`
uses in the backward pass) and ``inexact`` (the entries whose lines are not
exact, which CROWN tightens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__: list[str] = []

Coeffs = tuple[list["Tensor | None"], "Tensor | None"]
"""What ``backward`` returns: one coefficient tensor per input (or None), and a constant."""
Relaxation = tuple[Tensor, "Tensor | None", Tensor, Tensor]
"""What ``Elementwise.relaxation`` returns: (lower slope, lower intercept or None for 0,
upper slope, upper intercept), each shaped like the input's bounds."""


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


class Elementwise(Op):
    """$y_i = f(x_i)$ for a scalar function $f$: one input, the output of the same shape.

    ``relaxation(lower, upper)`` returns, per entry, lines $a_l x + b_l \\le f(x)
    \\le a_u x + b_u$ valid for every $x \\in [l, u]$ (Note [Relaxations of
    smooth activations] in `lipnets.propagation.ops_elementwise`; Note [ReLU
    relaxation] in `lipnets.propagation.propagator`); an entry whose bounds
    are NaN gets NaN lines. ``slope`` is the supremum of $|f'|$ (the
    function's Lipschitz constant), rounded up.
    """

    kind = "elementwise"
    slope = 1.0
    variants = 1
    """How many relaxations the op offers (Note [Relaxation variants] in
    `lipnets.propagation.propagator`); ``relaxation`` takes the variant's index."""

    def function(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, xs: list[Tensor]) -> Tensor:
        return self.function(xs[0])

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The image of the box for a nondecreasing $f$ (others override it)."""
        return self.function(lows[0]), self.function(ups[0])

    def relaxation(self, lower: Tensor, upper: Tensor, variant: int = 0) -> Relaxation:
        raise NotImplementedError

    def inexact(self, lower: Tensor, upper: Tensor) -> Tensor:
        """The entries whose lines are not exact on $[l, u]$ (what tightening can improve)."""
        return lower < upper

    def alpha_lines(self, lower: Tensor, upper: Tensor) -> list[Relaxation]:
        """Further sound relaxations on $[l, u]$ whose convex combinations with the first
        α-CROWN searches (Note [α-CROWN] in `lipnets.propagation.alpha`): the other
        variants."""
        return [self.relaxation(lower, upper, v) for v in range(1, self.variants)]

    def local_slope(self, lower: Tensor, upper: Tensor) -> float | Tensor:
        """A Lipschitz constant of the op on the box $[l, u]$ of its input, per sample or
        one for all (`local_lipschitz`): ``slope`` unless the op knows better."""
        return self.slope


def relu_relaxation(
    lower: Tensor, upper: Tensor, leak: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(lower slope, upper slope, upper intercept) of Note [ReLU relaxation] in
    `lipnets.propagation.propagator`; with ``leak`` $= a$, the lower slope is 1 where the
    chord of LeakyReLU$_a$ is steeper than 1/2 (Note [Relaxation variants] there)."""
    active = lower >= 0
    unstable = ~active & (upper > 0)
    ones = active.to(lower.dtype)
    width = torch.where(unstable, upper - lower, torch.ones_like(lower))
    slope_up = torch.where(unstable, upper / width, ones)
    intercept = torch.where(unstable, -slope_up * lower, torch.zeros_like(lower))
    steep = upper > -lower if leak is None else 2 * (upper - leak * lower) > upper - lower
    slope_lo = torch.where(unstable, steep.to(lower.dtype), ones)
    unknown = torch.isnan(lower) | torch.isnan(upper)  # Note [Floating-point rounding] in lirpa
    if bool(unknown.any()):
        nan = torch.full_like(lower, math.nan)
        slope_lo, slope_up, intercept = (
            torch.where(unknown, nan, t) for t in (slope_lo, slope_up, intercept)
        )
    return slope_lo, slope_up, intercept


class ReLU(Elementwise):
    """$y = \\max(x, 0)$, relaxed by Note [ReLU relaxation] in `lipnets.propagation.propagator`.

    Its lower line goes through the origin (intercept None: the backward pass
    adds no term for it).
    """

    kind = "relu"

    def __init__(
        self, in_shapes: Sequence[torch.Size], out_shape: torch.Size, leak: float = 0.0
    ) -> None:
        super().__init__(in_shapes, out_shape)
        self.leak = leak  # the ReLU of a LeakyReLU's rewrite (Note [LeakyReLU as a ReLU])
        self.variants = 2 if 0.0 < leak < 1.0 else 1

    def function(self, x: Tensor) -> Tensor:
        return torch.relu(x)

    def relaxation(self, lower: Tensor, upper: Tensor, variant: int = 0) -> Relaxation:
        leak = self.leak if variant == 1 and self.variants == 2 else None
        slope_lo, slope_up, intercept = relu_relaxation(lower, upper, leak)
        return slope_lo, None, slope_up, intercept

    def inexact(self, lower: Tensor, upper: Tensor) -> Tensor:
        return (lower < 0) & (upper > 0)
