r"""Complete verification of classifiers by branch and bound over ReLU phases.

`verify` answers, for each input, whether every point of the ball is classified as its
label: ``"verified"`` (proven), ``"falsified"`` (with a counterexample a forward pass
confirms) or ``"unknown"`` (the budget ran out). The bounds are lipnets' own
(`lipnets.propagation`: CROWN, α-CROWN at the root, Note [Split constraints] for the parts
of the ball); the leaves are closed by linear programming (Note [Leaves by linear
programming]). `lipnets.verify.milp` is the exact reference it is tested against.

# Note [Branch and bound]

A *domain* is the part of the ball where some unstable ReLU inputs have a fixed sign. The
root is the ball; a domain is bounded by CROWN with its splits as clips of the split
nodes' intervals (Note [Split constraints] in `lipnets.propagation.propagator`) and with
every interval also intersected with its parent's (the parent's intervals hold on the
child, a subset), so bounds only tighten down the tree. A domain is done when every
margin's lower bound is $> 0$ (verified there) or when some interval is empty (no point
of the ball is in it). Otherwise it is split on one ReLU input $z$ into $z \ge 0$ and
$z \le 0$ (the two cover it), chosen by Note [Branching score]; the open domains with the
lowest bounds are split first, a batch at a time (``batch_size`` children bounded in one
propagation). The input is verified when no domain is left open; it is falsified as
soon as a point with a margin $\le 0$ is found: by PGD before anything else (as α,β-CROWN
does), at the minimiser of each domain's worst linear bound, or at a leaf's LP solution.
Every counterexample is checked by a plain forward pass of the model before it is
reported. ReLU here means every `ReLU` op of the propagation graph, so the comparator
phases of MaxMin, GroupSort, ``torch.maximum`` and max pooling are branched on too, and
a LeakyReLU's kink; grafted neurons (`lipnets.nn.GraftedReLU`) are never unstable, so
never branched on. Smooth activations are never split: with them, verification may end
``"unknown"``.

# Note [Branching score]

The lower bound of a margin pays, for each unstable ReLU whose output coefficient $a$ is
negative, $a$ times the intercept $-u l / (u - l)$ of the upper line; fixing the ReLU's
phase removes that term. The score of an unstable entry is $\sum_r \max(0, -a_r) \cdot
(-u l / (u - l))$ over the margins $r$ still open in the domain (the intercept score of
BaBSR, Bunel et al. 2020). When every score is 0 (only positive coefficients), the entry
with the largest $\sum_r |a_r| \min(u, -l)$ is split instead.

# Note [Leaves by linear programming]

A domain with no unstable entry left is a *leaf*: every relaxation is exact there, so the
network is affine on the domain, and the backward passes give the margins $m_r(x) = A_r x
+ c_r$ and every split input $z_k(x) = g_k^\top x + h_k$ exactly on it. Over an
l-infinity ball the domain is the polytope $\{x \in B : s_k z_k(x) \ge 0\}$ ($s_k = \pm 1$
the phase), and $\min_x m_r(x)$ over it is a linear program, solved by HiGHS
(`scipy.optimize.linprog`). Its answer is not trusted as such: for the multipliers
$\lambda \ge 0$ of the split constraints it returns, weak duality gives $\min m_r \ge
\min_{x \in B} (A_r - \sum_k \lambda_k s_k g_k)^\top x + c_r - \sum_k \lambda_k s_k
h_k$, which is computed over the box like any CROWN bound; a margin is verified on
the leaf when that bound is $> 0$, and otherwise the LP's minimiser is tried as a
counterexample. When HiGHS finds the leaf infeasible (its splits hold nowhere on the
ball, which the intervals alone did not show), the LP $\min t$ subject to $s_k z_k(x) + t
\ge 0$, $x \in B$, $t \ge 0$ is solved instead, and its multipliers $\mu \ge 0$
(scaled to $\sum_k \mu_k \le 1$) prove emptiness when $\min_{x \in B} -\sum_k \mu_k
s_k z_k(x) > 0$, again computed over the box. An l2 leaf (a second-order cone program) is
not solved: its input ends ``"unknown"`` unless it is falsified elsewhere.

References:
    Bunel, R., Lu, J., Turkaslan, I., Torr, P. H. S., Kohli, P. & Kumar, M. P. (2020).
    Branch and bound for piecewise linear neural network verification. *JMLR* 21.

    Wang, S. et al. (2021). Beta-CROWN: efficient bound propagation with per-neuron split
    constraints for neural network robustness verification. *NeurIPS*.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lipnets._checks import check_int, check_real
from lipnets._progress import progress_bar
from lipnets.functional.margins import check_scores, margin_spec
from lipnets.graph import trace
from lipnets.propagation.alpha import optimized_bounds, optimized_final
from lipnets.propagation.checks import check_args, check_norm, session
from lipnets.propagation.graph import build
from lipnets.propagation.ops_base import ReLU
from lipnets.propagation.propagator import Propagator
from lipnets.verify.attack import attack_margins
from lipnets.verify.leaf import solve_leaf
from lipnets.verify.status import Statuses

__all__ = ["VerificationResult", "verify"]


@dataclass(frozen=True)
class VerificationResult(Statuses):
    """What `verify` found for each input of a batch (Note [Branch and bound])."""

    status: tuple[str, ...]
    """Per input: ``"verified"``, ``"falsified"`` or ``"unknown"``."""
    counterexample: Tensor
    """Like ``x``: for a falsified input, a point of the ball where a forward pass of the
    model gives a margin ``<= 0``; NaN for the others."""
    lower: Tensor
    """(N,) float64: a proven lower bound of the smallest margin over the whole ball: for
    an unknown input the least bound over the verified parts, the open domains and the
    leaves left undecided (``-inf`` where nothing was proven); NaN for a falsified input."""
    nodes: Tensor
    """(N,) int64: domains bounded (the root included)."""
    time: Tensor
    """(N,) float64: seconds spent on each input."""
    reason: tuple[str, ...]
    """Per input: how it was decided (``"attack"``, ``"root"``, ``"branch and bound"``) or
    why it is unknown (``"time limit"``, ``"node limit"``, ``"unresolved leaf"``)."""


@dataclass(order=True)
class _Domain:
    bound: float
    order: int
    lows: list[Tensor] = field(compare=False)
    ups: list[Tensor] = field(compare=False)
    splits: list[tuple[int, int, int]] = field(compare=False)  # (node, flat entry, sign)
    choice: tuple[int, int] | None = field(compare=False)  # (node, flat entry) to split
    rows: Tensor = field(compare=False, default=None)  # (1, R) lower bounds of the margins


@dataclass
class _Options:
    norm: float
    steps: int
    split_steps: int
    lr: float
    time_limit: float
    max_nodes: int
    batch_size: int
    attack: bool
    generator: torch.Generator | None
    domain: tuple[Tensor, Tensor] | None


def verify(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    norm: float | str = math.inf,
    domain: tuple[float | Tensor, float | Tensor] | None = None,
    optimize: int = 20,
    split_steps: int = 20,
    lr: float = 0.5,
    time_limit: float = 60.0,
    max_nodes: int = 100_000,
    batch_size: int = 64,
    attack: bool = True,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
) -> VerificationResult:
    r"""Decide for each input whether the classifier is robust on its ball (branch and bound).

    Each input is attacked first (PGD, ``attack``); then bounded by α-CROWN
    (``optimize`` steps, `lipnets.propagation.crown_bounds`); then, while a margin's lower
    bound is $\le 0$, its ball is split on ReLU phases and the parts bounded again
    (Note [Branch and bound]), until every part is verified, a counterexample is found,
    or the budget (``time_limit`` seconds or ``max_nodes`` domains per input) runs out.
    Over l-infinity balls the search is complete: a leaf (no unstable ReLU left) is
    decided by linear programming (Note [Leaves by linear programming]).

    The model runs in eval mode; no parameter or buffer changes.

    Args:
        model: a classifier built from the operations `crown_bounds` supports, returning
            scores $(N, C)$ or one score per input (binary).
        x: the inputs, a floating-point batch $(N, \dots)$ with the model's dtype
            (float64 recommended).
        y: the labels (class indices, one-hot rows, or binary labels: Note [Label
            conventions] in `lipnets.functional.margins`).
        eps: the radius, a float $\ge 0$ or a tensor of shape $(N,)$.
        norm: ``float("inf")`` (default) or ``2``.
        domain: optional ``(lo, hi)``, floats or tensors broadcastable to one input: the
            inputs are restricted to the box $lo \le x \le hi$ as well as the ball (pixels
            in $[0, 1]$, say), as in `lipnets.verify.milp_verify`; every input must lie in
            it.
        optimize: α-CROWN steps at the root (0 for plain CROWN).
        split_steps: α-β-CROWN steps on each batch of domains (Note [β-CROWN] in
            `lipnets.propagation.alpha`; 0: CROWN with the splits as clips only).
        lr: α-CROWN's learning rate.
        time_limit: seconds per input, > 0.
        max_nodes: domains bounded per input, >= 1.
        batch_size: domains bounded in one propagation, >= 2.
        attack: run PGD first.
        generator: the random generator of the attack (seeded 0 when None).
        progress: a progress bar over the inputs (None: when attached to a terminal).

    Returns:
        A `VerificationResult`.

    Raises:
        TypeError, ValueError: for bad arguments (the message names the argument).
        UnboundedModuleError, UntraceableModelError: as `crown_bounds`.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lipnets.verify import verify
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3)).double()
        >>> x = torch.randn(4, 2, dtype=torch.float64)
        >>> y = model(x).argmax(1)
        >>> result = verify(model, x, y, 0.05, progress=False)
        >>> all(s in ("verified", "falsified") for s in result.status)
        True
    """
    q = check_norm(norm)
    x, radius = check_args(model, x, eps)
    options = _Options(
        q,
        check_int(optimize, "optimize", 0),
        check_int(split_steps, "split_steps", 0),
        check_real(lr, "lr", low=0.0, low_open=True),
        check_real(time_limit, "time_limit", low=0.0, low_open=True),
        check_int(max_nodes, "max_nodes", 1),
        check_int(batch_size, "batch_size", 2),
        _flag(attack, "attack"),
        generator,
        _domain(domain, x),
    )
    n = x.shape[0]
    status, reason = ["unknown"] * n, [""] * n
    cex = torch.full_like(x, math.nan)
    lower = torch.full((n,), -math.inf, dtype=torch.float64)
    nodes = torch.zeros(n, dtype=torch.int64)
    seconds = torch.zeros(n, dtype=torch.float64)
    with session(model):
        scores = check_scores(model(x))
        if scores.shape[0] != n:
            raise ValueError(
                f"the model must map N inputs to N rows of scores, got input shape "
                f"{tuple(x.shape)} and output shape {tuple(scores.shape)}"
            )
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor of labels, got {type(y).__name__}")
        spec = margin_spec(scores, y.detach(), x.dtype)
        traced = trace(model)
        bar = progress_bar(progress, n, "verify")
        for i in range(n):
            start = time.perf_counter()
            one = _Search(model, traced, x[i : i + 1], radius[i : i + 1], spec[i : i + 1], options)
            status[i], reason[i], point, bound = one.run()
            nodes[i] = one.count
            lower[i] = bound
            if point is not None:
                cex[i] = point[0]
            seconds[i] = time.perf_counter() - start
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    return VerificationResult(tuple(status), cex, lower, nodes, seconds, tuple(reason))


class _Search:
    """Branch and bound for one input (Note [Branch and bound])."""

    def __init__(self, model, traced, x: Tensor, radius: Tensor, spec: Tensor, options):
        self.model, self.traced, self.x, self.radius, self.spec = model, traced, x, radius, spec
        self.options = options
        self.count = 0
        self.order = 0
        self.start = time.perf_counter()

    def run(self) -> tuple[str, str, Tensor | None, float]:
        o = self.options
        if float(self.margins(self.x).min()) <= 0:
            return "falsified", "attack", self.x.clone(), math.nan
        if o.attack:
            point = attack_margins(
                self.model, self.x, self.spec, self.radius, o.norm, o.generator, o.domain
            )
            if float(self.margins(point).min()) <= 0:
                return "falsified", "attack", point, math.nan
        self.graph = build(self.traced, self.x, self.radius, o.norm)
        self.out = self.graph.output
        if self.out is None:  # a constant model: its margins at x are its margins everywhere
            return "verified", "root", None, float(self.margins(self.x).min())
        root, kind, value = self.root()
        self.count = 1
        if kind == "verified":
            return "verified", "root", None, float(value)  # type: ignore[arg-type]
        if kind == "falsified":
            assert isinstance(value, Tensor)
            return "falsified", "root", value, math.nan
        if kind == "unresolved":
            return "unknown", "unresolved leaf", None, -math.inf
        b = o.batch_size
        xs = self.x.expand(b, *self.x.shape[1:]).contiguous()
        self.batch_graph = build(self.traced, xs, self.radius.expand(b), o.norm)
        self.xs, self.radii = xs, self.radius.expand(b).contiguous()
        self.specs = self.spec.expand(b, *self.spec.shape[1:])
        proven = math.inf  # the smallest bound over the verified parts
        pending = math.inf  # over the leaves left undecided (their domains' bounds)
        unresolved = False
        queue: list[_Domain] = [root]
        while queue:
            if time.perf_counter() - self.start > o.time_limit:
                return "unknown", "time limit", None, min(proven, pending, queue[0].bound)
            if self.count >= o.max_nodes:
                return "unknown", "node limit", None, min(proven, pending, queue[0].bound)
            parents = [heapq.heappop(queue) for _ in range(min(len(queue), b // 2))]
            children = [c for p in parents for c in self.split(p)]
            outcome = self.bound(children)
            self.count += len(children)
            for child, (kind, value) in zip(children, outcome, strict=True):
                if kind == "falsified":
                    assert isinstance(value, Tensor)
                    return "falsified", "branch and bound", value, math.nan
                if kind == "verified":
                    proven = min(proven, float(value))
                elif kind == "unresolved":
                    unresolved = True
                    pending = min(pending, child.bound)
                else:
                    heapq.heappush(queue, child)
        if unresolved:
            return "unknown", "unresolved leaf", None, min(proven, pending)
        return "verified", "branch and bound", None, proven

    def margins(self, points: Tensor) -> Tensor:
        """The margins (N, R) at ``points`` by a plain forward pass."""
        scores = self.model(points).reshape(points.shape[0], -1, 1).to(self.spec.dtype)
        return torch.bmm(self.spec.expand(points.shape[0], *self.spec.shape[1:]), scores)[..., 0]

    def root(self) -> tuple[_Domain, str, object]:
        """The ball bounded by CROWN and α-CROWN, then as a domain (for its scores)."""
        o = self.options
        variants = max((getattr(nd.op, "variants", 1) for nd in self.graph.nodes), default=1)
        box = None if o.domain is None else {0: o.domain}
        props = [
            Propagator(self.graph, self.x, self.radius, o.norm, True, v, splits=box).run()
            for v in range(variants)
        ]
        lows, ups = props[0].lows, props[0].ups
        best = -math.inf
        if o.steps:
            low, _, alpha = optimized_bounds(props, self.out, self.spec, o.steps, o.lr, True)
            lows, ups = alpha.best_lo, alpha.best_up
            best = float(low.nan_to_num(nan=-math.inf).min())
        rows = torch.full(self.spec.shape[:2], -math.inf, dtype=self.x.dtype)
        domain = _Domain(-math.inf, 0, list(lows), list(ups), [], None, rows)
        if best > 0:
            return domain, "verified", best
        self.batch_graph, self.xs, self.radii, self.specs = (
            self.graph,
            self.x,
            self.radius,
            self.spec,
        )
        ((kind, value),) = self.bound([domain])
        if kind == "open":
            domain.bound = max(domain.bound, best)
        return domain, kind, value

    def split(self, parent: _Domain) -> list[_Domain]:
        assert parent.choice is not None
        node, entry = parent.choice
        children = []
        for sign in (1, -1):
            lows, ups = list(parent.lows), list(parent.ups)
            lo, up = lows[node].flatten().clone(), ups[node].flatten().clone()
            if sign == 1:
                lo[entry] = max(float(lo[entry]), 0.0)
            else:
                up[entry] = min(float(up[entry]), 0.0)
            lows[node] = lo.reshape(parent.lows[node].shape)
            ups[node] = up.reshape(parent.ups[node].shape)
            self.order += 1
            splits = [*parent.splits, (node, entry, sign)]
            children.append(_Domain(parent.bound, self.order, lows, ups, splits, None, parent.rows))
        return children

    def bound(self, domains: list[_Domain]) -> list[tuple[str, object]]:
        """Bound a batch of domains; each ends verified (with its bound), falsified (with
        the point), unresolved (a leaf not decided), or open (its bound and choice set)."""
        k = len(domains)
        b = self.xs.shape[0]
        padded = domains + [domains[0]] * (b - k)
        count = len(self.graph.nodes)
        limits = {
            i: (torch.cat([d.lows[i] for d in padded]), torch.cat([d.ups[i] for d in padded]))
            for i in range(count)
        }
        o = self.options
        ref = Propagator(self.batch_graph, self.xs, self.radii, o.norm, True, splits=limits)
        ref.run()
        signs = self.signs(padded, count)
        low, prop = optimized_final(ref, self.out, self.specs, signs, o.split_steps, o.lr)
        parent = torch.cat([d.rows for d in padded])
        low = torch.fmax(low, parent)  # a part of the parent: its bounds hold too
        empty = torch.zeros(b, dtype=torch.bool)
        for i in range(count):
            empty |= (prop.lows[i] > prop.ups[i]).flatten(1).any(1)
        candidates = self.candidates(prop.kept.get(0), low)
        candidates = torch.maximum(torch.minimum(candidates, prop.ups[0]), prop.lows[0])
        worst = low.min(1).values
        bad = self.margins(candidates).min(1).values <= 0
        results: list[tuple[str, object]] = []
        for j, domain in enumerate(domains):
            domain.lows = [prop.lows[i][j : j + 1] for i in range(count)]
            domain.ups = [prop.ups[i][j : j + 1] for i in range(count)]
            if bool(empty[j]):
                results.append(("verified", math.inf))
            elif float(worst[j]) > 0:
                results.append(("verified", float(worst[j])))
            elif bool(bad[j]):
                results.append(("falsified", candidates[j : j + 1].clone()))
            else:
                domain.rows = low[j : j + 1]
                domain.bound = float(worst[j])
                domain.choice = self.choose(prop, j, low[j] <= 0)
                results.append(self.leaf(domain) if domain.choice is None else ("open", None))
        return results

    def signs(self, domains: list[_Domain], count: int) -> dict[int, Tensor]:
        """The split signs (B, *S) of the split nodes of a batch of domains."""
        nodes = sorted({node for d in domains for node, _, _ in d.splits})
        signs = {}
        for node in nodes:
            size = self.graph.nodes[node].shape
            sign = torch.zeros((len(domains), size.numel()), dtype=self.x.dtype)
            for j, d in enumerate(domains):
                for i, entry, s in d.splits:
                    if i == node:
                        sign[j, entry] = s
            signs[node] = sign.reshape(len(domains), *size)
        return signs

    def candidates(self, at_input: Tensor | None, low: Tensor) -> Tensor:
        """Per domain, the minimiser over the ball of its worst margin's linear bound."""
        if at_input is None:
            return self.xs
        row = low.argmin(1)
        a = at_input[torch.arange(low.shape[0]), row]
        r = self.radii.reshape(-1, *([1] * (a.ndim - 1)))
        if self.options.norm == math.inf:
            return self.xs - r * a.sign()
        norms = a.flatten(1).norm(dim=1).clamp_min(1e-300).reshape(r.shape)
        return self.xs - r * a / norms

    def choose(self, prop: Propagator, j: int, open_rows: Tensor) -> tuple[int, int] | None:
        """The entry to split in domain ``j`` (Note [Branching score]); None for a leaf."""
        best = backup = None
        for r, node in enumerate(self.graph.nodes):
            if not isinstance(node.op, ReLU):
                continue
            i = node.inputs[0]
            lo, up = prop.lows[i][j].flatten(), prop.ups[i][j].flatten()
            free = node.op.inexact(prop.lows[i][j : j + 1], prop.ups[i][j : j + 1]).flatten()
            if not bool(free.any()):
                continue
            a = prop.kept.get(r)
            if a is None:
                coeff = torch.zeros((1, lo.numel()), dtype=lo.dtype)
            else:
                coeff = a[j][open_rows].flatten(1)
            width = torch.where(free, up - lo, torch.ones_like(lo))
            intercept = torch.where(free, -lo * up / width, torch.zeros_like(lo))
            score = (coeff.clamp_max(0).neg().sum(0) * intercept).nan_to_num(nan=0.0)
            score = torch.where(free, score, torch.full_like(score, -1.0))
            other = coeff.abs().sum(0) * torch.minimum(up, -lo)
            other = torch.where(free, other.nan_to_num(nan=0.0), torch.full_like(other, -1.0))
            e, v = int(score.argmax()), float(score.max())
            if best is None or v > best[0]:
                best = (v, i, e)
            e, v = int(other.argmax()), float(other.max())
            if backup is None or v > backup[0]:
                backup = (v, i, e)
        if best is None or backup is None:
            return None
        if best[0] > 0:
            return best[1], best[2]
        return backup[1], backup[2]

    def leaf(self, domain: _Domain) -> tuple[str, object]:
        """Decide a leaf by linear programming (Note [Leaves by linear programming])."""
        if self.options.norm != math.inf:
            return "unresolved", None
        limits = {i: (domain.lows[i], domain.ups[i]) for i in range(len(self.graph.nodes))}
        prop = Propagator(self.graph, self.x, self.radius, math.inf, True, splits=limits).run()
        verdict, value = solve_leaf(prop, self.out, self.spec, domain.splits)
        if verdict == "candidate":
            assert isinstance(value, Tensor)
            if float(self.margins(value).min()) <= 0:
                return "falsified", value
            return "unresolved", None
        return verdict, value


def _domain(domain: object, x: Tensor) -> tuple[Tensor, Tensor] | None:
    """The domain's bounds broadcast to one input (1, ...), checked to contain every input."""
    if domain is None:
        return None
    if not isinstance(domain, (tuple, list)) or len(domain) != 2:
        raise TypeError(f"domain must be None or a pair (lo, hi), got {domain!r}")
    bounds = []
    for end in domain:
        if isinstance(end, bool) or not isinstance(end, (int, float, Tensor)):
            raise TypeError(f"domain bounds must be floats or tensors, got {end!r}")
        t = torch.as_tensor(end, dtype=x.dtype, device=x.device)
        try:
            bounds.append(torch.broadcast_to(t, x.shape[1:]).unsqueeze(0).clone())
        except RuntimeError:
            raise ValueError(
                f"domain bounds must broadcast to one input of shape {tuple(x.shape[1:])}, "
                f"got shape {tuple(t.shape)}"
            ) from None
    lo, hi = bounds
    if not bool((lo <= hi).all()) or not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
        raise ValueError("domain must be finite with lo <= hi")
    if not bool(((x >= lo) & (x <= hi)).all()):
        raise ValueError("every input must lie in the domain (lo <= x <= hi)")
    return lo, hi


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value
