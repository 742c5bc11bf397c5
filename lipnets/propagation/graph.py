r"""From a model to a propagation graph, checked against the model on the balls.

The model is traced by the front end ([`lipnets.graph.trace`][lipnets.graph.trace]:
trusted modules are leaves, Note [Trust policy]; the graph is checked, Note
[Graph faithfulness]) and each graph node that depends on the input becomes
one or more nodes of `lipnets.propagation._ops`, run once on the input batch
(`lipnets.propagation.builder`): function and method nodes by their kind in
the op table (`lipnets.graph.ops`), module nodes by the rule registered for
their class (`lipnets.propagation.rules`). Nodes that do not depend on the
input (parameters, literals, sizes) are evaluated and kept as constants.
Anything without a rule raises
[`UnboundedModuleError`][lipnets.errors.UnboundedModuleError] naming the node,
e.g. ``"act (Softplus) has no propagation rule"``.

# Note [Graph checked on the balls]

The bounds are those of the propagation graph, so the graph must compute what
the model computes on the whole ball, not only at its centre. On top of the
front end's checks (which run on the input batch here), the graph is
evaluated on points of each ball (its boundary, its corners for an
l-infinity ball, and inside), and every output must match the model's (to
$\sqrt{\varepsilon}$ of the dtype, relative to each sample's largest output);
a mismatch raises `UntraceableModelError`. The sampled points are a second
line of defence, not a proof: a branch that only opens on a thin cap of the
ball escapes them, and the refusals of Note [Graph faithfulness] are what
keeps the graph equal to the model on the whole ball.

# Note [Propagation graphs reused]

Within `lipnets.graph.reuse_traces` (where the model's trace is reused, and the
caller states that nothing outside the model changes what its ``forward``
computes) the propagation graph built for a batch shape, strides, dtype and
device is kept with the traced graph and serves every later call on such
batches, as auto_LiRPA's ``BoundedModule`` serves every ``compute_bounds``.
Three things keep a kept graph equal to the model:

* an exact copy of every tensor lipnets can reach from the model (parameters,
  buffers and tensor attributes of every submodule, and the tensors in the lists,
  tuples, dicts, plain objects and unregistered modules they hold, breadth first
  to depth 4): when any differs (an optimiser step, ``load_state_dict``, an edit
  through ``.data``) every kept graph is dropped and the next call builds and
  checks afresh;
* the trace's fingerprint (`lipnets.graph.trace`), which covers attributes by
  value (lists, tuples and dicts of up to 1024 items too) and the ``forward``
  methods of every class: a change there is a new trace, hence a new graph;
* on every call, the model run on the batch's first sample and compared with the
  graph of that sample (built with the batch's graph, from the same state): a
  change that neither sees (a global, a closure) and that shows on that sample
  drops every kept graph, and the fresh build then checks the whole batch.

A kept graph skips the eager check on the other centres and the checks on the
balls, which it passed on the batch it was built on; it is checked again on the
balls of a call whose radius is larger than any it was checked on, or in another
norm. Node values are recomputed for every batch. Differentiable bounds
(autograd on) never keep a graph: their ops hold weights connected to the
parameters. Outside the context every call builds and checks afresh.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import overload

import torch
from torch import Tensor, nn

from lipnets.errors import UnboundedModuleError, UntraceableModelError
from lipnets.graph import TracedGraph, compare, reusing, trace
from lipnets.propagation._ops import Op

__all__ = ["Graph", "Node", "build", "evaluate"]

_LOCK = threading.Lock()

_FAITHFUL_ROUNDS = 8
"""Batches of points of the balls (besides the centres) on which the graph is checked."""


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
    constant: Tensor | None
    """The model's output when it does not depend on the input (``output`` is None)."""
    values: Sequence[Tensor]
    """Every node's value on the input batch (computed when first read, `Values`)."""

    @property
    def output_value(self) -> Tensor:
        """The model's output on the input batch (as the graph computes it)."""
        if self.output is None:
            assert self.constant is not None
            return self.constant
        return self.values[self.output]

    def ancestors(self, target: int) -> list[int]:
        """Indices of the nodes ``target`` depends on (itself included), ascending."""
        return _ancestors(self.nodes, target)


