"""Sound Lipschitz bounds composed over a model's real computational graph.

This is AutoLip (Scaman & Virmaux 2018) as a graph algorithm, with sound
per-node constants instead of power-iteration estimates. The model is traced
with torch.fx; modules that have a bound (a ``lipschitz_bound`` method or a
registered rule) are leaves. Each graph node ``v`` gets a constant $K_v$ such
that $v$ is $K_v$-Lipschitz as a function of the model's input:

* the input has $K = 1$; parameters, buffers and shape metadata have $K = 0$;
* a leaf module or a 1-input op with constant $L$: $K = L \\cdot K_{in}$;
* ``a + b`` and ``a - b``: $K = K_a r_a + K_b r_b$, where $r = \\sqrt{\\text{numel(out)} /
  \\text{numel(operand)}}$ accounts for broadcasting, which replicates entries;
* ``cat``/``stack``: $K = \\sqrt{\\sum_i K_i^2}$;
* ``c * a`` for a constant ``c``: $K = \\max|c| \\cdot K_a r_a$;
* reshapes, permutations, basic slicing: $K = K_{in}$; advanced indexing that
  repeats entries $m$ times: $K = \\sqrt{m} K_{in}$;
* any other op on an input-dependent tensor raises
  [`UnboundedModuleError`][lipnets.errors.UnboundedModuleError] naming it.

Broadcasting cannot be ruled out without shapes, so merges of input-dependent
tensors need ``input_shape``; without it lipnets raises
[`ShapeRequiredError`][lipnets.errors.ShapeRequiredError] rather than assume.

# Note [Graph faithfulness]

torch.fx records ``x += y`` as an out-of-place ``add``, so a graph can differ
from what eager mode computes when a tensor is mutated in place and used again
through another name. lipnets therefore (1) allows in-place ops only on a
freshly computed tensor that nothing else uses, (2) when ``input_shape`` is
given, runs the traced graph and the model on one random input (cloned for
each run, same RNG state, buffers restored) and refuses a graph whose output
differs, and (3) without ``input_shape`` refuses forwards whose source uses
augmented or attribute assignment, which only (2) could check. Forward hooks
and ``__call__`` overrides, which fx does not trace, are refused.
"""

from __future__ import annotations

import ast
import inspect
import math
import operator
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.nn.utils import parametrize

import lipnets.functional as LF
from lipnets.bounds.registry import as_bound, find_rule
from lipnets.errors import ShapeRequiredError, UnboundedModuleError, UntraceableModelError
from lipnets.functional import activations as _activations
from lipnets.functional.norms import spectral_norm_bound

__all__ = ["LeafBound", "lipschitz_bound"]


@dataclass(frozen=True)
class LeafBound:
    """The sound bound of one leaf module of a traced model."""

    name: str
    """Qualified module name, e.g. ``"features.3"``."""
    kind: str
    """The module's class name."""
    bound: torch.Tensor
    """Its sound bound (0-dim float64)."""


@dataclass
class _Composition:
    bound: torch.Tensor
    leaves: list[LeafBound] = field(default_factory=list)


LeafValue = Callable[[nn.Module, "torch.Size | None", str], "torch.Tensor | None"]
"""A leaf's constant from (module, its input shape or None, where): `_own_bound` by default.

Only `lipnets.estimators.autolip` passes another one (power-iteration estimates
for affine leaves); every bound in lipnets uses the default.
"""


