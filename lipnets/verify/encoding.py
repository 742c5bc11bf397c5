r"""A propagation graph as a mixed-integer linear program (MILP): big-M ReLUs over a box.

`encode` writes the value of every node of a propagation graph
(`lipnets.propagation.graph`) on one sample as an affine expression of the
variables of a MILP, and `lipnets.verify.milp` minimises the margins over it.

# Note [MILP encoding of a propagation graph]

The nodes of a propagation graph are affine in their inputs (linear layers,
convolutions, batch norm, reshapes, sums, the two halves of a comparator...)
or elementwise; sorting activations (MaxMin, GroupSort, FullSort),
``torch.maximum``/``minimum`` and max pooling are already rewritten into
comparators around ReLUs, and LeakyReLU into a ReLU and an affine node (the
module docs of `lipnets.propagation.ops_base`), so a graph whose only
elementwise op is the ReLU is a piecewise-linear function that a MILP
represents exactly. Any other elementwise op (tanh, sigmoid, GELU, softmax...)
is refused with `InvalidModelError` naming its node.

The variables $z$ are the input $x$, bounded by the box $[\underline{x},
\overline{x}]$ (the l-infinity ball intersected with the input domain), and,
for every *unstable* ReLU entry, its output $y$ and a binary $d$. Each node's
value is an affine expression $E z + e$ (a sparse matrix and a vector, one row
per entry of the node):

* an affine node with inputs $v_k = E_k z + e_k$ has the exact matrices
  $W_k$ and constant $b$ that its backward pass returns for identity rows
  (``op.backward(I)`` in `lipnets.propagation.ops_base`), so its expression
  is $\sum_k W_k E_k z + (\sum_k W_k e_k + b)$; the composition is checked
  against the op's forward pass at the sample;
* a ReLU entry with pre-activation $p = E_i z + e_i$ and sound bounds $l \le p
  \le u$ on the box (CROWN, Note [Pre-activation bounds for big-M]) is $p$
  itself when $l \ge 0$ (stably active), $0$ when $u \le 0$ (stably
  inactive), and otherwise the new variable $y$ with

  $$y \ge p, \quad y \le p - l (1 - d), \quad 0 \le y \le u d, \quad d \in \{0, 1\}.$$

  With $d = 1$ these say $y = p \ge 0$; with $d = 0$, $y = 0 \ge p$. So
  for every $p \in [l, u]$ the only feasible $y$ is $\max(p, 0)$, and the
  feasible set of the MILP, projected on $x$, is the whole box, with every
  node's expression equal to the node's value there: the minimum of a margin
  over the MILP is its exact minimum over the box. (Eliminating $d$ leaves
  the triangle relaxation of Note [ReLU relaxation] in
  `lipnets.propagation.propagator`, the LP relaxation HiGHS starts from.)

Only unstable entries get variables, so the program has as many binaries as
the ball leaves ReLUs unstable; tighter bounds mean fewer binaries and
smaller big-M constants, hence faster solves.

# Note [Pre-activation bounds for big-M]

The bounds $l, u$ are those of `lipnets.propagation.propagator.Propagator`
with CROWN tightening, one pass per relaxation variant, intersected (as
`crown_bounds` does). They are bounds over the l-infinity ball, not over its
intersection with the domain: sound (the box is a subset of the ball), if
sometimes looser. They are computed in float64 without outward rounding (Note
[Floating-point rounding] in `lipnets.propagation.lirpa`), so each unstable
entry's interval is widened by $10^{-9} (1 + |l|)$ and $10^{-9} (1 + |u|)$
before it enters the big-M rows: a bound a few ulps too tight must not cut
off the true value of $p$. An entry classified stable by bounds within
rounding of 0 changes the value by that rounding, far below the solver's
tolerances (Note [What exact means] in `lipnets.verify.milp`).

With ``tighten`` (the default of `milp_verify`), each ReLU input after the first
layer that has unstable entries is tightened further before it is encoded: each of its
unstable entries is minimised and maximised over the LP relaxation of the
program built so far (every binary relaxed to $[0, 1]$, i.e. the triangle
relaxation of the ReLUs before it, with their own tightened bounds), and the
CROWN interval is intersected with the LP's, widened by $10^{-6} (1 + |v|)$
for the LP solver's tolerances. The LP relaxation is sound (it contains the
MILP's feasible set), so the bounds stay valid; tighter bounds make some
entries stable (no binary) and shrink the big-M constants of the others,
which cuts branch-and-bound nodes on deeper networks (Tjeng et al., 2019,
tighten the same way). It costs two LPs per unstable entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import sparse

from lipnets.errors import InvalidModelError
from lipnets.propagation.graph import Graph
from lipnets.propagation.ops_base import Elementwise, ReLU
from lipnets.propagation.propagator import Propagator

__all__ = ["Program", "check_relu_graph", "encode", "relu_bounds"]

_WIDEN = 1e-9
"""Relative outward widening of unstable pre-activation bounds (Note [Pre-activation bounds
for big-M])."""
_CHUNK = 2**22
"""Largest number of entries of one coefficient tensor when forming a node's matrices."""


