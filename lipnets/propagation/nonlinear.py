r"""Builder rules for the nonlinear ops: activations, ``torch.maximum``/``minimum``, max pooling.

`convert_elementwise` turns an activation (function, method or module: the
same rule for every spelling) into an `Elementwise` node, or LeakyReLU into a
ReLU and an affine node (Note [LeakyReLU as a ReLU] in
`lipnets.propagation.ops_elementwise`); `convert_maxmin` and `convert_max_pool`
write maxima as comparators (Note [Maxima as comparators]).

# Note [Maxima as comparators]

$\max(a, b) = b + \mathrm{relu}(a - b)$ and $\min(a, b) = a - \mathrm{relu}(a -
b)$ are one comparator of Note [Comparators as ReLUs] in
`lipnets.propagation.rules`. For ``torch.maximum(a, b)`` (or ``minimum``,
``fmax``, ``fmin``: the same on the finite values a propagation meets) of two
input-dependent tensors, both operands, broadcast to the output's shape, are
concatenated by a `Gather` into one flat node $c = (a, b)$; one comparator
layer on the disjoint pairs $(c_i, c_{M + i})$ puts $\min(a_i, b_i)$ at $i$
and $\max(a_i, b_i)$ at $M + i$, and a last `Gather` picks the half asked
for. With a constant $c$, $\max(x, c) = c + \mathrm{relu}(x - c)$ and $\min(x,
c) = c - \mathrm{relu}(c - x)$: an affine node, a ReLU and an affine node,
whose interval is exact (each is nondecreasing in $x$).

Max pooling (``nn.MaxPool1d/2d/3d``, any kernel, stride, padding, dilation
and ``ceil_mode``): along each pooled dim, output $o$ reads the positions $o
s - p + j d$, $j < k$, that lie in $[0, L)$; the others are torch's implicit
$-\infty$ padding, which never wins a maximum, so they are left out (a
window with no position left is refused). Adaptive max pooling
(``nn.AdaptiveMaxPool1d/2d/3d``) reads, for $O$ outputs along a dim of size
$L$, the positions $\lfloor o L / O \rfloor \le i < \lceil (o + 1) L / O
\rceil$, torch's windows. The functional forms (``F.max_pool2d``, ...) are
these modules (Note [Functional calls as modules] in `lipnets.graph.ops`).
The positions of every window are gathered into one flat node (an entry in
several windows, when the stride is below the kernel, or adaptive windows
overlap, is copied into each), so that each window owns its
candidates. Then a tournament: each round compares the candidates of every
window in pairs, $(1, 2), (3, 4), \dots$, by one comparator layer (the pairs
are disjoint, as each candidate belongs to one window and one pair); the
maximum of each pair stays in the window, an odd last candidate waits for
the next round; after $\lceil \log_2 K \rceil$ rounds for windows of $K$
entries a `Gather` picks each window's survivor. A comparator's interval is
exact for a box (`lipnets.propagation.ops_compare.Compare`), so interval
bounds of a max pool are exact, and CROWN relaxes each comparator's ReLU.
Every rewrite is checked against the model (Note [Graph checked on the
balls] in `lipnets.propagation.graph`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx, nn

from lipnets.propagation import _ops

if TYPE_CHECKING:
    from lipnets.propagation.builder import Builder

__all__ = ["convert_elementwise", "convert_max_pool", "convert_maxmin", "function_params"]

_SMOOTH = {"tanh": _ops.Tanh, "sigmoid": _ops.Sigmoid, "silu": _ops.SiLU}
_POOL_DIMS = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}  # fmt: skip
_ADAPTIVE = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def function_params(b: Builder, node: fx.Node, name: str) -> dict[str, Any]:
    """The parameters of an activation's function or method node (constants only)."""
    names = {"leaky_relu": ("negative_slope", 0.01), "gelu": ("approximate", "none")}
    if name not in names:
        return {}
    key, default = names[name]
    arg = node.kwargs.get(key, node.args[1] if len(node.args) > 1 else default)
    if b.dependent(arg):
        raise b.no_rule(node, f"its {key} depends on the input")
    return {key: b.const(arg)}


