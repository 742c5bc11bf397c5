"""`trace`: one traced graph per model, reused by every entry point.

`trace(model, input_shape=None)` applies the trust policy (`lipnets.graph.policy`),
traces the model with torch.fx (trusted modules are leaves), applies the
faithfulness policy (`lipnets.graph.faithful`) and returns a `TracedGraph`.
The fx trace does not depend on the input size, so within `reuse_traces` it is
kept and reused across sizes, radii, batches and calls while the model's
structure is the same: its submodules, their classes and modes, and
their plain attributes (which a trace may have read as constants). Shapes and
the eager-mode check are kept per input size. Weights are read when a consumer
uses the graph, never cached.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from lipnets._state import STATE_LOCK, ModuleState, restored_buffers
from lipnets.errors import (
    InvalidModelError,
    LipnetsError,
    UnboundedModuleError,
    UntraceableModelError,
)
from lipnets.graph.faithful import InPlaceAudit, StateSnapshot, check_inplace, compare
from lipnets.graph.forms import load_peers
from lipnets.graph.ops import FUNCTIONAL_MODULES, classify
from lipnets.graph.policy import (
    check_model,
    module_kind,
    rules_version,
    trusted_owner,
    unwrap,
)
from lipnets.graph.realise import realise, state_modules
from lipnets.graph.tracer import functions_run, mutation_in, trace_graph

__all__ = [
    "TracedGraph",
    "check_input_shape",
    "reuse_traces",
    "reusing",
    "trace",
    "trace_count",
]

_CACHE_LOCK = threading.Lock()
_TRACES = [0]


_REUSE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("lipnets_reuse", default=None)


@contextlib.contextmanager
def reuse_traces() -> Iterator[None]:
    """Within this context, `trace` reuses a model's graph across calls, radii, batches
    and input sizes while its fingerprint is unchanged.

    The fingerprint covers what lipnets can see a trace depend on: each submodule's
    identity, class (with its ``forward`` methods) and mode, its attributes (Python
    values, lists, tuples and dicts by value; other objects by identity), the
    identities of its parameters and buffers, and the rules registered.
    It cannot see everything a ``forward`` may read as a constant: a module-level
    global, a closure, a field of a config object. Entering the context states that
    none of those changes inside it. Weights may change (an optimiser step, a
    ``load_state_dict``): they are read whenever a graph is used, never cached.
    Outside the context every call traces afresh. `certification_report` runs in it
    (one trace for all radii and batches). Nested contexts share the outer one's graphs.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import lipnets
        >>> from lipnets.graph import reuse_traces, trace_count
        >>> # eval(): crown_bounds runs the model in eval mode, and a trace may read the mode
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
        >>> x = torch.randn(5, 4)
        >>> before = trace_count()
        >>> with reuse_traces():
        ...     for eps in (0.01, 0.1):
        ...         _ = lipnets.propagation.crown_bounds(model, x, eps, norm=2)
        ...     _ = lipnets.lipschitz_bound(model, input_shape=(1, 4))
        >>> trace_count() - before
        1
    """
    if _REUSE.get() is not None:
        yield
        return
    token = _REUSE.set({})
    try:
        yield
    finally:
        _REUSE.reset(token)


def reusing() -> bool:
    """Whether a `reuse_traces` context is active, so that a graph may serve many calls."""
    return _REUSE.get() is not None


def trace_count() -> int:
    """How many fx traces lipnets has run in this process (a test counts them)."""
    return _TRACES[0]


def check_input_shape(input_shape: Sequence[int] | None) -> torch.Size | None:
    """``input_shape`` as a ``torch.Size``, or a ValueError naming what was received."""
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


def is_leaf(module: nn.Module) -> bool:
    """A module is a leaf when it is trusted through a rule of any kind (Note [Trust policy])."""
    return trusted_owner(module) is not None


@dataclass(eq=False)
class TracedGraph:
    """A model's fx graph, checked by the trust and faithfulness policies.

    The graph is traced from ``nn.Sequential(model)``, so a model that is itself
    a trusted leaf is one ``call_module`` node; names in messages are the user's.
    """

    model: nn.Module
    """The traced model (wrappers such as DataParallel removed)."""
    gm: fx.GraphModule
    inplace_ops: int
    """In-place updates of fresh tensors the graph accepted (rule 1 of the Note)."""
    traced: list[nn.Module]
    """The modules traced into (not leaves)."""
    modes: tuple[bool, ...] = ()
    """The ``training`` flags of the model and the modules traced into: a trace may have
    read them (``if self.training:``), so the cached graph serves only the same modes.
    Leaves run as they are, in whatever mode they are in."""
    _shapes: dict[Any, dict[fx.Node, torch.Size]] = field(default_factory=dict)
    _lock: Any = field(default_factory=threading.Lock)
    memo: dict[Any, Any] = field(default_factory=dict)
    """Consumers' caches that live as long as the graph (the propagation graphs of
    `lipnets.propagation.graph.build`, per input batch shape); only a graph reused
    within `reuse_traces` is asked for them twice."""
    overrides: dict[str, nn.Module] = field(default_factory=dict)
    """In a view made by `realised`, the modules that stand for graph targets in one call
    (Note [Realised parametrizations] in `lipnets.graph.realise`)."""

    @property
    def name(self) -> str:
        return module_kind(self.model)

    @property
    def root(self) -> nn.Module:
        """What the graph was traced from: the model called as the only submodule."""
        return nn.Sequential(self.model)

    def module(self, node: fx.Node) -> nn.Module:
        """The module a ``call_module`` node calls (in a `realised` view, its stand-in)."""
        target = str(node.target)
        found = self.overrides.get(target)
        return self.gm.get_submodule(target) if found is None else found

    def realised(self) -> TracedGraph:
        """A view of this graph for one call, in which parametrized tensors are the values
        they realise now, computed once, the model's state left as it was (Note [Realised
        parametrizations] in `lipnets.graph.realise`); this graph itself when it reads
        none."""
        overrides = realise(self)
        return dataclasses.replace(self, overrides=overrides) if overrides else self

    def run(self, x: Tensor) -> Any:
        """``model(x)``, with the state of the parametrizations the graph realises restored."""
        with self.restoring():
            return self.model(x)

    @contextlib.contextmanager
    def restoring(self) -> Iterator[None]:
        """Save the state of the parametrizations the graph realises and restore it on exit
        (Note [State restored] in `lipnets._state`)."""
        with STATE_LOCK:
            state = ModuleState(state_modules(self))
            try:
                yield
            finally:
                state.restore()

    def leaves(self) -> list[nn.Module]:
        """The model's own modules that ``call_module`` nodes call."""
        seen: dict[int, nn.Module] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                m = self.gm.get_submodule(str(node.target))
                seen[id(m)] = m
        return list(seen.values())

    def where(self, node: fx.Node) -> str:
        """Where ``node`` is, for messages: the module's name and class, or the op inside it."""
        if node.op == "call_module":
            module = self.gm.get_submodule(str(node.target))
            return f"{user_name(str(node.target))} ({module_kind(module)})"
        return op_where(node)

    def shapes(self, input_shape: torch.Size) -> dict[fx.Node, torch.Size]:
        """Every tensor node's shape for inputs of ``input_shape``, after the eager check.

        The check (Note [Graph faithfulness]) runs the graph and the model on one
        input drawn from a private generator; both run without autograd, every
        buffer is restored and the global RNG is untouched.
        """
        dtype, device = _dtype_device(self.model)
        key = (tuple(input_shape), dtype, device)
        with self._lock:
            if key in self._shapes:
                return self._shapes[key]
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(input_shape, generator=generator, dtype=dtype, device=device)
        with restored_buffers(self.model), torch.no_grad(), _dropout_off(self.model):
            view = self.realised()
            try:
                reference = self.eager(x)
            except (LipnetsError, NotImplementedError):
                raise
            except Exception as exc:
                raise InvalidModelError(
                    f"{self.name} fails on inputs of shape {tuple(input_shape)} (is input_shape "
                    f"right?): {type(exc).__name__}: {exc}"
                ) from exc
            try:
                out = _ShapeProp(view).propagate(x.clone())
            except Exception as exc:  # the model ran: its graph does not
                raise UntraceableModelError(
                    f"the graph torch.fx traced from {self.name} fails where the model runs "
                    f"(Note [Graph faithfulness]): {type(exc).__name__}: {exc}"
                ) from exc
            compare(out, reference, self.name, f"on a random input of shape {tuple(input_shape)}")
        found = {}
        for node in self.gm.graph.nodes:
            meta = node.meta.pop("tensor_meta", None)
            if isinstance(meta, TensorMetadata):
                found[node] = meta.shape
        with self._lock:
            self._shapes[key] = found
        return found

    def eager(self, x: Tensor) -> Any:
        """The model's output on ``x`` in eager mode, with rule 3 of Note [Graph faithfulness]
        checked: the in-place updates it makes and the state it leaves."""
        state = StateSnapshot(self.root, frozenset(map(id, state_modules(self))))
        audit = InPlaceAudit(self.leaves())
        try:
            with self.restoring(), torch.no_grad(), audit:  # the restore is not audited
                reference = self.model(x.clone())  # clone: the caller's x stays as it is
        finally:
            audit.close()
        state.check(self.name)
        if len(audit.found) != self.inplace_ops:
            raise UntraceableModelError(
                f"{self.name} updates tensors in place in eager mode "
                f"({', '.join(audit.found) or 'none'}) where its traced graph has "
                f"{self.inplace_ops} in-place update(s) of a fresh tensor: torch.fx recorded "
                "something else than the model runs (`h += r`, an in-place call in a helper, "
                "state kept in a tensor; Note [Graph faithfulness]); use out-of-place operations"
            )
        return reference