def check_relu_graph(graph: Graph) -> None:
    """Refuse a graph with an elementwise op other than ReLU, naming the node."""
    for node in graph.nodes[1:]:
        op = node.op
        if isinstance(op, Elementwise) and not (isinstance(op, ReLU) and op.kind == "relu"):
            raise InvalidModelError(
                f"milp_verify encodes piecewise-linear ReLU networks only (ReLU, LeakyReLU, "
                f"MaxMin, GroupSort, max pooling, affine layers); node {node.where} is "
                f"{op.kind}, which a MILP cannot represent exactly"
            )


def relu_bounds(
    graph: Graph, x: torch.Tensor, radius: torch.Tensor, spec: torch.Tensor | None = None
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], np.ndarray | None]:
    """CROWN bounds (lower, upper) of every node that feeds a ReLU, as float64 numpy rows
    of the first sample, intersected over the relaxation variants; with ``spec`` (1, R, M),
    also CROWN's lower bounds (R,) of the rows of ``spec`` applied to the output."""
    variants = max((getattr(nd.op, "variants", 1) for nd in graph.nodes), default=1)
    pre = {nd.inputs[0] for nd in graph.nodes[1:] if isinstance(nd.op, ReLU)}
    lows: dict[int, np.ndarray] = {}
    ups: dict[int, np.ndarray] = {}
    rows: np.ndarray | None = None
    for v in range(variants):
        prop = Propagator(graph, x, radius, math.inf, crown=True, variant=v).run()
        if spec is not None and graph.output is not None:
            low = prop.linear_bounds(graph.output, spec.to(x))[0][0].double().cpu().numpy()
            rows = low if rows is None else np.fmax(rows, low)
        for i in pre:
            lo = prop.lows[i][0].reshape(-1).double().cpu().numpy()
            up = prop.ups[i][0].reshape(-1).double().cpu().numpy()
            lows[i] = np.fmax(lows[i], lo) if i in lows else lo
            ups[i] = np.fmin(ups[i], up) if i in ups else up
    for i in pre:
        if not (np.isfinite(lows[i]).all() and np.isfinite(ups[i]).all()):
            raise InvalidModelError(
                f"the pre-activation bounds of node {graph.nodes[i].where} are not finite "
                "(an overflow); a big-M encoding needs finite bounds"
            )
    return lows, ups, rows


@dataclass
class Program:
    """The variables and constraints of a MILP: ``lo <= A z <= hi``, bounds, integrality."""

    lower: list[np.ndarray]
    upper: list[np.ndarray]
    integral: list[np.ndarray]
    blocks: list[sparse.csr_matrix] = field(default_factory=list)
    row_lo: list[np.ndarray] = field(default_factory=list)
    row_hi: list[np.ndarray] = field(default_factory=list)
    columns: int = 0
    binaries: int = 0

    def add_variables(self, lower: np.ndarray, upper: np.ndarray, integral: bool) -> np.ndarray:
        """Append variables; return their column indices."""
        k = lower.shape[0]
        self.lower.append(lower)
        self.upper.append(upper)
        self.integral.append(np.full(k, 1 if integral else 0, dtype=np.int64))
        self.binaries += k if integral else 0
        first = self.columns
        self.columns += k
        return np.arange(first, first + k)

    def add_rows(self, a: sparse.csr_matrix, lo: np.ndarray, hi: np.ndarray) -> None:
        self.blocks.append(a)
        self.row_lo.append(lo)
        self.row_hi.append(hi)

    def matrix(self) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray]:
        """All rows ``(A, lo, hi)`` with as many columns as there are variables."""
        blocks = [_pad(b, self.columns) for b in self.blocks]
        if not blocks:
            return sparse.csr_matrix((0, self.columns)), np.zeros(0), np.zeros(0)
        return (
            sparse.vstack(blocks, format="csr"),
            np.concatenate(self.row_lo),
            np.concatenate(self.row_hi),
        )

    def bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.concatenate(self.lower), np.concatenate(self.upper), np.concatenate(self.integral)


