r"""From a model to a propagation graph: tracing, operator rules, and a faithfulness check.

The model is traced with the tracer of `lipnets.bounds` (modules with a bound
are leaves; see `lipnets.bounds.compose`) and each graph node that depends on
the input becomes one or more nodes of `lipnets.propagation._ops`, run once on
the input batch (which gives shapes and checks every rule). Nodes that do not
depend on the input (parameters, literals, sizes) are evaluated and kept as
constants. Anything without a rule raises
[`UnboundedModuleError`][lipnets.errors.UnboundedModuleError] naming the node,
e.g. ``"act (Hardswish) has no propagation rule"``.

# Note [Index operations]

Reshapes, permutations, slicing, ``cat``/``stack``, ``flatten``,
``InvertibleDownsample``, ``PixelShuffle``, constant ``F.pad`` and the like
only move entries around (and may insert constants). Instead of a rule for
each, lipnets runs the operation itself on *codes*: every entry of every
graph tensor gets a distinct float64 number (exact below $2^{53}$), constant
operands become NaN, and the output's codes say where each output entry comes
from. The same operation run with every input-dependent operand set to zero
gives the constant part. The decoded map must keep samples apart (output
sample $n$ reads only input sample $n$) and be the same for every sample, or
lipnets refuses the operation: it mixes the batch, so per-sample balls do not
apply. Such an operation becomes one `Gather` node.

# Note [Comparators as ReLUs]

A comparator on a pair $(a, b)$ writes $\min(a, b)$ and $\max(a, b)$, and
$\min(a, b) = a - \mathrm{relu}(a - b)$, $\max(a, b) = b + \mathrm{relu}(a -
b)$. So one comparator layer (disjoint pairs) is a `Difference`, a `ReLU` and
a `Compare` node, and bound propagation needs no rule but the ReLU's. MaxMin
is one layer with the pair $(2i + 1, 2i)$ (the max goes first: Note [MaxMin
ties] in `lipnets.functional.activations`); GroupSort sorts each contiguous
group of ``group_size`` channels ascending with Batcher's merge-exchange
network (`lipnets.propagation._ops.sorting_network`: 1, 3, 6 and 10 layers
for groups of 2, 4, 8 and 16); FullSort is GroupSort with one group. Every
rewrite is checked against the model's own output (Note [Graph
faithfulness check]).

# Note [Circular convolution kernels]

`CayleyConv2d` and `FrequencyConv2d` multiply each frequency of the 2-D FFT
of ``space_to_depth(x, s)`` by a matrix and add a bias, so their linear part
commutes with circular shifts of the folded input: it is the circular
convolution with its own impulse responses. lipnets measures them (one
impulse per folded channel, at position (0, 0)), giving a kernel $K$ of shape
$(m, n, H/s, W/s)$, applies the layer as that convolution (by FFT) and checks
the result against the layer on the input batch; a mismatch raises. $|K|$ then
gives $|W|$ exactly.

# Note [Graph faithfulness check]

The bounds are those of the propagation graph, so the graph must compute what
the model computes on the whole ball, not only at its centre. torch.fx records
``h += r`` as an out-of-place ``add`` and ignores what Python does besides
tensor operations, so lipnets refuses, with
[`UntraceableModelError`][lipnets.errors.UntraceableModelError]:

- in-place updates that the graph does not follow. The graph accepts an
  in-place operation only on a freshly computed tensor that nothing else reads
  (``nn.ReLU(inplace=True)`` after a Linear), as in `lipnets.bounds` (Note
  [Graph faithfulness] there). The model is then run once in eager mode under a
  `TorchFunctionMode` that records every in-place update (``add_``, ``h += r``,
  ``operator.iadd``, ``inplace=`` flags, ``out=``, item assignment), wherever it
  is written: in ``forward``, a helper function, a decorator. Inside a layer
  that is one node of the graph only updates of its inputs' memory count. The
  eager run must make exactly the in-place updates the graph accepted;
- a traced ``forward`` whose source uses augmented assignment or writes an
  attribute or item (the common case of the above, with a message that points
  at the line), and a forward that changes a parameter, a buffer, or a plain
  tensor or number attribute of any submodule;
- random numbers (``torch.randn``, ``rand_like``, ``Tensor.normal_``, ...),
  which the graph would freeze at one draw, and a ``full_like`` or
  ``new_full`` whose fill value depends on the input.

Methods replaced on an instance (``forward``, ``_call_impl``,
``_conv_forward``, ``module.compile()``) are refused with
[`UnboundedModuleError`][lipnets.errors.UnboundedModuleError] by the checks
shared with `lipnets.bounds`: rules and traces follow the class.

Then the graph is evaluated on the input batch and on points of each ball
(its boundary, its corners for an l-infinity ball, and inside), and every
output must match the model's (to $\sqrt{\varepsilon}$ of the dtype, relative
to each sample's largest output); a mismatch raises `UntraceableModelError`.
The sampled points are a second line of defence, not a proof: a branch that
only opens on a thin cap of the ball escapes them, and the refusals above are
what keeps the graph equal to the model on the whole ball.

What no check here can see (three adversarial reviews looked): a forward that
takes another path when traced than in eager mode (``isinstance(h, Tensor)``,
``torch.fx.is_fx_tracing()``, ``try``/``except`` around tensor code), work
done in another thread or with torch function modes disabled, writes through
setters such as ``h.real = ...``, and state kept in private attributes or
containers. A model written like that is outside what lipnets can certify.
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

import lipnets.functional as LF
from lipnets.bounds.compose import (
    _META_ATTRS,
    _META_METHODS,
    _check_hooks,
    _python_mutation,
    _trace,
    _unwrap,
    _where,
)
from lipnets.errors import UnboundedModuleError, UntraceableModelError
from lipnets.functional.reshape import depth_to_space
from lipnets.nn import (
    BCOPConv2d,
    CayleyConv2d,
    FrequencyConv2d,
    FullSort,
    GroupSort,
    InvertibleDownsample,
    MaxMin,
)
from lipnets.propagation import _ops
from lipnets.propagation._ops import Op

__all__: list[str] = []


@dataclass(eq=False)
class Node:
    """One node of a propagation graph; ``op`` is None for the model's input."""

    index: int
    op: Op | None
    inputs: tuple[int, ...]
    shape: torch.Size
    """The per-sample shape (without the batch dimension)."""
    where: str
    """The traced node it comes from, for messages."""


