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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lipnets.errors import UnboundedModuleError
from lipnets.graph import TracedGraph, compare, trace
from lipnets.propagation._ops import Op

__all__ = ["Graph", "Node", "build", "evaluate"]

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
    balls of that radius in ``norm`` (Note [Graph checked on the balls]).
    """
    from lipnets.propagation.builder import Builder  # the builder reads the rule registry

    traced = model if isinstance(model, TracedGraph) else trace(model)
    builder = Builder(traced, x.clone())  # nothing the build runs can write into the caller's x
    graph = builder.run()
    reference = traced.eager(x)
    if not isinstance(reference, Tensor):
        raise UnboundedModuleError(
            f"{traced.name} returns {type(reference).__name__}; bound propagation needs a model "
            "that returns one tensor"
        )
    out = graph.values[graph.output] if graph.output is not None else graph.output_value
    compare(out, reference, traced.name, "on the input batch")
    if radius is not None and graph.output is not None:
        _check_on_balls(graph, traced, x, radius, norm)
    return graph


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
            reference = traced.model(points.clone())
            out = evaluate(graph.nodes, points)[graph.output]
        compare(out, reference, traced.name, "at points of the balls")
