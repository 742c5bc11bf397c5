r"""Output bounds over norm balls: interval bound propagation (IBP) and CROWN.

Both functions bound every output of a model (or every row of a linear
specification $C f$) over the ball $\{x : \|x - x_0\| \le \varepsilon\}$ around
each input $x_0$ of a batch, in the l-infinity or l2 norm. The model is traced
into a propagation graph (`lipnets.propagation.graph`): affine nodes, ReLUs,
and sorting activations rewritten as comparators of ReLUs (Note [Comparators
as ReLUs] there). See the module docs of `lipnets.propagation._ops` for the
interval rules of each operation.

# Note [ReLU relaxation]

For $z \in [l, u]$ with $l < 0 < u$, $\mathrm{relu}(z)$ lies between the lines
$\alpha z$ (for $\alpha \in [0, 1]$) and $\frac{u}{u - l}(z - l)$, the chord
through $(l, 0)$ and $(u, u)$. lipnets uses the adaptive lower slope of CROWN,
$\alpha = 1$ when $u > -l$ and $0$ otherwise, which keeps the area between the
lines smallest. A ReLU with $l \ge 0$ is the identity and one with
$u \le 0$ is zero; both are exact. Backward propagation of a lower bound of
$a^\top \mathrm{relu}(z)$ takes the lower line where $a_i \ge 0$ and the
chord where $a_i < 0$ (upper bounds are lower bounds of the negated rows).

# Note [CROWN never looser than IBP]

`crown_bounds` visits the graph in topological order. Each node first gets
interval bounds from its inputs' bounds (Note [Interval rules] in
`lipnets.propagation._ops`); each input of a ReLU is then tightened by a
backward CROWN pass from that node, run only for the entries whose interval
still straddles 0 (a stable entry's relaxation is exact whatever its bounds)
and not for a node whose interval is already exact (an affine map of the
ball, Note [IBP over an l2 ball]), and the two bounds are intersected. The
pass starts at the node's input with the rows of the node's matrix (formed
once, when it has at most $2^{24}$ entries) rather than with one-hot rows.
The output (or each row of the spec) is bounded by a backward pass and
intersected with its interval bound, and, with a spec, also with the interval
of $C f$ computed from CROWN's bounds of $f$.
The intersection of sound bounds is sound, and interval rules are
inclusion-monotone, so every CROWN bound is at least as tight as IBP's for
the same input (elementwise); on a depth-3 ReLU network it is usually
strictly tighter. Inclusion-monotone holds in exact arithmetic; after rounding
a tightened interval can map to one a unit in the last place outside IBP's,
so the outputs are also intersected with a plain IBP pass, and the guarantee
holds exactly.

# Note [IBP over an l2 ball]

Intervals are boxes. The smallest box around the l2 ball is the l-infinity
ball of the same radius, which IBP uses for the input. For an affine node that
reads the input directly (or a reshape, permutation or selection of it, which
maps the ball to a ball), the exact bounds $W x_0 + b \pm \varepsilon
\|W_{i,:}\|_2$ are used instead when the exact row norms are known (Linear,
zero-padded convolutions, BatchNorm, CayleyConv2d): much tighter than the
box, and what CROWN finds for that node too.

# Note [Floating-point rounding]

Bounds are computed in the dtype of ``x`` with the usual round-to-nearest
arithmetic. They are sound in exact arithmetic; in floating point each bound
can be off by rounding errors of the order of the unit roundoff times the
magnitudes involved (and the graph's depth). lipnets adds no outward rounding
margin: use float64 (model and inputs) for certification, and require a
margin well above $10^{-9}$ relative. The tests check soundness by sampling
in float64 with a $10^{-9}$ tolerance.

Overflow is handled soundly: a ReLU whose input bounds are NaN (from
$\infty - \infty$) gets NaN relaxation lines, never the "stably inactive"
that a NaN comparison would suggest, so every bound it reaches is NaN;
intersections use ``fmax``/``fmin``, so a NaN never replaces a real bound;
and a NaN left in a result becomes the trivial bound $-\infty$ or $+\infty$.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lipnets._state import eval_mode, restored_buffers
from lipnets.propagation import _ops
from lipnets.propagation.graph import Graph, build

__all__ = ["Bounds", "crown_bounds", "interval_bounds"]

_BUDGET = 2**25
"""Largest number of entries of one coefficient tensor; more rows are split into chunks."""
_DENSE_ROWS = 2**24
"""Largest affine node (entries of its matrix) whose rows tightening reads from the matrix."""


class Bounds(NamedTuple):
    """Elementwise lower and upper bounds, ``lower <= f(x) <= upper`` over the ball."""

    lower: Tensor
    upper: Tensor


def interval_bounds(
    model: nn.Module,
    x: Tensor,
    eps: float | Tensor,
    *,
    norm: float | str,
    spec: Tensor | None = None,
) -> Bounds:
    r"""Bounds of a model's outputs over norm balls by interval bound propagation (IBP).

    Every node's value gets an interval from its inputs' intervals (Note
    [Interval rules] in `lipnets.propagation._ops`); the first affine node
    of an l2 ball is bounded exactly (Note [IBP over an l2 ball]). Fast, sound,
    and loose for deep networks: use `crown_bounds` for tighter bounds.

    The model runs in eval mode (each submodule's mode is restored
    afterwards); no buffer or parameter changes.

    Args:
        model: an ``nn.Module`` built from the supported operations (see
            `crown_bounds`).
        x: the centres of the balls, a floating-point batch of shape
            $(N, \dots)$ with the model's dtype.
        eps: the radius, a float $\ge 0$ or a tensor of shape $(N,)$ (one per
            sample).
        norm: ``2`` (l2 ball) or ``float("inf")`` (l-infinity ball); the
            strings ``"2"``, ``"l2"``, ``"inf"`` and ``"linf"`` are accepted.
        spec: an optional matrix $C$ of shape $(R, M)$ or $(N, R, M)$, with
            $M$ the number of outputs per sample: the bounds are then for
            $C f(x)$ (interval arithmetic on the output bounds).

    Returns:
        `Bounds` ``(lower, upper)``, each shaped
        like ``model(x)`` (or $(N, R)$ with a spec), in the dtype of ``x``.

    Raises:
        TypeError: if ``model`` is not a module or ``x`` not a floating-point
            tensor, or their dtypes differ.
        ValueError: for a NaN or infinite ``x``, a negative or non-finite
            ``eps``, an unknown ``norm``, or a ``spec`` of the wrong shape.
        UnboundedModuleError: if an operation has no propagation rule; the
            message names the node, e.g. ``"act (Hardswish) has no
            propagation rule"``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lipnets.propagation import interval_bounds
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
        >>> x = torch.randn(5, 4, dtype=torch.float64)
        >>> lower, upper = interval_bounds(model, x, 0.1, norm=float("inf"))
        >>> y = model(x + 0.1 * (2 * torch.rand_like(x) - 1))  # a point in the ball
        >>> bool((lower <= y).all() and (y <= upper).all())
        True

    References:
        Gowal, S. et al. (2018). On the effectiveness of interval bound
        propagation for training verifiably robust models. arXiv:1810.12715.
    """
    return _bounds(model, x, eps, norm, spec, crown=False)


def crown_bounds(
    model: nn.Module,
    x: Tensor,
    eps: float | Tensor,
    *,
    norm: float | str,
    spec: Tensor | None = None,
) -> Bounds:
    r"""Bounds of a model's outputs over norm balls by backward linear relaxation (CROWN).

    Each ReLU is bounded by two lines over the interval of its input (Note
    [ReLU relaxation]); a backward pass through the graph then gives, for each
    output, linear functions $a^\top x + c$ below and above it on the ball,
    whose extrema are $a^\top x_0 + c \mp \varepsilon \|a\|_*$ (the dual norm:
    $\|a\|_1$ for an l-infinity ball, $\|a\|_2$ for an l2 ball). The bounds
    of every ReLU input are computed the same way first, and every bound is
    intersected with its interval bound, so CROWN is never looser than
    `interval_bounds` (Note [CROWN never looser than IBP]).

    Supported operations: ``nn.Linear`` (and BjorckLinear, CayleyLinear, with
    their realised weights; ``F.linear`` with constant weights); ``nn.Conv1d``,
    ``nn.Conv2d``, ``nn.Conv3d`` (any padding mode, stride, dilation, groups;
    BCOPConv2d); CayleyConv2d and FrequencyConv2d (Note [Circular
    convolution kernels]); ReLU (module, function or method); MaxMin,
    GroupSort and FullSort (Note [Comparators as ReLUs]); eval-mode
    BatchNorm1d/2d/3d with running statistics; AvgPool, AdaptiveAvgPool,
    zero and constant padding; InvertibleDownsample, PixelShuffle,
    PixelUnshuffle, ChannelShuffle; flatten, reshapes, permutations, slicing,
    ``cat``/``stack``, ``F.pad`` (Note [Index operations]); ``+``, ``-``
    (residual connections), multiplication and division by constants; ``sum``
    and ``mean`` over non-batch dimensions; Identity and Dropout (eval).

    Args:
        model: an ``nn.Module`` built from the supported operations, taking
            one input and returning one tensor.
        x: the centres of the balls, a floating-point batch of shape
            $(N, \dots)$ with the model's dtype (float64 is recommended for
            certification: Note [Floating-point rounding]).
        eps: the radius, a float $\ge 0$ or a tensor of shape $(N,)$.
        norm: ``2`` (l2 ball) or ``float("inf")`` (l-infinity ball); the
            strings ``"2"``, ``"l2"``, ``"inf"`` and ``"linf"`` are accepted.
        spec: an optional matrix $C$ of shape $(R, M)$ or $(N, R, M)$, with
            $M$ the number of outputs per sample (flattened): the bounds are
            then for the $R$ linear functions $C f(x)$, such as the margins
            $f_y - f_j$, computed directly (tighter than combining the output
            bounds, which they are also intersected with).

    Returns:
        `Bounds` ``(lower, upper)``, each shaped
        like ``model(x)`` (or $(N, R)$ with a spec), in the dtype of ``x``.

    Raises:
        TypeError: if ``model`` is not a module or ``x`` not a floating-point
            tensor, or their dtypes differ.
        ValueError: for a NaN or infinite ``x``, a negative or non-finite
            ``eps``, an unknown ``norm``, or a ``spec`` of the wrong shape.
        UnboundedModuleError: if an operation has no propagation rule; the
            message names the node, e.g. ``"act (Hardswish) has no
            propagation rule"``.
        UntraceableModelError: if torch.fx cannot trace the model, or the
            traced graph does not compute what the model computes.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lipnets.propagation import crown_bounds, interval_bounds
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(
        ...     nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
        ... ).double()
        >>> x = torch.randn(8, 4, dtype=torch.float64)
        >>> crown = crown_bounds(model, x, 0.05, norm=2)
        >>> ibp = interval_bounds(model, x, 0.05, norm=2)
        >>> bool((crown.upper - crown.lower <= ibp.upper - ibp.lower).all())  # never looser
        True
        >>> bool((crown.lower <= model(x)).all() and (model(x) <= crown.upper).all())
        True

    References:
        Zhang, H., Weng, T.-W., Chen, P.-Y., Hsieh, C.-J. & Daniel, L. (2018).
        Efficient neural network robustness certification with general
        activation functions. *NeurIPS*.

        Xu, K. et al. (2020). Automatic perturbation analysis for scalable
        certified robustness and beyond. *NeurIPS* (auto_LiRPA).
    """
    return _bounds(model, x, eps, norm, spec, crown=True)


# ---------------------------------------------------------------------------
# Arguments and the evaluation session
# ---------------------------------------------------------------------------

_NORMS = {2: 2.0, "2": 2.0, "l2": 2.0, math.inf: math.inf, "inf": math.inf, "linf": math.inf}


def check_norm(norm: object) -> float:
    """2.0 or math.inf from the accepted spellings of ``norm``."""
    key: object = norm
    if isinstance(norm, str):
        key = norm.lower()
    elif isinstance(norm, numbers.Real) and not isinstance(norm, bool):
        key = float(norm)
        key = 2 if key == 2.0 else key
    if isinstance(key, (str, int, float)) and key in _NORMS:
        return _NORMS[key]
    raise ValueError(f"norm must be 2 or float('inf') (or 'l2', 'inf', 'linf'), got {norm!r}")


def check_batch(model: object, x: object) -> None:
    """A module and a non-empty floating-point batch (N, ...), or a clear error."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor, got {got}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(
            f"x must be a non-empty batch of shape (N, ...) with at least 2 dimensions, "
            f"got shape {tuple(x.shape)}"
        )


