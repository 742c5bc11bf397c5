r"""Output bounds over norm balls: interval bound propagation (IBP) and CROWN.

Both functions bound every output of a model (or every row of a linear
specification $C f$) over the ball $\{x : \|x - x_0\| \le \varepsilon\}$ around
each input $x_0$ of a batch, in the l-infinity or l2 norm. The model is traced
into a propagation graph (`lipnets.propagation.graph`): affine nodes, ReLUs,
and sorting activations rewritten as comparators of ReLUs (Note [Comparators
as ReLUs] in `lipnets.propagation.rules`). See the module docs of
`lipnets.propagation.ops_base` for the operations, Note [Interval rules] in
`lipnets.propagation.ops_affine` for their interval rules, and
`lipnets.propagation.propagator` for the passes themselves; the arguments
are checked by `lipnets.propagation.checks`.

# Note [CROWN never looser than IBP]

`crown_bounds` visits the graph in topological order. Each node first gets
interval bounds from its inputs' bounds (Note [Interval rules] in
`lipnets.propagation.ops_affine`); each input of a ReLU is then tightened by a
backward CROWN pass from that node, run only for the entries whose interval
still straddles 0 (a stable entry's relaxation is exact whatever its bounds)
and not for a node whose interval is already exact (an affine map of the
ball, Note [IBP over an l2 ball] in `lipnets.propagation.propagator`), and
the two bounds are intersected. The pass starts at the node's input with the
rows of the node's matrix (formed once, when it has at most $2^{24}$ entries)
rather than with one-hot rows.
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
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lipnets.propagation import _ops
from lipnets.propagation.checks import check_args, check_norm, check_spec, session
from lipnets.propagation.checks import check_batch as check_batch
from lipnets.propagation.graph import build
from lipnets.propagation.propagator import Propagator
from lipnets.propagation.propagator import relaxation as relaxation

__all__ = ["Bounds", "crown_bounds", "interval_bounds"]


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
    differentiable: bool = False,
) -> Bounds:
    r"""Bounds of a model's outputs over norm balls by interval bound propagation (IBP).

    Every node's value gets an interval from its inputs' intervals (Note
    [Interval rules] in `lipnets.propagation.ops_affine`); the first affine
    node of an l2 ball is bounded exactly (Note [IBP over an l2 ball] in
    `lipnets.propagation.propagator`). Fast, sound, and loose for deep
    networks: use `crown_bounds` for tighter bounds.

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
            $C f(x)$, with $C$ folded into the last affine layer when the output
            is one (Note [Specification folded into the last affine layer]), as
            CROWN-IBP does, and intersected with interval arithmetic on the output
            bounds.
        differentiable: keep autograd on, so that the bounds are differentiable with
            respect to the model's parameters (certified training,
            `lipnets.certify.training`); the values are the same.

    Returns:
        `Bounds` ``(lower, upper)``, each shaped
        like ``model(x)`` (or $(N, R)$ with a spec), in the dtype of ``x``.

    Raises:
        TypeError: if ``model`` is not a module or ``x`` not a floating-point
            tensor, or their dtypes differ.
        ValueError: for a NaN or infinite ``x``, a negative or non-finite
            ``eps``, an unknown ``norm``, or a ``spec`` of the wrong shape.
        UnboundedModuleError: if an operation has no propagation rule; the
            message names the node, e.g. ``"act (Softplus) has no
            propagation rule"``.

    Examples:
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
    return _bounds(model, x, eps, norm, spec, "ibp", differentiable)