def lipschitz_bound(
    model: nn.Module | Callable[..., Any], input_shape: Sequence[int] | None = None
) -> torch.Tensor:
    """Sound upper bound on a model's l2 -> l2 Lipschitz constant.

    The bound is composed over the model's real computational graph (traced
    with torch.fx) from sound per-module bounds computed from the weights the
    model has now. See the module docs for the composition rules. A module
    with a ``lipschitz_bound(input_shape=None)`` method is a leaf whose method
    is trusted for its own subgraph; torch built-ins use the rules registered
    with [`register_bound`][lipnets.bounds.register_bound].

    The result bounds the function the model computes in its current mode
    (``train()`` or ``eval()``); use ``eval()`` for BatchNorm and Dropout.

    Args:
        model: an ``nn.Module`` (a ``torch.compile``, ``DataParallel`` or
            ``DistributedDataParallel`` wrapper is unwrapped).
        input_shape: the shape of an input batch, e.g. ``(1, 3, 32, 32)``.
            Without it the bound holds for every input size, and parts whose
            bound depends on sizes (merges that might broadcast, adaptive
            pooling) raise [`ShapeRequiredError`][lipnets.errors.ShapeRequiredError].

    Returns:
        A 0-dim float64 CPU tensor, detached from autograd.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if ``input_shape`` is not a sequence of positive ints.
        UnboundedModuleError: if a module or op has no sound bound rule; the
            message names it, e.g. ``"1 (Hardswish) has no bound rule"``.
        UntraceableModelError: if torch.fx cannot trace the model; the message
            names the module to give a ``lipschitz_bound`` method.
        ShapeRequiredError: if the bound depends on sizes and ``input_shape``
            is missing.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import lipnets
        >>> f = nn.Sequential(nn.Linear(8, 8), lipnets.GroupSort(2), nn.Linear(8, 4))
        >>> sigma = [torch.linalg.matrix_norm(m.weight.double(), 2) for m in (f[0], f[2])]
        >>> bound = lipnets.lipschitz_bound(f)
        >>> bool(torch.isclose(bound, sigma[0] * sigma[1], rtol=1e-9))
        True

    References:
        Scaman & Virmaux, "Lipschitz regularity of deep neural networks:
        analysis and efficient estimation", NeurIPS 2018.
    """
    return _compose(model, input_shape).bound


def _compose(
    model: nn.Module, input_shape: Sequence[int] | None, leaf_value: LeafValue | None = None
) -> _Composition:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    shape = _check_shape(input_shape)
    model = _unwrap(model)
    _check_hooks(model)
    # Reading a parametrized weight can advance state (spectral_norm's power
    # iteration in training mode): restore every buffer, so the call has no effect.
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        where = _kind(model)
        leaf_value = _own_bound if leaf_value is None else leaf_value
        own = leaf_value(model, shape, where)
        if own is not None:
            return _Composition(own, [LeafBound("", where, own)])
        gm, constants, traced = _trace(model)
        if shape is not None:
            _propagate_shapes(model, gm, shape)
        else:
            _require_shapes_for_python_mutation(traced)
        return _Propagation(gm, constants, shape is not None, leaf_value).run()
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])


def _check_shape(input_shape: Sequence[int] | None) -> torch.Size | None:
    if input_shape is None:
        return None
    try:
        dims = tuple(input_shape)
    except TypeError:
        dims = None
    if (
        dims is None
        or not dims
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims)
    ):
        raise ValueError(
            "input_shape must be a non-empty sequence of positive ints such as (1, 3, 32, 32) "
            f"or None, got {input_shape!r}"
        )
    return torch.Size(dims)


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def _kind(module: nn.Module) -> str:
    """The class name a user wrote: ``BjorckLinear``, not ``ParametrizedBjorckLinear``."""
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__name__.startswith("Parametrized"):
        cls = cls.__bases__[0]
    return cls.__name__


def _has_own_bound(module: nn.Module) -> bool:
    return callable(getattr(module, "lipschitz_bound", None))


def _own_bound(module: nn.Module, shape: torch.Size | None, where: str) -> torch.Tensor | None:
    """The bound of a leaf: its own method, else its registered rule, else None."""
    if _has_own_bound(module):
        return as_bound(module.lipschitz_bound(input_shape=shape), where)
    rule = find_rule(module)
    if rule is None:
        return None
    return as_bound(rule(module, shape), where)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs")