def check_args(model: object, x: object, eps: object) -> tuple[Tensor, Tensor]:
    """Check the model and batch; return x (detached) and eps as an (N,) tensor of x's dtype."""
    check_batch(model, x)
    assert isinstance(x, Tensor)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or infinite values")
    n = x.shape[0]
    if isinstance(eps, Tensor):
        if eps.ndim > 1 or (eps.ndim == 1 and eps.shape[0] != n) or eps.is_complex():
            raise ValueError(
                f"eps must be a float or a real tensor of shape () or ({n},), "
                f"got shape {tuple(eps.shape)}"
            )
        radius = eps.detach().to(dtype=x.dtype, device=x.device).expand(n)
    elif isinstance(eps, numbers.Real) and not isinstance(eps, bool):
        radius = torch.full((n,), float(eps), dtype=x.dtype, device=x.device)
    else:
        raise TypeError(f"eps must be a float or a tensor, got {type(eps).__name__}")
    if not bool(torch.isfinite(radius).all()) or bool((radius < 0).any()):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and t.dtype != x.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the model's {name} has dtype {t.dtype}; cast one of "
                "them (float64 is recommended for certification)"
            )
    return x.detach(), radius.contiguous()


def check_spec(spec: object, n: int, m: int, dtype: torch.dtype, device) -> Tensor:
    """The spec as an (N, R, M) tensor of the given dtype."""
    if not isinstance(spec, Tensor) or not (spec.is_floating_point() or spec.dtype == torch.bool):
        got = f"dtype {spec.dtype}" if isinstance(spec, Tensor) else type(spec).__name__
        raise TypeError(f"spec must be a real tensor, got {got}")
    if spec.ndim not in (2, 3) or spec.shape[-1] != m or (spec.ndim == 3 and spec.shape[0] != n):
        raise ValueError(
            f"spec must have shape (R, {m}) or ({n}, R, {m}) for {m} outputs per sample, "
            f"got {tuple(spec.shape)}"
        )
    spec = spec.detach().to(dtype=dtype, device=device)
    if not bool(torch.isfinite(spec).all()):
        raise ValueError("spec contains NaN or infinite values")
    return spec.expand(n, *spec.shape[-2:]) if spec.ndim == 2 else spec


