r"""Propagation of torch's structured linear maps: interpolation, unfold, fold, cumsum, diff,
and transposed convolutions.

Copies of entries (nearest interpolation, ``F.unfold``, reflect/replicate/circular padding)
become `Gather` nodes through the index operations of the builder (Note [Index
operations] in `lipnets.propagation.builder`). Maps with weights become affine ops:
`SeparableLinear` (interpolation with weights, ``cumsum``, ``diff``: a 1-D matrix per
per-sample dim, Note [Separable interpolation] in `lipnets.functional.linear_maps`),
`PatchSum` (``F.fold``) and `ConvTranspose`. Each gives the exact $|W|$ for intervals
(Note [Interval rules] in `lipnets.propagation.ops_affine`).

# Note [Affine maps of the op table]

* `SeparableLinear`: $W = \bigotimes_d M_d$ over the dims it acts on (the identity on the
  others), so $|W| = \bigotimes_d |M_d|$ entrywise, $W^\top = \bigotimes_d M_d^\top$, the rows
  of $W$ have norms $\prod_d \|(M_d)_{i_d,:}\|$, and $\|W\| = \prod_d \|M_d\|$. The bias (the
  map at zero: ``diff``'s ``prepend``/``append`` constants) must be the same for every
  sample.
* `PatchSum` (``F.fold``): a sum of entries with weights 1, monotone; its adjoint is
  ``F.unfold`` with the same arguments (Note [Unfold and fold]); row $i$ holds one 1 per
  patch entry that lands on output $i$, so its norm is $\sqrt{\mathrm{fold}(1)_i}$.
* `ConvTranspose`: $W$ connects each (input, output) pair through at most one kernel tap
  (zero padding), so the transposed convolution with $|K|$ gives $|W|$ exactly and the one
  with $K^2$ the squared row norms. The adjoint is the convolution with the same kernel,
  stride, padding, dilation and groups, cropped to the input size (Note [Transposed
  convolution bound] in `lipnets.bounds.conv`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from lipnets.errors import UnboundedModuleError
from lipnets.functional import linear_maps as LM
from lipnets.functional.norms import spectral_norm_bound
from lipnets.graph import OpSpec, flat_nodes
from lipnets.graph import linear_maps as GM
from lipnets.propagation.ops_affine import Affine, _per_dim, held
from lipnets.propagation.rules import register_propagation

if TYPE_CHECKING:
    from lipnets.propagation.builder import Builder, Lazy

__all__ = [
    "ConvTranspose",
    "PatchSum",
    "SeparableLinear",
    "convert_map",
    "map_rule",
    "per_sample_dim",
]

_EPS64 = torch.finfo(torch.float64).eps
_OPERATOR_LIMIT = 2**24
"""Largest dense 1-D operator (entries) a `SeparableLinear` holds."""


class SeparableLinear(Affine):
    """$y = (\\bigotimes_d M_d) x + b$ with one matrix per per-sample dim it acts on
    (Note [Affine maps of the op table])."""

    def __init__(self, in_shape, out_shape, mats: dict[int, Tensor], bias: Tensor | None):
        super().__init__(in_shape, out_shape, None)
        self.mats = mats
        self.abs_mats = {d: m.abs() for d, m in mats.items()}
        first = next(iter(mats.values()))
        self.dtype, self.device = first.dtype, first.device
        self.b = bias

    @staticmethod
    def _along(x: Tensor, mats: dict[int, Tensor], transpose: bool) -> Tensor:
        for d, m in mats.items():
            x = torch.movedim(torch.movedim(x, d + 1, -1) @ (m if transpose else m.T), -1, d + 1)
        return x

    def linear(self, x: Tensor) -> Tensor:
        return self._along(x, self.mats, False)

    def abs_linear(self, r: Tensor) -> Tensor:
        return self._along(r, self.abs_mats, False)

    def adjoint(self, a: Tensor) -> Tensor:
        return self._along(a, self.mats, True)

    def bias(self) -> Tensor | None:
        return self.b

    def row_norms(self) -> Tensor | None:
        rows = torch.ones(self.out_shape, dtype=self.dtype, device=self.device)
        for d, m in self.mats.items():
            view = [1] * len(self.out_shape)
            view[d] = -1
            rows = rows * torch.linalg.vector_norm(m, dim=1).reshape(view)
        return rows

    def norm_bound(self) -> Tensor:
        """$\\prod_d \\|M_d\\|$, sound (what `lipnets.bounds` computes for the map)."""
        total = torch.ones((), dtype=torch.float64)
        for m in self.mats.values():
            total = total * spectral_norm_bound(m, name="operator") * (1 + 4 * _EPS64)
        return total


class PatchSum(Affine):
    """``F.fold``: patches summed into an image (Note [Affine maps of the op table])."""

    monotone = True

    def __init__(self, in_shape, out_shape, args: dict[str, Any], dtype, device):
        super().__init__(in_shape, out_shape, None)
        self.args = args
        self.dtype, self.device = dtype, device

    def linear(self, x: Tensor) -> Tensor:
        return F.fold(x, **self.args)

    def abs_linear(self, r: Tensor) -> Tensor:
        return self.linear(r)

    def adjoint(self, a: Tensor) -> Tensor:
        args = {k: v for k, v in self.args.items() if k != "output_size"}
        return F.unfold(a, **args)

    def row_norms(self) -> Tensor | None:
        ones = torch.ones((1, *self.in_shapes[0]), dtype=self.dtype, device=self.device)
        return self.linear(ones)[0].clamp_min(0).sqrt()

    def norm_bound(self) -> Tensor:
        args = {k: v for k, v in self.args.items() if k != "output_size"}
        size = self.args["output_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return torch.tensor(LM.copies_norm(LM.unfold_cover(**args, sizes=size)))


class ConvTranspose(Affine):
    """A transposed convolution module (Note [Affine maps of the op table])."""

    def __init__(self, in_shape, out_shape, module, weight: Tensor, bias: Tensor | None):
        super().__init__(in_shape, out_shape, module)
        self.weight = held(weight)
        self.dtype, self.device = self.weight.dtype, self.weight.device
        n = len(in_shape) - 1
        m = module
        self.n = n
        self.stride, self.padding = _per_dim(m.stride, n), _per_dim(m.padding, n)
        self.dilation, self.groups = _per_dim(m.dilation, n), m.groups
        ks = self.weight.shape[2:]
        self.extra = tuple(
            o - ((i - 1) * s - 2 * p + d * (k - 1) + 1)
            for o, i, s, p, d, k in zip(
                out_shape[1:], in_shape[1:], self.stride, self.padding, self.dilation, ks,
                strict=True,
            )
        )  # fmt: skip
        self.b_view = None if bias is None else held(bias).reshape(-1, *([1] * n))

    def _transpose(self, x: Tensor, weight: Tensor) -> Tensor:
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self.n - 1]
        return fn(
            x, weight, None, self.stride, self.padding, self.extra, self.groups, self.dilation
        )

    def linear(self, x: Tensor) -> Tensor:
        return self._transpose(x, self.weight)

    def abs_linear(self, r: Tensor) -> Tensor:
        return self._transpose(r, self.weight.abs())

    def adjoint(self, a: Tensor) -> Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.n - 1]
        g = conv(a, self.weight, None, self.stride, self.padding, self.dilation, self.groups)
        return g[(slice(None), slice(None), *(slice(0, i) for i in self.in_shapes[0][1:]))]

    def bias(self) -> Tensor | None:
        return self.b_view

    def backward(self, a: Tensor):
        bias = None
        if self.b_view is not None:
            bias = a.flatten(3).sum(-1) @ self.b_view.reshape(-1)
        return [self.backward_linear(a)], bias

    def row_norms(self) -> Tensor | None:
        ones = torch.ones((1, *self.in_shapes[0]), dtype=self.dtype, device=self.device)
        return self._transpose(ones, self.weight.square()).clamp_min(0).sqrt()[0]


@register_propagation(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_transpose(b: Builder, node: fx.Node, module: Any, source: fx.Node) -> int:
    if module.padding_mode != "zeros":
        raise b.no_rule(node, f"padding_mode={module.padding_mode!r}")
    return b.affine(
        node, source, lambda i, o: ConvTranspose(i, o, module, module.weight, module.bias)
    )


# -- the "map" kind of the op table ------------------------------------------------------

MapRule = Callable[["Builder", fx.Node], "int | Lazy"]
_MAP_RULES: dict[str, MapRule] = {}


def map_rule(*names: str) -> Callable[[MapRule], MapRule]:
    """Register the propagation rule of op-table ``"map"`` entries by name."""

    def register(rule: MapRule) -> MapRule:
        for name in names:
            _MAP_RULES[name] = rule
        return rule

    return register


def convert_map(b: Builder, node: fx.Node, spec: OpSpec) -> int | Lazy:
    """The propagation ops of a ``"map"`` node of the op table, by the entry's name."""
    rule = _MAP_RULES.get(spec.name)
    if rule is None:
        raise b.no_rule(node)
    if any(b.dependent(a) for a in flat_nodes((node.args[1:], node.kwargs))):
        raise b.no_rule(node, "an argument other than the first depends on the input")
    return rule(b, node)