def _check_hooks(model: nn.Module) -> None:
    """Refuse forward hooks: they can change a module's output behind its rule."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        raise UnboundedModuleError(
            "global forward hooks are registered (register_module_forward_hook); they can "
            "change every module's output, so no bound is sound while they are active"
        )
    for name, module in model.named_modules():
        where = f"{name or 'the model'} ({type(module).__name__})"
        lazy = isinstance(module, nn.modules.lazy.LazyModuleMixin)
        if lazy and module.has_uninitialized_params():
            raise ValueError(f"{where} is uninitialised (lazy): run one forward pass first")
        # GraphModule.__call__ only wraps forward to improve error messages.
        graph_module = isinstance(module, fx.GraphModule)
        if type(module).__call__ is not nn.Module.__call__ and not graph_module:
            raise UnboundedModuleError(
                f"{where} overrides __call__, which torch.fx does not follow (it traces "
                "forward); move that logic into forward"
            )
        # Rules and traces follow the class; a method set on the instance runs instead.
        patched = [
            k
            for k, v in vars(module).items()
            if callable(v) and not isinstance(v, (nn.Module, torch.Tensor))
            and callable(getattr(type(module), k, None))
        ]  # fmt: skip
        if getattr(module, "_compiled_call_impl", None) is not None:
            patched.append("_compiled_call_impl (module.compile())")
        if patched:
            raise UnboundedModuleError(
                f"{where} has {patched[0]} replaced on the instance, so it computes something "
                "else than its class, which is what lipnets bounds and traces; bound a module "
                "whose methods are its class's"
            )
        hooks = [h for attr in _HOOK_DICTS for h in getattr(module, attr, {}).values()]
        # The deprecated spectral_norm/weight_norm hooks rewrite `weight` before
        # each forward, so the attribute a rule reads can be stale.
        for hook in hooks:
            if type(hook).__name__ in ("SpectralNorm", "WeightNorm"):
                raise UnboundedModuleError(
                    f"{where} uses the deprecated torch.nn.utils.{type(hook).__name__.lower()} "
                    "hook, whose `weight` attribute can be stale; use "
                    "torch.nn.utils.parametrizations instead"
                )
        if hooks:
            raise UnboundedModuleError(
                f"{where} has forward hooks, which can change its output; remove them (or "
                "compute the bound on a copy without them)"
            )


def _require_shapes_for_python_mutation(traced: list[nn.Module]) -> None:
    """Without input_shape the graph cannot be checked against eager mode, so
    refuse forwards whose Python code fx may not record (Note [Graph faithfulness])."""
    found = _python_mutation(traced)
    if found is not None:
        module, construct = found
        raise ShapeRequiredError(
            f"{type(module).__name__}.forward uses {construct}, which torch.fx may record "
            "differently from what eager mode does (in-place updates, attribute writes); pass "
            "input_shape so that lipnets checks the traced graph against eager mode"
        )


def _python_mutation(traced: list[nn.Module]) -> tuple[nn.Module, str] | None:
    """The first traced module whose forward uses augmented assignment or writes an
    attribute or item (what torch.fx may record differently), with the construct."""
    for module in traced:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(type(module).forward)))
        except (OSError, TypeError, SyntaxError):
            construct = "code whose source cannot be read"
        else:
            found = [
                n
                for n in ast.walk(tree)
                if isinstance(n, ast.AugAssign)
                or (
                    isinstance(n, (ast.Assign, ast.AnnAssign))
                    and any(
                        isinstance(t, (ast.Attribute, ast.Subscript))
                        for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                    )
                )
            ]
            if not found:
                continue
            construct = f"`{ast.unparse(found[0])}`"
        return module, construct
    return None


# ---------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """fx tracer whose leaves are the modules lipnets can bound."""

    def __init__(self) -> None:
        super().__init__(autowrap_modules=(math, _activations, LF))
        self.stack: list[tuple[str, str]] = []
        self.failed_in: list[tuple[str, str]] | None = None
        self.traced: list[nn.Module] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _has_own_bound(m) or find_rule(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):  # type: ignore[override]
        self.stack.append((self.path_of_module(m), type(m).__name__))
        if not self.is_leaf_module(m, self.stack[-1][0]):
            self.traced.append(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.stack)
            raise
        finally:
            self.stack.pop()


def _where(gm: fx.GraphModule, node: fx.Node, rename: Callable[[str], str] = str) -> str:
    """Where ``node`` is, for error messages: the module's name and class, or the
    node's description inside the module that called it (``rename`` maps names)."""
    if node.op == "call_module":
        return f"{rename(str(node.target))} ({_kind(gm.get_submodule(str(node.target)))})"
    desc = f"node '{node.name}' ({_describe(node)})"
    stack = node.meta.get("nn_module_stack")
    if stack:
        qualname, cls = list(stack.values())[-1][:2]
        cls_name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
        return f"{rename(qualname)} ({cls_name}), {desc}"
    return desc


