r"""The builder: one pass over a traced graph that turns each node into propagation ops.

Function and method nodes are converted by their kind in the op table
(`lipnets.graph.ops`); module nodes by the rule registered for their class
(`lipnets.propagation.rules`), when the trust policy trusts the module with it.

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
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from lipnets.errors import UnboundedModuleError
from lipnets.graph import (
    META_ATTRS,
    META_METHODS,
    TracedGraph,
    classify,
    first_operand,
    flat_nodes,
    operand,
)
from lipnets.graph.conv_calls import stand_in
from lipnets.propagation import _ops
from lipnets.propagation import ops_softmax as ops_softmax  # registers its map rules
from lipnets.propagation._ops import Op
from lipnets.propagation.graph import Graph, Node, evaluate
from lipnets.propagation.linear_maps import convert_map
from lipnets.propagation.nonlinear import (
    convert_elementwise,
    convert_max_pool,
    convert_maxmin,
    function_params,
)
from lipnets.propagation.ops_affine import held
from lipnets.propagation.rules import propagation_rule

__all__ = ["Builder", "Lazy"]


@dataclass(eq=False)
class Lazy:
    """An index operation's result, kept as codes until a non-index operation reads it."""

    codes: Any
    zero: Any
    node: int | None = None


def _is_tensor_tree(value: Any) -> bool:
    return isinstance(value, Tensor) or (
        isinstance(value, (list, tuple)) and all(_is_tensor_tree(v) for v in value)
    )


_INDEX_KINDS = {"copy", "replicate", "getitem", "cat", "pad"}


