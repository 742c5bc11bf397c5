r"""Local Lipschitz bounds: the l2 Lipschitz constant of a model restricted to a ball.

# Note [Local Lipschitz bound]

Let $B$ be the ball around one input and $x, y \in B$. CROWN bounds every
ReLU input $u$ by $[l, h]$ on $B$ (`lipnets.propagation.crown_bounds`). A
unit with $h \le 0$ is *stably inactive*: its output is 0 at $x$ and at $y$.
(lipnets asks for $h \le -\sqrt{\epsilon}\,(1 + |l| + |h|)$, $\epsilon$ the
dtype's machine epsilon, so that a computed bound rounded to the wrong side of 0
cannot switch a unit off.)
For every unit, $\mathrm{relu}(u(x)) - \mathrm{relu}(u(y)) = d\,(u(x) - u(y))$
with a secant slope $d \in [0, 1]$, and $d = 0$ for a stably inactive unit.

Write $\delta v = v(x) - v(y)$ for each node $v$ of the propagation graph.
lipnets computes two masks per node (per sample): $V_v$, the entries that can
vary on $B$ (so $\delta v$ is supported on $V_v$), and $R_v$, the entries
whose variation can reach the output, and a constant $K_v \ge \|P_{R_v}
\delta v\| / \|x - y\|$ ($P$ keeps the masked entries). Masks:

* $V$: all entries for the input and affine nodes; $V_{in} \wedge \neg
  \text{inactive}$ after a ReLU; picked from the inputs' masks by a `Gather`;
  the union of the inputs' masks for a sum.
* $R$: all entries for the output; the union over consumers of what each
  consumer reads: $R_c \wedge \neg \text{inactive}$ for a ReLU, the entries a
  `Gather` picks for $R_c$, $R_c$ for an elementwise sum, everything for any
  other consumer (so a node read by an affine node has $R$ = everything and
  $K_v \ge \|\delta v\| / \|x - y\|$).

Constants, each a one-line proof:

* input: $K = 1$;
* affine node $c = W v + b$: $P_{R_c} \delta c = P_{R_c} W P_{V_v} \delta v$,
  so $K_c = \|P_{R_c} W P_{V_v}\|_2 K_v$: the spectral norm of the submatrix
  of rows $R_c$ and columns $V_v$, never above $\|W\|_2$ (a dense matrix when
  it has at most $2^{22}$ entries, else the layer's global sound bound);
  batch norm is diagonal, so it is the largest $|s_i|$ over $R_c \wedge V_v$;
* ReLU: $P_{R} \delta r = D P_{R \wedge \neg\text{inactive}} \delta u$ with
  $D$ diagonal in $[0, 1]$, and $R \wedge \neg\text{inactive} \subseteq R_u$,
  so $K_r = K_u$; a `GraftedReLU` has $D_{ii} = a_i$ on its grafted entries, so
  $K_r = s K_u$ with $s$ the largest $|D_{ii}|$ over its entries that are not
  constant on the ball (Note [Grafted neurons in propagation] in
  `lipnets.propagation.ops_grafted`);
* sum $\sum_k a_k x_k$: $K = \sum_k \max|a_k| K_k$ (as $R_c \subseteq
  R_{x_k}$); `Gather`: $K = \sqrt{\sum_k m_k K_k^2}$, $m_k$ the most times an
  entry of input $k$ is picked; mean/sum over $n$ entries: $K / \sqrt{n}$ /
  $K \sqrt{n}$;
* a comparator layer (MaxMin, GroupSort, FullSort) is 1-Lipschitz: $K_y =
  K_x$. A pair whose order is fixed on $B$ is a fixed permutation, which has
  norm 1 as well, so sorting activations gain nothing here: the gain comes
  from ReLUs.

Every product, sum and square root is rounded up as in the fold (Note [Rounding
up] in `lipnets.bounds.rounding`, whose composition rules both use). The
output's $K$ bounds $\|f(x) - f(y)\| / \|x - y\|$ on $B$, so it is a sound
local constant; since each affine factor is at most the layer's norm
and the rules match those of `lipnets.bounds` otherwise, it stays below the
global bound, and the result is also capped by
[`lipschitz_bound`][lipnets.bounds.lipschitz_bound] (a minimum of two sound
bounds) so that it is never above it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lipnets.bounds import lipschitz_bound
from lipnets.bounds.rounding import div_up, mul_up, root_sum_squares, sqrt_up, weighted_sum
from lipnets.errors import UnboundedModuleError
from lipnets.functional.norms import spectral_norm_bound
from lipnets.propagation import _ops
from lipnets.propagation.checks import check_args, check_norm, session
from lipnets.propagation.graph import Graph, build
from lipnets.propagation.ops_grafted import Grafted
from lipnets.propagation.propagator import Propagator

__all__ = ["local_lipschitz"]

_DENSE_LIMIT = 2**22
"""Largest matrix (entries) formed to take the norm of its masked submatrices."""


def local_lipschitz(
    model: nn.Module, x: Tensor, eps: float | Tensor, *, norm: float | str = 2
) -> Tensor:
    r"""Sound upper bound on the l2 Lipschitz constant of a model on a ball around each input.

    The bound holds for every pair of points of the ball
    $\{x : \|x - x_0\| \le \varepsilon\}$ ($\|f(x) - f(y)\|_2 \le L
    \|x - y\|_2$). ReLUs that CROWN proves inactive on the ball are dropped
    from the weight matrices around them (Note [Local Lipschitz bound]), so
    the bound shrinks as the ball does, and it never exceeds the global bound
    [`lipnets.lipschitz_bound`][lipnets.bounds.lipschitz_bound].

    The model runs in eval mode (each submodule's mode is restored
    afterwards). Supported operations are those of
    `crown_bounds`.

    Args:
        model: an ``nn.Module`` taking one input and returning one tensor.
        x: the centres of the balls, a floating-point batch of shape
            $(N, \dots)$ with the model's dtype.
        eps: the radius, a float $\ge 0$ or a tensor of shape $(N,)$.
        norm: the norm of the ball, ``2`` or ``float("inf")``; the Lipschitz
            constant itself is always l2 to l2.

    Returns:
        A float64 CPU tensor of shape $(N,)$.

    Raises:
        TypeError: if ``model`` is not a module or ``x`` not a floating-point
            tensor, or their dtypes differ.
        ValueError: for a NaN or infinite ``x``, a negative or non-finite
            ``eps``, or an unknown ``norm``.
        UnboundedModuleError: if an operation has no propagation rule (the
            message names the node), as for `crown_bounds`.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import lipnets
        >>> from lipnets.propagation import local_lipschitz
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2)).double()
        >>> x = torch.randn(3, 4, dtype=torch.float64)
        >>> local = local_lipschitz(model, x, 1e-3)
        >>> bool((local <= lipnets.lipschitz_bound(model)).all())  # some units are off
        True

    References:
        Zhang, H., Weng, T.-W., Chen, P.-Y., Hsieh, C.-J. & Daniel, L. (2018).
        Efficient neural network robustness certification with general
        activation functions. *NeurIPS*.

        Scaman, K. & Virmaux, A. (2018). Lipschitz regularity of deep neural
        networks: analysis and efficient estimation. *NeurIPS*.
    """
    q = check_norm(norm)
    x, radius = check_args(model, x, eps)
    with session(model):
        graph = build(model, x, radius, q)
        n = x.shape[0]
        if graph.output is None:
            return torch.zeros(n, dtype=torch.float64)
        prop = Propagator(graph, x, radius, q, crown=True).run()
        local = _compose(graph, prop)
        try:
            overall = lipschitz_bound(model, input_shape=tuple(x.shape))
        except UnboundedModuleError:  # an op lipnets.bounds has no rule for: the local bound
            return local  # stands; any other error (a graph that is not the model) is raised
    return torch.minimum(local, overall)


def _compose(graph: Graph, prop: Propagator) -> Tensor:
    """The constants of Note [Local Lipschitz bound], per sample."""
    nodes = graph.nodes
    n = prop.n
    device = prop.x.device
    inactive: dict[int, Tensor] = {}
    for node in nodes:
        if isinstance(node.op, _ops.ReLU):
            lo, up = prop.lows[node.inputs[0]], prop.ups[node.inputs[0]]
            if isinstance(node.op, Grafted):  # Note [Grafted neurons in propagation]
                inactive[node.index] = node.op.inactive(lo, up)
                continue
            # Off on the ball, with room for the rounding of the computed bound.
            slack = math.sqrt(torch.finfo(up.dtype).eps) * (1 + lo.abs() + up.abs())
            inactive[node.index] = up <= -slack

    def ones(i: int) -> Tensor:
        return torch.ones((n, *nodes[i].shape), dtype=torch.bool, device=device)

    vary: list[Tensor] = []
    for node in nodes:
        op = node.op
        if isinstance(op, _ops.ReLU):
            vary.append(vary[node.inputs[0]] & ~inactive[node.index])
        elif isinstance(op, _ops.Gather):
            masks = [vary[i].to(torch.uint8) for i in node.inputs]
            vary.append(op.forward(masks).bool())
        elif isinstance(op, _ops.LinearCombination):
            mask = torch.zeros((n, *node.shape), dtype=torch.bool, device=device)
            for i in node.inputs:
                mask = mask | vary[i]
            vary.append(mask)
        else:
            vary.append(ones(node.index))

    relevant = [torch.zeros((n, *node.shape), dtype=torch.bool, device=device) for node in nodes]
    assert graph.output is not None
    relevant[graph.output] = ones(graph.output)
    for node in reversed(nodes):
        op, mask = node.op, relevant[node.index]
        if op is None:
            continue
        if isinstance(op, _ops.ReLU):
            i = node.inputs[0]
            relevant[i] = relevant[i] | (mask & ~inactive[node.index])
        elif isinstance(op, _ops.Gather):
            flat = mask.reshape(n, -1).to(torch.int32)
            for i, (where, idx) in zip(node.inputs, op.parts, strict=True):
                hits = torch.zeros((n, nodes[i].shape.numel()), dtype=torch.int32, device=device)
                hits.index_add_(1, idx, flat[:, where])
                relevant[i] = relevant[i] | (hits > 0).reshape(relevant[i].shape)
        elif isinstance(op, _ops.LinearCombination):
            for i in node.inputs:
                relevant[i] = relevant[i] | mask
        else:
            for i in node.inputs:
                relevant[i] = ones(i)

    # The constants, composed with the rules and rounding of the fold (Note [Rounding up]).
    consts: list[Tensor] = []
    for node in nodes:
        op = node.op
        ks = [consts[i] for i in node.inputs]
        if op is None:
            k: Tensor | float = 1.0
        elif isinstance(op, Grafted):  # slopes a_i on grafted entries, in [0, 1] elsewhere
            i = node.inputs[0]
            s = op.local_slope(prop.lows[i], prop.ups[i])
            k = torch.where(s == 1, ks[0], mul_up(ks[0], s))  # k * 1 is exact
        elif isinstance(op, (_ops.ReLU, _ops.Compare)):
            k = ks[0]  # a ReLU's slopes are in [0, 1]; a comparator layer is 1-Lipschitz
        elif isinstance(op, _ops.Affine):
            k = mul_up(_masked_norm(op, relevant[node.index], vary[node.inputs[0]]), ks[0])
        elif isinstance(op, _ops.Gather):
            k = root_sum_squares(ks, op.multiplicities())
        elif isinstance(op, _ops.LinearCombination):
            k = weighted_sum(op.scales(), ks)
        elif isinstance(op, _ops.Reduce):
            k = mul_up(ks[0], _reduce_factor(op))
        elif isinstance(op, _ops.Difference):
            k = mul_up(ks[0], sqrt_up(2.0))  # disjoint pairs: (a - b)^2 <= 2 a^2 + 2 b^2
        elif isinstance(op, _ops.Elementwise):
            i = node.inputs[0]  # the supremum of |f'| on the input's box, rounded up
            k = mul_up(ks[0], op.local_slope(prop.lows[i], prop.ups[i]))
        else:  # pragma: no cover - every op of _ops is listed above
            raise TypeError(f"no local rule for {type(op).__name__}")
        consts.append(torch.as_tensor(k, dtype=torch.float64).expand(n).clone())
    return consts[graph.output]


def _reduce_factor(op: _ops.Reduce) -> float:
    """The norm of a sum over ``count`` entries times ``scale`` (a mean: 1/count)."""
    if op.count and op.scale == 1.0 / op.count:  # a mean: 1/sqrt(count), not the rounded scale
        return sqrt_up(div_up(1.0, float(op.count)))
    return mul_up(abs(float(op.scale)), sqrt_up(float(op.count)))


def _masked_norm(op: _ops.Affine, rows: Tensor, cols: Tensor) -> Tensor:
    """Per sample, a sound bound on the norm of $W$ restricted to ``rows`` and ``cols``."""
    n = rows.shape[0]
    if isinstance(op, _ops.BatchNorm):
        scale = op.scale.abs().expand(rows.shape[1:]).to(torch.float64)
        both = (rows & cols).reshape(n, -1)
        picked = torch.where(both.cpu(), scale.reshape(1, -1).cpu(), torch.zeros(()))
        return picked.max(dim=1).values * (1 + 4 * torch.finfo(op.dtype).eps)
    dense = op.dense(_DENSE_LIMIT)
    if dense is None:
        return _whole_norm(op).expand(n)
    r_flat, c_flat = rows.reshape(n, -1), cols.reshape(n, -1)
    keys, inverse = torch.unique(torch.cat([r_flat, c_flat], 1), dim=0, return_inverse=True)
    m = r_flat.shape[1]
    values = torch.stack(
        [spectral_norm_bound(dense[key[:m]][:, key[m:]], name="a masked weight") for key in keys]
    )
    return values[inverse.cpu()]


def _whole_norm(op: _ops.Affine) -> Tensor:
    """The sound bound of the whole layer (what `lipnets.bounds` uses)."""
    own = getattr(op, "norm_bound", None)  # ops of lipnets.propagation.linear_maps
    if own is not None:
        return own().reshape(())
    if op.module is not None:
        return lipschitz_bound(op.module, input_shape=(1, *op.in_shapes[0])).reshape(())
    assert isinstance(op, _ops.Linear)
    return spectral_norm_bound(op.weight)