def convert_elementwise(
    b: Builder, node: fx.Node, source: Any, name: str, params: dict[str, Any]
) -> int:
    if name == "relu":
        return b.relu(node, source)
    if name == "leaky_relu":
        return _leaky_relu(b, node, source, params.get("negative_slope", 0.01))
    if name == "gelu":
        approximate = params.get("approximate", "none")
        if approximate not in ("none", "tanh"):
            raise b.no_rule(node, f"approximate must be 'none' or 'tanh', got {approximate!r}")
        make: Any = lambda shape: _ops.GELU([shape], shape, approximate)  # noqa: E731
    elif name in _SMOOTH:
        make = lambda shape: _SMOOTH[name]([shape], shape)  # noqa: E731
    else:
        raise b.no_rule(node)
    src = b.materialize(source, node)
    shape = b.nodes[src].shape
    return b.add(make(shape), [src], shape, b.where(node))


def _leaky_relu(b: Builder, node: fx.Node, source: Any, slope: Any) -> int:
    """Note [LeakyReLU as a ReLU]."""
    if isinstance(slope, Tensor) and slope.numel() == 1:
        slope = slope.item()
    if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not math.isfinite(slope):
        raise b.no_rule(node, f"its negative_slope is not a finite number: {slope!r}")
    src = b.materialize(source, node)
    a = float(slope)
    if a == 1.0:
        return src
    shape = b.nodes[src].shape
    where = b.where(node)
    relu = b.add(_ops.ReLU([shape], shape, leak=a), [src], shape, where)
    if a == 0.0:
        return relu
    return b.add(_ops.LeakyCombination(shape, a), [src, relu], shape, where)


def convert_maxmin(b: Builder, node: fx.Node, name: str) -> int:
    """``torch.maximum``/``minimum`` (and ``fmax``/``fmin``): Note [Maxima as comparators]."""
    out = b.value[node]
    if not isinstance(out, Tensor) or len(node.args) + len(node.kwargs) != 2:
        raise b.no_rule(node, "it takes other arguments than two tensors")
    first = node.args[0] if node.args else node.kwargs.get("input")
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    take_max = name == "maximum"
    where = b.where(node)
    shape = out.shape[1:]
    if b.dependent(first) and b.dependent(other):
        a, c = _as_output(b, node, first, out), _as_output(b, node, other, out)
        if a == c:
            return a
        m = shape.numel()
        device = b.x.device
        positions = torch.arange(m, device=device)
        source = torch.cat([torch.zeros_like(positions), torch.ones_like(positions)])
        table = torch.stack([positions, positions + m], dim=1)
        valid = torch.ones_like(table, dtype=torch.bool)
        return _tournament(
            b, where, [a, c], source, positions.repeat(2), table, valid, shape, take_max
        )
    x, constant = (first, other) if b.dependent(first) else (other, first)
    src = _as_output(b, node, x, out)
    value = b.coefficient(node, b.const(constant), out)
    c = value if isinstance(value, Tensor) else torch.full_like(out, value)
    sign = 1.0 if take_max else -1.0
    # max: c + relu(x - c); min: c - relu(c - x)
    diff = b.add(_ops.LinearCombination([shape], shape, [sign], -sign * c), [src], shape, where)
    relu = b.add(_ops.ReLU([shape], shape), [diff], shape, where)
    return b.add(_ops.LinearCombination([shape], shape, [sign], c), [relu], shape, where)


def _as_output(b: Builder, node: fx.Node, operand: fx.Node, out: Tensor) -> int:
    if b.shape_of(operand) != out.shape:
        return b.broadcast(node, operand, out.shape)
    return b.materialize(operand, node)