def _trace(model: nn.Module) -> tuple[fx.GraphModule, set[int], list[nn.Module]]:
    tracer = _Tracer()
    # Arguments after the first that have defaults (masks, flags) are fixed to
    # their defaults, so fx does not trace branches a default would never take.
    # They are constants; fx's guards on them then have K = 0 too.
    params = list(inspect.signature(model.forward).parameters.values())
    concrete = {
        p.name: p.default
        for p in params[1:]
        if p.default is not inspect.Parameter.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    constant_positions = {i for i, p in enumerate(params) if p.name in concrete}
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as exc:
        path = tracer.failed_in or []
        name = f"{path[-1][0]} ({path[-1][1]})" if path else f"the model ({type(model).__name__})"
        raise UntraceableModelError(
            f"torch.fx could not trace {name}: {type(exc).__name__}: {exc}. Give that module a "
            "`lipschitz_bound(self, input_shape=None)` method returning a sound bound, so that "
            "lipnets treats it as a leaf instead of tracing into it"
        ) from exc
    return fx.GraphModule(tracer.root, graph), constant_positions, [model, *tracer.traced]


def _propagate_shapes(model: nn.Module, gm: fx.GraphModule, shape: torch.Size) -> None:
    """Record node shapes, and check the graph computes what the model does.

    See Note [Graph faithfulness]. Both runs use the same RNG state; the caller
    restores every buffer.
    """
    ref = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    device = ref.device if ref is not None else torch.device("cpu")
    devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        x = torch.randn(shape, dtype=dtype, device=device)
        try:
            ShapeProp(gm).propagate(x.clone())
            torch.manual_seed(1)
            traced = gm(x.clone())  # clones: an in-place update of the input stays visible
            torch.manual_seed(1)
            eager = model(x.clone())
        except Exception as exc:
            raise ValueError(
                f"running {type(model).__name__} on a random input of shape "
                f"{tuple(shape)} failed: {type(exc).__name__}: {exc}"
            ) from exc
    outs, refs = list(_flat_tensors(traced)), list(_flat_tensors(eager))
    same = len(outs) == len(refs) and all(
        a.shape == b.shape
        and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + float(b.abs().max())), equal_nan=True)
        for a, b in zip(outs, refs, strict=True)
    )
    if not same:
        raise UntraceableModelError(
            f"the graph torch.fx traced from {type(model).__name__} does not compute what the "
            "model computes (an in-place update such as `x += ...` of a tensor used again, or "
            "Python-side state?); give the module that does this a `lipschitz_bound` method"
        )


def _flat_tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _flat_tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flat_tensors(v)


# ---------------------------------------------------------------------------
# Propagation of constants over the graph
# ---------------------------------------------------------------------------

_Rule = Callable[["_Propagation", fx.Node], float]