class Builder:
    def __init__(self, traced: TracedGraph, x: Tensor) -> None:
        self.traced = traced
        self.gm = traced.gm
        self.x = x
        self.n = x.shape[0]
        self.nodes: list[Node] = []
        self.offsets: list[int] = []
        self.total = 0
        self.value: dict[fx.Node, Any] = {}
        self.rep: dict[fx.Node, int | Lazy] = {}
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
        return self.traced.where(node)

    def no_rule(self, node: fx.Node, why: str = "") -> UnboundedModuleError:
        return UnboundedModuleError(
            f"{self.where(node)} has no propagation rule{': ' + why if why else ''}"
        )

    def dependent(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and arg in self.rep

    def const(self, arg: Any) -> Any:
        return self.value[arg] if isinstance(arg, fx.Node) else arg

    def shape_of(self, arg: fx.Node) -> torch.Size:
        return self.value[arg].shape

    # -- the pass -----------------------------------------------------------
    def run(self) -> Graph:
        output: Any = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.value[node] = self.x
                self.rep[node] = self.add(None, [], self.x.shape[1:], "the input")
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
            return Graph(self.nodes, out, None, values)
        value = self.const(output)
        if not isinstance(value, Tensor):
            raise UnboundedModuleError(
                f"the model returns {type(value).__name__}; bound propagation needs a model "
                "that returns one tensor"
            )
        return Graph(self.nodes, None, held(value), evaluate(self.nodes, self.x))

    def run_concrete(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "call_module":
            return self.traced.module(node)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        return node.target(*args, **kwargs)  # type: ignore[operator]

    def visit(self, node: fx.Node) -> None:
        args = fx.node.map_arg(node.args, self.const)
        kwargs = fx.node.map_arg(node.kwargs, self.const)
        deps = [a for a in flat_nodes((node.args, node.kwargs)) if a in self.rep]
        # Constants (a weight computed in forward) keep their autograd graph when bounds are
        # differentiable; the model's own values on the batch never need one (Note
        # [Differentiable bounds] in lipnets.propagation.checks).
        with torch.set_grad_enabled(torch.is_grad_enabled() and not deps):
            self.value[node] = self.run_concrete(node, args, kwargs)
        if not deps or self.is_meta(node):
            return
        self.rep[node] = self.convert(node)

    def is_meta(self, node: fx.Node) -> bool:
        """Values that carry no information about the input's values (sizes, constant fills)."""
        if node.op == "call_method" and node.target in META_METHODS:
            return True
        if node.target is getattr and len(node.args) > 1 and node.args[1] in META_ATTRS:
            return True
        if node.target in (len, torch.numel):
            return True
        spec = classify(node) if node.op != "call_module" else None
        if spec is not None and spec.kind == "fill":
            if spec.name != "full":
                return True
            position = 1 if node.op == "call_function" else 2
            fill = node.args[position] if len(node.args) > position else None
            fill = node.kwargs.get("fill_value", fill)
            return not any(self.dependent(a) for a in flat_nodes(fill))
        return False

    # -- dispatch -------------------------------------------------------------
    def convert(self, node: fx.Node) -> int | Lazy:
        if node.op == "call_module":
            return self.convert_module(node)
        spec = classify(node)
        if spec is None:
            raise self.no_rule(node)
        first = node.args[0] if node.args else node.kwargs.get("input")
        if spec.kind == "elementwise":
            params = function_params(self, node, spec.name)
            return self.elementwise(node, operand(node, spec), spec.name, params)
        if spec.kind == "maxmin":
            return self.maxmin(node, spec.name)
        if spec.kind == "sort":
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)  # type: ignore[arg-type]
            bound.apply_defaults()
            params = {k: self.const(v) for k, v in bound.arguments.items() if k != "x"}
            return self.comparators(
                node, bound.arguments["x"], spec.name, params.get("group_size"), params["dim"]
            )
        if spec.kind in ("add", "sub", "mul", "div", "neg", "pos"):
            return self.arith(node, spec.kind)
        if spec.kind == "reduce":
            return self.reduce(node, spec.name)
        if spec.kind in ("alias", "dropout"):
            return self.alias(node, first)
        if spec.kind == "linear":
            return self.functional_linear(node)
        if spec.kind == "conv":
            return self.functional_conv(node)
        if spec.kind in _INDEX_KINDS:
            return self.index_op(node)
        if spec.kind == "map":  # by name (lipnets.propagation.linear_maps.map_rule)
            return convert_map(self, node, spec)
        raise self.no_rule(node)

    def convert_module(self, node: fx.Node) -> int | Lazy:
        module = self.traced.module(node)  # a stand-in for a parametrized leaf
        if len(node.args) != 1 or node.kwargs or node.args[0] not in self.rep:
            raise self.no_rule(node, "it takes other arguments than one input-dependent tensor")
        rule = propagation_rule(module)
        if rule is None:
            raise self.no_rule(node)
        return rule(self, node, module, node.args[0])

    # -- rules used by the registry and the op kinds ---------------------------
    def relu(self, node: fx.Node, source: Any) -> int:
        src = self.materialize(source, node)
        shape = self.nodes[src].shape
        return self.add(_ops.ReLU([shape], shape), [src], shape, self.where(node))

    def elementwise(
        self, node: fx.Node, source: Any, name: str, params: dict[str, Any] | None = None
    ) -> int:
        """An activation by its op-table name (``"tanh"``, ``"leaky_relu"``, ...), for the
        function, method and module spellings alike (`lipnets.propagation.nonlinear`)."""
        return convert_elementwise(self, node, source, name, params or {})

    def maxmin(self, node: fx.Node, name: str) -> int:
        """``torch.maximum``/``minimum`` (Note [Maxima as comparators])."""
        return convert_maxmin(self, node, name)

    def max_pool(self, node: fx.Node, source: Any, module: Any) -> int:
        """``nn.MaxPool1d/2d/3d``, ``nn.AdaptiveMaxPool1d/2d/3d`` (Note [Maxima as comparators])."""
        return convert_max_pool(self, node, source, module)

    def affine(self, node: fx.Node, source: Any, make: Any) -> int:
        """An affine op built by ``make(in_shape, out_shape)`` on ``source``."""
        src = self.materialize(source, node)
        out_shape = self.value[node].shape[1:]
        op = make(self.nodes[src].shape, out_shape)
        return self.add(op, [src], out_shape, self.where(node))

    def comparators(
        self, node: fx.Node, source: Any, kind: str, group_size: Any, dim: Any
    ) -> int | Lazy:
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
        codes = rep.codes if isinstance(rep, Lazy) else self.codes(rep)
        zero = rep.zero if isinstance(rep, Lazy) else torch.zeros_like(self.value[operand])
        if not isinstance(codes, Tensor):
            raise self.no_rule(node, "an operand is a tuple")
        codes, zero = torch.broadcast_to(codes, shape), torch.broadcast_to(zero, shape)
        return self.decode(codes, zero, self.where(node))

    def coefficient(self, node: fx.Node, value: Any, out: Tensor) -> Tensor | float:
        if isinstance(value, Tensor):
            if value.is_complex():
                raise self.no_rule(node, f"it uses a constant of dtype {value.dtype}")
            value = torch.broadcast_to(held(value).to(out.dtype), out.shape)
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

    def alias(self, node: fx.Node, source: Any) -> int | Lazy:
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
        weight, bias = self.const(weight), self.const(bias)
        return self.affine(node, source, lambda i, o: _ops.Linear(i, o, None, weight, bias))

    def functional_conv(self, node: fx.Node) -> int | Lazy:
        """Note [Functional convolutions]: torch.nn's rule on the stand-in module."""
        source = first_operand(node)
        others = (node.args[1:], {k: v for k, v in node.kwargs.items() if k != "input"})
        if not node.args:  # the input by keyword: every positional argument is another
            others = (node.args, others[1])
        if any(self.dependent(a) for a in flat_nodes(others)):  # F.conv2d(x, x) included
            raise self.no_rule(node, "an argument other than its input depends on the input")
        module = stand_in(node, lambda arg: fx.node.map_arg(arg, self.const), self.where(node))
        return propagation_rule(module)(self, node, module, source)

    # -- index operations (Note [Index operations]) -----------------------------
    def codes(self, index: int) -> Tensor:
        if index not in self.code_cache:
            numel = self.n * self.nodes[index].shape.numel()
            codes = self.offsets[index] + torch.arange(
                numel, dtype=torch.float64, device=self.x.device
            )
            self.code_cache[index] = codes.reshape(self.n, *self.nodes[index].shape)
        return self.code_cache[index]

    def index_op(self, node: fx.Node) -> Lazy:
        def as_codes(arg: fx.Node) -> Any:
            if arg in self.rep:
                rep = self.rep[arg]
                return rep.codes if isinstance(rep, Lazy) else self.codes(rep)
            return self.value[arg]

        def as_zero(arg: fx.Node) -> Any:
            if arg in self.rep:
                rep = self.rep[arg]
                return rep.zero if isinstance(rep, Lazy) else torch.zeros_like(self.value[arg])
            return self.value[arg]

        code_args = fx.node.map_arg(node.args, as_codes)
        code_kwargs = dict(fx.node.map_arg(node.kwargs, as_codes))
        zero_args = fx.node.map_arg(node.args, as_zero)
        zero_kwargs = fx.node.map_arg(node.kwargs, as_zero)
        spec = classify(node) if node.op != "call_module" else None
        if spec is not None and spec.kind == "cat":
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
        elif spec is not None and spec.kind == "pad":
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            if mode == "constant":
                code_args = code_args[:2]
                code_kwargs = {"mode": "constant", "value": math.nan}
        elif (
            node.op == "call_function"
            and any(self.dependent(a) for a in flat_nodes((node.args[1:], node.kwargs)))
            and node.target is not operator.getitem
        ):
            raise self.no_rule(node, "an argument other than the first depends on the input")
        if node.target is operator.getitem and any(
            self.dependent(a) for a in flat_nodes(node.args[1:])
        ):
            raise self.no_rule(node, "it indexes with an input-dependent index")
        with torch.no_grad():
            codes = self.run_concrete(node, code_args, code_kwargs)
        zero = self.run_concrete(node, zero_args, zero_kwargs)  # constants: differentiable
        if not _is_tensor_tree(codes):
            raise self.no_rule(node, "its result is not a tensor or a tuple of tensors")
        return Lazy(codes, zero)

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
        zero_flat = held(zero).reshape(n, -1).to(self.x.dtype)
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