def _resolve(b: Builder) -> Callable[[Any], Any]:
    return lambda arg: (
        fx.node.map_arg(arg, b.const) if isinstance(arg, (fx.Node, tuple, list)) else arg
    )


def _separable(b: Builder, node: fx.Node, mats: dict[int, Tensor]) -> int:
    """A `SeparableLinear` node, its bias measured at zero and the map checked on the batch."""
    source = node.args[0] if node.args else node.kwargs["input"]
    src = b.materialize(source, node)
    in_shape, out = b.nodes[src].shape, b.value[node]
    if not isinstance(out, Tensor) or out.dtype != b.value[source].dtype:
        raise b.no_rule(node, "it changes the dtype")
    mats = {d: m.to(device=b.x.device, dtype=b.x.dtype) for d, m in mats.items()}
    with torch.no_grad():
        zero = b.run_concrete(
            node,
            (torch.zeros_like(b.value[source]), *fx.node.map_arg(node.args[1:], b.const)),
            dict(fx.node.map_arg(node.kwargs, b.const)),
        )
    bias = None
    if bool(zero.any()):
        if not bool((zero == zero[:1]).all()):
            raise b.no_rule(node, "its constant part differs between the samples")
        bias = zero[0]
    op = SeparableLinear(in_shape, out.shape[1:], mats, bias)
    with torch.no_grad():
        got = op.apply(b.value[source])
    tol = math.sqrt(torch.finfo(out.dtype).eps) * (1 + float(out.abs().max()) if out.numel() else 1)
    if got.shape != out.shape or not bool(((got - out).abs() <= tol).all()):
        raise UnboundedModuleError(
            f"{b.where(node)}: lipnets' operator does not reproduce it (Note [Separable "
            "interpolation] in lipnets.functional.linear_maps)"
        )
    return b.add(op, [src], out.shape[1:], b.where(node))