def convert_max_pool(b: Builder, node: fx.Node, source: Any, module: nn.Module) -> int:
    """``nn.MaxPool1d/2d/3d`` and ``nn.AdaptiveMaxPool1d/2d/3d``: Note [Maxima as comparators]."""
    dims = next((n for cls, n in _POOL_DIMS.items() if isinstance(module, cls)), None)
    if dims is None or getattr(module, "return_indices", False):
        raise b.no_rule(node, "it returns the indices of the maxima (return_indices=True)")
    src = b.materialize(source, node)
    in_shape, out_shape = b.nodes[src].shape, b.value[node].shape[1:]
    if len(in_shape) < dims or len(out_shape) != len(in_shape):
        raise b.no_rule(node, f"it pools {dims} dims of a sample of shape {tuple(in_shape)}")
    device = b.x.device
    # Per pooled dim: the input position of offset j of output o, and whether it is inside.
    flat = torch.zeros((1, 1), dtype=torch.long, device=device)
    valid = torch.ones((1, 1), dtype=torch.bool, device=device)
    for d in range(dims):
        size, outs = in_shape[len(in_shape) - dims + d], out_shape[len(out_shape) - dims + d]
        pos, inside = _windows(module, d, dims, size, outs, device)  # (outs, k) each
        # windows (W, K) x (outs, k) -> (W * outs, K * k), row-major in both
        flat = (flat.unsqueeze(1).unsqueeze(3) * size + pos.unsqueeze(0).unsqueeze(2)).reshape(
            flat.shape[0] * outs, -1
        )
        valid = (valid.unsqueeze(1).unsqueeze(3) & inside.unsqueeze(0).unsqueeze(2)).reshape(
            valid.shape[0] * outs, -1
        )
    spatial = math.prod(in_shape[len(in_shape) - dims :])
    lead = math.prod(in_shape[: len(in_shape) - dims])
    if tuple(out_shape[: len(out_shape) - dims]) != tuple(in_shape[: len(in_shape) - dims]):
        raise b.no_rule(node, "its output does not keep the leading dims of its input")
    offsets = (torch.arange(lead, device=device) * spatial).reshape(-1, 1, 1)
    flat = (flat.unsqueeze(0) + offsets).reshape(-1, flat.shape[1])
    valid = valid.unsqueeze(0).expand(lead, -1, -1).reshape(-1, valid.shape[1])
    if bool((~valid.any(1)).any()):
        raise b.no_rule(node, "a pooling window holds padding only")
    # Each window's valid positions first, then numbered in one flat node of candidates.
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    flat, valid = flat.gather(1, order), valid.gather(1, order)
    number = (torch.cumsum(valid.reshape(-1), 0) - 1).reshape(valid.shape)
    table = torch.where(valid, number, torch.zeros_like(number))
    index = flat[valid]
    source_ids = torch.zeros_like(index)
    return _tournament(
        b, b.where(node), [src], source_ids, index, table, valid, out_shape, take_max=True
    )


def _windows(
    module: nn.Module, d: int, dims: int, size: int, outs: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The input positions (outs, k) of each output's window along pooled dim ``d``, and
    which of them lie inside the input (Note [Maxima as comparators])."""
    o = torch.arange(outs, device=device).unsqueeze(1)
    if isinstance(module, _ADAPTIVE):
        # torch's adaptive windows: [floor(o L / O), ceil((o + 1) L / O))
        start = (o * size) // outs
        end = -((-(o + 1) * size) // outs)
        j = torch.arange(int((end - start).max()), device=device).unsqueeze(0)
        return start + j, start + j < end
    kernel, stride, padding, dilation = (
        _tuple(getattr(module, attr), dims)[d]
        for attr in ("kernel_size", "stride", "padding", "dilation")
    )
    j = torch.arange(kernel, device=device).unsqueeze(0)
    pos = o * stride - padding + j * dilation
    return pos, (pos >= 0) & (pos < size)


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)
    return (int(value),) * dims


def _tournament(
    b: Builder,
    where: str,
    inputs: list[int],
    source: Tensor,
    index: Tensor,
    table: Tensor,
    valid: Tensor,
    out_shape: torch.Size,
    take_max: bool,
) -> int:
    """The max (or min) of each window of candidates (Note [Maxima as comparators]).

    The candidates are entry ``index[t]`` of ``inputs[source[t]]``, gathered into one
    flat node; row ``w`` of ``table`` lists window ``w``'s candidates (valid ones
    first, as marked by ``valid``); window ``w`` is output entry ``w``.
    """
    count = index.numel()
    flat = torch.Size([count])
    gather = _ops.Gather([b.nodes[i].shape for i in inputs], flat, source, index, None)
    current = b.add(gather, inputs, flat, where)
    while table.shape[1] > 1:
        half = table.shape[1] // 2
        first, second = table[:, 0 : 2 * half : 2], table[:, 1 : 2 * half : 2]
        paired = valid[:, 1 : 2 * half : 2]  # the valid entries come first in each row
        lo, hi = first[paired], second[paired]
        if lo.numel() == 0:
            break
        pairs = torch.Size([lo.numel()])
        diff = b.add(_ops.Difference(flat, pairs, 0, lo, hi), [current], pairs, where)
        relu = b.add(_ops.ReLU([pairs], pairs), [diff], pairs, where)
        current = b.add(_ops.Compare(flat, 0, lo, hi), [current, relu], flat, where)
        survivor = torch.where(paired, second if take_max else first, first)
        kept = valid[:, 0 : 2 * half : 2]
        if table.shape[1] % 2:
            survivor = torch.cat([survivor, table[:, -1:]], 1)
            kept = torch.cat([kept, valid[:, -1:]], 1)
        table, valid = survivor, kept
    picks = table[:, 0]
    op = _ops.Gather([flat], out_shape, torch.zeros_like(picks), picks, None)
    return b.add(op, [current], out_shape, where)