def user_name(qualname: str) -> str:
    """A submodule's name in the user's model (the graph traces it wrapped, as ``0``)."""
    if qualname in ("0", ""):
        return "the model"
    return qualname.removeprefix("0.")


def op_where(node: fx.Node) -> str:
    """Where a function or method node is, for messages: the op, and the module whose
    ``forward`` recorded it (what `TracedGraph.where` says of such nodes)."""
    target = node.target
    desc = f"Tensor.{target}" if node.op == "call_method" else getattr(target, "__name__", "")
    desc = f"node '{node.name}' ({desc or target})"
    stack = node.meta.get("nn_module_stack")
    if stack:
        qualname, cls = list(stack.values())[-1][:2]
        cls_name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
        bases = getattr(cls, "__bases__", ())
        if len(bases) == 1 and cls_name == f"Parametrized{bases[0].__name__}":
            cls_name = bases[0].__name__  # the user's class, not parametrize's
        if qualname not in ("", "0") or len(stack) > 1:
            return f"{user_name(qualname)} ({cls_name}), {desc}"
    return desc


def trace(model: nn.Module, input_shape: Sequence[int] | None = None) -> TracedGraph:
    """The checked, traced graph of ``model`` (built once, reused while the model's
    structure is unchanged).

    Args:
        model: an ``nn.Module`` (``torch.compile``, ``DataParallel`` and DDP
            wrappers are unwrapped).
        input_shape: optional shape of an input batch; with it, shapes are
            recorded and the graph is checked against the model in eager mode.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: for a bad ``input_shape``, or one the model fails on.
        UnboundedModuleError: for hooks, ``__call__`` overrides, methods replaced on
            instances (Note [Trust policy]) and random ops.
        UntraceableModelError: if fx cannot trace the model or the graph is not
            faithful (Note [Graph faithfulness]).
        NonFiniteError: if a parameter or buffer holds NaN or infinite values.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    shape = check_input_shape(input_shape)
    model = unwrap(model)
    # STATE_LOCK: the checks must not see another lipnets call's eval mode or its eager
    # check's hooks (Note [State restored] in lipnets._state)
    with STATE_LOCK:
        return _trace(model, shape)


def _trace(model: nn.Module, shape: torch.Size | None) -> TracedGraph:
    load_peers(model)  # Note [Traced forms] in lipnets.graph.forms
    check_model(model)
    key = _fingerprint(model)
    cache = _REUSE.get()
    if cache is None:  # no reuse context: a fresh trace (see `reuse_traces`)
        graph = _build(model)
        if shape is not None:
            graph.shapes(shape)
        return graph
    with _CACHE_LOCK:
        hit = cache.get(id(model))
        if (
            hit is not None
            and hit[0]() is model
            and hit[1] == key
            and hit[2].modes == _modes(hit[2])
        ):
            graph = hit[2]
        else:
            graph = None
    if graph is None:
        graph = _build(model)
        with _CACHE_LOCK:
            cache[id(model)] = (weakref.ref(model), key, graph)
    if shape is not None:
        graph.shapes(shape)
    return graph


def _build(model: nn.Module) -> TracedGraph:
    root = nn.Sequential(model)
    state = StateSnapshot(root)  # before tracing: a trace can change state too
    with restored_buffers(model):
        gm, tracer = trace_graph(root, is_leaf, module_kind(model))
    _functions_as_modules(gm)
    _TRACES[0] += 1
    state.check(module_kind(model))
    found = mutation_in(functions_run(gm, [*tracer.traced, model]))
    if found is not None:
        function, construct = found
        if construct.startswith("code whose source"):
            raise UntraceableModelError(
                f"lipnets cannot read the source of {function}, which the trace of "
                f"{module_kind(model)} runs, to check it for in-place updates and attribute "
                "writes that torch.fx may record differently from what eager mode computes "
                "(Note [Graph faithfulness]); define it in a file"
            )
        raise UntraceableModelError(
            f"{function} uses {construct}, which torch.fx may record differently from what "
            "eager mode computes (a tensor updated in place and also reached through another "
            "name, an attribute write), so a bound could be that of another function (Note "
            "[Graph faithfulness]); write it out of place, e.g. `h = h + r` instead of `h += r`"
        )
    graph = TracedGraph(model, gm, 0, [m for m in tracer.traced if m is not model])
    graph.modes = _modes(graph)
    graph.inplace_ops = check_inplace(graph)
    _refuse_random_and_out(graph)
    return graph


def _functions_as_modules(gm: fx.GraphModule) -> None:
    """Note [Functional calls as modules] in `lipnets.graph.ops`: ``F.max_pool2d(x, 2)``
    becomes a call of a new ``nn.MaxPool2d(2)`` registered on the graph module."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        try:
            entry = FUNCTIONAL_MODULES.get(node.target)
        except TypeError:  # an unhashable target
            continue
        if entry is None or not node.args:
            continue
        cls, params = entry
        source, rest = node.args[0], node.args[1:]
        if len(rest) > len(params) or any(k not in params for k in node.kwargs):
            continue
        arguments = {**dict(zip(params, rest, strict=False)), **node.kwargs}
        constants = _flat(list(arguments.values()))
        if not isinstance(source, fx.Node) or any(isinstance(a, fx.Node) for a in constants):
            continue
        if arguments.get("stride") in ((), []):  # torch's builtin default: the kernel size
            arguments["stride"] = None
        try:
            module = cls(**arguments)
        except (TypeError, ValueError):
            continue
        name = node.name
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (source,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()


def _flat(values: Any) -> list[Any]:
    out: list[Any] = []
    fx.node.map_aggregate(values, out.append)
    return out


def _refuse_random_and_out(graph: TracedGraph) -> None:
    for node in graph.gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        if node.kwargs.get("out") is not None:
            raise UntraceableModelError(
                f"{graph.where(node)} writes into `out=`, which torch.fx does not follow "
                "(Note [Graph faithfulness]); use the returned value instead"
            )
        spec = classify(node)
        random = spec is not None and spec.kind == "random"
        if spec is not None and spec.kind == "dropout":
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            random = isinstance(training, fx.Node) or bool(training)
        if random:
            raise UnboundedModuleError(
                f"{graph.where(node)} has no bound rule: it draws random numbers (or reads "
                "uninitialised memory), which a traced graph would freeze at one draw"
            )


class _ShapeProp(ShapeProp):
    """ShapeProp over a `TracedGraph.realised` view: modules come from ``graph.module``."""

    def __init__(self, graph: TracedGraph) -> None:
        super().__init__(graph.gm)
        self.view = graph

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.view.overrides.get(str(target))
        if module is None:
            return super().call_module(target, args, kwargs)
        return module(*args, **kwargs)


def _dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    ref = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
    if ref is None:
        return torch.get_default_dtype(), torch.device("cpu")
    return ref.dtype, ref.device


class _dropout_off:
    """Dropout layers in training mode in eval mode for a check (Note [Graph faithfulness])."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [
            m
            for m in model.modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training
        ]

    def __enter__(self) -> None:
        for m in self.modules:
            m.training = False

    def __exit__(self, *exc: object) -> None:
        for m in self.modules:
            m.training = True


def _modes(graph: TracedGraph) -> tuple[bool, ...]:
    return tuple(m.training for m in [graph.model, *graph.traced])


def _fp(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, complex, str)):
        return (type(value), value)  # the type too: 1 == 1.0 == True, but a trace may differ
    if isinstance(value, (torch.dtype, torch.device, torch.Size)):
        return value
    if isinstance(value, (tuple, list)) and len(value) <= _BY_VALUE:
        return (type(value), tuple(_fp(v) for v in value))
    if isinstance(value, dict) and len(value) <= _BY_VALUE:
        return (type(value), tuple((_fp(k), _fp(v)) for k, v in value.items()))
    return ("id", id(value))


_BY_VALUE = 1024
"""Longest list, tuple or dict attribute fingerprinted by value (longer ones by identity)."""


# nn.Module's own bookkeeping: the parts a trace can depend on are listed separately.
_MODULE_DICTS = {"_parameters", "_buffers", "_modules", "training"}


def _fingerprint(model: nn.Module) -> Any:
    """What a trace depends on besides the values of weights (see `reuse_traces`): each
    submodule's identity and class (and the ``forward`` methods of its class and bases),
    its attributes, public or private (Python values, and lists, tuples and dicts of up
    to 1024 items, by value; other objects by identity), and which parameters and buffers
    it holds (by identity: a reassigned parameter is a new graph input)."""
    items = []
    for name, m in model.named_modules(remove_duplicate=False):
        attrs = tuple((k, _fp(v)) for k, v in vars(m).items() if k not in _MODULE_DICTS)
        tensors = tuple(
            (k, None if v is None else id(v))
            for k, v in (*m._parameters.items(), *m._buffers.items())
        )
        # the class's methods by identity: a method patched on the class between calls
        methods = tuple(id(vars(c).get("forward")) for c in type(m).__mro__ if "forward" in vars(c))
        items.append((name, id(m), type(m), methods, attrs, tensors))
    return (rules_version(), tuple(items))
