"""The one op table: every torch function and Tensor method the tracer can meet, classified once.

Each consumer of a traced graph (the Lipschitz fold in `lipnets.bounds`, the
propagation graph of `lipnets.propagation`) reads the same `OpSpec` for a node
from `classify` and decides what that kind means for it; an op that is not in
the table has no rule anywhere. In-place spellings (``x.add_``,
``operator.iadd``, ``F.relu(x, inplace=True)``) classify as their out-of-place
op with ``inplace=True``, so the faithfulness rule for them is written once
(`lipnets.graph.trace`).

Kinds:

* ``"copy"``: the output's entries are entries of the first operand, each used
  at most once (reshapes, permutations, basic slicing, ``split``);
* ``"replicate"``: entries of the first operand copied (``expand``,
  ``repeat``, ``tile``): each entry used ``numel(out) / numel(in)`` times;
* ``"getitem"``: indexing (advanced indices may repeat entries);
* ``"cat"``: concatenation or stacking of a sequence of tensors;
* ``"pad"``: ``F.pad`` (``mode`` decides; ``slope`` is its `MapBound`, Note [Padding copies]
  in `lipnets.functional.linear_maps`);
* ``"alias"``: the same values (``clone``, ``detach``, floating casts);
* ``"cast"``: a cast to a non-floating dtype (rounds: refused);
* ``"elementwise"``: a scalar function applied entrywise, with the supremum of
  its slope in ``slope`` (a number, or a function of the node for slopes given
  as arguments);
* ``"map"``: any other map of its first operand alone (softmax, ``cumsum``,
  interpolation, ``unfold``, ...): ``slope`` is a `MapBound`, the map's
  Lipschitz constant computed from its constant arguments and the operand's
  shape; each consumer decides separately whether it can propagate the op
  (by ``name``);
* ``"compare"``: ``<``, ``<=``, ``>``, ``>=`` (a mask: a step function, accepted only as the
  condition of ``torch.where``, Note [Where with a comparison] in `lipnets.bounds.where_rule`);
* ``"where"``: ``torch.where(condition, a, b)`` and ``a.where(condition, b)``;
* ``"sort"``: the sorting activations of `lipnets.functional`;
* ``"add"``, ``"sub"``, ``"mul"``, ``"div"``, ``"neg"``, ``"pos"``: arithmetic;
* ``"maxmin"``: ``torch.maximum``/``minimum`` and ``fmax``/``fmin``;
* ``"clamp"``: ``clamp``/``clip`` (bounds may be tensors that broadcast);
* ``"reduce"``: ``sum``/``mean``;
* ``"linear"``: ``F.linear``;
* ``"conv"``: ``F.conv1d``/``conv2d``/``conv3d`` (Note [Functional convolutions] in
  `lipnets.graph.conv_calls`: torch.nn's rules applied to a stand-in module);
* ``"fill"``: values that do not depend on the input's values (``zeros_like``),
  or only on a fill operand (``full_like``, ``new_full``);
* ``"dropout"``: ``F.dropout`` and friends (random when ``training``);
* ``"random"``: random draws or uninitialised memory (refused: a graph would
  freeze one draw).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

import lipnets.functional as LF
from lipnets.functional import activation_slopes as AS
from lipnets.graph import linear_maps as GM
from lipnets.graph import normalize_map as NM
from lipnets.graph import softmax_maps as SM

__all__ = [
    "META_ATTRS",
    "META_METHODS",
    "TRACED_TORCH_MODULES",
    "MapBound",
    "OpSpec",
    "classify",
    "first_operand",
    "operand",
]

MapBound = Callable[[fx.Node, Callable[[Any], Any], "torch.Size | None"], float]
"""The constant of a ``"map"`` op: ``bound(node, resolve, shape)``, where ``resolve(arg)``
returns the value of an argument that does not depend on the input and ``shape`` is the
first operand's shape, batch dimension included (None without ``input_shape``). It raises
`lipnets.errors.ShapeRequiredError` when the constant needs the shape, and
`lipnets.errors.UnboundedModuleError` when the arguments make the map non-Lipschitz."""


def _circular_pad(module: nn.Module, input: torch.Tensor) -> torch.Tensor:
    return F.pad(input, module.padding, "circular")


TRACED_TORCH_MODULES: dict[type[nn.Module], Callable[..., Any] | None] = {
    # linear maps: F.interpolate, F.pad (reflect, replicate, circular), F.unfold, F.fold
    nn.Upsample: None, nn.UpsamplingNearest2d: None, nn.UpsamplingBilinear2d: None,
    nn.ReflectionPad1d: None, nn.ReflectionPad2d: None, nn.ReflectionPad3d: None,
    nn.ReplicationPad1d: None, nn.ReplicationPad2d: None, nn.ReplicationPad3d: None,
    nn.CircularPad1d: _circular_pad, nn.CircularPad2d: _circular_pad,
    nn.CircularPad3d: _circular_pad, nn.Unfold: None, nn.Fold: None,
    # activations: F.gelu, F.silu, F.mish, F.hardswish, F.selu, the softmax family
    nn.GELU: None, nn.SiLU: None, nn.Mish: None, nn.Hardswish: None, nn.SELU: None,
    nn.Softmax: None, nn.Softmin: None, nn.LogSoftmax: None,
}  # fmt: skip
"""torch.nn classes that are traced into rather than kept as leaves when no rule is
registered for them: each one's ``forward`` is one call of a function this table
classifies (``nn.GELU`` calls ``F.gelu``), so the function's entry is the one rule for
both spellings. The value is None when the tracer follows ``forward`` itself, or the
functional call ``form(module, *args)`` it records instead, where ``forward`` also checks
its input in Python (``CircularPad2d`` branches on ``input.dim()``, which fx cannot
trace; the eager forward still checks it, and the faithfulness check compares the graph
with it)."""


@dataclass(frozen=True)
class OpSpec:
    """What one graph op is, for every consumer of a traced graph."""

    kind: str
    name: str = ""
    """The op's canonical name within its kind (``"relu"``, ``"mean"``, ``"add"``)."""
    slope: float | Callable[[fx.Node], float] | MapBound | None = None
    """For ``"elementwise"``: the supremum of the slope (Lipschitz constant), a number or
    a function of the node; for ``"map"``: a `MapBound`."""
    inplace: bool = False
    operand: Any = None
    """For an ``"elementwise"`` entry recognised from a pattern, the node it applies to
    (``u * torch.sigmoid(u)`` is ``silu(u)``: Note [Recognised patterns]); None for the
    first operand."""


