r"""The propagation op of `lipnets.nn.GraftedReLU`, and its module rule.

# Note [Grafted neurons in propagation]

A `GraftedReLU` is a ReLU op (`Grafted` subclasses `ReLU`, so every pass that
handles ReLUs handles it) with a mask $m$ and per-entry lines $a_i x + b_i$
on the grafted entries ($m_i = 1$):

* ``function``: ``where(m, a * x + b, relu(x))``, the module's own ``forward``;
* ``interval``: on a grafted entry the image of $[l, u]$ is the segment between
  $a l + b$ and $a u + b$, ordered by the sign of $a$ (exact); the ReLU's
  interval elsewhere;
* ``relaxation``: on a grafted entry both lines are the neuron itself (slope
  $a_i$, intercept $b_i$, below and above: exact for every $x$, so they stay
  valid even where the input's bounds are NaN); the ReLU's lines of Note [ReLU
  relaxation] in `lipnets.propagation.propagator` elsewhere. The lower
  intercept is therefore not None (the ReLU's is) and the backward pass adds
  its term (Note [Elementwise operations in the backward pass] there);
* ``inexact``: the ReLU's unstable entries that are not grafted. A grafted
  entry is never unstable: CROWN does not tighten its input for it, an
  optimised lower slope (alpha-CROWN) and branch and bound never touch it;
* local Lipschitz bounds (Note [Local Lipschitz bound] in
  `lipnets.propagation.local`): the op is $\delta y = D\,\delta x$ with $D$
  diagonal, $D_{ii} = a_i$ on grafted entries and a secant slope in $[0, 1]$
  on the others (0 on the stably inactive ones). An entry is *constant* on the
  ball when it is ungrafted and stably inactive, or grafted with $a_i = 0$
  (`Grafted.inactive`); for the others $\|P\,\delta y\| \le s\,\|P\,\delta x\|$
  with $s = \max(\max_{\text{grafted}, a_i \ne 0} |a_i|, 1$ if an ungrafted
  entry is not constant$)$ per sample (`Grafted.local_slope`).

A `GraftedReLU` with no grafted entry becomes a plain `ReLU` op, so every
entry point gives exactly what it gives for ``nn.ReLU``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, fx

from lipnets.nn import GraftedReLU
from lipnets.propagation.ops_base import Relaxation, ReLU
from lipnets.propagation.rules import register_propagation

if TYPE_CHECKING:
    from lipnets.propagation.builder import Builder

__all__ = ["Grafted"]


class Grafted(ReLU):
    """ReLU with grafted entries $a_i x + b_i$ (Note [Grafted neurons in propagation]).

    ``mask``, ``line_slope`` and ``line_intercept`` have the per-sample shape;
    the slopes are the module's realised (clamped) ones. ``slope`` is, as for
    every `Elementwise` op, the op's Lipschitz constant.
    """

    kind = "grafted_relu"  # not "relu": what reads a kind must not take it for a plain ReLU

    def __init__(
        self,
        in_shapes: Sequence[torch.Size],
        out_shape: torch.Size,
        mask: Tensor,
        slope: Tensor,
        intercept: Tensor,
    ) -> None:
        super().__init__(in_shapes, out_shape)
        self.mask = mask
        self.line_slope = slope
        self.line_intercept = intercept
        # Elementwise.slope, the op's Lipschitz constant (Note [Grafted ReLU] in
        # lipnets.nn.grafted): exact, as every slope converts to float64 exactly.
        grafted = slope.detach()[mask].to(torch.float64).abs()
        ungrafted = 1.0 if not bool(mask.all()) else 0.0
        self.slope = max(ungrafted, float(grafted.max())) if grafted.numel() else ungrafted

    def function(self, x: Tensor) -> Tensor:
        return torch.where(self.mask, self.line_slope * x + self.line_intercept, torch.relu(x))

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        lo, up = lows[0], ups[0]
        at_lo = self.line_slope * lo + self.line_intercept
        at_up = self.line_slope * up + self.line_intercept
        rising = self.line_slope >= 0
        line_lo = torch.where(rising, at_lo, at_up)
        line_up = torch.where(rising, at_up, at_lo)
        return (
            torch.where(self.mask, line_lo, torch.relu(lo)),
            torch.where(self.mask, line_up, torch.relu(up)),
        )

    def relaxation(self, lower: Tensor, upper: Tensor, variant: int = 0) -> Relaxation:
        slope_lo, _, slope_up, intercept = super().relaxation(lower, upper, variant)
        mask, a, b = self.mask, self.line_slope, self.line_intercept
        intercept_lo = torch.where(mask, b, torch.zeros_like(lower))
        return (
            torch.where(mask, a, slope_lo),
            intercept_lo,
            torch.where(mask, a, slope_up),
            torch.where(mask, b, intercept),
        )

    def _flat(self, values: Tensor, like: Tensor) -> Tensor:
        """A per-sample tensor broadcast to ``like`` (shaped (N, *S) or flat (N, M))."""
        return values.reshape(-1) if like.ndim == 2 and values.ndim != 1 else values

    def inexact(self, lower: Tensor, upper: Tensor) -> Tensor:
        return super().inexact(lower, upper) & ~self._flat(self.mask, lower)

    def inactive(self, lower: Tensor, upper: Tensor) -> Tensor:
        """The entries whose output is constant on the box $[l, u]$: ungrafted and off
        (with the rounding room of Note [Local Lipschitz bound] in
        `lipnets.propagation.local`), or grafted with slope 0."""
        slack = math.sqrt(torch.finfo(upper.dtype).eps) * (1 + lower.abs() + upper.abs())
        mask = self._flat(self.mask, lower)
        return torch.where(mask, self._flat(self.line_slope, lower) == 0, upper <= -slack)

    def local_slope(self, lower: Tensor, upper: Tensor) -> Tensor:
        """Per sample, the largest $|D_{ii}|$ over the entries not constant on the box
        (Note [Grafted neurons in propagation]): a float64 CPU tensor $(N,)$, exact."""
        n = lower.shape[0]
        mask = self.mask.reshape(1, -1)
        moving = ~self.inactive(lower, upper).reshape(n, -1)
        modulus = self.line_slope.reshape(1, -1).to(torch.float64).abs()
        per_entry = torch.where(mask, modulus, torch.ones_like(modulus))
        per_entry = torch.where(moving, per_entry, torch.zeros_like(per_entry))
        return per_entry.amax(dim=1).cpu()  # with the other local constants (CPU, float64)


@register_propagation(GraftedReLU)
def _grafted_relu(b: Builder, node: fx.Node, module: GraftedReLU, source: fx.Node) -> int:
    """Note [Grafted neurons in propagation]; no grafted entry: a plain ReLU op."""
    src = b.materialize(source, node)
    shape = b.nodes[src].shape
    if tuple(shape) != module.shape:
        raise b.no_rule(node, f"its shape {module.shape} is not its input's {tuple(shape)}")
    # A copy: autograd saves the mask, and the session restores every buffer in place.
    mask = module.mask.to(b.x.device, copy=True)
    if not bool(mask.any()):
        return b.relu(node, source)
    # Not detached: differentiable bounds train the slopes and intercepts too (Note
    # [Differentiable bounds] in lipnets.propagation.checks).
    dtype, device = b.x.dtype, b.x.device
    slope = module.effective_slope().to(dtype=dtype, device=device)
    intercept = module.intercept.to(dtype=dtype, device=device)
    op = Grafted([shape], shape, mask, slope, intercept)
    return b.add(op, [src], shape, b.where(node))