@dataclass
class Graph:
    """A propagation graph in topological order; node 0 is the input."""

    nodes: list[Node]
    output: int | None
    """The node holding the model's output, or None when the output is constant."""
    output_value: Tensor
    """The model's output on the input batch (as the graph computes it)."""
    values: list[Tensor] = field(default_factory=list)
    """Every node's value on the input batch."""

    def ancestors(self, target: int) -> list[int]:
        """Indices of the nodes ``target`` depends on (itself included), ascending."""
        seen = {target}
        stack = [target]
        while stack:
            for i in self.nodes[stack.pop()].inputs:
                if i not in seen:
                    seen.add(i)
                    stack.append(i)
        return sorted(seen)


@dataclass(eq=False)
class _Lazy:
    """An index operation's result, kept as codes until a non-index operation reads it."""

    codes: Any
    zero: Any
    node: int | None = None


_RELU = {torch.relu, F.relu, torch.relu_, F.relu_, "relu", "relu_"}
_SORTS = {LF.group_sort: "groupsort", LF.max_min: "maxmin", LF.full_sort: "fullsort"}
_ARITH = {
    operator.add: "add", operator.iadd: "add", torch.add: "add", "add": "add", "add_": "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub", torch.subtract: "sub",
    "sub": "sub", "sub_": "sub", "subtract": "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", torch.multiply: "mul",
    "mul": "mul", "mul_": "mul", "multiply": "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div", torch.divide: "div",
    torch.true_divide: "div", "div": "div", "div_": "div", "divide": "div",
    "true_divide": "div",
    operator.neg: "neg", torch.neg: "neg", torch.negative: "neg", "neg": "neg",
    "negative": "neg", "neg_": "neg", operator.pos: "pos",
}  # fmt: skip
_REDUCE = {torch.mean: "mean", "mean": "mean", torch.sum: "sum", "sum": "sum"}
_INDEX_FUNCTIONS = {
    torch.reshape, torch.flatten, torch.unflatten, torch.permute, torch.transpose, torch.t,
    torch.squeeze, torch.unsqueeze, torch.movedim, torch.moveaxis, torch.swapaxes,
    torch.swapdims, torch.flip, torch.roll, torch.narrow, torch.select, torch.split,
    torch.chunk, torch.unbind, torch.tensor_split, operator.getitem, torch.cat, torch.concat,
    torch.concatenate, torch.stack, torch.hstack, torch.vstack, F.pad, F.pixel_shuffle,
    F.pixel_unshuffle,
}  # fmt: skip
_INDEX_METHODS = {
    "reshape", "view", "flatten", "unflatten", "permute", "transpose", "t", "squeeze",
    "unsqueeze", "movedim", "moveaxis", "swapaxes", "swapdims", "flip", "roll", "narrow",
    "select", "split", "chunk", "unbind", "tensor_split", "expand", "expand_as", "repeat",
    "view_as", "reshape_as", "__getitem__",
}  # fmt: skip
_CAT = {torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack}
# Same values as the input (when dtype and device are unchanged).
_ALIAS_METHODS = {
    "contiguous", "clone", "detach", "to", "float", "double", "type", "type_as", "cpu", "cuda",
}  # fmt: skip
_ALIAS_FUNCTIONS = {torch.clone, torch.detach}
_INDEX_MODULES = (
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
    InvertibleDownsample,
)  # fmt: skip
_MONOTONE_MODULES = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d,
    nn.ConstantPad2d, nn.ConstantPad3d,
)  # fmt: skip
_CONV_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, BCOPConv2d.forward}
_CONV_IMPLS = {nn.Conv1d._conv_forward, nn.Conv2d._conv_forward, nn.Conv3d._conv_forward}
_RANDOM_FUNCTIONS = {
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal, torch.bernoulli,
    torch.multinomial, torch.poisson, torch.rand_like, torch.randn_like, torch.randint_like,
    torch.empty, torch.empty_like, torch.empty_strided, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
}  # fmt: skip
_RANDOM_METHODS = {
    "uniform_", "normal_", "bernoulli", "bernoulli_", "random_", "exponential_",
    "geometric_", "cauchy_", "log_normal_", "multinomial", "new_empty",
}  # fmt: skip
_FAITHFUL_ROUNDS = 8
"""Batches of points of the balls (besides the centres) on which the graph is checked."""


def _same_forward(module: nn.Module, cls: type) -> bool:
    """``module`` is a ``cls`` whose forward is ``cls.forward`` (not overridden or patched)."""
    return (
        isinstance(module, cls)
        and type(module).forward is cls.forward
        and "forward" not in vars(module)
        and type(module).__call__ is nn.Module.__call__
    )


def _is_tensor_tree(value: Any) -> bool:
    return isinstance(value, Tensor) or (
        isinstance(value, (list, tuple)) and all(_is_tensor_tree(v) for v in value)
    )