@contextmanager
def session(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd; each submodule's mode and every buffer restored after."""
    with eval_mode(model), restored_buffers(model), torch.no_grad():
        yield


# ---------------------------------------------------------------------------
# The propagation
# ---------------------------------------------------------------------------


def relaxation(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(lower slope, upper slope, upper intercept) of Note [ReLU relaxation]."""
    active = lower >= 0
    unstable = ~active & (upper > 0)
    ones = active.to(lower.dtype)
    width = torch.where(unstable, upper - lower, torch.ones_like(lower))
    slope_up = torch.where(unstable, upper / width, ones)
    intercept = torch.where(unstable, -slope_up * lower, torch.zeros_like(lower))
    slope_lo = torch.where(unstable, (upper > -lower).to(lower.dtype), ones)
    unknown = torch.isnan(lower) | torch.isnan(upper)  # Note [Floating-point rounding]
    if bool(unknown.any()):
        nan = torch.full_like(lower, math.nan)
        slope_lo, slope_up, intercept = (
            torch.where(unknown, nan, t) for t in (slope_lo, slope_up, intercept)
        )
    return slope_lo, slope_up, intercept


class Propagator:
    """Interval (and, with ``crown``, CROWN-tightened) bounds of every node of a graph."""

    def __init__(self, graph: Graph, x: Tensor, eps: Tensor, norm: float, crown: bool) -> None:
        self.graph = graph
        self.nodes = graph.nodes
        self.x = x
        self.n = x.shape[0]
        self.eps = eps
        self.norm = norm
        self.crown = crown
        self.lows: list[Tensor] = []
        self.ups: list[Tensor] = []
        self.relax: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self.ball: set[int] = {0}
        self.exact: set[int] = {0}  # nodes whose interval is exact on the ball
        self.pre = {node.inputs[0] for node in self.nodes if isinstance(node.op, _ops.ReLU)}

    def radius(self, ndim: int) -> Tensor:
        return self.eps.reshape(self.n, *([1] * ndim))

    def run(self) -> Propagator:
        for node in self.nodes:
            lo, up = self.interval(node)
            self.lows.append(lo)
            self.ups.append(up)
            if self.crown and node.index in self.pre and node.index not in self.exact:
                self.tighten(node.index)
            if isinstance(node.op, _ops.ReLU) and self.crown:
                i = node.inputs[0]
                self.relax[node.index] = relaxation(self.lows[i], self.ups[i])
        return self

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
            rows = op.row_norms()
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
        return max(1, _BUDGET // max(1, self.n * largest))

    def tighten(self, index: int) -> None:
        """Intersect a ReLU input's interval with CROWN bounds on its unstable entries."""
        lo, up = self.lows[index], self.ups[index]
        flat_lo, flat_up = lo.reshape(self.n, -1).clone(), up.reshape(self.n, -1).clone()
        unstable = (flat_lo < 0) & (flat_up > 0)
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
            matrix = op.dense(_DENSE_ROWS)
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
            bound = self.backward(origin, rows, bias)
            new_lo, new_up = bound[:, :k], -bound[:, k:]
            cur_lo, cur_up = flat_lo.gather(1, sel), flat_up.gather(1, sel)
            flat_lo.scatter_(1, sel, torch.where(ok, torch.fmax(cur_lo, new_lo), cur_lo))
            flat_up.scatter_(1, sel, torch.where(ok, torch.fmin(cur_up, new_up), cur_up))
        self.lows[index] = flat_lo.reshape(lo.shape)
        self.ups[index] = flat_up.reshape(up.shape)

    def backward(self, target: int, rows: Tensor, bias: Tensor | None = None) -> Tensor:
        """Lower bounds (N, K) of ``rows`` (N, K, *S) applied to a node, plus ``bias``."""
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
            if node.op is None:
                at_input = a
            elif isinstance(node.op, _ops.ReLU):
                slope_lo, slope_up, intercept = self.relax[i]
                # pos * slope_lo + neg * slope_up with fewer temporaries (a = pos + neg)
                neg = a.clamp_max(0)
                bias = bias + _rowdot(neg, intercept)
                a_in = a * slope_lo.unsqueeze(1)
                a_in.addcmul_(neg, (slope_up - slope_lo).unsqueeze(1))
                accumulate(node.inputs[0], a_in)
            else:
                a_ins, b = node.op.backward(a)
                if b is not None:
                    bias = bias + b
                for j, a_j in zip(node.inputs, a_ins, strict=True):
                    if a_j is not None:
                        accumulate(j, a_j)
        if at_input is None:
            return bias
        flat = at_input.flatten(2)
        dual = 1.0 if self.norm == math.inf else 2.0
        spread = torch.linalg.vector_norm(flat, ord=dual, dim=-1)
        return bias + _rowdot(flat, self.x) - self.eps.unsqueeze(1) * spread

    def linear_bounds(self, target: int, spec: Tensor) -> tuple[Tensor, Tensor]:
        """CROWN lower and upper bounds (N, R) of ``spec`` (N, R, M) applied to a node."""
        shape = self.nodes[target].shape
        r = spec.shape[1]
        step = max(1, self.chunk(target) // 2)
        lows, ups = [], []
        for start in range(0, r, step):
            part = spec[:, start : start + step]
            rows = torch.cat([part, -part], dim=1).reshape(self.n, -1, *shape)
            bound = self.backward(target, rows)
            k = part.shape[1]
            lows.append(bound[:, :k])
            ups.append(-bound[:, k:])
        return torch.cat(lows, 1), torch.cat(ups, 1)


def _rowdot(a: Tensor, v: Tensor) -> Tensor:
    """sum_j a[n, k, j] v[n, j] for coefficients (N, K, *S) and values (N, *S): (N, K)."""
    n, k = a.shape[:2]
    return torch.bmm(a.reshape(n, k, -1), v.reshape(n, -1, 1)).squeeze(2)


def spec_interval(spec: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """Bounds (N, R) of C f by interval arithmetic from bounds (N, M) of f."""
    pos, neg = spec.clamp_min(0), spec.clamp_max(0)
    lo = (pos * lower.unsqueeze(1) + neg * upper.unsqueeze(1)).sum(-1)
    up = (pos * upper.unsqueeze(1) + neg * lower.unsqueeze(1)).sum(-1)
    return lo, up


def _bounds(
    model: nn.Module, x: Tensor, eps: object, norm: object, spec: Tensor | None, crown: bool
) -> Bounds:
    q = check_norm(norm)
    x, radius = check_args(model, x, eps)
    with session(model):
        graph = build(model, x, radius, q)
        n = x.shape[0]
        out_shape = graph.output_value.shape
        m = out_shape[1:].numel()
        matrix = None if spec is None else check_spec(spec, n, m, x.dtype, x.device)
        if graph.output is None:
            value = graph.output_value.to(x.dtype)
            if matrix is None:
                return Bounds(value.clone(), value.clone())
            flat = value.reshape(n, -1)
            lo, up = spec_interval(matrix, flat, flat)
            return Bounds(lo, up)
        prop = Propagator(graph, x, radius, q, crown).run()
        out = graph.output
        lo, up = prop.lows[out].reshape(n, -1), prop.ups[out].reshape(n, -1)
        if crown:
            eye = torch.eye(m, dtype=x.dtype, device=x.device).expand(n, m, m)
            c_lo, c_up = prop.linear_bounds(out, eye)
            lo, up = torch.fmax(lo, c_lo), torch.fmin(up, c_up)
            # Plain IBP too: in floating point the tightened intervals can round a hair
            # outside IBP's (Note [CROWN never looser than IBP]).
            ibp = Propagator(graph, x, radius, q, crown=False).run()
            lo = torch.fmax(lo, ibp.lows[out].reshape(n, -1))
            up = torch.fmin(up, ibp.ups[out].reshape(n, -1))
        if matrix is None:
            return _finite_or_infinite(lo.reshape(out_shape), up.reshape(out_shape))
        s_lo, s_up = spec_interval(matrix, lo, up)
        if crown:
            d_lo, d_up = prop.linear_bounds(out, matrix)
            s_lo, s_up = torch.fmax(s_lo, d_lo), torch.fmin(s_up, d_up)
        return _finite_or_infinite(s_lo, s_up)


def _finite_or_infinite(lower: Tensor, upper: Tensor) -> Bounds:
    """NaN bounds (an overflow, inf - inf) become the trivial -inf and +inf."""
    return Bounds(lower.nan_to_num(nan=-math.inf), upper.nan_to_num(nan=math.inf))
