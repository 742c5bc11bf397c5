r"""The propagation passes over a graph: interval bounds of every node, CROWN-tightened.

`Propagator` gives each node of a propagation graph (`lipnets.propagation.graph`)
interval bounds from its inputs' bounds, tightens the inputs of elementwise
operations (ReLU, tanh, ...) by backward CROWN passes, and bounds linear
functions of a node by a backward pass; `lipnets.propagation.lirpa` turns this
into `interval_bounds` and `crown_bounds` (Note [CROWN never looser than IBP]
there).

# Note [Elementwise operations in the backward pass]

Every elementwise node $y = f(x)$ has, per entry, lines $a_l x + b_l \le f(x)
\le a_u x + b_u$ on the interval of its input (`Elementwise.relaxation` in
`lipnets.propagation.ops_base`). A lower bound of $c^\top y$ follows from
$c_i f(x_i) \ge c_i (a_l x_i + b_l)$ where $c_i \ge 0$ and $c_i (a_u x_i +
b_u)$ where $c_i < 0$: the coefficients of $x$ are $c^+ a_l + c^- a_u$ and
the constant $c^+ \cdot b_l + c^- \cdot b_u$. ReLU is the case $b_l = 0$
(no term), with the formula it always had, so its bounds are unchanged to
the bit. The input of an elementwise node is tightened on the entries whose
lines are not exact (``inexact``: for a ReLU the unstable ones, for a smooth
function every entry of positive width); a node read by several elementwise
nodes is tightened on the union.

# Note [ReLU relaxation]

For $z \in [l, u]$ with $l < 0 < u$, $\mathrm{relu}(z)$ lies between the lines
$\alpha z$ (for $\alpha \in [0, 1]$) and $\frac{u}{u - l}(z - l)$, the chord
through $(l, 0)$ and $(u, u)$. lipnets uses the adaptive lower slope of CROWN,
$\alpha = 1$ when $u > -l$ and $0$ otherwise, which keeps the area between the
lines smallest. A ReLU with $l \ge 0$ is the identity and one with
$u \le 0$ is zero; both are exact. Backward propagation of a lower bound of
$a^\top \mathrm{relu}(z)$ takes the lower line where $a_i \ge 0$ and the
chord where $a_i < 0$ (upper bounds are lower bounds of the negated rows).

# Note [Relaxation variants]

No relaxation of a nonlinear op is best for every bound: which lines give the tightest
bound depends on the coefficients that reach them. Some ops therefore offer a second
relaxation (``Elementwise.variants``), each sound on its own, and `crown_bounds` runs one
whole CROWN pass per variant index (variant $v$ for every op that has it, variant 0 for
the others) and intersects the results, which is sound and never looser than any single
pass. lipnets' default lines minimise the area between them; the second ones are the
lines of auto_LiRPA's CROWN (Xu et al., 2020), so lipnets' CROWN is never looser than
auto_LiRPA's on these ops:

* LeakyReLU$_a$ with $0 < a < 1$ (the ReLU of its rewrite, Note [LeakyReLU as a ReLU] in
  `lipnets.propagation.ops_elementwise`): lower slope 1 (of the LeakyReLU) when the chord's
  slope $(u - a l) / (u - l)$ exceeds $\frac12$, else $a$, instead of 1 when $u > -l$;
  both are lines through the origin with slope in $[a, 1]$, below the function.
* tanh and sigmoid on an interval that straddles 0: the tangent through the endpoint is
  searched for the grid point $l' = -0.01 (\lfloor -l / 0.01 \rfloor + 1) \le l$ instead
  of $l$ itself (a tangent valid through $(l', f(l'))$ is valid through $(l, f(l))$, as
  Note [Relaxations of smooth activations] shows every $d \ge d_0$ is), and the mirror
  for the lower line.
* exact GELU: lines chosen by convexity pieces (chords, midpoint tangents, tangents
  through endpoints on a 0.01 grid), each kept only where an exact condition proves it
  (Note [GELU by convexity pieces] in `lipnets.propagation.gelu_pieces`).

A network whose ops have one relaxation each (ReLU, the comparators, max pooling) gets
one pass, as before.

# Note [Split constraints]

Branch and bound (`lipnets.verify`) splits the ball into the parts where an unstable
ReLU's input $z_i$ is $\ge 0$ and where it is $\le 0$. A Propagator bounds such a part when
given ``splits``: for some nodes, per-entry clips (a lower clip 0 where $z_i \ge 0$ is
assumed, $-\infty$ elsewhere; an upper clip 0 where $z_i \le 0$ is assumed, $+\infty$
elsewhere) intersected with the node's interval as soon as it is computed, before
anything reads it. Every bound that follows is then a bound over the points of the ball
that satisfy the constraints: the intervals are valid there (a valid interval intersected
with a constraint that holds there), so are the relaxations built on them, and so are the
backward passes. A part whose clipped interval is empty somewhere ($l > u$) holds no point
of the ball, and any bound is valid on it. The constraints are not otherwise used (the
minimum of a backward pass's linear function is taken over the whole ball), which is
what β-CROWN's Lagrangian terms add (``split_term``). A constraint on the input itself
(node 0: an input domain such as pixels in $[0, 1]$) also bounds the backward passes:
their linear functions are then minimised over the box of the input's interval as well
as over the ball, and the larger minimum is kept.

# Note [IBP over an l2 ball]

Intervals are boxes. The smallest box around the l2 ball is the l-infinity
ball of the same radius, which IBP uses for the input. For an affine node that
reads the input directly (or a reshape, permutation or selection of it, which
maps the ball to a ball), the exact bounds $W x_0 + b \pm \varepsilon
\|W_{i,:}\|_2$ are used instead when the exact row norms are known (Linear,
zero-padded convolutions, BatchNorm, CayleyConv2d): much tighter than the
box, and what CROWN finds for that node too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lipnets.propagation import _ops
from lipnets.propagation.graph import Graph

__all__ = ["Propagator", "relaxation"]

_BUDGET_BYTES = 2**22
"""Largest size in bytes of one coefficient tensor; more rows are split into chunks.