def build(model: nn.Module, x: Tensor, radius: Tensor | None = None, norm: float = 2.0) -> Graph:
    """Trace ``model`` and build its propagation graph on the batch ``x`` (eval mode set).

    With ``radius`` (one per sample) the graph is also checked on points of the
    balls of that radius in ``norm`` (Note [Graph faithfulness check]).
    """
    # Wrapped, the model is traced as a call: a torch.nn module or a layer with a
    # bound is then one leaf node, anything else is traced into as usual.
    root = nn.Sequential(_unwrap(model))
    _check_hooks(_unwrap(model))
    state = _State(root)  # before tracing: a trace can change state too
    gm, _, traced = _trace(root)  # not under parametrize.cached(): it would cache proxies
    _refuse_python_mutation(traced)
    with parametrize.cached():  # one realised weight per layer for the whole check
        return _checked_graph(type(_unwrap(model)).__name__, root, gm, state, x, radius, norm)


def _refuse_python_mutation(traced: list[nn.Module]) -> None:
    found = _python_mutation(traced)
    if found is not None:
        module, construct = found
        if construct.startswith("code whose source"):
            raise UntraceableModelError(
                f"lipnets cannot read the source of {type(module).__name__}.forward to check "
                "it for in-place updates and attribute writes, which torch.fx may record "
                "differently from what eager mode computes (Note [Graph faithfulness check]); "
                "define the module in a file"
            )
        raise UntraceableModelError(
            f"{type(module).__name__}.forward uses {construct}, which torch.fx may record "
            "differently from what eager mode computes (an in-place update of a tensor also "
            "reached through another name, an attribute write), so the bounds could be those "
            "of another function (Note [Graph faithfulness check]); write it out of place, "
            "e.g. `h = h + r` instead of `h += r`"
        )


def _checked_graph(
    name: str,
    root: nn.Module,
    gm: fx.GraphModule,
    state: _State,
    x: Tensor,
    radius: Tensor | None,
    norm: float,
) -> Graph:
    """The propagation graph of ``gm`` on ``x``, checked against ``root`` in eager mode."""
    builder = _Builder(gm, x.clone())  # nothing the trace runs can write into the caller's x
    graph = builder.run()
    leaves = {
        id(m): m
        for m in (gm.get_submodule(str(n.target)) for n in gm.graph.nodes if n.op == "call_module")
    }
    audit = _InPlaceAudit(list(leaves.values()))
    try:
        with torch.no_grad(), audit:
            reference = root(x.clone())
    finally:
        audit.close()
    state.check(name)
    if len(audit.found) != builder.inplace_ops:
        raise UntraceableModelError(
            f"{name} updates tensors in place in eager mode ({', '.join(audit.found) or 'none'}) "
            f"where its traced graph has {builder.inplace_ops} in-place update(s) of a fresh "
            "tensor: torch.fx recorded something else than the model runs (`h += r`, an "
            "in-place call in a helper, state kept in a tensor; Note [Graph faithfulness "
            "check]); use out-of-place operations"
        )
    _check_faithful(graph, reference, name)
    if radius is not None and graph.output is not None:
        _check_on_balls(graph, root, x, radius, norm, name)
    return graph


def evaluate(nodes: list[Node], x: Tensor) -> list[Tensor]:
    """Every node's value for the input batch ``x``."""
    values = [x]
    for node in nodes[1:]:
        assert node.op is not None
        values.append(node.op.forward([values[i] for i in node.inputs]))
    return values


class _State:
    """Parameters, buffers and plain tensor or number attributes of every submodule."""

    def __init__(self, root: nn.Module) -> None:
        self.items: list[tuple[str, Any, Any]] = []
        for prefix, module in root.named_modules():
            values = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            values += [
                (k, v)
                for k, v in vars(module).items()
                if not k.startswith("_") and isinstance(v, (Tensor, int, float))
            ]
            for key, value in values:
                copy = value.detach().clone() if isinstance(value, Tensor) else value
                label = f"{prefix}.{key}".removeprefix("0").removeprefix(".")
                self.items.append((label, (module, key, value), copy))

    def check(self, name: str) -> None:
        for where, (module, key, value), copy in self.items:
            now = getattr(module, key, None)
            changed = now is not value
            if isinstance(value, Tensor) and not changed:
                changed = now.shape != copy.shape or not torch.equal(now.detach(), copy)
            if changed:
                raise UntraceableModelError(
                    f"{name}.forward changes {where!r}: the propagation graph would hold one "
                    "value of it while the model uses another (Note [Graph faithfulness check])"
                )


_INPLACE_DUNDERS = {
    "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
    "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
    "__irshift__", "__setitem__",
}  # fmt: skip


