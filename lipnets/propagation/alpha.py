r"""α-CROWN: CROWN with the relaxations' lines optimised (ReLU slopes, mixed lines), per bound.

`crown_bounds(..., optimize=...)` (`lipnets.propagation.lirpa`) runs the passes here after
plain CROWN; `lipnets.verify` uses them on the parts of the ball branch and bound makes.

# Note [α-CROWN]

For an unstable ReLU ($l < 0 < u$) every line $\alpha z$ with $\alpha \in [0, 1]$ lies below
$\mathrm{relu}(z)$ on $[l, u]$ (Note [ReLU relaxation] in
`lipnets.propagation.propagator`), so a backward pass is sound for *any* choice of
$\alpha$, entry by entry, and the choice may differ between the bounds being computed:
each row of each backward pass (every output row, lower and upper; every tightened entry
of every intermediate node, lower and upper) gets its own $\alpha$ for every ReLU it passes
(Xu et al., 2021). The bound is a differentiable function of all of them, through the
final backward pass and through the intermediate bounds, which shape the later
relaxations (their chords) and the entries that are unstable at all. α-CROWN starts from
CROWN's slopes (0 or 1), takes ``steps`` steps of Adam on the sum of the output widths
(learning rate ``lr``, decayed by 0.98 per step) and projects every $\alpha$ back into
$[0, 1]$ after each step (the passes also clamp it, so soundness never rests on the
optimiser).

Every iterate is a sound bound, so the result is the intersection over all iterates
(elementwise the best), intersected with CROWN's (never looser than CROWN); each
intermediate interval is likewise intersected with the best found so far (and CROWN's),
which only removes points that no iterate allowed. The optimised entries are those
unstable under CROWN's intermediate bounds: an entry that becomes stable during the
optimisation gets its exact line, whatever its $\alpha$.

# Note [Gradients through intersections]

A tightened entry's interval is the intersection of its CROWN bound with its interval
from the inputs' intervals (and with the best so far), so where the other side is
tighter, the intersection's gradient with respect to the entry's own variables is 0:
they never move, even where optimising them would make the CROWN bound the tighter side.
This is common on residual networks (the interval of a skip connection's sum is often
tighter than its CROWN bound at CROWN's slopes) and happens on some entries of plain
MLPs. The passes here therefore take the intersection's value (sound, the tightest)
with the gradient of the CROWN bound alone, a straight-through estimator: $v + (b -
\operatorname{sg}(b))$ with $\operatorname{sg}$ the stop-gradient, which equals $v$
exactly in floating point ($b - b = 0$). This is the gradient auto_LiRPA's α-CROWN
follows (it does not intersect intermediate bounds while optimising); without it
lipnets' α-CROWN was up to 2.9 % wider than auto_LiRPA's on a residual net. The
variables are clamped into their ranges the same way (the clamped value, the identity's
gradient).

ReLUs here are every `ReLU` op of the propagation graph: the model's ReLUs, those of the
comparators that MaxMin, GroupSort, ``torch.maximum`` and max pooling are rewritten into,
and those of LeakyReLU's rewrite (whose lower slope then ranges over $[a, 1]$).

A smooth op with further relaxations (``Elementwise.alpha_lines``: for tanh and sigmoid
the tangents at both ends of each valid range of tangent points, for GELU its second
variant, Note [Relaxation variants] in `lipnets.propagation.propagator`) gets variables
$\theta \in [0, 1]$ per row and entry instead: its lower line is the nested convex
combination $\theta_1 L_0 + (1 - \theta_1)(\theta_2 L_1 + (1 - \theta_2) L_2)$ of the
lower lines $L_0$ (CROWN's), $L_1$, $L_2$ of its relaxations on the current interval, and
the same for the upper line with its own variables. Every $L_k$ is below $f$ on the
interval, so every convex combination is too. The variables start at 1, CROWN's lines.
An op with one relaxation (SiLU) keeps CROWN's lines.

# Note [β-CROWN]

On a part of the ball where split inputs have fixed signs, $s_k z_k(x) \ge 0$ (Note
[Split constraints] in `lipnets.propagation.propagator`), every $\beta_k \ge 0$ gives
$f(x) \ge f(x) - \sum_k \beta_k s_k z_k(x)$ there, so a bound of the right-hand side
over the whole ball is a bound of $f$ on the part (weak duality; Wang et al., 2021). In a
backward pass the term is $-\beta_k s_k$ added to the coefficient of $z_k$ when the pass
reaches the split node, before it goes on to the node's inputs: the constraint then
enters the bound, which clipping alone cannot do (the minimum of the linear function is
taken over the whole ball). `optimized_final` optimises, for the output pass only and
with the intervals of a run Propagator fixed, the lower slopes $\alpha$ and the
multipliers $\beta$ (one per row and split entry, starting at 0) by Adam, projecting
$\beta$ onto $\beta \ge 0$ and $\alpha$ onto $[0, 1]$; every iterate is sound and the
best bound of each row over the iterates is returned. Branch and bound (`lipnets.verify`)
bounds its domains this way.

References:
    Wang, S., Zhang, H., Xu, K., Lin, X., Jana, S., Hsieh, C.-J. & Kolter, J. Z. (2021).
    Beta-CROWN: efficient bound propagation with per-neuron split constraints for neural
    network robustness verification. *NeurIPS*.

    Xu, K., Zhang, H., Wang, S., Wang, Y., Jana, S., Lin, X. & Hsieh, C.-J. (2021). Fast
    and complete: enabling complete neural network verification with rapid and massively
    parallel incomplete verifiers. *ICLR*.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lipnets.propagation import _ops
from lipnets.propagation.propagator import Propagator

__all__ = ["AlphaPropagator", "BetaPropagator", "optimized_bounds", "optimized_final"]

_DECAY = 0.98
"""Learning-rate decay per step (Note [α-CROWN])."""


class AlphaPropagator(Propagator):
    """A CROWN Propagator whose ReLU lower slopes are variables, one set per backward row
    (Note [α-CROWN]); ``reference`` are run Propagators on the same graph, batch and splits
    whose intersected intervals start the search."""

    def __init__(self, reference: list[Propagator]) -> None:
        first = reference[0]
        super().__init__(
            first.graph, first.x, first.eps, first.norm, crown=True, splits=first.splits
        )
        self.best_lo = [p.detach() for p in first.lows]
        self.best_up = [p.detach() for p in first.ups]
        for prop in reference[1:]:
            self.best_lo = [
                torch.fmax(a, b.detach()) for a, b in zip(self.best_lo, prop.lows, strict=True)
            ]
            self.best_up = [
                torch.fmin(a, b.detach()) for a, b in zip(self.best_up, prop.ups, strict=True)
            ]
        self.alphas: dict[tuple, Tensor] = {}
        self._selection: dict[int, Tensor] = {}
        self._second: dict[int, list[_ops.Relaxation]] = {}  # further relaxations per node

    def reset(self) -> None:
        """Forget the last pass's intervals, keeping the best ones and the variables."""
        self.lows, self.ups, self.relax, self._second = [], [], {}, {}

    def remember(self) -> None:
        """Intersect the best intervals with the last pass's."""
        self.best_lo = [
            torch.fmax(a, b.detach()) for a, b in zip(self.best_lo, self.lows, strict=True)
        ]
        self.best_up = [
            torch.fmin(a, b.detach()) for a, b in zip(self.best_up, self.ups, strict=True)
        ]

    def restrict(self, index: int, lo: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
        lo, up = super().restrict(index, lo, up)
        return torch.fmax(lo, self.best_lo[index]), torch.fmin(up, self.best_up[index])

    def meet(self, lo: Tensor, up: Tensor, new_lo: Tensor, new_up: Tensor) -> tuple[Tensor, Tensor]:
        # Note [Gradients through intersections]
        met_lo, met_up = super().meet(lo, up, new_lo, new_up)
        return _through(met_lo, new_lo), _through(met_up, new_up)

    def unstable(self, index: int, flat_lo: Tensor, flat_up: Tensor) -> Tensor:
        # The rows of a tightening are fixed by the starting bounds, so that every pass
        # meets the same variables (an entry stable by now gets its exact line anyway).
        if index not in self._selection:
            n = self.n
            lo, up = self.best_lo[index].reshape(n, -1), self.best_up[index].reshape(n, -1)
            self._selection[index] = super().unstable(index, lo, up)
        return self._selection[index]

    def lines(self, key: object, index: int, rows: int) -> _ops.Relaxation:
        op = self.nodes[index].op
        if isinstance(op, _ops.ReLU):
            return self._relu_lines(key, index, rows)
        if getattr(op, "variants", 1) > 1:
            return self._mixed_lines(key, index, rows)
        return super().lines(key, index, rows)

    def _variable(self, name: tuple, shape: tuple, start: Tensor) -> Tensor:
        """The variable ``name``, created as ``start`` expanded to ``shape``."""
        value = self.alphas.get(name)
        if value is None:
            start = torch.nan_to_num(start.detach(), nan=0.0)
            value = start.expand(shape).clone().requires_grad_(True)
            self.alphas[name] = value
        # The value clamped into [0, 1], the gradient of the identity (a clamp's is 0 at
        # the ends, where the variables start): Note [Gradients through intersections].
        return _through(value.clamp(0, 1), value)

    def _relu_lines(self, key: object, index: int, rows: int) -> _ops.Relaxation:
        slope_lo, intercept_lo, slope_up, intercept = self.relax[index]
        op = self.nodes[index].op
        i = self.nodes[index].inputs[0]
        free = op.inexact(self.lows[i], self.ups[i])
        if not bool(free.any()):
            return super().lines(key, index, rows)
        shape = (self.n, rows, *slope_lo.shape[1:])
        alpha = self._variable((key, index), shape, slope_lo.unsqueeze(1))
        slope = torch.where(free.unsqueeze(1), alpha, slope_lo.unsqueeze(1))
        return slope, intercept_lo, slope_up.unsqueeze(1), intercept

    def _mixed_lines(self, key: object, index: int, rows: int) -> _ops.Relaxation:
        r"""Per row, nested convex combinations $\theta_1 L_0 + (1 - \theta_1)(\theta_2 L_1 +
        (1 - \theta_2)(\dots))$ of the op's relaxations (Note [α-CROWN])."""
        first = self.relax[index]
        if index not in self._second:
            i = self.nodes[index].inputs[0]
            self._second[index] = self.nodes[index].op.alpha_lines(self.lows[i], self.ups[i])
        others = self._second[index]
        if not others or first[1] is None or any(o[1] is None for o in others):
            return super().lines(key, index, rows)
        shape = (self.n, rows, *first[0].shape[1:])
        one = first[0].new_ones(()).reshape([1] * len(shape))
        lines = [first, *others]
        mixed = [t.unsqueeze(1) for t in lines[-1]]
        for k in range(len(lines) - 2, -1, -1):
            lower = self._variable((key, index, "lower", k), shape, one)
            upper = self._variable((key, index, "upper", k), shape, one)
            theta = (lower, lower, upper, upper)
            mixed = [
                w * t.unsqueeze(1) + (1 - w) * m
                for w, t, m in zip(theta, lines[k], mixed, strict=True)
            ]
        slope_lo, intercept_lo, slope_up, intercept = mixed
        return slope_lo, intercept_lo, slope_up, intercept


class BetaPropagator(AlphaPropagator):
    """The output pass of a run Propagator with α and β variables (Note [β-CROWN]):
    ``signs`` maps split nodes to (N, *S) tensors of the split signs (+1, -1, 0 unsplit).
    The intervals and relaxations are the reference's, fixed."""

    def __init__(self, reference: Propagator, signs: dict[int, Tensor]) -> None:
        super().__init__([reference])
        self.lows, self.ups, self.relax = reference.lows, reference.ups, reference.relax
        self.signs = signs
        self.betas: dict[int, Tensor] = {}

    def split_term(self, key: object, index: int, a: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        sign = self.signs.get(index)
        if sign is None or key != _FINAL:
            return a, bias
        beta = self.betas.get(index)
        if beta is None:
            beta = a.new_zeros(a.shape).requires_grad_(True)
            self.betas[index] = beta
        inside = _through(beta.clamp_min(0), beta)  # value >= 0, the identity's gradient
        return a - inside * sign.unsqueeze(1), bias


_FINAL = ("spec", 0)


def optimized_final(
    reference: Propagator,
    target: int,
    spec: Tensor,
    signs: dict[int, Tensor],
    steps: int,
    lr: float,
) -> tuple[Tensor, BetaPropagator]:
    """Lower bounds (N, R) of ``spec`` (N, R, M) applied to node ``target`` by α-β-CROWN on
    the output pass (Note [β-CROWN]), never looser than the reference's CROWN pass, and the
    propagator, whose ``kept`` coefficients are those of the last pass."""
    prop = BetaPropagator(reference, signs)
    n, r = spec.shape[:2]
    rows = spec.reshape(n, r, *prop.nodes[target].shape)
    best = None
    optimizer = None
    with torch.enable_grad():
        for step in range(steps + 1):
            low = prop.backward(target, rows, key=_FINAL, keep=step == steps)
            with torch.no_grad():
                value = low.detach().nan_to_num(nan=-math.inf)
                best = value if best is None else torch.fmax(best, value)
            if step == steps:
                break
            params = [*prop.alphas.values(), *prop.betas.values()]
            if not params:
                low = prop.backward(target, rows, key=_FINAL, keep=True)
                break
            if optimizer is None:
                optimizer = torch.optim.Adam(params, lr=lr)
            loss = -low[low.isfinite()].sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for alpha in prop.alphas.values():
                    alpha.nan_to_num_(nan=0.0).clamp_(0, 1)
                for beta in prop.betas.values():
                    beta.nan_to_num_(nan=0.0).clamp_(min=0)
    assert best is not None
    prop.kept = {i: t.detach() for i, t in prop.kept.items()}
    if prop.kept_bias is not None:
        prop.kept_bias = prop.kept_bias.detach()
    return best, prop


def _through(value: Tensor, source: Tensor) -> Tensor:
    """``value`` exactly, with the gradient of ``source`` where ``source`` is finite (Note
    [Gradients through intersections]); ``value`` itself elsewhere."""
    finite = source.isfinite()
    safe = torch.where(finite, source, 0.0)
    return torch.where(finite, value.detach() + (safe - safe.detach()), value)


def optimized_bounds(
    reference: list[Propagator],
    target: int,
    spec: Tensor,
    steps: int,
    lr: float,
    lower_only: bool = False,
) -> tuple[Tensor, Tensor | None, AlphaPropagator]:
    """α-CROWN lower and upper bounds (N, R) of ``spec`` (N, R, M) applied to node
    ``target`` (Note [α-CROWN]), from run CROWN Propagators, never looser than theirs, and
    the propagator (whose ``best_lo`` and ``best_up`` are the intermediate intervals found).
    With ``lower_only`` only the lower bounds are optimised (the upper is None)."""
    prop = AlphaPropagator(reference)
    shape = prop.nodes[target].shape
    n, r = spec.shape[:2]
    best_lo = best_up = None
    optimizer = scheduler = None
    with torch.enable_grad():
        for step in range(steps + 1):
            prop.reset()
            prop.run()
            if lower_only:
                lo = prop.backward(target, spec.reshape(n, r, *shape), key=("spec", 0))
                up = lo.new_full(lo.shape, math.inf)
            else:
                lo, up = prop.linear_bounds(target, spec)
            with torch.no_grad():
                lo_d, up_d = lo.detach(), up.detach()
                if best_lo is None or best_up is None:
                    best_lo, best_up = lo_d, up_d
                else:
                    best_lo, best_up = torch.fmax(best_lo, lo_d), torch.fmin(best_up, up_d)
                prop.remember()
            if step == steps or not prop.alphas:
                break
            if optimizer is None:
                optimizer = torch.optim.Adam(list(prop.alphas.values()), lr=lr)
                scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, _DECAY)
            width = up - lo
            loss = (
                width[torch.isfinite(width)].sum() if not lower_only else -lo[lo.isfinite()].sum()
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            assert scheduler is not None
            scheduler.step()
            with torch.no_grad():
                for alpha in prop.alphas.values():
                    alpha.nan_to_num_(nan=0.0).clamp_(0, 1)
    assert best_lo is not None and best_up is not None
    return best_lo, None if lower_only else best_up, prop