class Values(Sequence[Tensor]):
    """The nodes' values on a batch, each computed when first read (a bound that never reads
    a node's value does not pay for it)."""

    def __init__(self, nodes: list[Node], x: Tensor) -> None:
        self.nodes = nodes
        self.found: dict[int, Tensor] = {0: x}

    def __len__(self) -> int:
        return len(self.nodes)

    @overload
    def __getitem__(self, index: int) -> Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> list[Tensor]: ...

    def __getitem__(self, index: int | slice) -> Tensor | list[Tensor]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        i = range(len(self))[index]  # negative indices, and IndexError
        if i not in self.found:
            for j in _ancestors(self.nodes, i):  # ascending: inputs first
                if j not in self.found:
                    node = self.nodes[j]
                    assert node.op is not None
                    self.found[j] = node.op.forward([self.found[k] for k in node.inputs])
        return self.found[i]


def _ancestors(nodes: list[Node], target: int) -> list[int]:
    seen = {target}
    stack = [target]
    while stack:
        for i in nodes[stack.pop()].inputs:
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return sorted(seen)


def evaluate(nodes: list[Node], x: Tensor) -> list[Tensor]:
    """Every node's value for the input batch ``x``."""
    values = [x]
    for node in nodes[1:]:
        assert node.op is not None
        values.append(node.op.forward([values[i] for i in node.inputs]))
    return values


def build(
    model: nn.Module | TracedGraph, x: Tensor, radius: Tensor | None = None, norm: float = 2.0
) -> Graph:
    """The propagation graph of ``model`` on the batch ``x`` (eval mode set by the caller).

    With ``radius`` (one per sample) the graph is also checked on points of the
    balls of that radius in ``norm`` (Note [Graph checked on the balls]). Within
    `lipnets.graph.reuse_traces` the graph is kept and reused (Note [Propagation
    graphs reused]).
    """
    from lipnets.propagation.builder import Builder  # the builder reads the rule registry

    traced = model if isinstance(model, TracedGraph) else trace(model)
    keep = reusing() and not torch.is_grad_enabled()
    key = _key(x)
    if keep:
        kept = _kept(traced, key)
        if kept is not None:
            out = kept.graph.output
            values = Values(kept.graph.nodes, x.clone())  # the caller's x stays as it is
            graph = Graph(kept.graph.nodes, out, kept.graph.constant, values)
            if _agrees(graph, traced, x):
                if radius is not None and out is not None and not kept.covers(radius, norm):
                    _check_on_balls(graph, traced, x, radius, norm)
                    kept.record(radius, norm)
                return graph
            with _LOCK:  # the model computes something else now: build and check afresh
                traced.memo.clear()
    # x cloned: nothing the build runs can write into the caller's x; parametrized tensors
    # realised once for this build (Note [Realised parametrizations] in lipnets.graph.realise)
    builder = Builder(traced.realised(), x.clone())
    graph = builder.run()
    reference = traced.eager(x)
    if not isinstance(reference, Tensor):
        raise UnboundedModuleError(
            f"{traced.name} returns {type(reference).__name__}; bound propagation needs a model "
            "that returns one tensor"
        )
    compare(graph.output_value, reference, traced.name, "on the input batch")
    if radius is not None and graph.output is not None:
        _check_on_balls(graph, traced, x, radius, norm)
    if keep:
        entry = _Kept(graph)
        if radius is not None:
            entry.record(radius, norm)
        with _LOCK:
            traced.memo[key] = entry
        if x.shape[0] > 1:
            build(traced, x[:1])  # the first sample's graph, which checks this one later
    return graph


def _key(x: Tensor) -> tuple[object, ...]:
    """What a kept propagation graph is for: the batch's shape, strides, dtype and device."""
    return ("propagation", tuple(x.shape), x.stride(), x.dtype, x.device)