A backward pass streams its coefficient tensors through every op of the graph, so chunks
that stay in the processor's cache are much faster than large ones: on a 2-conv CNN at
batch 64 in float64 (one thread) 4 MiB chunks took 0.40 s per CROWN call against 1.3 s
for 256 MiB ones, and 7.5 s against 11.7 s on a 784-1024-1024-1024-10 MLP at batch 32
(`benchmarks/certification.py`)."""
_DENSE_ROWS = 2**24
"""Largest affine node (entries of its matrix) whose rows tightening reads from the matrix."""


def relaxation(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(lower slope, upper slope, upper intercept) of Note [ReLU relaxation]."""
    return _ops.relu_relaxation(lower, upper)


class Propagator:
    """Interval (and, with ``crown``, CROWN-tightened) bounds of every node of a graph.

    Note [CROWN never looser than IBP] in `lipnets.propagation.lirpa` describes the passes.
    """

    def __init__(
        self,
        graph: Graph,
        x: Tensor,
        eps: Tensor,
        norm: float,
        crown: bool,
        variant: int = 0,
        *,
        tighten: bool = True,
        splits: dict[int, tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        self.graph = graph
        self.tightens = crown and tighten  # CROWN-IBP: relaxations, but IBP intermediate bounds
        self.splits = {} if splits is None else splits  # Note [Split constraints]
        self.kept: dict[int, Tensor] = {}  # coefficients kept by a backward pass (``keep``)
        self.kept_bias: Tensor | None = None
        self.variant = variant  # Note [Relaxation variants]
        self.nodes = graph.nodes
        self.x = x
        self.n = x.shape[0]
        self.eps = eps
        self.norm = norm
        self.crown = crown
        self.lows: list[Tensor] = []
        self.ups: list[Tensor] = []
        self.relax: dict[int, _ops.Relaxation] = {}
        self.ball: set[int] = {0}
        self.exact: set[int] = {0}  # nodes whose interval is exact on the ball
        self.pre: dict[int, list[_ops.Elementwise]] = {}  # inputs of elementwise nodes
        for node in self.nodes:
            if isinstance(node.op, _ops.Elementwise):
                self.pre.setdefault(node.inputs[0], []).append(node.op)

    def radius(self, ndim: int) -> Tensor:
        return self.eps.reshape(self.n, *([1] * ndim))

    def run(self) -> Propagator:
        for node in self.nodes:
            lo, up = self.restrict(node.index, *self.interval(node))
            self.lows.append(lo)
            self.ups.append(up)
            if self.tightens and node.index in self.pre and node.index not in self.exact:
                self.tighten(node.index)
            if isinstance(node.op, _ops.Elementwise) and self.crown:
                i = node.inputs[0]
                relax = node.op.relaxation
                self.relax[node.index] = relax(self.lows[i], self.ups[i], self.variant)
        return self

    def restrict(self, index: int, lo: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
        """A node's interval intersected with its split constraints (Note [Split constraints])."""
        if index in self.splits:
            clip_lo, clip_up = self.splits[index]
            lo, up = torch.fmax(lo, clip_lo), torch.fmin(up, clip_up)
        return lo, up

    def unstable(self, index: int, flat_lo: Tensor, flat_up: Tensor) -> Tensor:
        """The entries (N, size) of a node that CROWN tightens: inexact for a consumer."""
        consumers = self.pre[index]
        unstable = consumers[0].inexact(flat_lo, flat_up)
        for op in consumers[1:]:
            unstable = unstable | op.inexact(flat_lo, flat_up)
        return unstable

    def lines(self, key: object, index: int, rows: int) -> _ops.Relaxation:
        """The lines of an elementwise node for the ``rows`` of the backward pass ``key``:
        slopes (N, 1 or K, *S), intercepts (N, *S) or (N, K, *S); the relaxation's
        (α-CROWN overrides this)."""
        slope_lo, intercept_lo, slope_up, intercept = self.relax[index]
        return slope_lo.unsqueeze(1), intercept_lo, slope_up.unsqueeze(1), intercept

    def interval(self, node) -> tuple[Tensor, Tensor]:
        op = node.op
        if op is None:
            r = self.radius(self.x.ndim - 1)
            return self.x - r, self.x + r
        if isinstance(op, _ops.Gather) and node.inputs[0] in self.ball:
            if op.const is None and len(node.inputs) == 1 and max(op.multiplicities()) <= 1:
                self.ball.add(node.index)  # a selection of coordinates of a ball is a ball
                self.exact.add(node.index)
        if isinstance(op, _ops.Affine) and node.inputs[0] in self.ball:
            # The exact bounds of an affine map of the ball (Note [IBP over an l2 ball]);
            # over a box, the interval rule is exact when |W| is (row norms known).
            rows = op.memo("row_norms")
            if rows is not None or (op.monotone and self.norm == math.inf):
                self.exact.add(node.index)
            if rows is not None and self.norm == 2:
                center = op.apply(self.graph.values[node.inputs[0]])
                r = self.radius(len(node.shape)) * rows
                return center - r, center + r
        return op.interval([self.lows[i] for i in node.inputs], [self.ups[i] for i in node.inputs])

    def chunk(self, target: int) -> int:
        """Rows per backward pass so that coefficient tensors stay within the budget."""
        largest = max(self.nodes[i].shape.numel() for i in self.graph.ancestors(target))
        return max(1, _BUDGET_BYTES // max(1, self.n * largest * self.x.element_size()))

    def tighten(self, index: int) -> None:
        """Intersect an elementwise node's input interval with CROWN bounds on its inexact
        entries (Note [Elementwise operations in the backward pass])."""
        lo, up = self.lows[index], self.ups[index]
        flat_lo, flat_up = lo.reshape(self.n, -1), up.reshape(self.n, -1)
        unstable = self.unstable(index, flat_lo, flat_up)
        counts = unstable.sum(1)
        most = int(counts.max())
        if most == 0:
            return
        order = torch.argsort((~unstable).to(torch.int8), dim=1, stable=True)[:, :most]
        valid = torch.arange(most, device=lo.device) < counts.unsqueeze(1)
        step = max(1, self.chunk(index) // 2)
        size = flat_lo.shape[1]
        op = self.nodes[index].op
        matrix = offset = None
        if isinstance(op, _ops.Affine):
            node_in = op.in_shapes[0]
            matrix = op.memo("dense", _DENSE_ROWS)
            b = op.bias()
            if matrix is not None and b is not None:
                offset = torch.broadcast_to(b, op.out_shape).reshape(-1)
        for start in range(0, most, step):
            sel, ok = order[:, start : start + step], valid[:, start : start + step]
            k = sel.shape[1]
            unit = ok.to(lo.dtype)
            node = self.nodes[index]
            if matrix is not None:
                # One-hot rows through an affine node are rows of its matrix (and bias).
                if matrix.requires_grad:  # differentiable bounds: no writes into out=
                    half = matrix[sel] * unit.unsqueeze(2)
                    rows = torch.cat([half, -half], 1)
                else:
                    rows = matrix.new_empty((self.n, 2 * k, matrix.shape[1]))
                    torch.mul(matrix[sel], unit.unsqueeze(2), out=rows[:, :k])
                    torch.neg(rows[:, :k], out=rows[:, k:])
                rows = rows.reshape(self.n, 2 * k, *node_in)
                origin, bias = node.inputs[0], None
                if offset is not None:
                    part = offset[sel] * unit
                    bias = torch.cat([part, -part], 1)
            else:
                rows = torch.zeros((self.n, 2 * k, size), dtype=lo.dtype, device=lo.device)
                rows[:, :k].scatter_(2, sel.unsqueeze(2), unit.unsqueeze(2))
                rows[:, k:].scatter_(2, sel.unsqueeze(2), -unit.unsqueeze(2))
                origin, bias = index, None
                rows = rows.reshape(self.n, 2 * k, *node.shape)
            bound = self.backward(origin, rows, bias, key=(index, start))
            new_lo, new_up = bound[:, :k], -bound[:, k:]
            cur_lo, cur_up = flat_lo.gather(1, sel), flat_up.gather(1, sel)
            # out of place: autograd (differentiable bounds, α-CROWN) keeps the gathered tensors
            met_lo, met_up = self.meet(cur_lo, cur_up, new_lo, new_up)
            flat_lo = flat_lo.scatter(1, sel, torch.where(ok, met_lo, cur_lo))
            flat_up = flat_up.scatter(1, sel, torch.where(ok, met_up, cur_up))
        self.lows[index] = flat_lo.reshape(lo.shape)
        self.ups[index] = flat_up.reshape(up.shape)

    def meet(self, lo: Tensor, up: Tensor, new_lo: Tensor, new_up: Tensor) -> tuple[Tensor, Tensor]:
        """An interval intersected with the CROWN bounds of its tightened entries (α-CROWN
        overrides this to send the gradient to the CROWN bounds)."""
        return torch.fmax(lo, new_lo), torch.fmin(up, new_up)

    def backward(
        self,
        target: int,
        rows: Tensor,
        bias: Tensor | None = None,
        key: object = None,
        keep: bool = False,
    ) -> Tensor:
        """Lower bounds (N, K) of ``rows`` (N, K, *S) applied to a node, plus ``bias``.

        ``key`` names the pass for `lines`; with ``keep`` the coefficients reaching each
        elementwise node (and the input, index 0) are kept in ``self.kept``, and the
        constant of the linear function of the input in ``self.kept_bias``.
        """
        coeffs: dict[int, Tensor] = {target: rows}
        bias = rows.new_zeros(rows.shape[:2]) if bias is None else bias
        at_input: Tensor | None = None

        def accumulate(i: int, a: Tensor) -> None:
            coeffs[i] = coeffs[i] + a if i in coeffs else a

        for i in reversed(self.graph.ancestors(target)):
            a = coeffs.pop(i, None)
            if a is None:
                continue
            node = self.nodes[i]
            a, bias = self.split_term(key, i, a, bias)
            if node.op is None:
                at_input = a
            elif isinstance(node.op, _ops.Elementwise):
                # Note [Elementwise operations in the backward pass]
                if keep:
                    self.kept[i] = a
                slope_lo, intercept_lo, slope_up, intercept = self.lines(key, i, a.shape[1])
                # pos * slope_lo + neg * slope_up with fewer temporaries (a = pos + neg)
                neg = a.clamp_max(0)
                bias = bias + _rowdot(neg, intercept)
                if intercept_lo is not None:
                    bias = bias + _rowdot(a.clamp_min(0), intercept_lo)
                a_in = a * slope_lo
                a_in.addcmul_(neg, slope_up - slope_lo)
                accumulate(node.inputs[0], a_in)
            else:
                a_ins, b = node.op.backward(a)
                if b is not None:
                    bias = bias + b
                for j, a_j in zip(node.inputs, a_ins, strict=True):
                    if a_j is not None:
                        accumulate(j, a_j)
        if keep:
            self.kept_bias = bias  # the constant of the linear function kept
        if at_input is None:
            return bias
        if keep:
            self.kept[0] = at_input
        flat = at_input.flatten(2)
        dual = 1.0 if self.norm == math.inf else 2.0
        spread = torch.linalg.vector_norm(flat, ord=dual, dim=-1)
        ball = bias + _rowdot(flat, self.x) - self.eps.unsqueeze(1) * spread
        if 0 not in self.splits:
            return ball
        # the input itself constrained (an input domain, Note [Split constraints]): the
        # minimum over the box of its interval holds too
        box = _rowdot(flat.clamp_min(0), self.lows[0]) + _rowdot(flat.clamp_max(0), self.ups[0])
        return torch.fmax(ball, bias + box)

    def linear_bounds(self, target: int, spec: Tensor, keep: bool = False) -> tuple[Tensor, Tensor]:
        """CROWN lower and upper bounds (N, R) of ``spec`` (N, R, M) applied to a node
        (``keep``: see `backward`; one chunk of rows then)."""
        shape = self.nodes[target].shape
        r = spec.shape[1]
        step = r if keep else max(1, self.chunk(target) // 2)
        lows, ups = [], []
        for start in range(0, r, step):
            part = spec[:, start : start + step]
            rows = torch.cat([part, -part], dim=1).reshape(self.n, -1, *shape)
            bound = self.backward(target, rows, key=("spec", start), keep=keep)
            k = part.shape[1]
            lows.append(bound[:, :k])
            ups.append(-bound[:, k:])
        return torch.cat(lows, 1), torch.cat(ups, 1)

    def split_term(self, key: object, index: int, a: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """The coefficients of a split node in a backward pass: unchanged, as clipping alone
        enforces the splits (β-CROWN adds its Lagrangian terms here)."""
        return a, bias


def _rowdot(a: Tensor, v: Tensor) -> Tensor:
    """sum_j a[n, k, j] v[n, j] for coefficients (N, K, *S) and values (N, *S): (N, K);
    values of a's very shape (one per row, α-CROWN) give sum_j a[n, k, j] v[n, k, j]
    (the same sum when K = 1, the one case where the two readings share a shape)."""
    if v.shape == a.shape:
        return (a * v).flatten(2).sum(-1)
    n, k = a.shape[:2]
    return torch.bmm(a.reshape(n, k, -1), v.reshape(n, -1, 1)).squeeze(2)
