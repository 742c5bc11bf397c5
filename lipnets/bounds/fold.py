"""The fold of Lipschitz constants over a traced graph: one method per kind of the op table.

The rules are listed in `lipnets.bounds.compose`; every product, sum and square root is
rounded up (Note [Rounding up] in `lipnets.bounds.rounding`).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx, nn

from lipnets.bounds.registry import as_bound, find_rule
from lipnets.bounds.rounding import add_up, div_up, mul_up, root_sum_squares, sqrt_up
from lipnets.bounds.types import Composition, LeafBound, LeafValue
from lipnets.bounds.where_rule import compare_bound, where_bound
from lipnets.errors import ShapeRequiredError, UnboundedModuleError
from lipnets.functional.norms import spectral_norm_bound
from lipnets.graph import (
    META_ATTRS,
    META_METHODS,
    TracedGraph,
    classify,
    first_operand,
    flat_nodes,
    module_kind,
    operand,
    trusted,
    user_name,
)
from lipnets.graph.conv_calls import stand_in
from lipnets.graph.policy import draws_random

__all__ = ["Fold", "last_linear"]


def last_linear(graph: TracedGraph) -> tuple[nn.Module, fx.Node] | None:
    """The final layer and its input node, when the model returns the output of an
    ``nn.Linear`` (or a subclass such as ``BjorckLinear``) that the trust policy trusts
    to compute $W x + b$ (no forward of its own, no hook: Note [Trust policy])."""
    output = next(n for n in reversed(graph.gm.graph.nodes) if n.op == "output")
    node = output.args[0]
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    module = graph.module(node)
    if not trusted(module, nn.Linear) or len(node.args) != 1 or node.kwargs:
        return None
    source = node.args[0]
    return (module, source) if isinstance(source, fx.Node) else None


class Fold:
    def __init__(
        self,
        graph: TracedGraph,
        shapes: dict[fx.Node, torch.Size] | None,
        leaf_value: LeafValue,
    ) -> None:
        self.graph = graph
        self.gm = graph.gm
        self.shapes = shapes
        self.leaf_value = leaf_value
        self.K: dict[fx.Node, float] = {}
        self.values: dict[fx.Node, Any] = {}
        self.meta: set[fx.Node] = set()  # nodes whose value is shape metadata, not data
        self.meta_int: set[fx.Node] = set()  # meta nodes known to be Python ints
        self.leaves: list[LeafBound] = []

    # -- helpers -----------------------------------------------------------
    def k(self, arg: Any) -> float:
        """K of an argument: a node's constant, 0 for literals, the root of the sum of
        squares for containers (disjoint parts)."""
        if isinstance(arg, fx.Node):
            return self.K[arg]
        if isinstance(arg, (list, tuple)):
            return root_sum_squares([self.k(a) for a in arg])
        if isinstance(arg, dict):
            return root_sum_squares([self.k(a) for a in arg.values()])
        if isinstance(arg, slice):
            return self.k((arg.start, arg.stop, arg.step))
        return 0.0

    def shape(self, node: Any) -> torch.Size | None:
        if isinstance(node, fx.Node) and self.shapes is not None:
            return self.shapes.get(node)
        return None

    def where(self, node: fx.Node) -> str:
        return self.graph.where(node)

    def const(self, arg: Any, node: fx.Node) -> Any:
        """The value of an argument that does not depend on the input (evaluated once)."""
        if not isinstance(arg, fx.Node):
            return fx.node.map_arg(arg, lambda a: self.const(a, node))
        if arg in self.values:
            return self.values[arg]
        if self.K.get(arg, 0.0) > 0 or arg in self.meta or arg.op in ("placeholder", "output"):
            raise UnboundedModuleError(
                f"{self.where(node)}: lipnets cannot read the value of its constant operand "
                f"'{arg.name}' (it depends on the input or its shape); compute it in a module "
                "with a `lipschitz_bound` method"
            )
        args = self.const(arg.args, node)
        kwargs = self.const(arg.kwargs, node)
        if arg.op == "get_attr":
            value: Any = self.gm
            for part in str(arg.target).split("."):
                value = getattr(value, part)
        elif arg.op == "call_module":  # a realised parametrization, or a module of constants
            module = self.graph.module(arg)
            if draws_random(module):
                raise UnboundedModuleError(
                    f"{self.where(node)}: its constant operand '{arg.name}' is computed by "
                    f"{module_kind(module)} in training mode, which draws random numbers: a "
                    "bound would hold for one draw only; bound the model in eval mode"
                )
            value = module(*args, **kwargs)
        elif arg.op == "call_method":
            value = getattr(args[0], str(arg.target))(*args[1:], **kwargs)
        else:
            value = arg.target(*args, **kwargs)  # type: ignore[operator]
        value = value.detach() if isinstance(value, torch.Tensor) else value
        self.values[arg] = value
        return value

    def broadcast(self, node: fx.Node, operand: Any, other: Any) -> float:
        """sqrt of how many times broadcasting repeats each entry of ``operand``."""
        if other is None or (isinstance(other, (int, float)) and not isinstance(other, bool)):
            return 1.0
        if isinstance(other, fx.Node) and self.K[other] == 0 and other not in self.meta:
            value = self.const(other, node)
            if not isinstance(value, torch.Tensor) or value.numel() <= 1:
                return 1.0
        return self.replication(node, operand)

    def replication(self, node: fx.Node, operand: Any) -> float:
        """sqrt(numel(out) / numel(operand)): every entry copied that many times."""
        s_in, s_out = self.shape(operand), self.shape(node)
        if s_in is None or s_out is None:
            raise ShapeRequiredError(
                f"{self.where(node)} combines an input-dependent tensor with another tensor or "
                "copies its entries; if broadcasting repeats them the Lipschitz constant grows, "
                "and ruling that out needs shapes: pass input_shape, e.g. "
                "lipschitz_bound(model, input_shape=(1, *input_size))"
            )
        return sqrt_up(div_up(max(s_out.numel(), 1), max(s_in.numel(), 1)))

    # -- the pass ----------------------------------------------------------
    def run(self) -> Composition:
        out: float | None = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.K[node] = 1.0
            elif node.op == "get_attr":
                self.K[node] = 0.0
            elif node.op == "output":
                out = self.k(node.args[0])
            else:
                self.K[node] = self.visit(node)
        assert out is not None  # every fx graph has an output node
        composition = Composition(as_bound(out, "the composed bound"), self.leaves)
        head = last_linear(self.graph)
        if head is not None:
            composition.head = head[0]
            composition.body = as_bound(self.k(head[1]), "the bound before the last layer")
        return composition

    def visit(self, node: fx.Node) -> float:
        args = (*node.args, *node.kwargs.values())
        dependent = [a for a in flat_nodes(args) if self.K[a] > 0]
        if node.op == "call_module":
            return self.visit_module(node, dependent)
        if self.visit_meta(node, args):
            return 0.0
        if not dependent:
            return 0.0
        spec = classify(node)
        if spec is None:
            raise UnboundedModuleError(f"{self.where(node)} has no bound rule")
        if spec.kind != "fill":  # a constant fill may have any dtype
            self.check_dtype(node, spec.name)
        visit = getattr(self, f"op_{spec.kind}", None)
        if visit is None:
            raise UnboundedModuleError(f"{self.where(node)} has no bound rule")
        return visit(node, spec, dependent)

    def visit_meta(self, node: fx.Node, args: tuple) -> bool:
        """Mark nodes whose value is shape metadata (sizes, dims), not tensor data."""
        target = node.target
        nodes = flat_nodes(args)
        literals = [a for a in args if not isinstance(a, fx.Node)]
        if node.op == "call_method" and target in META_METHODS:
            self.meta.add(node)
            if target != "size" or len(node.args) > 1 or "dim" in node.kwargs:
                self.meta_int.add(node)  # x.size(d), x.dim(), x.numel()
            return True
        if target is getattr and len(node.args) > 1 and node.args[1] in META_ATTRS:
            self.meta.add(node)
            return True
        if target in (len, torch.numel):
            self.meta.add(node)
            self.meta_int.add(node)
            return True
        if node.op == "call_function" and nodes and all(a in self.meta for a in nodes):
            if getattr(target, "__module__", None) not in ("_operator", "operator"):
                return False
            self.meta.add(node)
            # int arithmetic, or one entry of a torch.Size, stays an int
            scalar = all(isinstance(a, (int, float)) for a in literals)
            if scalar and (all(a in self.meta_int for a in nodes) or target is operator.getitem):
                self.meta_int.add(node)
            return True
        return False

    def visit_module(self, node: fx.Node, dependent: list[fx.Node]) -> float:
        module = self.graph.module(node)
        where = self.where(node)
        if not dependent:
            return 0.0
        if len(set(dependent)) > 1 or not node.args or dependent[0] is not node.args[0]:
            raise UnboundedModuleError(
                f"{where} receives more than one input-dependent tensor, or one that is not "
                "its first argument; lipnets bounds single-input modules only"
            )
        bound = self.leaf_value(module, self.shape(node.args[0]), where)
        if bound is None:
            raise UnboundedModuleError(
                f"{where} has no bound rule: register one with "
                f"@lipnets.register_bound({module_kind(module)}) or give the module a "
                "`lipschitz_bound(self, input_shape=None)` method"
            )
        self.leaves.append(LeafBound(_leaf_name(node), module_kind(module), bound))
        return mul_up(float(bound), self.K[dependent[0]])

    def only_first_dependent(self, node: fx.Node, dependent: list[fx.Node]) -> None:
        if any(d is not first_operand(node) for d in dependent):
            raise UnboundedModuleError(
                f"{self.where(node)} has no bound rule when an argument other than the first "
                "depends on the input"
            )

    # -- one method per kind of the op table -----------------------------------
    def op_copy(self, node, spec, dependent) -> float:
        self.only_first_dependent(node, dependent)
        if spec.name in ("view", "view_as") and _view_dtype(node):
            raise UnboundedModuleError(
                f"{self.where(node)} reinterprets the bits as another dtype, which is not "
                "Lipschitz; it has no bound rule"
            )
        return self.k(first_operand(node))

    def op_alias(self, node, spec, dependent) -> float:
        self.only_first_dependent(node, dependent)
        return self.k(first_operand(node))

    def op_sort(self, node, spec, dependent) -> float:
        self.only_first_dependent(node, dependent)
        return self.k(first_operand(node))  # sorting is 1-Lipschitz in l2

    def op_neg(self, node, spec, dependent) -> float:
        return self.op_copy(node, spec, dependent)

    op_pos = op_neg

    def op_replicate(self, node, spec, dependent) -> float:
        self.only_first_dependent(node, dependent)
        a = first_operand(node)
        return mul_up(self.k(a), self.replication(node, a))

    def op_cast(self, node, spec, dependent) -> float:
        raise UnboundedModuleError(
            f"{self.where(node)} changes the dtype to {_CASTS.get(spec.name, spec.name)}, "
            "which rounds and is not Lipschitz; it has no bound rule"
        )

    def op_elementwise(self, node, spec, dependent) -> float:
        if spec.operand is None:  # else a recognised pattern (Note [Recognised patterns])
            self.only_first_dependent(node, dependent)
        slope = spec.slope
        try:
            value = float(slope(node) if callable(slope) else slope)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise UnboundedModuleError(
                f"{self.where(node)} takes its slope from a value lipnets cannot read: {exc}"
            ) from exc
        return mul_up(value, self.k(operand(node, spec)))

    def op_map(self, node, spec, dependent) -> float:
        """A map of the first operand with the constant its `MapBound` computes."""
        self.only_first_dependent(node, dependent)
        a = first_operand(node)
        value = spec.slope(node, lambda arg: self.const(arg, node), self.shape(a))
        return mul_up(float(as_bound(value, self.where(node))), self.k(a))

    def op_dropout(self, node, spec, dependent) -> float:
        return self.op_copy(node, spec, dependent)  # training=False (else refused by trace)

    def op_getitem(self, node, spec, dependent) -> float:
        source, index = node.args
        if any(self.K[n] > 0 for n in flat_nodes(index)):
            raise UnboundedModuleError(f"{self.where(node)} indexes with an input-dependent index")
        repeats = 1
        for item in index if isinstance(index, tuple) else (index,):
            if isinstance(item, fx.Node) and item in self.meta_int:
                continue  # a single integer index
            if isinstance(item, fx.Node):
                item = self.const(item, node)
            if isinstance(item, (list, tuple)) and any(isinstance(i, fx.Node) for i in item):
                raise UnboundedModuleError(
                    f"{self.where(node)} indexes with a list built at run time; lipnets cannot "
                    "count its repeated entries"
                )
            if isinstance(item, (list, tuple)) or (
                isinstance(item, torch.Tensor) and item.dtype != torch.bool
            ):
                repeats *= _max_repeats(torch.as_tensor(item).reshape(-1).tolist())
        return mul_up(self.k(source), sqrt_up(repeats))

    def op_cat(self, node, spec, dependent) -> float:
        # k() of a list is the root of the sum of squares of its entries; of a
        # tuple-valued node (x.unbind(0)), that node's joint constant.
        return self.k(node.args[0] if node.args else node.kwargs["tensors"])

    op_pad = op_map  # Note [Padding copies] in lipnets.functional.linear_maps

    def op_compare(self, node, spec, dependent) -> float:
        return compare_bound(self, node)  # Note [Where with a comparison]

    def op_where(self, node, spec, dependent) -> float:
        return where_bound(self, node)

    def op_linear(self, node, spec, dependent) -> float:
        self.only_first_dependent(node, dependent)
        weight = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
        value = self.const(weight, node)
        return mul_up(float(spectral_norm_bound(value, name="weight")), self.k(first_operand(node)))

    def op_conv(self, node, spec, dependent) -> float:
        """torch.nn's rule on the stand-in module (Note [Functional convolutions])."""
        self.only_first_dependent(node, dependent)
        where = self.where(node)
        module = stand_in(node, lambda arg: self.const(arg, node), where)
        rule = find_rule(module)
        if rule is None:  # nn.Conv3d: no rule (Note [Functional convolutions])
            raise UnboundedModuleError(f"{where} has no bound rule: {type(module).__name__}")
        bound = as_bound(rule(module, self.shape(first_operand(node))), where)
        return mul_up(float(bound), self.k(first_operand(node)))

    def op_reduce(self, node, spec, dependent) -> float:
        self.only_first_dependent(node, dependent)
        a = first_operand(node)
        s_in, s_out = self.shape(a), self.shape(node)
        mean = spec.name == "mean"
        if mean and (s_in is None or s_out is None):
            return self.k(a)  # an average of n entries has norm 1/sqrt(n) <= 1
        if s_in is None or s_out is None:
            self.replication(node, a)  # raises ShapeRequiredError
            raise AssertionError  # pragma: no cover
        count, outputs = s_in.numel(), max(s_out.numel(), 1)  # entries summed per output
        factor = sqrt_up(div_up(outputs, count) if mean else div_up(count, outputs))
        return mul_up(self.k(a), factor)

    def op_fill(self, node, spec, dependent) -> float:
        """Constant fills; a fill value computed from the input is broadcast to the output."""
        if spec.name != "full":
            return 0.0  # zeros/ones: values independent of the input's values
        if node.op == "call_method":  # x.new_full(size, fill_value)
            fill = node.kwargs.get("fill_value", node.args[2] if len(node.args) > 2 else None)
        else:  # torch.full_like(x, fill_value)
            fill = node.kwargs.get("fill_value", node.args[1] if len(node.args) > 1 else None)
        if any(self.K[n] > 0 for n in flat_nodes((node.args[1:], node.kwargs))) and not (
            isinstance(fill, fx.Node) and self.K[fill] > 0
        ):
            raise UnboundedModuleError(
                f"{self.where(node)} has no bound rule: an input-dependent size or dtype"
            )
        if not isinstance(fill, fx.Node) or self.K[fill] == 0:
            return 0.0
        return mul_up(self.k(fill), self.replication(node, fill))

    def op_clamp(self, node, spec, dependent) -> float:
        x = first_operand(node)
        names = {"clamp_min": ("min",), "clamp_max": ("max",)}.get(spec.name, ("min", "max"))
        bounds = [
            node.kwargs.get(name, node.args[i + 1] if len(node.args) > i + 1 else None)
            for i, name in enumerate(names)
        ]
        if x not in dependent or any(isinstance(b, fx.Node) and self.K[b] > 0 for b in bounds):
            raise UnboundedModuleError(
                f"{self.where(node)} has no bound rule: its bounds depend on the input"
            )
        factor = 1.0
        for b in bounds:
            factor = max(factor, self.broadcast(node, x, b))
        return mul_up(self.k(x), factor)

    def op_maxmin(self, node, spec, dependent) -> float:
        # |max(a, b) - max(a', b')| <= max(|da|, |db|), so ||d out||^2 <= ||da||^2 + ||db||^2.
        a, b = self.operands(node)
        ka, kb = self.k(a), self.k(b)
        parts = [
            mul_up(k, self.broadcast(node, x, y)) for k, x, y in ((ka, a, b), (kb, b, a)) if k > 0
        ]
        return root_sum_squares(parts)

    def operands(self, node: fx.Node) -> tuple[Any, Any]:
        if len(node.args) > 2 or node.kwargs.get("rounding_mode") is not None:
            raise UnboundedModuleError(
                f"{self.where(node)} uses an overload lipnets does not bound (a third positional "
                "argument, or rounding_mode=)"
            )
        a = first_operand(node)
        b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        return a, b

    def op_add(self, node, spec, dependent) -> float:
        a, b = self.operands(node)
        ka, kb = self.k(a), self.k(b)
        alpha = node.kwargs.get("alpha", 1)
        if isinstance(alpha, fx.Node):
            raise UnboundedModuleError(f"{self.where(node)} has no bound rule: alpha is a tensor")
        total = 0.0
        if ka > 0:
            total = add_up(total, mul_up(ka, self.broadcast(node, a, b)))
        if kb > 0:
            term = mul_up(abs(float(alpha)), mul_up(kb, self.broadcast(node, b, a)))
            total = add_up(total, term)
        return total

    op_sub = op_add

    def op_mul(self, node, spec, dependent) -> float:
        return self.scale(node, multiply=True)

    def op_div(self, node, spec, dependent) -> float:
        return self.scale(node, multiply=False)

    def scale(self, node: fx.Node, multiply: bool) -> float:
        a, b = self.operands(node)
        ka, kb = self.k(a), self.k(b)
        if ka > 0 and kb > 0:
            raise UnboundedModuleError(
                f"{self.where(node)} multiplies or divides two input-dependent tensors, which "
                "is not globally Lipschitz; it has no bound rule"
            )
        if not multiply and kb > 0:
            raise UnboundedModuleError(
                f"{self.where(node)} divides by an input-dependent tensor; it has no bound rule"
            )
        x, c = (a, b) if ka > 0 else (b, a)
        value = self.const(c, node)
        if isinstance(value, torch.Tensor):
            value = value.detach().double().abs()
            if not bool(torch.isfinite(value).all()):
                raise UnboundedModuleError(f"{self.where(node)}: a constant operand is not finite")
            scale = float(value.max()) if multiply else div_up(1.0, float(value.min()))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            scale = abs(float(value)) if multiply else div_up(1.0, abs(float(value)))
        else:
            raise UnboundedModuleError(
                f"{self.where(node)} has no bound rule for a constant of type "
                f"{type(value).__name__}"
            )
        if not math.isfinite(scale):
            raise UnboundedModuleError(f"{self.where(node)}: a constant operand is not finite")
        return mul_up(scale, mul_up(self.k(x), self.broadcast(node, x, c)))

    def check_dtype(self, node: fx.Node, name: str) -> None:
        """Refuse casts to non-floating dtypes and bit reinterpretation (not Lipschitz)."""
        dtypes: list[Any] = []
        for a in (*node.args[1:], *node.kwargs.values()):
            if isinstance(a, torch.dtype):
                dtypes.append(a)
            elif isinstance(a, str) and name == "type":
                dtypes.append(a)
            elif isinstance(a, fx.Node) and name in ("to", "type_as") and self.K[a] == 0:
                value = self.const(a, node)
                if isinstance(value, torch.Tensor):
                    dtypes.append(value.dtype)
        bad = [
            d
            for d in dtypes
            if (isinstance(d, str) and d not in ("torch.FloatTensor", "torch.DoubleTensor"))
            or (isinstance(d, torch.dtype) and not (d.is_floating_point or d.is_complex))
        ]
        if bad:
            raise UnboundedModuleError(
                f"{self.where(node)} changes the dtype to {bad[0]}, which rounds or "
                "reinterprets bits and is not Lipschitz; it has no bound rule"
            )


_CASTS = {
    "long": torch.int64, "int": torch.int32, "short": torch.int16, "char": torch.int8,
    "byte": torch.uint8, "bool": torch.bool,
}  # fmt: skip


def _view_dtype(node: fx.Node) -> bool:
    return any(isinstance(a, torch.dtype) for a in (*node.args[1:], *node.kwargs.values()))


def _leaf_name(node: fx.Node) -> str:
    name = user_name(str(node.target))
    return "" if name == "the model" else name


def _max_repeats(indices: list[int]) -> int:
    """Largest number of times one entry is selected by a list of indices.

    Without the dimension's size, ``i >= 0`` and ``j < 0`` may name the same
    entry (``j = i - n``), so the counts of both signs are added: sound, and
    exact when all indices share a sign.
    """
    counts: dict[int, int] = {}
    for i in indices:
        counts[i] = counts.get(i, 0) + 1
    pos = max((c for i, c in counts.items() if i >= 0), default=0)
    neg = max((c for i, c in counts.items() if i < 0), default=0)
    return max(pos + neg, 1)