def _agrees(graph: Graph, traced: TracedGraph, x: Tensor) -> bool:
    """Whether a kept graph still computes what the model computes, tested on the first
    sample of the batch (Note [Propagation graphs reused]): a batch of one is compared
    with the model, a larger batch through the graph of its first sample, built with it
    from the same state (no such graph: False)."""
    if x.shape[0] > 1:
        x = x[:1]
        with _LOCK:
            probe = traced.memo.get(_key(x))
        if probe is None:
            return False
        nodes = probe.graph.nodes
        graph = Graph(nodes, probe.graph.output, probe.graph.constant, Values(nodes, x.clone()))
    with torch.no_grad():
        reference = traced.run(x.clone())
    try:
        compare(graph.output_value, reference, traced.name, "on the input batch")
    except UntraceableModelError:
        return False
    return True


def _kept(traced: TracedGraph, key: object) -> _Kept | None:
    """The graph kept for ``key``, if the model's tensors equal those it was built from;
    when they differ, every kept graph is dropped and a new copy of the tensors taken (the
    builds that follow are kept against it)."""
    with _LOCK:
        state = traced.memo.get("state")
    if state is not None and state.unchanged():
        with _LOCK:
            return traced.memo.get(key)
    fresh = _Snapshot(traced)
    with _LOCK:
        traced.memo.clear()
        traced.memo["state"] = fresh
    return None


def _state_tensors(traced: TracedGraph) -> list[Tensor]:
    """Every tensor the model's function can read that lipnets can reach: parameters,
    buffers and tensor attributes of every submodule and of the graph, and the tensors of
    the lists, tuples, dicts, plain objects and unregistered modules they hold (a
    parametrization may read any of them), to a depth of 4."""
    found: dict[int, Tensor] = {}
    queue = collections.deque(
        (m, 0) for root in (traced.model, traced.gm) for m in root.modules()
    )  # breadth first: every object is reached at its least depth from a module
    seen = {id(m) for m, _ in queue}
    while queue:
        value, depth = queue.popleft()
        if isinstance(value, (list, tuple, set, frozenset)):
            children = list(value)
        elif isinstance(value, dict):
            children = list(value.values())
        elif isinstance(value, nn.Module) or (
            hasattr(value, "__dict__") and not isinstance(value, type) and not callable(value)
        ):
            children = list(vars(value).values())
        else:
            continue
        for child in children:
            if isinstance(child, Tensor):
                found.setdefault(id(child), child)
            elif depth < 4 and id(child) not in seen:
                seen.add(id(child))
                queue.append((child, depth + 1))
    return list(found.values())


class _Snapshot:
    """Exact copies of the tensors a propagation graph was built from."""

    def __init__(self, traced: TracedGraph) -> None:
        self.pairs = [(t, t.detach().clone()) for t in _state_tensors(traced)]

    def unchanged(self) -> bool:
        return all(
            t.shape == c.shape and t.dtype == c.dtype and t.device == c.device
            and torch.equal(t.detach(), c)
            for t, c in self.pairs
        )  # fmt: skip


@dataclass
class _Kept:
    """A propagation graph kept for one batch shape, with the balls it was checked on."""

    graph: Graph
    checked: dict[float, float] = field(default_factory=dict)
    """Per norm, the largest radius whose balls the graph was checked on."""

    def covers(self, radius: Tensor, norm: float) -> bool:
        return norm in self.checked and float(radius.max()) <= self.checked[norm]

    def record(self, radius: Tensor, norm: float) -> None:
        with _LOCK:
            self.checked[norm] = max(self.checked.get(norm, 0.0), float(radius.max()))


def _check_on_balls(
    graph: Graph, traced: TracedGraph, x: Tensor, radius: Tensor, norm: float
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
        with torch.no_grad():  # a check: no autograd graph, even for differentiable bounds
            reference = traced.run(points.clone())  # parametrization state restored
            out = evaluate(graph.nodes, points)[graph.output]
        compare(out, reference, traced.name, "at points of the balls")