def _arg(node: fx.Node, name: str, position: int, default: Any) -> Any:
    return node.kwargs.get(name, node.args[position] if len(node.args) > position else default)


def _leaky(node: fx.Node) -> float:
    return max(1.0, abs(float(_arg(node, "negative_slope", 1, 0.01))))


def _elu(node: fx.Node) -> float:
    return max(1.0, abs(float(_arg(node, "alpha", 1, 1.0))))


def _gelu(node: fx.Node) -> float:
    approximate = _arg(node, "approximate", 1, "none")
    slopes = {"none": AS.GELU_SLOPE, "tanh": AS.GELU_TANH_SLOPE}
    if approximate not in slopes:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return slopes[approximate]


def _celu(node: fx.Node) -> float:
    alpha = float(_arg(node, "alpha", 1, 1.0))
    if not alpha > 0:  # Note [Maximal slopes of activations]
        raise ValueError(f"CELU(alpha={alpha}) is not Lipschitz: alpha must be > 0")
    return AS.CELU_SLOPE


_COPY = {
    "reshape", "view", "flatten", "unflatten", "permute", "transpose", "t", "squeeze",
    "unsqueeze", "movedim", "moveaxis", "swapaxes", "swapdims", "flip", "roll", "narrow",
    "select", "split", "chunk", "unbind", "tensor_split", "view_as", "reshape_as",
    "pixel_shuffle", "pixel_unshuffle",
}  # fmt: skip
_REPLICATE = {"expand", "expand_as", "repeat", "tile", "broadcast_to"}
_ALIAS = {
    "clone", "detach", "contiguous", "to", "float", "double", "half", "bfloat16", "type",
    "type_as", "cpu", "cuda",
}  # fmt: skip
_INTEGER_CASTS = {"long", "int", "short", "char", "byte", "bool"}
_ELEMENTWISE: dict[str, float | Callable[[fx.Node], float]] = {
    "relu": 1.0, "tanh": 1.0, "abs": 1.0, "absolute": 1.0, "relu6": 1.0, "hardtanh": 1.0,
    "softsign": 1.0, "logsigmoid": 1.0, "tanhshrink": 1.0, "softshrink": 1.0,
    "sigmoid": 0.25, "hardsigmoid": 1.0 / 6.0, "leaky_relu": _leaky, "elu": _elu,
    "gelu": _gelu, "silu": AS.SILU_SLOPE, "mish": AS.MISH_SLOPE, "selu": AS.SELU_SLOPE,
    "hardswish": AS.HARDSWISH_SLOPE, "celu": _celu,
}  # fmt: skip
_SOFTMAX = {
    "softmax": SM.softmax_bound, "softmin": SM.softmax_bound,
    "log_softmax": SM.log_softmax_bound, "logsumexp": SM.logsumexp_bound,
}  # fmt: skip
_MAP_METHODS = {"cumsum": GM.cumsum_bound, "diff": GM.diff_bound, **_SOFTMAX}
_COMPARE = {"gt": "gt", "greater": "gt", "ge": "ge", "greater_equal": "ge", "lt": "lt"}
_COMPARE.update({"less": "lt", "le": "le", "less_equal": "le"})
_ARITH = {"add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "neg"}
_ARITH_NAME = {"subtract": "sub", "multiply": "mul", "divide": "div", "true_divide": "div"}
_ARITH_NAME.update({"negative": "neg"})
_RANDOM_METHODS = {
    "uniform_", "normal_", "bernoulli", "bernoulli_", "random_", "exponential_",
    "geometric_", "cauchy_", "log_normal_", "multinomial", "new_empty", "new_empty_strided",
}  # fmt: skip
_FILL_METHODS = {"new_zeros": "zeros", "new_ones": "ones", "new_full": "full"}
META_METHODS = frozenset(
    {"size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous"}
)
"""Tensor methods whose result is shape metadata, not tensor data."""
META_ATTRS = frozenset(
    {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
)  # fmt: skip
"""Tensor attributes that are metadata."""


def _method_spec(name: str) -> OpSpec | None:
    if name in _COPY:
        return OpSpec("copy", name)
    if name in _REPLICATE:
        return OpSpec("replicate", name)
    if name in _ALIAS:
        return OpSpec("alias", name)
    if name in _INTEGER_CASTS:
        return OpSpec("cast", name)
    if name in _ELEMENTWISE:
        return OpSpec("elementwise", name, _ELEMENTWISE[name])
    if name in _ARITH or name == "negative":
        return OpSpec(_ARITH_NAME.get(name, name), name)
    if name in ("maximum", "minimum", "fmax", "fmin"):
        return OpSpec("maxmin", name)
    if name in ("clamp", "clip", "clamp_min", "clamp_max"):
        return OpSpec("clamp", name)
    if name in ("sum", "mean"):
        return OpSpec("reduce", name)
    if name in _FILL_METHODS:
        return OpSpec("fill", _FILL_METHODS[name])
    if name in _MAP_METHODS:
        return OpSpec("map", name, _MAP_METHODS[name])
    if name in _COMPARE:
        return OpSpec("compare", _COMPARE[name])
    if name == "where":
        return OpSpec("where", "where")
    if name == "__getitem__":
        return OpSpec("getitem")
    return None


_FUNCTIONS: dict[Any, OpSpec] = {}


def _add(kind: str, name: str, *targets: Any, slope: Any = None) -> None:
    for target in targets:
        _FUNCTIONS[target] = OpSpec(kind, name, slope)


for _name in sorted(_COPY - {"view", "view_as", "reshape_as", "pixel_shuffle", "pixel_unshuffle"}):
    if hasattr(torch, _name):
        _add("copy", _name, getattr(torch, _name))
_add("copy", "pixel_shuffle", F.pixel_shuffle, torch.pixel_shuffle)
_add("copy", "pixel_unshuffle", F.pixel_unshuffle, torch.pixel_unshuffle)
_add("replicate", "tile", torch.tile)
_add("replicate", "broadcast_to", torch.broadcast_to)
_add("getitem", "getitem", operator.getitem)
_add("cat", "cat", torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack)
_add("cat", "cat", torch.vstack)
_add("pad", "pad", F.pad, slope=GM.pad_bound)
_add("map", "interpolate", F.interpolate, slope=GM.interpolate_bound)
_add("map", "unfold", F.unfold, slope=GM.unfold_bound)
_add("map", "fold", F.fold, slope=GM.fold_bound)
_add("map", "cumsum", torch.cumsum, slope=GM.cumsum_bound)
_add("map", "diff", torch.diff, slope=GM.diff_bound)
_add("compare", "gt", operator.gt, torch.gt, torch.greater)
_add("compare", "ge", operator.ge, torch.ge, torch.greater_equal)
_add("compare", "lt", operator.lt, torch.lt, torch.less)
_add("compare", "le", operator.le, torch.le, torch.less_equal)
_add("where", "where", torch.where)
_add("alias", "clone", torch.clone)
_add("alias", "detach", torch.detach)
_add("elementwise", "relu", torch.relu, F.relu, slope=1.0)
_add("elementwise", "tanh", torch.tanh, F.tanh, slope=1.0)
_add("elementwise", "abs", torch.abs, torch.absolute, slope=1.0)
_add("elementwise", "relu6", F.relu6, slope=1.0)
_add("elementwise", "hardtanh", F.hardtanh, slope=1.0)
_add("elementwise", "softsign", F.softsign, slope=1.0)
_add("elementwise", "logsigmoid", F.logsigmoid, slope=1.0)
_add("elementwise", "tanhshrink", F.tanhshrink, slope=1.0)
_add("elementwise", "softshrink", F.softshrink, slope=1.0)
_add("elementwise", "sigmoid", torch.sigmoid, F.sigmoid, slope=0.25)
_add("elementwise", "hardsigmoid", F.hardsigmoid, slope=1.0 / 6.0)
_add("elementwise", "leaky_relu", F.leaky_relu, slope=_leaky)
_add("elementwise", "elu", F.elu, slope=_elu)
_add("elementwise", "gelu", F.gelu, slope=_gelu)
_add("elementwise", "silu", F.silu, slope=AS.SILU_SLOPE)
_add("elementwise", "mish", F.mish, slope=AS.MISH_SLOPE)
_add("elementwise", "selu", F.selu, torch.selu, slope=AS.SELU_SLOPE)
_add("elementwise", "celu", F.celu, torch.celu, slope=_celu)
_add("elementwise", "hardswish", F.hardswish, slope=AS.HARDSWISH_SLOPE)
_add("map", "softmax", F.softmax, torch.softmax, slope=SM.softmax_bound)
_add("map", "softmin", F.softmin, slope=SM.softmax_bound)
_add("map", "log_softmax", F.log_softmax, torch.log_softmax, slope=SM.log_softmax_bound)
_add("map", "logsumexp", torch.logsumexp, slope=SM.logsumexp_bound)
_add("map", "normalize", F.normalize, slope=NM.normalize_bound)
_add("sort", "groupsort", LF.group_sort)
_add("sort", "maxmin", LF.max_min)
_add("sort", "fullsort", LF.full_sort)
_add("add", "add", operator.add, torch.add)
_add("sub", "sub", operator.sub, torch.sub, torch.subtract)
_add("mul", "mul", operator.mul, torch.mul, torch.multiply)
_add("div", "div", operator.truediv, torch.div, torch.divide, torch.true_divide)
_add("neg", "neg", operator.neg, torch.neg, torch.negative)
_add("pos", "pos", operator.pos)
_add("maxmin", "maximum", torch.maximum, torch.fmax)
_add("maxmin", "minimum", torch.minimum, torch.fmin)
_add("clamp", "clamp", torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max)
_add("reduce", "sum", torch.sum)
_add("reduce", "mean", torch.mean)
_add("linear", "linear", F.linear)
_add("conv", "conv", F.conv1d, F.conv2d, F.conv3d)
_add("fill", "zeros", torch.zeros_like)
_add("fill", "ones", torch.ones_like)
_add("fill", "full", torch.full_like)
_add("dropout", "dropout", F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
_add("dropout", "dropout", F.feature_alpha_dropout)
_add(
    "random", "random", torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal,
    torch.bernoulli, torch.multinomial, torch.poisson, torch.rand_like, torch.randn_like,
    torch.randint_like, torch.empty, torch.empty_like, torch.empty_strided,
)  # fmt: skip
_INPLACE_FUNCTIONS = {
    operator.iadd: OpSpec("add", "add", inplace=True),
    operator.isub: OpSpec("sub", "sub", inplace=True),
    operator.imul: OpSpec("mul", "mul", inplace=True),
    operator.itruediv: OpSpec("div", "div", inplace=True),
    torch.relu_: OpSpec("elementwise", "relu", 1.0, inplace=True),
    F.relu_: OpSpec("elementwise", "relu", 1.0, inplace=True),
}


def first_operand(node: fx.Node) -> Any:
    """The op's first operand, passed positionally or as ``input=``/``self=``."""
    if node.args:
        return node.args[0]
    return node.kwargs.get("input", node.kwargs.get("self"))


def classify(node: fx.Node) -> OpSpec | None:
    """The table entry of a ``call_function`` or ``call_method`` node, or None (no rule)."""
    if node.op == "call_method":
        name = str(node.target)
        if name in _RANDOM_METHODS:
            return OpSpec("random", name)
        inplace = name.endswith("_") and not name.endswith("__")
        spec = _method_spec(name[:-1] if inplace else name)
        if spec is None:
            return None
        if inplace:
            return OpSpec(spec.kind, spec.name, spec.slope, inplace)
        return (_swish(node) or spec) if spec.kind == "mul" else spec
    if node.op != "call_function":
        return None
    target = node.target
    if target is getattr and len(node.args) > 1:  # x.T, x.data
        attr = node.args[1]
        if attr in ("T", "mT", "H", "mH"):
            return OpSpec("copy", str(attr))
        return OpSpec("alias", "data") if attr == "data" else None
    if target in _INPLACE_FUNCTIONS:
        return _INPLACE_FUNCTIONS[target]
    try:
        spec = _FUNCTIONS.get(target)
    except TypeError:  # an unhashable target
        return None
    if spec is None:
        return None
    if spec.kind == "mul":
        return _swish(node) or spec
    if spec.kind == "elementwise" and _inplace_flag(node):
        return OpSpec(spec.kind, spec.name, spec.slope, inplace=True)
    return spec


# Note [Recognised patterns]
# ``u * torch.sigmoid(u)`` (either order; ``torch.mul``, ``*``, ``Tensor.mul``; the sigmoid
# as torch.sigmoid, F.sigmoid, Tensor.sigmoid or a plain nn.Sigmoid module) is, entry by
# entry, silu(u): the op table classifies the product as the elementwise entry "silu" with
# ``operand=u``, so every consumer bounds it as SiLU (Note [Maximal slopes of activations]
# in `lipnets.functional.activation_slopes`) instead of refusing a product of two
# input-dependent tensors. Both factors read the same node ``u``, so they have one shape
# and nothing broadcasts; the sigmoid node is a function of ``u`` alone (a plain call or
# a module of exactly torch's class, with no extra arguments; in-place updates are refused
# by the trace's faithfulness rules), so the product is exactly silu(u).


def _is_sigmoid_of(node: Any, u: Any) -> bool:
    if not isinstance(node, fx.Node) or node.kwargs or len(node.args) != 1 or node.args[0] is not u:
        return False
    if node.op == "call_module":
        owner = node.graph.owning_module
        module = None if owner is None else owner.get_submodule(str(node.target))
        return type(module) is nn.Sigmoid
    if node.op == "call_method":
        return node.target == "sigmoid"
    return node.op == "call_function" and node.target in (torch.sigmoid, F.sigmoid)


def _swish(node: fx.Node) -> OpSpec | None:
    """silu(u) for a product ``u * sigmoid(u)`` (Note [Recognised patterns]), else None."""
    if node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    for u, s in ((a, b), (b, a)):
        if isinstance(u, fx.Node) and _is_sigmoid_of(s, u):
            return OpSpec("elementwise", "silu", AS.SILU_SLOPE, operand=u)
    return None


def operand(node: fx.Node, spec: OpSpec) -> Any:
    """The input of an ``"elementwise"`` op: ``spec.operand`` or the first operand."""
    return spec.operand if spec.operand is not None else first_operand(node)


def _inplace_flag(node: fx.Node) -> bool:
    flag = node.kwargs.get("inplace")
    position = {F.relu: 1, F.relu6: 1, F.leaky_relu: 2, F.elu: 2, F.hardtanh: 3, F.silu: 1}
    position.update({F.mish: 1, F.hardswish: 1, F.selu: 1, F.celu: 2})
    if flag is None and node.target in position:
        flag = _arg(node, "inplace", position[node.target], False)
    if isinstance(flag, fx.Node):
        return True  # decided at run time: treat as in place (the stricter reading)
    return bool(flag)


# Note [Functional calls as modules]
# A call of a functional form whose module torch.nn defines with the same parameters
# (``F.max_pool2d(x, 2)`` is ``nn.MaxPool2d(2)(x)``: torch's module forwards exactly these
# arguments to that function) is rewritten after tracing into a ``call_module`` node of a
# new instance of the module (`lipnets.graph.trace`), when every argument but the input
# is a constant. Every consumer then uses the module's rule: nothing is written twice.
# A call with an input-dependent argument stays a function call, which has no rule.

_MAX_POOL = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_POOL = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
_LP_POOL = ("norm_type", "kernel_size", "stride", "ceil_mode")
FUNCTIONAL_MODULES: dict[Any, tuple[type[nn.Module], tuple[str, ...]]] = {}
"""Functional form -> (its torch.nn module, the parameters after the input, in order)."""
for _d in (1, 2, 3):
    _forms: list[tuple[Any, type[nn.Module], tuple[str, ...]]] = [
        (getattr(F, f"max_pool{_d}d"), getattr(nn, f"MaxPool{_d}d"), _MAX_POOL),
        (getattr(torch, f"max_pool{_d}d"), getattr(nn, f"MaxPool{_d}d"), _MAX_POOL[:5]),
        (getattr(F, f"avg_pool{_d}d"), getattr(nn, f"AvgPool{_d}d"), _AVG_POOL + (
            ("divisor_override",) if _d > 1 else ()
        )),
        (getattr(F, f"adaptive_max_pool{_d}d"), getattr(nn, f"AdaptiveMaxPool{_d}d"),
         ("output_size", "return_indices")),
        (getattr(F, f"adaptive_avg_pool{_d}d"), getattr(nn, f"AdaptiveAvgPool{_d}d"),
         ("output_size",)),
        (getattr(F, f"lp_pool{_d}d"), getattr(nn, f"LPPool{_d}d"), _LP_POOL),
    ]  # fmt: skip
    for _form, _module, _params in _forms:
        FUNCTIONAL_MODULES[_form] = (_module, _params)