def _pad(e: sparse.csr_matrix, columns: int) -> sparse.csr_matrix:
    """The same rows with ``columns`` columns (the new ones zero)."""
    if e.shape[1] == columns:
        return e
    return sparse.csr_matrix((e.data, e.indices, e.indptr), shape=(e.shape[0], columns))


def _matrices(node, graph: Graph) -> tuple[list[sparse.csr_matrix | None], np.ndarray]:
    """The exact matrices of an affine node (one per input) and its constant, first sample,
    from the backward pass of identity rows (Note [MILP encoding of a propagation graph])."""
    op = node.op
    values = graph.values
    m = node.shape.numel()
    widest = max(graph.nodes[i].shape.numel() for i in node.inputs)
    step = max(1, _CHUNK // max(1, widest))
    dtype, device = values[node.inputs[0]].dtype, values[node.inputs[0]].device
    parts: list[list[sparse.csr_matrix]] = [[] for _ in node.inputs]
    const = np.zeros(m)
    n = values[0].shape[0]
    for start in range(0, m, step):
        k = min(step, m - start)
        rows = torch.zeros((n, k, m), dtype=dtype, device=device)
        rows[:, torch.arange(k), torch.arange(start, start + k)] = 1.0
        coeffs, bias = op.backward(rows.reshape(n, k, *node.shape))
        for j, c in enumerate(coeffs):
            if c is not None:
                parts[j].append(sparse.csr_matrix(c[0].reshape(k, -1).double().cpu().numpy()))
        if bias is not None:
            const[start : start + k] = bias[0].double().cpu().numpy()
    mats = [sparse.vstack(p, format="csr") if p else None for p in parts]
    return mats, const


def encode(
    graph: Graph,
    lows: dict[int, np.ndarray],
    ups: dict[int, np.ndarray],
    box_lo: np.ndarray,
    box_hi: np.ndarray,
    tighten: bool = True,
) -> tuple[Program, sparse.csr_matrix, np.ndarray]:
    """The MILP of the graph's first sample over the box ``[box_lo, box_hi]`` (flat float64
    arrays), and the expression ``(E, e)`` of the output: output = E z + e."""
    n0 = box_lo.shape[0]
    program = Program([], [], [])
    program.add_variables(box_lo, box_hi, integral=False)
    exprs: dict[int, tuple[sparse.csr_matrix, np.ndarray]] = {
        0: (sparse.identity(n0, format="csr"), np.zeros(n0))
    }
    last_use = {}
    for node in graph.nodes:
        for i in node.inputs:
            last_use[i] = node.index
    assert graph.output is not None
    last_use[graph.output] = len(graph.nodes)
    for node in graph.nodes[1:]:
        if isinstance(node.op, ReLU):
            source = node.inputs[0]
            if tighten and program.binaries:
                _tighten(program, exprs[source], lows[source], ups[source])
            exprs[node.index] = _relu(program, exprs[source], source, lows, ups)
        else:
            exprs[node.index] = _affine(node, graph, exprs, program.columns)
        for i in node.inputs:  # free what no later node reads
            if last_use.get(i) == node.index:
                exprs.pop(i, None)
    e_out, c_out = exprs[graph.output]
    return program, _pad(e_out, program.columns), c_out


def _affine(node, graph: Graph, exprs, columns: int) -> tuple[sparse.csr_matrix, np.ndarray]:
    mats, const = _matrices(node, graph)
    m = node.shape.numel()
    e = sparse.csr_matrix((m, columns))
    c = const.copy()
    for i, w in zip(node.inputs, mats, strict=True):
        if w is None:
            continue
        e_in, c_in = exprs[i]
        e = e + w @ _pad(e_in, columns)
        c = c + w @ c_in
    _check_affine(node, graph, mats, const)  # a non-affine op would not pass
    return e.tocsr(), c


def _check_affine(node, graph: Graph, mats, const: np.ndarray) -> None:
    """W_k v_k + b must equal the op's forward value at the sample."""
    values = graph.values
    total = const.copy()
    for i, w in zip(node.inputs, mats, strict=True):
        if w is not None:
            total = total + w @ values[i][0].reshape(-1).double().cpu().numpy()
    want = values[node.index][0].reshape(-1).double().cpu().numpy()
    scale = 1.0 + float(np.abs(want).max(initial=0.0))
    rounding = math.sqrt(torch.finfo(values[node.index].dtype).eps)  # as the graph's checks
    if not np.allclose(total, want, rtol=0.0, atol=rounding * scale):
        raise InvalidModelError(
            f"node {node.where} is not affine in its inputs as its backward pass says; "
            "milp_verify cannot encode it"
        )


def _relu(program: Program, expr, source: int, lows, ups) -> tuple[sparse.csr_matrix, np.ndarray]:
    e_in, c_in = expr
    lo, up = lows[source], ups[source]
    m = lo.shape[0]
    active = lo >= 0
    unstable = ~active & (up > 0)
    idx = np.flatnonzero(unstable)
    k = idx.shape[0]
    l_u = lo[idx] - _WIDEN * (1.0 + np.abs(lo[idx]))
    u_u = up[idx] + _WIDEN * (1.0 + np.abs(up[idx]))
    cy = program.add_variables(np.zeros(k), u_u, integral=False)
    cd = program.add_variables(np.zeros(k), np.ones(k), integral=True)
    columns = program.columns
    e_in = _pad(e_in, columns)
    if k:
        p = e_in[idx]  # the pre-activations of the unstable entries
        r = np.arange(k)
        y = sparse.csr_matrix((np.ones(k), (r, cy)), shape=(k, columns))
        d_l = sparse.csr_matrix((-l_u, (r, cd)), shape=(k, columns))
        d_u = sparse.csr_matrix((-u_u, (r, cd)), shape=(k, columns))
        inf = np.full(k, math.inf)
        program.add_rows((y - p).tocsr(), c_in[idx], inf)  # y >= p
        program.add_rows((y - p + d_l).tocsr(), -inf, c_in[idx] - l_u)  # y <= p - l (1 - d)
        program.add_rows((y + d_u).tocsr(), -inf, np.zeros(k))  # y <= u d
    keep = sparse.diags(active.astype(np.float64))
    out = keep @ e_in
    if k:
        out = out + sparse.csr_matrix((np.ones(k), (idx, cy)), shape=(m, columns))
    return out.tocsr(), np.where(active, c_in, 0.0)


_LP_SLACK = 1e-6
"""Relative and absolute outward margin of a bound an LP proved (its solver's tolerances)."""


def _tighten(program: Program, expr, lo: np.ndarray, up: np.ndarray) -> None:
    """Tighten, in place, the bounds of the unstable entries of ``expr`` by minimising and
    maximising each over the LP relaxation of the program so far (Note [Pre-activation
    bounds for big-M])."""
    idx = np.flatnonzero((lo < 0) & (up > 0))
    if not idx.shape[0]:
        return
    from scipy.optimize import Bounds, LinearConstraint, milp

    a, row_lo, row_hi = program.matrix()
    lb, ub, _ = program.bounds()
    constraints = LinearConstraint(a, row_lo, row_hi) if a.shape[0] else None
    e, c = expr
    e = _pad(e, program.columns)
    for k in idx:
        row = e[k].toarray().reshape(-1)
        for sign in (1.0, -1.0):
            res = milp(sign * row, bounds=Bounds(lb, ub), constraints=constraints)
            if res.status != 0:
                continue
            value = sign * float(res.fun) + c[k]
            slack = _LP_SLACK * (1.0 + abs(value))
            if sign > 0:
                lo[k] = max(lo[k], value - slack)
            else:
                up[k] = min(up[k], value + slack)