def _check_size(b: Builder, node: fx.Node, n: int, m: int) -> None:
    if n * m > _OPERATOR_LIMIT:
        raise b.no_rule(node, f"its 1-D operator ({m} x {n}) is too large")


@map_rule("interpolate")
def _interpolate(b: Builder, node: fx.Node) -> int | Lazy:
    params = GM.interpolate_args(node, _resolve(b))
    if params.get("mode", "nearest") in ("nearest", "nearest-exact"):
        return b.index_op(node)  # copies: a Gather (Note [Index operations])
    source = node.args[0] if node.args else node.kwargs["input"]
    value = b.value[source]
    sizes = tuple(value.shape[2:])
    mats = {}
    for d in range(len(sizes)):
        _check_size(b, node, sizes[d], b.value[node].shape[2 + d])
        mats[1 + d] = LM.interpolation_operator(sizes, d, params, b.x.dtype)
    return _separable(b, node, mats)


def per_sample_dim(b: Builder, node: fx.Node, dim: Any) -> int:
    """The dim (counting the batch) an op of the node's first operand runs along, as a
    non-negative index; refused for the batch dimension."""
    source = node.args[0] if node.args else node.kwargs["input"]
    shape = b.value[source].shape
    try:
        d = GM.map_dim(node, dim, shape)
    except UnboundedModuleError as exc:
        raise b.no_rule(node, str(exc).split(": ", 1)[-1]) from exc
    assert d is not None
    return d


@map_rule("cumsum")
def _cumsum(b: Builder, node: fx.Node) -> int:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    d = per_sample_dim(b, node, b.const(dim))
    n = b.value[node].shape[d]
    _check_size(b, node, n, n)
    return _separable(b, node, {d - 1: LM.cumsum_operator(n)})


@map_rule("diff")
def _diff(b: Builder, node: fx.Node) -> int:
    order, dim, prepend, append = GM.diff_args(node, _resolve(b))
    d = per_sample_dim(b, node, dim)
    source = node.args[0] if node.args else node.kwargs["input"]
    n = b.value[source].shape[d]
    extra = [0 if t is None else int(t.shape[d]) for t in (prepend, append)]
    if order == 0:
        extra = [0, 0]
    _check_size(b, node, n, b.value[node].shape[d])
    return _separable(b, node, {d - 1: LM.diff_operator(n, order, *extra)})


@map_rule("unfold")
def _unfold(b: Builder, node: fx.Node) -> Lazy:
    """Copies: a Gather, from codes padded with NaN (constants) rather than zeros, which
    would read as the code of an entry (Note [Index operations])."""
    from lipnets.propagation.builder import Lazy

    args = GM.unfold_args(node, _resolve(b))
    source = node.args[0] if node.args else node.kwargs["input"]
    rep = b.rep[source]
    codes = rep.codes if isinstance(rep, Lazy) else b.codes(rep)
    zero = rep.zero if isinstance(rep, Lazy) else torch.zeros_like(b.value[source])
    if not isinstance(codes, Tensor):
        raise b.no_rule(node, "its input is a tuple")
    pads = args["padding"]
    ph, pw = (pads, pads) if isinstance(pads, int) else (tuple(pads) * 2)[-2:]
    padded = F.pad(codes, (pw, pw, ph, ph), value=math.nan)
    with torch.no_grad():
        out_codes = F.unfold(padded, args["kernel_size"], args["dilation"], 0, args["stride"])
        out_zero = F.unfold(zero, **args)
    return Lazy(out_codes, out_zero)


@map_rule("fold")
def _fold(b: Builder, node: fx.Node) -> int:
    args = GM.fold_args(node, _resolve(b))
    dtype, device = b.x.dtype, b.x.device
    source = node.args[0] if node.args else node.kwargs["input"]
    return b.affine(node, source, lambda i, o: PatchSum(i, o, args, dtype, device))