def crown_bounds(
    model: nn.Module,
    x: Tensor,
    eps: float | Tensor,
    *,
    norm: float | str,
    spec: Tensor | None = None,
    optimize: bool | int = False,
    lr: float = 0.5,
    differentiable: bool = False,
) -> Bounds:
    r"""Bounds of a model's outputs over norm balls by backward linear relaxation (CROWN).

    Each ReLU, Tanh, Sigmoid, GELU and SiLU is bounded by two lines over the
    interval of its input (Note [ReLU relaxation] in
    `lipnets.propagation.propagator`, Note [Relaxations of smooth activations]
    in `lipnets.propagation.ops_elementwise`); a backward pass
    through the graph then gives, for each output, linear functions
    $a^\top x + c$ below and above it on the ball, whose extrema are
    $a^\top x_0 + c \mp \varepsilon \|a\|_*$ (the dual norm: $\|a\|_1$ for an
    l-infinity ball, $\|a\|_2$ for an l2 ball). The bounds of every ReLU input
    are computed the same way first, and every bound is intersected with its
    interval bound, so CROWN is never looser than `interval_bounds` (Note
    [CROWN never looser than IBP]).

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
    and ``mean`` over non-batch dimensions; Identity and Dropout (eval);
    LeakyReLU (any slope, rewritten exactly into a ReLU), Tanh, Sigmoid, GELU
    (both forms), SiLU (also ``x * torch.sigmoid(x)``), ``torch.maximum`` /
    ``minimum`` (comparators), MaxPool1d/2d/3d and AdaptiveMaxPool1d/2d/3d (tournaments of
    comparators);
    softmax, softmin and log_softmax (Note [Softmax intervals]);
    ConvTranspose1d/2d/3d, interpolation, reflect/replicate/circular
    padding, unfold/fold, ``cumsum`` and ``diff`` (Note [Affine maps of the
    op table] in `lipnets.propagation.linear_maps`). The op table with every
    op's coverage is in docs/bounds.md.

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
        optimize: α-CROWN (Note [α-CROWN] in `lipnets.propagation.alpha`): ``True`` for
            20 steps of Adam on the lower slopes of the unstable ReLUs (those of
            comparators and LeakyReLUs included), an integer for that many steps;
            ``False`` or 0 for plain CROWN. The result is never looser than CROWN.
        lr: Adam's learning rate for ``optimize`` (decayed by 0.98 per step).
        differentiable: keep autograd on, so that the bounds are differentiable with
            respect to the model's parameters (not with ``optimize``).

    Returns:
        `Bounds` ``(lower, upper)``, each shaped
        like ``model(x)`` (or $(N, R)$ with a spec), in the dtype of ``x``.

    Raises:
        TypeError: if ``model`` is not a module or ``x`` not a floating-point
            tensor, or their dtypes differ.
        ValueError: for a NaN or infinite ``x``, a negative or non-finite
            ``eps``, an unknown ``norm``, or a ``spec`` of the wrong shape.
        UnboundedModuleError: if an operation has no propagation rule; the
            message names the node, e.g. ``"act (Softplus) has no
            propagation rule"``.
        UntraceableModelError: if torch.fx cannot trace the model, or the
            traced graph does not compute what the model computes.

    Examples:
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
    steps = check_steps(optimize, lr, differentiable)
    return _bounds(model, x, eps, norm, spec, "crown", differentiable, steps, lr)


def spec_interval(spec: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """Bounds (N, R) of C f by interval arithmetic from bounds (N, M) of f."""
    pos, neg = spec.clamp_min(0), spec.clamp_max(0)
    lo = (pos * lower.unsqueeze(1) + neg * upper.unsqueeze(1)).sum(-1)
    up = (pos * upper.unsqueeze(1) + neg * lower.unsqueeze(1)).sum(-1)
    return lo, up


def _bounds(
    model: nn.Module,
    x: Tensor,
    eps: object,
    norm: object,
    spec: Tensor | None,
    mode: str,
    differentiable: bool = False,
    steps: int = 0,
    lr: float = 0.5,
) -> Bounds:
    """The bounds of ``mode`` "ibp", "crown-ibp" (IBP intermediate bounds, a CROWN pass from
    the output) or "crown" (``steps`` > 0: then optimised, Note [α-CROWN])."""
    if not isinstance(differentiable, bool):
        raise TypeError(f"differentiable must be True or False, got {differentiable!r}")
    q = check_norm(norm)
    x, radius = check_args(model, x, eps)
    with session(model, grad=True) if differentiable else session(model):
        graph = build(model, x, radius, q)
        n = x.shape[0]
        out = graph.output
        out_shape = graph.output_value.shape if out is None else (n, *graph.nodes[out].shape)
        m = math.prod(out_shape[1:])
        matrix = None if spec is None else check_spec(spec, n, m, x.dtype, x.device)
        if graph.output is None:
            value = graph.output_value.to(x.dtype)
            if matrix is None:
                return Bounds(value.clone(), value.clone())
            flat = value.reshape(n, -1)
            lo, up = spec_interval(matrix, flat, flat)
            return Bounds(lo, up)
        crown = mode != "ibp"
        # Note [Relaxation variants] in lipnets.propagation.propagator: one pass per variant
        variants = max((getattr(nd.op, "variants", 1) for nd in graph.nodes), default=1)
        props = [
            Propagator(graph, x, radius, q, crown, v, tighten=mode == "crown")
            for v in range(variants if crown else 1)
        ]
        lo = up = s_lo = s_up = None
        for prop in props:
            prop.run()
            p_lo, p_up = prop.lows[out].reshape(n, -1), prop.ups[out].reshape(n, -1)
            if crown:
                eye = torch.eye(m, dtype=x.dtype, device=x.device).expand(n, m, m)
                c_lo, c_up = prop.linear_bounds(out, eye)
                p_lo, p_up = torch.fmax(p_lo, c_lo), torch.fmin(p_up, c_up)
            lo, up = _meet(lo, up, p_lo, p_up)
            if matrix is None:
                continue
            folded = _folded_spec(prop, out, matrix)
            if folded is not None:  # Note [Specification folded into the last affine layer]
                s_lo, s_up = _meet(s_lo, s_up, *folded)
            if crown:
                s_lo, s_up = _meet(s_lo, s_up, *prop.linear_bounds(out, matrix))
        assert lo is not None and up is not None
        if mode == "crown":
            # Plain IBP too: in floating point the tightened intervals can round a hair
            # outside IBP's (Note [CROWN never looser than IBP]).
            ibp = Propagator(graph, x, radius, q, crown=False).run()
            lo, up = _meet(lo, up, ibp.lows[out].reshape(n, -1), ibp.ups[out].reshape(n, -1))
        if steps:  # Note [α-CROWN] in lipnets.propagation.alpha
            from lipnets.propagation.alpha import optimized_bounds

            rows = torch.eye(m, dtype=x.dtype, device=x.device).expand(n, m, m)
            a_lo, a_up, _ = optimized_bounds(
                props, out, rows if matrix is None else matrix, steps, lr
            )
            if matrix is None:
                lo, up = _meet(lo, up, a_lo, a_up)
            else:
                s_lo, s_up = _meet(s_lo, s_up, a_lo, a_up)
        if matrix is None:
            return _finite_or_infinite(lo.reshape(out_shape), up.reshape(out_shape))
        s_lo, s_up = _meet(s_lo, s_up, *spec_interval(matrix, lo, up))
        assert s_lo is not None and s_up is not None
        return _finite_or_infinite(s_lo, s_up)


def check_steps(optimize: object, lr: object, differentiable: object) -> int:
    """The number of α-CROWN steps from ``optimize``, with ``lr`` checked."""
    if isinstance(optimize, bool):
        steps = 20 if optimize else 0
    elif isinstance(optimize, int) and optimize >= 0:
        steps = optimize
    else:
        raise ValueError(
            f"optimize must be True, False or a number of steps >= 0, got {optimize!r}"
        )
    if steps:
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if differentiable:
            raise ValueError("optimize and differentiable=True cannot be combined")
    return steps


def _meet(
    lo: Tensor | None, up: Tensor | None, new_lo: Tensor, new_up: Tensor
) -> tuple[Tensor, Tensor]:
    """The intersection of two sound bounds (the first may be absent); NaN never wins."""
    if lo is None or up is None:
        return new_lo, new_up
    return torch.fmax(lo, new_lo), torch.fmin(up, new_up)


# Note [Specification folded into the last affine layer]
# When the output node is affine, $f = W h + b$ with $h$ its input, the rows of the
# specification are linear in $h$: $C f = (C W) h + C b$. Bounding $(C W) h$ over the box of
# $h$ (or, when $h$ is the input itself, over the ball: $(C W) x_0 \pm \varepsilon \|(C
# W)_{r,:}\|_*$) is exact for the box, whereas bounding $f$ first and then $C f$ by interval
# arithmetic adds up the slack of every output a row touches; for a margin $f_y - f_j$ the
# folded bound is the one CROWN-IBP (Zhang et al., 2020) and auto_LiRPA's IBP with ``C=``
# compute. Both are sound, so the two are intersected: never looser than before.


def _folded_spec(prop: Propagator, out: int, matrix: Tensor) -> tuple[Tensor, Tensor] | None:
    """Bounds (N, R) of ``matrix`` times the output, folded into the output's affine op
    (Note [Specification folded into the last affine layer]), or None when it is not one."""
    node = prop.nodes[out]
    if not isinstance(node.op, _ops.Affine) or len(node.inputs) != 1:
        return None
    n, r = matrix.shape[:2]
    (coeffs,), bias = node.op.backward(matrix.reshape(n, r, *node.shape))
    if coeffs is None:
        return None
    flat = coeffs.reshape(n, r, -1)
    bias = flat.new_zeros((n, r)) if bias is None else bias
    source = node.inputs[0]
    if prop.nodes[source].op is None:  # the input: the ball itself
        dual = 1.0 if prop.norm == math.inf else 2.0
        centre = torch.bmm(flat, prop.x.reshape(n, -1, 1)).squeeze(2) + bias
        spread = prop.eps.reshape(n, 1) * torch.linalg.vector_norm(flat, ord=dual, dim=-1)
        return centre - spread, centre + spread
    # centre and radius, as the interval rules of affine ops (Note [Interval rules]); the
    # centre's image C (W c + b) is a product with the small spec, not with C W
    half_lo, half_up = prop.lows[source] / 2, prop.ups[source] / 2
    mid = node.op.apply(half_lo + half_up).reshape(n, -1, 1)
    centre = torch.bmm(matrix.to(mid.dtype), mid).squeeze(2)
    spread = torch.bmm(flat.abs(), (half_up - half_lo).reshape(n, -1, 1)).squeeze(2)
    return centre - spread, centre + spread


def _finite_or_infinite(lower: Tensor, upper: Tensor) -> Bounds:
    """NaN bounds (an overflow, inf - inf) become the trivial -inf and +inf."""
    return Bounds(lower.nan_to_num(nan=-math.inf), upper.nan_to_num(nan=math.inf))