def _written(func: Any, args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors a torch call writes into: ``x.add_``, ``x += y``, ``out=``, ``inplace=``."""
    name = getattr(func, "__name__", "")
    first = [args[0]] if args and isinstance(args[0], Tensor) else []
    schema = getattr(func, "_schema", None)  # torch.ops.aten.add_.Tensor and the like
    if schema is not None:
        written = []
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                written += _flat_tensors(value)
        return written
    if name in _INPLACE_DUNDERS or name == "__set__":  # __set__: `h.data = ...`
        return first
    if name.endswith("_") and not name.endswith("__"):
        return first
    out = kwargs.get("out")
    if out is not None:
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [t for t in outs if isinstance(t, Tensor)]
    if getattr(func, "__module__", "") == "torch.nn.functional":
        try:
            bound = inspect.signature(func).bind(*args, **kwargs)
        except (TypeError, ValueError):
            return []
        if bound.arguments.get("inplace"):
            return first
    return []


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _InPlaceAudit(TorchFunctionMode):
    """Records the in-place updates of an eager forward (Note [Graph faithfulness check]).

    Inside a leaf module (a node of the graph), only updates of the memory of its
    inputs count: its own temporaries are its business.
    """

    def __init__(self, leaves: list[nn.Module]) -> None:
        super().__init__()
        self.found: list[str] = []
        self.scopes: list[set[int]] = []
        self.handles = []
        for module in leaves:
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, module: nn.Module, args: Any) -> None:
        self.scopes.append({_storage(t) for t in _flat_tensors(args)})

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.scopes.pop()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for target in _written(func, args, kwargs):
            if not self.scopes or _storage(target) in self.scopes[-1]:
                self.found.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


def _flat_tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat_tensors(v)]
    return []


def _user_name(qualname: str) -> str:
    """A submodule's name in the user's model (``build`` traces it wrapped, as ``0``)."""
    if qualname in ("0", ""):
        return "the model"
    return qualname.removeprefix("0.")


def _check_on_balls(
    graph: Graph, root: nn.Module, x: Tensor, radius: Tensor, norm: float, name: str
) -> None:
    """The graph against the model on points of each ball (seeded, so reproducible)."""
    generator = torch.Generator(device=x.device).manual_seed(0)
    r = radius.reshape(-1, *([1] * (x.ndim - 1)))
    for k in range(_FAITHFUL_ROUNDS):
        u = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        if norm == math.inf:
            step = (
                u.sign()
                if k % 2 == 0
                else 2 * torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                - 1
            )  # corners, then uniform points of the box
        else:
            flat = u.flatten(1)
            step = (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-300)).reshape(x.shape)
            if k % 2:  # inside the ball, at a random fraction of the radius
                step = step * torch.rand(
                    (x.shape[0], *([1] * (x.ndim - 1))), generator=generator,
                    dtype=x.dtype, device=x.device,
                )  # fmt: skip
        points = x + r * step
        with torch.no_grad():
            reference = root(points.clone())
        out = evaluate(graph.nodes, points)[graph.output]
        _compare(out, reference, name, "at points of the balls")


def _check_faithful(graph: Graph, reference: Any, name: str) -> None:
    if not isinstance(reference, Tensor):
        raise UnboundedModuleError(
            f"{name} returns {type(reference).__name__}; bound propagation needs a model that "
            "returns one tensor"
        )
    out = graph.output_value
    if graph.output is not None:
        out = graph.values[graph.output]
    _compare(out, reference, name, "on the input batch")


def _compare(out: Tensor, reference: Tensor, name: str, where: str) -> None:
    reference = reference.detach()
    tol = math.sqrt(torch.finfo(reference.dtype).eps) if reference.is_floating_point() else 0.0
    same = out.shape == reference.shape
    if same and reference.numel():
        # Per sample: a large output of one sample must not hide a mismatch in another.
        rows = reference.shape[0] if reference.ndim else 1
        ref, got = reference.reshape(rows, -1), out.reshape(rows, -1)
        size = torch.where(torch.isfinite(ref), ref.abs(), torch.zeros_like(ref))
        atol = tol * (1.0 + size.amax(dim=1, keepdim=True))
        close = ((got - ref).abs() <= atol) | (got == ref)  # == : infinities of one sign
        close |= torch.isnan(got) & torch.isnan(ref)
        same = bool(close.all())
    if not same:
        raise UntraceableModelError(
            f"the propagation graph of {name} does not compute what the model computes {where} "
            "(Note [Graph faithfulness check]); an in-place update, Python-side state or a "
            "module whose forward differs from its class's?"
        )


class _Builder:
    def __init__(self, gm: fx.GraphModule, x: Tensor) -> None:
        self.gm = gm
        self.x = x
        self.n = x.shape[0]
        self.nodes: list[Node] = []
        self.offsets: list[int] = []
        self.total = 0
        self.value: dict[fx.Node, Any] = {}
        self.rep: dict[fx.Node, int | _Lazy] = {}
        self.fresh: set[fx.Node] = set()
        self.inplace_ops = 0
        self.code_cache: dict[int, Tensor] = {}

    # -- bookkeeping -------------------------------------------------------
    def add(self, op: Op | None, inputs: list[int], shape: torch.Size, where: str) -> int:
        index = len(self.nodes)
        shape = torch.Size(shape)
        self.nodes.append(Node(index, op, tuple(inputs), shape, where))
        self.offsets.append(self.total)
        self.total += self.n * shape.numel()
        if self.total >= 2**53:
            raise ValueError("the model is too large for bound propagation (2**53 entries)")
        return index

    def where(self, node: fx.Node) -> str:
        return _where(self.gm, node, _user_name)

    def no_rule(self, node: fx.Node, why: str = "") -> UnboundedModuleError:
        return UnboundedModuleError(
            f"{self.where(node)} has no propagation rule{': ' + why if why else ''}"
        )

    def dependent(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and arg in self.rep

    def const(self, arg: Any) -> Any:
        return self.value[arg] if isinstance(arg, fx.Node) else arg

    def shape_of(self, arg: fx.Node) -> torch.Size:
        value = self.value[arg]
        return value.shape

    # -- the pass -----------------------------------------------------------
    def run(self) -> Graph:
        placeholders = 0
        output: Any = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if placeholders == 0:
                    self.value[node] = self.x
                    self.rep[node] = self.add(None, [], self.x.shape[1:], "the input")
                elif node.args:
                    self.value[node] = node.args[0]  # a default, fixed when tracing
                else:
                    raise UnboundedModuleError(
                        "bound propagation takes models with one input; "
                        f"forward also takes '{node.target}' without a default"
                    )
                placeholders += 1
            elif node.op == "get_attr":
                value: Any = self.gm
                for part in str(node.target).split("."):
                    value = getattr(value, part)
                self.value[node] = value
            elif node.op == "output":
                output = node.args[0]
            else:
                self.visit(node)
        return self.finish(output)

    def finish(self, output: Any) -> Graph:
        if isinstance(output, fx.Node) and output in self.rep:
            out = self.materialize(output, None)
            values = evaluate(self.nodes, self.x)
            return Graph(self.nodes, out, values[out], values)
        value = self.const(output)
        if not isinstance(value, Tensor):
            raise UnboundedModuleError(
                f"the model returns {type(value).__name__}; bound propagation needs a model "
                "that returns one tensor"
            )
        return Graph(self.nodes, None, value.detach(), evaluate(self.nodes, self.x))

    def run_concrete(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "call_module":
            return self.gm.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        return node.target(*args, **kwargs)  # type: ignore[operator]

    def visit(self, node: fx.Node) -> None:
        args = fx.node.map_arg(node.args, self.const)
        kwargs = fx.node.map_arg(node.kwargs, self.const)
        deps = [a for a in _flat_nodes((node.args, node.kwargs)) if a in self.rep]
        random = node.target in _RANDOM_FUNCTIONS or (
            node.op == "call_method" and node.target in _RANDOM_METHODS
        )
        if random:
            raise self.no_rule(node, "it draws random numbers (or uninitialised memory)")
        if "out" in node.kwargs:
            raise UntraceableModelError(
                f"{self.where(node)} writes into `out=`, which torch.fx does not follow "
                "(Note [Graph faithfulness check]); use the returned value instead"
            )
        if deps and not self.is_meta(node):
            self.check_inplace(node)  # before running it: it could write into the input
        with torch.no_grad():
            self.value[node] = self.run_concrete(node, args, kwargs)
        if not deps or self.is_meta(node):
            return
        before = len(self.nodes)
        result = self.convert(node)
        self.rep[node] = result
        if isinstance(result, int) and result >= before and node.target is not operator.pos:
            self.fresh.add(node)  # a new tensor, not an alias of another node's (+h is h)
        elif all(d in self.fresh and len(d.users) == 1 for d in deps):
            # A view (or copy) of fresh tensors that nothing else reads: updating it in
            # place changes nothing another node sees (Linear -> Dropout -> ReLU(inplace)).
            self.fresh.add(node)

    def is_meta(self, node: fx.Node) -> bool:
        if node.op == "call_method" and node.target in _META_METHODS:
            return True
        if node.target is getattr and len(node.args) > 1 and node.args[1] in _META_ATTRS:
            return True
        if node.target in (torch.zeros_like, torch.ones_like):
            return True  # values that do not depend on the input's values
        if node.op == "call_method" and node.target in ("new_zeros", "new_ones"):
            return True
        if node.target is torch.full_like or (
            node.op == "call_method" and node.target == "new_full"
        ):  # the same, unless the fill value is computed from the input
            position = 1 if node.target is torch.full_like else 2
            fill = node.args[position] if len(node.args) > position else None
            fill = node.kwargs.get("fill_value", fill)
            return not any(self.dependent(a) for a in _flat_nodes(fill))
        return node.target in (len, torch.numel)

    def check_inplace(self, node: fx.Node) -> None:
        name = str(node.target) if node.op == "call_method" else ""
        if node.op == "call_function":
            name = getattr(node.target, "__name__", "")
        inplace = name.endswith("_") and not name.endswith("__")
        inplace = inplace or bool(self.const(node.kwargs.get("inplace", False)))
        inplace = inplace or node.target in (operator.iadd, operator.isub, operator.imul)
        inplace = inplace or node.target is operator.itruediv
        if node.target is F.relu and len(node.args) > 1 and bool(self.const(node.args[1])):
            inplace = True
        if node.op == "call_module":  # torch.nn's own classes honour their flag
            module = self.gm.get_submodule(str(node.target))
            torch_class = type(module).__module__.startswith("torch.nn.")
            inplace = torch_class and bool(getattr(module, "inplace", False))
        if not inplace:
            return
        if not node.args or not isinstance(node.args[0], fx.Node):
            raise UntraceableModelError(
                f"{self.where(node)} updates a tensor in place that the propagation graph "
                "cannot follow; use the out-of-place version"
            )
        source = node.args[0]
        others = [u for u in source.users if u is not node]
        if others or source not in self.fresh:
            users = ", ".join(repr(u.name) for u in others) or "an alias"
            raise UntraceableModelError(
                f"{self.where(node)} modifies '{source.name}' in place, and that memory is also "
                f"reached through {users}; use the out-of-place version"
            )
        self.inplace_ops += 1  # matched against the eager run (Note [Graph faithfulness check])

    # -- dispatch -------------------------------------------------------------
    def convert(self, node: fx.Node) -> int | _Lazy:
        if node.op == "call_module":
            return self.convert_module(node)
        target = node.target
        method = node.op == "call_method"
        first = node.args[0] if node.args else node.kwargs.get("input")
        if target in _RELU:
            return self.relu(node, first)
        if not method and target in _SORTS:
            bound = inspect.signature(target).bind(*node.args, **node.kwargs)  # type: ignore[arg-type]
            bound.apply_defaults()
            params = {k: self.const(v) for k, v in bound.arguments.items() if k != "x"}
            return self.comparators(
                node, bound.arguments["x"], _SORTS[target], params.get("group_size"), params["dim"]
            )
        if target in _ARITH:
            return self.arith(node, _ARITH[target])
        if target in _REDUCE:
            return self.reduce(node, _REDUCE[target])
        if (method and target in _ALIAS_METHODS) or target in _ALIAS_FUNCTIONS:
            return self.alias(node, first)
        if target is F.linear:
            return self.functional_linear(node)
        if (method and target in _INDEX_METHODS) or (not method and target in _INDEX_FUNCTIONS):
            return self.index_op(node)
        if target is getattr and node.args[1] in ("T", "mT", "mH", "H"):
            return self.index_op(node)
        raise self.no_rule(node)

    def convert_module(self, node: fx.Node) -> int | _Lazy:
        module = self.gm.get_submodule(str(node.target))
        if len(node.args) != 1 or node.kwargs or node.args[0] not in self.rep:
            raise self.no_rule(node, "it takes other arguments than one input-dependent tensor")
        source = node.args[0]
        out_shape = self.value[node].shape[1:]
        if _same_forward(module, nn.ReLU):
            return self.relu(node, source)
        if _same_forward(module, MaxMin):
            return self.comparators(node, source, "maxmin", None, module.dim)
        if _same_forward(module, GroupSort):
            return self.comparators(node, source, "groupsort", module.group_size, module.dim)
        if _same_forward(module, FullSort):
            return self.comparators(node, source, "fullsort", None, module.dim)
        if _same_forward(module, nn.Linear):
            src = self.materialize(source, node)
            op = _ops.Linear(self.nodes[src].shape, out_shape, module, module.weight, module.bias)
            return self.add(op, [src], out_shape, self.where(node))
        conv = (
            isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            and type(module).forward in _CONV_FORWARDS
            and type(module)._conv_forward in _CONV_IMPLS
            and "forward" not in vars(module)
            and type(module).__call__ is nn.Module.__call__
        )
        if conv:
            src = self.materialize(source, node)
            op = _ops.Conv(self.nodes[src].shape, out_shape, module, module.weight, module.bias)
            return self.add(op, [src], out_shape, self.where(node))
        if any(_same_forward(module, c) for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            return self.batch_norm(node, module, source, out_shape)
        if _same_forward(module, CayleyConv2d) or _same_forward(module, FrequencyConv2d):
            return self.circular_conv(node, module, source, out_shape)
        if any(_same_forward(module, c) for c in _INDEX_MODULES):
            return self.index_op(node)
        if any(_same_forward(module, c) for c in _MONOTONE_MODULES):
            divisor = getattr(module, "divisor_override", None)
            if divisor is not None and divisor <= 0:
                raise self.no_rule(node, f"divisor_override={divisor} makes its weights negative")
            src = self.materialize(source, node)
            op = _ops.ModuleLinear(
                self.nodes[src].shape, out_shape, module, self.x.dtype, self.x.device
            )
            return self.add(op, [src], out_shape, self.where(node))
        raise self.no_rule(node)

    # -- rules ------------------------------------------------------------------
    def relu(self, node: fx.Node, source: Any) -> int:
        src = self.materialize(source, node)
        shape = self.nodes[src].shape
        return self.add(_ops.ReLU([shape], shape), [src], shape, self.where(node))

    def comparators(
        self, node: fx.Node, source: Any, kind: str, group_size: Any, dim: Any
    ) -> int | _Lazy:
        src = self.materialize(source, node)
        shape = self.nodes[src].shape
        ndim = len(shape) + 1
        if not isinstance(dim, int) or not -ndim <= dim < ndim or dim % ndim == 0:
            raise self.no_rule(node, f"it sorts along dim={dim!r}, which must not be the batch")
        d = dim % ndim - 1
        channels = shape[d]
        if kind == "maxmin":
            layers = [[(2 * i + 1, 2 * i) for i in range(channels // 2)]]
        else:
            g = channels if kind == "fullsort" else int(group_size)
            network = _ops.sorting_network(g)
            layers = [
                [(k * g + i, k * g + j) for k in range(channels // g) for i, j in layer]
                for layer in network
            ]
        layers = [layer for layer in layers if layer]
        if not layers:
            return src  # nothing to sort: the identity
        where = self.where(node)
        current = src
        device = self.x.device
        for layer in layers:
            lo = torch.tensor([p[0] for p in layer], dtype=torch.long, device=device)
            hi = torch.tensor([p[1] for p in layer], dtype=torch.long, device=device)
            diff_shape = _ops._with(shape, d, len(layer))
            difference = _ops.Difference(shape, diff_shape, d, lo, hi)
            diff = self.add(difference, [current], diff_shape, where)
            relu = self.add(_ops.ReLU([diff_shape], diff_shape), [diff], diff_shape, where)
            current = self.add(_ops.Compare(shape, d, lo, hi), [current, relu], shape, where)
        return current

    def arith(self, node: fx.Node, name: str) -> int:
        out = self.value[node]
        if not isinstance(out, Tensor):
            raise self.no_rule(node, "its result is not a tensor")
        if node.kwargs.get("rounding_mode") is not None or len(node.args) > 2:
            raise self.no_rule(node, "it rounds or takes more arguments than lipnets supports")
        a = node.args[0] if node.args else node.kwargs.get("input")
        b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        alpha = float(self.const(node.kwargs.get("alpha", 1)))
        terms: list[tuple[fx.Node, Any]] = []
        const: Any = 0.0
        if name in ("neg", "pos"):
            terms = [(a, -1.0 if name == "neg" else 1.0)]
        elif name in ("add", "sub"):
            sign = 1.0 if name == "add" else -1.0
            for operand, coeff in ((a, 1.0), (b, sign * alpha)):
                if self.dependent(operand):
                    terms.append((operand, coeff))
                else:
                    const = const + coeff * self.const(operand)
        elif name == "mul":
            if self.dependent(a) and self.dependent(b):
                raise self.no_rule(node, "it multiplies two input-dependent tensors")
            x, c = (a, b) if self.dependent(a) else (b, a)
            terms = [(x, self.const(c))]
        else:  # div
            if self.dependent(b):
                raise self.no_rule(node, "it divides by an input-dependent tensor")
            c = self.const(b)
            terms = [(a, 1.0 / c if not isinstance(c, Tensor) else torch.reciprocal(c))]
        ids, coeffs = [], []
        for operand, coeff in terms:
            if self.shape_of(operand) != out.shape:
                src = self.broadcast(node, operand, out.shape)
            else:
                src = self.materialize(operand, node)
            ids.append(src)
            coeffs.append(self.coefficient(node, coeff, out))
        constant = None
        if isinstance(const, Tensor) or const != 0:
            constant = self.coefficient(node, const, out)
            if not isinstance(constant, Tensor):
                constant = torch.full_like(out, constant)
        shapes = [self.nodes[i].shape for i in ids]
        op = _ops.LinearCombination(shapes, out.shape[1:], coeffs, constant)
        return self.add(op, ids, out.shape[1:], self.where(node))

    def broadcast(self, node: fx.Node, operand: fx.Node, shape: torch.Size) -> int:
        """A Gather that broadcasts ``operand`` to ``shape`` (its entries repeated)."""
        rep = self.rep[operand]
        codes = rep.codes if isinstance(rep, _Lazy) else self.codes(rep)
        zero = rep.zero if isinstance(rep, _Lazy) else torch.zeros_like(self.value[operand])
        if not isinstance(codes, Tensor):
            raise self.no_rule(node, "an operand is a tuple")
        codes, zero = torch.broadcast_to(codes, shape), torch.broadcast_to(zero, shape)
        return self.decode(codes, zero, self.where(node))

    def coefficient(self, node: fx.Node, value: Any, out: Tensor) -> Tensor | float:
        if isinstance(value, Tensor):
            if value.is_complex():
                raise self.no_rule(node, f"it uses a constant of dtype {value.dtype}")
            value = torch.broadcast_to(value.detach().to(out.dtype), out.shape)
            if not bool(torch.isfinite(value).all()):
                raise self.no_rule(node, "a constant operand is not finite")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.no_rule(node, f"it uses a constant of type {type(value).__name__}")
        if not math.isfinite(value):
            raise self.no_rule(node, "a constant operand is not finite")
        return float(value)

    def reduce(self, node: fx.Node, name: str) -> int:
        out = self.value[node]
        source = node.args[0] if node.args else node.kwargs.get("input")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        dim, keepdim = self.const(dim), self.const(keepdim)
        if node.kwargs.get("dtype") is not None:
            raise self.no_rule(node, "it changes the dtype")
        src = self.materialize(source, node)
        shape = self.nodes[src].shape
        ndim = len(shape) + 1
        dims = (dim,) if isinstance(dim, int) else tuple(dim) if dim is not None else ()
        if not dims or any(not isinstance(d, int) for d in dims):
            raise self.no_rule(node, "it reduces over the batch dimension (give dim=)")
        dims = tuple(sorted({d % ndim for d in dims}))
        if 0 in dims:
            raise self.no_rule(node, "it reduces over the batch dimension")
        per_sample = tuple(d - 1 for d in dims)
        count = math.prod(shape[d] for d in per_sample)
        scale = 1.0 / count if name == "mean" else 1.0
        op = _ops.Reduce(shape, out.shape[1:], per_sample, bool(keepdim), scale)
        return self.add(op, [src], out.shape[1:], self.where(node))

    def alias(self, node: fx.Node, source: Any) -> int | _Lazy:
        out, before = self.value[node], self.value[source]
        if (
            not isinstance(out, Tensor)
            or out.dtype != before.dtype
            or out.device != before.device
            or out.shape != before.shape
        ):
            raise self.no_rule(node, "it changes the dtype or device (rounding is not Lipschitz)")
        return self.rep[source]

    def functional_linear(self, node: fx.Node) -> int:
        args = list(node.args) + [None] * (3 - len(node.args))
        weight = node.kwargs.get("weight", args[1])
        bias = node.kwargs.get("bias", args[2])
        if self.dependent(weight) or self.dependent(bias):
            raise self.no_rule(node, "its weight or bias depends on the input")
        source = node.args[0] if node.args else node.kwargs["input"]
        src = self.materialize(source, node)
        out_shape = self.value[node].shape[1:]
        weight, bias = self.const(weight), self.const(bias)
        op = _ops.Linear(self.nodes[src].shape, out_shape, None, weight, bias)
        return self.add(op, [src], out_shape, self.where(node))

    def batch_norm(self, node: fx.Node, module: nn.Module, source: Any, out_shape) -> int:
        bn: nn.modules.batchnorm._BatchNorm = module  # type: ignore[assignment]
        if bn.training or not bn.track_running_stats or bn.running_mean is None:
            raise self.no_rule(
                node, "it normalises with batch statistics (use eval mode with running stats)"
            )
        assert bn.running_var is not None
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = bn.weight * scale
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        src = self.materialize(source, node)
        op = _ops.BatchNorm(self.nodes[src].shape, out_shape, module, scale, shift)
        return self.add(op, [src], out_shape, self.where(node))

    def circular_conv(self, node: fx.Node, module: nn.Module, source: Any, out_shape) -> int:
        src = self.materialize(source, node)
        shape = self.nodes[src].shape
        s = int(module.stride)  # type: ignore[arg-type]
        channels, height, width = shape
        n = channels * s * s
        dtype, device = self.x.dtype, self.x.device
        folded = torch.zeros((n, n, height // s, width // s), dtype=dtype, device=device)
        folded[torch.arange(n), torch.arange(n), 0, 0] = 1
        impulses = depth_to_space(folded, s) if s > 1 else folded
        with torch.no_grad():
            zero = module(torch.zeros((1, *shape), dtype=dtype, device=device))
            kernel = (module(impulses) - zero).transpose(0, 1).contiguous()
        bias = getattr(module, "bias", None)
        op = _ops.CircularConv(shape, out_shape, module, kernel, bias, s)
        center = self.value[source] if isinstance(source, fx.Node) else None
        if center is not None:
            with torch.no_grad():
                got, want = op.apply(center), self.value[node]
            tol = math.sqrt(torch.finfo(dtype).eps) * (1 + float(want.abs().max()))
            if got.shape != want.shape or not bool(((got - want).abs() <= tol).all()):
                raise self.no_rule(
                    node,
                    "it does not act as the circular convolution of its impulse responses "
                    "(Note [Circular convolution kernels])",
                )
        return self.add(op, [src], out_shape, self.where(node))

    # -- index operations (Note [Index operations]) -----------------------------
    def codes(self, index: int) -> Tensor:
        if index not in self.code_cache:
            numel = self.n * self.nodes[index].shape.numel()
            codes = self.offsets[index] + torch.arange(
                numel, dtype=torch.float64, device=self.x.device
            )
            self.code_cache[index] = codes.reshape(self.n, *self.nodes[index].shape)
        return self.code_cache[index]

    def index_op(self, node: fx.Node) -> _Lazy:
        def as_codes(arg: fx.Node) -> Any:
            if arg in self.rep:
                rep = self.rep[arg]
                return rep.codes if isinstance(rep, _Lazy) else self.codes(rep)
            return self.value[arg]

        def as_zero(arg: fx.Node) -> Any:
            if arg in self.rep:
                rep = self.rep[arg]
                return rep.zero if isinstance(rep, _Lazy) else torch.zeros_like(self.value[arg])
            return self.value[arg]

        code_args = fx.node.map_arg(node.args, as_codes)
        code_kwargs = dict(fx.node.map_arg(node.kwargs, as_codes))
        zero_args = fx.node.map_arg(node.args, as_zero)
        zero_kwargs = fx.node.map_arg(node.kwargs, as_zero)
        if node.target in _CAT:
            tensors = code_args[0] if code_args else code_kwargs["tensors"]
            sources = node.args[0] if node.args else node.kwargs["tensors"]
            if isinstance(sources, (list, tuple)):  # else one tuple-valued graph tensor
                nan = [
                    t if self.dependent(s) else torch.full_like(t, math.nan, dtype=torch.float64)
                    for s, t in zip(sources, tensors, strict=True)
                ]
                if code_args:
                    code_args = (nan, *code_args[1:])
                else:
                    code_kwargs["tensors"] = nan
        elif node.target is F.pad:
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            if mode == "constant":
                code_args = code_args[:2]
                code_kwargs = {"mode": "constant", "value": math.nan}
        elif (
            node.op == "call_function"
            and any(self.dependent(a) for a in _flat_nodes((node.args[1:], node.kwargs)))
            and node.target not in (operator.getitem,)
        ):
            raise self.no_rule(node, "an argument other than the first depends on the input")
        if node.target is operator.getitem and any(
            self.dependent(a) for a in _flat_nodes(node.args[1:])
        ):
            raise self.no_rule(node, "it indexes with an input-dependent index")
        with torch.no_grad():
            codes = self.run_concrete(node, code_args, code_kwargs)
            zero = self.run_concrete(node, zero_args, zero_kwargs)
        if not _is_tensor_tree(codes):
            raise self.no_rule(node, "its result is not a tensor or a tuple of tensors")
        return _Lazy(codes, zero)

    def materialize(self, arg: Any, consumer: fx.Node | None) -> int:
        if not self.dependent(arg):
            where = self.where(consumer) if consumer is not None else "the output"
            raise UnboundedModuleError(f"{where}: expected an input-dependent tensor operand")
        rep = self.rep[arg]
        if isinstance(rep, int):
            return rep
        if rep.node is None:
            if not isinstance(rep.codes, Tensor):
                where = self.where(consumer) if consumer is not None else "the output"
                raise UnboundedModuleError(
                    f"{where} takes the tuple {self.where(arg)}; index it to get one tensor"
                )
            rep.node = self.decode(rep.codes, rep.zero, self.where(arg))
        return rep.node

    def decode(self, codes: Tensor, zero: Tensor, where: str) -> int:
        n = self.n
        if codes.ndim == 0 or codes.shape[0] != n:
            raise UnboundedModuleError(
                f"{where} has no propagation rule: it moves the batch dimension "
                f"(output shape {tuple(codes.shape)} for a batch of {n})"
            )
        flat = codes.reshape(n, -1)
        m = flat.shape[1]
        finite = torch.isfinite(flat)
        source = torch.full((n, m), -1, dtype=torch.long, device=flat.device)
        index = torch.zeros((n, m), dtype=torch.long, device=flat.device)
        values = flat[finite]
        offsets = torch.tensor(self.offsets, dtype=torch.float64, device=flat.device)
        sizes = torch.tensor(
            [node.shape.numel() for node in self.nodes], dtype=torch.long, device=flat.device
        )
        ids = torch.searchsorted(offsets, values, right=True) - 1
        pos = (values - offsets[ids]).long()
        sample = pos // sizes[ids].clamp_min(1)
        rows = torch.arange(n, device=flat.device).unsqueeze(1).expand(n, m)[finite]
        if bool((sample != rows).any()):
            raise UnboundedModuleError(
                f"{where} has no propagation rule: it mixes the samples of the batch"
            )
        source[finite] = ids
        index[finite] = pos % sizes[ids].clamp_min(1)
        if not (bool((source == source[0]).all()) and bool((index == index[0]).all())):
            raise UnboundedModuleError(
                f"{where} has no propagation rule: it treats the samples of the batch differently"
            )
        src0, idx0 = source[0], index[0]
        inputs = sorted(set(src0[src0 >= 0].tolist()))
        if not inputs:
            raise UnboundedModuleError(f"{where}: the result does not depend on the input")
        local = torch.full_like(src0, -1)
        for k, i in enumerate(inputs):
            local[src0 == i] = k
        zero_flat = zero.detach().reshape(n, -1).to(self.x.dtype)
        if bool((zero_flat[finite] != 0).any()):
            raise UnboundedModuleError(
                f"{where} has no propagation rule: it is not a pure rearrangement of entries"
            )
        const = zero_flat if bool((~finite[0]).any()) and bool(zero_flat.any()) else None
        out_shape = codes.shape[1:]
        op = _ops.Gather([self.nodes[i].shape for i in inputs], out_shape, local, idx0, const)
        if op.reshape_only and self.nodes[inputs[0]].shape == out_shape:
            return inputs[0]
        return self.add(op, inputs, out_shape, where)


def _flat_nodes(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: found.append(n) or n)
    return found
