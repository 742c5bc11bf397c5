"""Sound Lipschitz bounds composed over a model's real computational graph.

This is AutoLip (Scaman & Virmaux 2018) as a graph algorithm, with sound
per-node constants instead of power-iteration estimates: a fold over the
graph that [`lipnets.graph.trace`][lipnets.graph.trace] returns (trusted
modules are leaves, Note [Trust policy]; the graph is checked against the
model, Note [Graph faithfulness]). Each node ``v`` gets a constant $K_v$ such
that $v$ is $K_v$-Lipschitz as a function of the model's input, by the kind
the op table (`lipnets.graph.ops`) gives it:

* the input has $K = 1$; parameters, buffers, literals and shape metadata
  have $K = 0$ (their values are computed when an op needs them);
* a leaf module or an elementwise op with constant $L$: $K = L \\cdot K_{in}$;
* ``a + b`` and ``a - b``: $K = K_a r_a + K_b r_b$, where $r = \\sqrt{\\text{numel(out)} /
  \\text{numel(operand)}}$ accounts for broadcasting, which replicates entries;
  the same factor multiplies every operand that broadcasts (``clamp`` with
  tensor bounds, ``maximum``, ``expand``, a fill from an input-dependent value);
* ``cat``/``stack``: $K = \\sqrt{\\sum_i K_i^2}$;
* ``c * a`` for a constant ``c``: $K = \\max|c| \\cdot K_a r_a$;
* reshapes, permutations, basic slicing: $K = K_{in}$; advanced indexing that
  repeats entries $m$ times: $K = \\sqrt{m} K_{in}$;
* any other op on an input-dependent tensor raises
  [`UnboundedModuleError`][lipnets.errors.UnboundedModuleError] naming it.

Broadcasting cannot be ruled out without shapes, so merges of input-dependent
tensors need ``input_shape``; without it lipnets raises
[`ShapeRequiredError`][lipnets.errors.ShapeRequiredError] rather than assume.

See Note [Rounding up] in `lipnets.bounds.rounding`: every constant of the fold is
rounded up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lipnets._state import restored_buffers
from lipnets.bounds.fold import Fold, last_linear
from lipnets.bounds.registry import as_bound, bound_rule
from lipnets.bounds.rounding import add_up, div_up, mul_up, sqrt_up, up
from lipnets.bounds.types import Composition, LeafBound, LeafValue
from lipnets.graph import TracedGraph, trace

__all__ = [
    "Composition",
    "LeafBound",
    "LeafValue",
    "add_up",
    "compose",
    "div_up",
    "last_linear",
    "lipschitz_bound",
    "mul_up",
    "own_bound",
    "sqrt_up",
    "up",
]


def lipschitz_bound(model: nn.Module, input_shape: Sequence[int] | None = None) -> torch.Tensor:
    """Sound upper bound on a model's l2 -> l2 Lipschitz constant.

    The bound is composed over the model's real computational graph (traced
    with torch.fx) from sound per-module bounds computed from the weights the
    model has now. See the module docs for the composition rules. A module
    with a ``lipschitz_bound(input_shape=None)`` method is a leaf whose method
    is trusted for its own subgraph, as long as its class also provides the
    ``forward`` it runs (Note [Trust policy] in `lipnets.graph.policy`); torch
    built-ins use the rules registered with
    [`register_bound`][lipnets.bounds.register_bound].

    The result bounds the function the model computes in its current mode
    (``train()`` or ``eval()``); use ``eval()`` for BatchNorm and Dropout.

    Args:
        model: an ``nn.Module`` (a ``torch.compile``, ``DataParallel`` or
            ``DistributedDataParallel`` wrapper is unwrapped).
        input_shape: the shape of an input batch, e.g. ``(1, 3, 32, 32)``.
            Without it the bound holds for every input size, and parts whose
            bound depends on sizes (merges that might broadcast, adaptive
            pooling) raise [`ShapeRequiredError`][lipnets.errors.ShapeRequiredError].
            With it, the model is also run on one input of that shape and
            checked against its traced graph.

    Returns:
        A 0-dim float64 CPU tensor, detached from autograd.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if ``input_shape`` is not a sequence of positive ints, or
            the model fails on inputs of that shape.
        NonFiniteError: if a parameter or buffer holds NaN or infinity.
        UnboundedModuleError: if a module or op has no sound bound rule; the
            message names it, e.g. ``"1 (Softplus) has no bound rule"``.
        UntraceableModelError: if torch.fx cannot trace the model, or its
            graph may not compute what the model does; the message names the
            module to give a ``lipschitz_bound`` method.
        ShapeRequiredError: if the bound depends on sizes and ``input_shape``
            is missing.

    Examples:
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
    return compose(model, input_shape).bound


def compose(
    model: nn.Module | TracedGraph,
    input_shape: Sequence[int] | None,
    leaf_value: LeafValue | None = None,
) -> Composition:
    """The fold of constants over ``model``'s traced graph (see the module docs).

    ``model`` may be a `TracedGraph` already built by the caller.
    """
    graph = model if isinstance(model, TracedGraph) else trace(model, input_shape)
    shapes = graph.shapes(torch.Size(input_shape)) if input_shape is not None else None
    with restored_buffers(graph.model), torch.no_grad():
        # parametrized tensors realised once for this call (Note [Realised parametrizations])
        return Fold(graph.realised(), shapes, leaf_value or own_bound).run()


def own_bound(module: nn.Module, shape: torch.Size | None, where: str) -> torch.Tensor | None:
    """The bound of a trusted leaf from its own method or registered rule, else None."""
    rule = bound_rule(module)
    if rule is None:
        return None
    return as_bound(rule(module, shape), where)