# Ops that return their input's entries, rearranged or a subset: K_out = K_in.
_SAME_FUNCTIONS = {
    torch.reshape, torch.flatten, torch.unflatten, torch.permute, torch.transpose, torch.t,
    torch.squeeze, torch.unsqueeze, torch.movedim, torch.moveaxis, torch.swapaxes,
    torch.swapdims, torch.clone, torch.flip, torch.roll, torch.narrow, torch.select,
    torch.split, torch.chunk, torch.unbind, torch.tensor_split, torch.detach,
    operator.pos, operator.neg, torch.neg, torch.negative,
    torch.relu, F.relu, torch.tanh, F.tanh, torch.abs, torch.absolute, F.relu6, F.hardtanh,
    torch.clamp, torch.clip, F.softsign, F.logsigmoid, F.tanhshrink,
    F.softshrink, LF.group_sort, LF.max_min, LF.full_sort,
}  # fmt: skip
_SAME_METHODS = {
    "reshape", "view", "flatten", "unflatten", "permute", "transpose", "t", "contiguous",
    "squeeze", "unsqueeze", "movedim", "moveaxis", "swapaxes", "swapdims", "clone", "flip",
    "roll", "narrow", "select", "split", "chunk", "unbind", "tensor_split", "detach", "view_as",
    "reshape_as", "float", "double", "half", "bfloat16", "to", "type", "type_as", "cpu", "cuda",
    "neg", "negative", "relu", "tanh", "abs", "absolute", "clamp", "clip",
}  # fmt: skip
# Ops whose result carries no information about tensor values (shapes, dtypes).
_META_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
_LIKE_FUNCTIONS = {
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
    torch.randn_like, torch.randint_like,
}  # fmt: skip
_ADD = {operator.add, operator.sub, torch.add, torch.sub, torch.subtract, "add", "sub", "subtract"}
_MUL = {operator.mul, torch.mul, torch.multiply, "mul", "multiply"}
_DIV = {
    operator.truediv,
    torch.div,
    torch.divide,
    torch.true_divide,
    "div",
    "divide",
    "true_divide",
}
_MAXMIN = {torch.maximum, torch.minimum, torch.fmax, torch.fmin, "maximum", "minimum"}
_CAT = {torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack}
_MEAN = {torch.mean, "mean"}
_SUM = {torch.sum, "sum"}


def _slope(node: fx.Node, name: str, position: int, default: float) -> float:
    value = node.kwargs.get(name, node.args[position] if len(node.args) > position else default)
    return float(value)


_SCALED_FUNCTIONS: dict[Any, Callable[[fx.Node], float]] = {
    torch.sigmoid: lambda n: 0.25,
    F.sigmoid: lambda n: 0.25,
    "sigmoid": lambda n: 0.25,
    F.hardsigmoid: lambda n: 1.0 / 6.0,
    F.leaky_relu: lambda n: max(1.0, abs(_slope(n, "negative_slope", 1, 0.01))),
    F.elu: lambda n: max(1.0, abs(_slope(n, "alpha", 1, 1.0))),
    F.dropout: lambda n: _dropout_scale(n),
}


def _dropout_scale(node: fx.Node) -> float:
    p = _slope(node, "p", 1, 0.5)
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    if not training:
        return 1.0
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


class _Propagation:
    def __init__(
        self, gm: fx.GraphModule, concrete: set[int], shapes: bool, leaf_value: LeafValue
    ) -> None:
        self.gm = gm
        self.leaf_value = leaf_value
        self.concrete = concrete
        self.shapes = shapes
        self.K: dict[fx.Node, float] = {}
        self.meta: set[fx.Node] = set()  # nodes whose value is shape metadata, not data
        self.meta_int: set[fx.Node] = set()  # meta nodes known to be Python ints
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.leaves: list[LeafBound] = []

    # -- helpers -----------------------------------------------------------
    def k(self, arg: Any) -> float:
        """K of an argument: a node's constant, or 0 for literals and containers of them."""
        if isinstance(arg, fx.Node):
            return self.K[arg]
        if isinstance(arg, (list, tuple)):
            return math.sqrt(sum(self.k(a) ** 2 for a in arg))
        if isinstance(arg, dict):
            return math.sqrt(sum(self.k(a) ** 2 for a in arg.values()))
        if isinstance(arg, slice):
            return self.k((arg.start, arg.stop, arg.step))
        return 0.0

    def shape(self, node: Any) -> torch.Size | None:
        if isinstance(node, fx.Node):
            tm = node.meta.get("tensor_meta")
            if isinstance(tm, TensorMetadata):
                return tm.shape
        return None

    def const(self, arg: Any, node: fx.Node) -> Any:
        """The value of a constant argument (a literal or a parameter/buffer)."""
        if not isinstance(arg, fx.Node):
            return arg
        if arg.op == "get_attr":
            value = self.gm
            for part in str(arg.target).split("."):
                value = getattr(value, part)
            return value.detach() if isinstance(value, torch.Tensor) else value
        raise UnboundedModuleError(
            f"{self.where(node)}: lipnets cannot read the value of its constant operand "
            f"'{arg.name}'; compute it in a module with a `lipschitz_bound` method"
        )

    def where(self, node: fx.Node) -> str:
        return _where(self.gm, node)

    def broadcast(self, node: fx.Node, operand: Any, other: Any) -> float:
        """sqrt of how many times broadcasting repeats each entry of ``operand``."""
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return 1.0
        if isinstance(other, fx.Node) and other.op == "get_attr":
            value = self.const(other, node)
            if isinstance(value, torch.Tensor) and value.numel() <= 1:
                return 1.0
        s_in, s_out = self.shape(operand), self.shape(node)
        if s_in is None or s_out is None:
            raise ShapeRequiredError(
                f"{self.where(node)} combines an input-dependent tensor with another tensor; "
                "if broadcasting repeats its entries the Lipschitz constant grows, and ruling "
                "that out needs shapes: pass input_shape, e.g. "
                "lipschitz_bound(model, input_shape=(1, *input_size))"
            )
        return math.sqrt(max(s_out.numel(), 1) / max(s_in.numel(), 1))

    # -- the pass ----------------------------------------------------------
    def run(self) -> _Composition:
        out: float | None = None
        placeholders = 0
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.K[node] = 0.0 if placeholders in self.concrete else 1.0
                placeholders += 1
            elif node.op == "get_attr":
                self.K[node] = 0.0
            elif node.op == "output":
                out = self.k(node.args[0])
            else:
                self.K[node] = self.visit(node)
                self.check_inplace(node)
        assert out is not None  # every fx graph has an output node
        return _Composition(as_bound(out, "the composed bound"), self.leaves)

    def visit(self, node: fx.Node) -> float:
        args = (*node.args, *node.kwargs.values())
        dependent = [a for a in _flat_nodes(args) if self.K[a] > 0]
        target = node.target
        if node.op == "call_module":
            return self.visit_module(node, dependent)
        if node.op == "call_method" and isinstance(target, str) and target.endswith("_"):
            target = target[:-1]  # in-place variant: same function (see check_inplace)
        if "out" in node.kwargs:
            raise UnboundedModuleError(f"{self.where(node)} writes into `out=`; use its result")
        if self.visit_meta(node, target, args):
            return 0.0
        if not dependent or target in _LIKE_FUNCTIONS:
            return 0.0
        self.check_dtype(node, target)
        return self.visit_op(node, target, dependent)

    def visit_meta(self, node: fx.Node, target: Any, args: tuple) -> bool:
        """Mark nodes whose value is shape metadata (sizes, dims), not tensor data."""
        nodes = _flat_nodes(args)
        literals = [a for a in args if not isinstance(a, fx.Node)]
        if node.op == "call_method" and target in _META_METHODS:
            self.meta.add(node)
            if target != "size" or len(node.args) > 1 or "dim" in node.kwargs:
                self.meta_int.add(node)  # x.size(d), x.dim(), x.numel()
            return True
        if target is getattr and len(node.args) > 1 and node.args[1] in _META_ATTRS:
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

    def check_dtype(self, node: fx.Node, target: Any) -> None:
        """Refuse casts to non-floating dtypes and bit reinterpretation (not Lipschitz)."""
        dtypes: list[Any] = []
        if node.op == "call_method" and target in _INTEGER_CASTS:
            dtypes.append(_INTEGER_CASTS[target])
        for a in (*node.args[1:], *node.kwargs.values()):
            if isinstance(a, torch.dtype):
                dtypes.append(a)
            elif isinstance(a, str) and node.op == "call_method" and target == "type":
                dtypes.append(a)
            elif isinstance(a, fx.Node) and target in ("to", "type_as") and self.K[a] == 0:
                value = self.const(a, node)
                if isinstance(value, torch.Tensor):
                    dtypes.append(value.dtype)
        reinterpret = target in ("view", "view_as") and any(
            isinstance(d, torch.dtype) for d in dtypes
        )
        bad = [
            d
            for d in dtypes
            if (isinstance(d, str) and d not in ("torch.FloatTensor", "torch.DoubleTensor"))
            or (isinstance(d, torch.dtype) and not (d.is_floating_point or d.is_complex))
        ]
        if reinterpret or bad:
            raise UnboundedModuleError(
                f"{self.where(node)} changes the dtype to {(bad or dtypes)[0]}, which rounds or "
                "reinterprets bits and is not Lipschitz; it has no bound rule"
            )

    def visit_module(self, node: fx.Node, dependent: list[fx.Node]) -> float:
        module = self.gm.get_submodule(str(node.target))
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
                f"@lipnets.register_bound({type(module).__name__}) or give the module a "
                "`lipschitz_bound(self, input_shape=None)` method"
            )
        self.leaves.append(LeafBound(str(node.target), _kind(module), bound))
        return float(bound) * self.K[dependent[0]]

    def visit_op(self, node: fx.Node, target: Any, dependent: list[fx.Node]) -> float:
        a = _first(node)
        if target in _SAME_FUNCTIONS or (node.op == "call_method" and target in _SAME_METHODS):
            self.only_first_dependent(node, dependent)
            return self.k(a)
        if target in _SCALED_FUNCTIONS:
            self.only_first_dependent(node, dependent)
            return _SCALED_FUNCTIONS[target](node) * self.k(a)
        if target is getattr and node.args[1] in ("T", "mT", "data"):
            return self.k(a)
        if target is operator.getitem:
            return self.getitem(node)
        if target in _CAT:
            # k() of a list is the root of the sum of squares of its entries; of a
            # tuple-valued node (x.unbind(0)), that node's joint constant.
            return self.k(node.args[0] if node.args else node.kwargs["tensors"])
        if target in _ADD or target in _MUL or target in _DIV or target in _MAXMIN:
            return self.binary(node, target)
        if target in _MEAN or target in _SUM:
            self.only_first_dependent(node, dependent)
            s_in, s_out = self.shape(a), self.shape(node)
            if target in _MEAN and (s_in is None or s_out is None):
                return self.k(a)  # an average of n entries has norm 1/sqrt(n) <= 1
            if s_in is None or s_out is None:
                self.broadcast(node, a, None)  # raises ShapeRequiredError
            ratio = s_in.numel() / max(s_out.numel(), 1)  # entries summed per output
            return self.k(a) * (1 / math.sqrt(ratio) if target in _MEAN else math.sqrt(ratio))
        if target is F.pad:
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            if mode != "constant":
                raise UnboundedModuleError(
                    f"{self.where(node)} pads with mode={mode!r}, which repeats entries; only "
                    "constant padding has a bound rule"
                )
            self.only_first_dependent(node, dependent)
            return self.k(a)
        if target is F.linear:
            self.only_first_dependent(node, dependent)
            weight = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
            return float(spectral_norm_bound(self.const(weight, node))) * self.k(a)
        raise UnboundedModuleError(f"{self.where(node)} has no bound rule")

    def only_first_dependent(self, node: fx.Node, dependent: list[fx.Node]) -> None:
        if any(d is not _first(node) for d in dependent):
            raise UnboundedModuleError(
                f"{self.where(node)} has no bound rule when an argument other than the first "
                "depends on the input"
            )

    def getitem(self, node: fx.Node) -> float:
        source, index = node.args
        if any(self.K[n] > 0 for n in _flat_nodes(index)):
            raise UnboundedModuleError(f"{self.where(node)} indexes with an input-dependent index")
        repeats = 1
        for item in index if isinstance(index, tuple) else (index,):
            if isinstance(item, fx.Node) and item in self.meta_int:
                continue  # a single integer index
            if isinstance(item, fx.Node):
                item = self.const(item, node)  # raises unless a parameter or buffer
            if isinstance(item, (list, tuple)) and any(isinstance(i, fx.Node) for i in item):
                raise UnboundedModuleError(
                    f"{self.where(node)} indexes with a list built at run time; lipnets cannot "
                    "count its repeated entries"
                )
            if isinstance(item, (list, tuple)) or (
                isinstance(item, torch.Tensor) and item.dtype != torch.bool
            ):
                repeats *= _max_repeats(torch.as_tensor(item).reshape(-1).tolist())
        return self.k(source) * math.sqrt(repeats)

    def binary(self, node: fx.Node, target: Any) -> float:
        if len(node.args) > 2 or node.kwargs.get("rounding_mode") is not None:
            raise UnboundedModuleError(
                f"{self.where(node)} uses an overload lipnets does not bound (a third positional "
                "argument, or rounding_mode=)"
            )
        a = _first(node)
        b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        ka, kb = self.k(a), self.k(b)
        if target in _ADD:
            alpha = abs(float(node.kwargs.get("alpha", 1)))
            total = 0.0
            if ka > 0:
                total += ka * self.broadcast(node, a, b)
            if kb > 0:
                total += alpha * kb * self.broadcast(node, b, a)
            return total
        if target in _MAXMIN:
            # |max(a, b) - max(a', b')| <= max(|da|, |db|), so ||d out||^2 <= ||da||^2 + ||db||^2.
            parts = [k * self.broadcast(node, x, y) for k, x, y in ((ka, a, b), (kb, b, a)) if k]
            return math.sqrt(sum(p**2 for p in parts))
        if ka > 0 and kb > 0:
            raise UnboundedModuleError(
                f"{self.where(node)} multiplies or divides two input-dependent tensors, which "
                "is not globally Lipschitz; it has no bound rule"
            )
        if target in _DIV and kb > 0:
            raise UnboundedModuleError(
                f"{self.where(node)} divides by an input-dependent tensor; it has no bound rule"
            )
        x, c = (a, b) if ka > 0 else (b, a)
        value = self.const(c, node)
        if isinstance(value, torch.Tensor):
            value = value.detach().double().abs()
            scale = float(value.max()) if target in _MUL else float(1.0 / value.min())
        else:
            scale = abs(float(value)) if target in _MUL else 1.0 / abs(float(value))
        return scale * self.k(x) * self.broadcast(node, x, c)

    def check_inplace(self, node: fx.Node) -> None:
        """Refuse in-place ops whose input is used again (Note [Graph faithfulness])."""
        inplace = (
            (node.op == "call_method" and str(node.target).endswith("_"))
            or (node.op == "call_function" and node.kwargs.get("inplace") is True)
            or (
                node.op == "call_module"
                and getattr(self.gm.get_submodule(str(node.target)), "inplace", False) is True
            )
        )
        source = _first(node)
        if not inplace or not isinstance(source, fx.Node):
            return
        # The update is invisible to every other name for the same memory, so
        # it is allowed only on a tensor that a non-aliasing op just produced
        # and that nothing else uses (nn.ReLU(inplace=True) after a Linear).
        others = [u for u in source.users if u is not node]
        if others or not self.fresh(source):
            users = ", ".join(repr(u.name) for u in others) or "an alias"
            raise UntraceableModelError(
                f"{self.where(node)} modifies '{source.name}' in place, and that memory is also "
                f"reached through {users}; the graph's constants cannot follow in-place "
                "updates there, so use the out-of-place version"
            )

    def fresh(self, node: fx.Node) -> bool:
        """Whether ``node`` is a new tensor, not a view or alias of another."""
        if node.op == "call_module":
            module = self.gm.get_submodule(str(node.target))
            return not _has_own_bound(module) and isinstance(module, _FRESH_MODULES)
        if node.op == "call_function":
            return node.target in _ADD | _MUL | _DIV | _MAXMIN | _CAT or node.target in (
                F.linear,
                torch.relu,
                F.relu,
                torch.tanh,
                torch.sigmoid,
            )
        return False


_INTEGER_CASTS = {
    "long": torch.int64,
    "int": torch.int32,
    "short": torch.int16,
    "char": torch.int8,
    "byte": torch.uint8,
    "bool": torch.bool,
}


def _first(node: fx.Node) -> Any:
    """The op's first operand, passed positionally or as ``input=``/``self=``."""
    if node.args:
        return node.args[0]
    return node.kwargs.get("input", node.kwargs.get("self"))


# Modules whose output is always a new tensor (never their input or a view of it).
_FRESH_MODULES = (
    nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
)  # fmt: skip


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


def _flat_nodes(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: found.append(n) or n)
    return found


def _describe(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return f"Tensor.{target}"
    return getattr(target, "__name__", str(target))
