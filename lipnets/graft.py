r"""Linearity grafting: pick ReLU neurons to linearise (`graft_mask`) and swap them (`graft`).

Linearity grafting (Chen et al., 2022) replaces the ReLU of neurons that are
*unstable* under the perturbation (their pre-activation bounds straddle 0, so
verification must relax them or branch on them) and *insignificant* for the
task by a learned line $a_i x + b_i$ (`lipnets.nn.GraftedReLU`), then
fine-tunes. `graft_mask` scores every neuron of every ``nn.ReLU`` module of a
model on calibration inputs and returns a mask per module; `graft` returns a
copy of the model with a `GraftedReLU` in place of each masked ``nn.ReLU``;
`finetune` (from `lipnets.graft_train`) is the paper's fine-tuning recipe, and
`unstable_relus` counts, per input, the ReLUs that CROWN still has to relax.

# Note [Grafting scores]

For neuron $i$ (an entry of a ReLU module's per-sample input, one per channel
and position in a convolutional network) and calibration inputs $x_1, \dots,
x_n$, with $z_i(x)$ its pre-activation and $[l_{ik}, u_{ik}]$ lipnets' CROWN
bounds of $z_i$ over the ball of radius $\varepsilon$ around $x_k$ (those
`lipnets.propagation.crown_bounds` computes on the way to the output):

* instability $U_i = \frac1n \#\{k : l_{ik} < 0 < u_{ik}\} \in [0, 1]$;
* magnitude $M_i = \frac1n \sum_k |z_i(x_k)|$, and insignificance
  $Q_i = 1 - M_i / \max_j M_j \in [0, 1]$ (1 for the least significant
  neuron; every $Q_i = 1$ when every $M_j = 0$);
* combined: $U_i + Q_i$, both normalised to $[0, 1]$ and weighted equally;
* random: a uniformly random order (from ``generator``).

The scores of all ReLU modules are ranked together (globally, as in the
paper), highest first, ties broken by the module order of the model and the
position inside the module, and exactly $k = \mathrm{round}(r N)$ neurons are
grafted ($N$ the number of neurons of all the modules, Python's rounding,
half to even).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from lipnets._checks import check_choice, check_int, check_real
from lipnets.graft_train import FinetuneHistory, finetune
from lipnets.graph import TracedGraph, trace, unwrap
from lipnets.nn import GraftedReLU
from lipnets.propagation.checks import check_args, check_norm, session
from lipnets.propagation.graph import Graph, build
from lipnets.propagation.ops_base import ReLU
from lipnets.propagation.propagator import Propagator

__all__ = ["SCORES", "FinetuneHistory", "finetune", "graft", "graft_mask", "unstable_relus"]

SCORES = ("combined", "instability", "insignificance", "random")
"""The neuron scores of `graft_mask` (Note [Grafting scores])."""


def _relu_nodes(model: nn.Module, traced: TracedGraph) -> dict[str, str]:
    """``{module name: where}`` for every ``nn.ReLU`` module the traced graph calls, in
    graph order (``where`` is how the propagation graph names the module's node)."""
    names = {id(m): name for name, m in unwrap(model).named_modules()}
    found: dict[str, str] = {}
    for node in traced.gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = traced.module(node)
        if not isinstance(module, nn.ReLU):
            continue
        name = names.get(id(module))
        if name is None:  # pragma: no cover - every traced leaf is a submodule
            continue
        if name in found:
            shown = name or "the model"
            raise ValueError(
                f"graft_mask: the nn.ReLU {shown!r} is called more than once; give each call "
                "its own nn.ReLU so that each has its own neurons"
            )
        found[name] = traced.where(node)
    return found


def _pre_activations(graph: Graph, relus: dict[str, str]) -> dict[str, int]:
    """``{module name: index of the node holding its input}`` in a propagation graph."""
    by_where = {node.where: node for node in graph.nodes if type(node.op) is ReLU}
    out = {}
    for name, where in relus.items():
        node = by_where.get(where)
        if node is None:  # pragma: no cover - the builder turns each nn.ReLU into one ReLU op
            raise RuntimeError(f"graft_mask: no ReLU node for {where} in the propagation graph")
        out[name] = node.inputs[0]
    return out


def _statistics(
    model: nn.Module, x: Tensor, radius: Tensor, q: float, crown: bool, batch_size: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per ReLU module: counts of straddling CROWN bounds and sums of |pre-activation|."""
    unstable: dict[str, Tensor] = {}
    magnitude: dict[str, Tensor] = {}
    with session(model):
        traced = trace(model)
        relus = _relu_nodes(model, traced)
        if not relus:
            raise ValueError("graft_mask: the model calls no nn.ReLU module")
        for start in range(0, x.shape[0], batch_size):
            xb, rb = x[start : start + batch_size], radius[start : start + batch_size]
            graph = build(traced, xb, rb if crown else None, q)
            inputs = _pre_activations(graph, relus)
            prop = Propagator(graph, xb, rb, q, crown=True).run() if crown else None
            for name, i in inputs.items():
                value = graph.values[i].to(torch.float64)
                part = value.abs().sum(0)
                straddle = torch.zeros_like(part)
                if prop is not None:
                    straddle = ((prop.lows[i] < 0) & (prop.ups[i] > 0)).sum(0).to(torch.float64)
                magnitude[name] = magnitude.get(name, 0) + part
                unstable[name] = unstable.get(name, 0) + straddle
    return unstable, magnitude


def graft_mask(
    model: nn.Module,
    x_calib: Tensor,
    eps: float | Tensor,
    *,
    norm: float | str,
    ratio: float,
    score: str = "combined",
    generator: torch.Generator | None = None,
    batch_size: int = 128,
) -> dict[str, Tensor]:
    r"""Which ReLU neurons to graft: the $\mathrm{round}(r N)$ best by ``score``, globally.

    Every ``nn.ReLU`` module that the model calls (each once) is scored on
    the calibration inputs (Note [Grafting scores]): instability from the
    CROWN bounds of its pre-activations over the $\varepsilon$-balls,
    insignificance from their mean modulus at the inputs themselves. The
    model runs in eval mode (each submodule's mode is restored afterwards).

    Args:
        model: an ``nn.Module`` that `lipnets.propagation.crown_bounds`
            supports, with at least one ``nn.ReLU`` module.
        x_calib: calibration inputs, a floating-point batch $(n, \dots)$ with
            the model's dtype.
        eps: the radius of the balls, a float $\ge 0$ or a tensor of shape $(n,)$.
        norm: ``2`` or ``float("inf")`` (``"l2"``, ``"inf"``, ``"linf"``).
        ratio: the fraction $r \in [0, 1]$ of all the neurons to graft.
        score: ``"combined"`` (the paper's), ``"instability"``,
            ``"insignificance"`` or ``"random"``.
        generator: the random order of ``score="random"`` (default: a
            generator seeded with 0, so the mask is reproducible).
        batch_size: calibration inputs bounded at once (memory).

    Returns:
        ``{module name: mask}``, one bool tensor per ReLU module, of its
        input's per-sample shape, on the device of ``x_calib``, with exactly
        $\mathrm{round}(r N)$ true entries in all; ready for `graft`.

    Raises:
        ValueError: for a ``ratio`` outside $[0, 1]$, an unknown ``score``, a
            model that calls no ``nn.ReLU`` or one ``nn.ReLU`` twice, and the
            errors of `lipnets.propagation.crown_bounds` (``x_calib``, ``eps``, ``norm``).
        TypeError: for a ``generator`` that is not a ``torch.Generator``.
        UnboundedModuleError: if an operation of the model has no propagation rule.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lipnets.graft import graft, graft_mask
        >>> g = torch.Generator().manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
        ...                       nn.Linear(8, 2)).double()
        >>> x = torch.randn(16, 4, dtype=torch.float64, generator=g)
        >>> mask = graft_mask(model, x, 0.1, norm=2, ratio=0.25)
        >>> sorted(mask), [tuple(m.shape) for m in mask.values()]
        (['1', '3'], [(8,), (8,)])
        >>> sum(int(m.sum()) for m in mask.values())  # round(0.25 * 16), ranked globally
        4
        >>> grafted = graft(model, mask)
        >>> type(grafted[1]).__name__
        'GraftedReLU'

    References:
        Chen, T., Zhang, H., Zhang, Z., Chang, S., Liu, S., Chen, P.-Y. &
        Wang, Z. (2022). Linearity grafting: relaxed neuron pruning helps
        certifiable robustness. *ICML*, PMLR 162:3760-3772.
    """
    ratio = check_real(ratio, "ratio", low=0.0, high=1.0)
    score = str(check_choice(score, "score", SCORES))
    batch_size = check_int(batch_size, "batch_size")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    q = check_norm(norm)
    x, radius = check_args(model, x_calib, eps)
    crown = score in ("combined", "instability")
    unstable, magnitude = _statistics(model, x, radius, q, crown, batch_size)
    n = x.shape[0]
    names = list(magnitude)
    shapes = [magnitude[name].shape for name in names]
    sizes = [math.prod(s) for s in shapes]
    total = sum(sizes)
    k = round(ratio * total)
    if score == "random":
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        order = torch.randperm(total, generator=gen)
    else:
        u = torch.cat([unstable[name].reshape(-1).cpu() for name in names]) / n
        m = torch.cat([magnitude[name].reshape(-1).cpu() for name in names]) / n
        top = float(m.max())
        insignificance = 1 - m / top if top > 0 else torch.ones_like(m)
        value = {"instability": u, "insignificance": insignificance}.get(score)
        value = u + insignificance if value is None else value
        order = torch.sort(value, descending=True, stable=True).indices
    flat = torch.zeros(total, dtype=torch.bool)
    flat[order[:k]] = True
    parts = flat.split(sizes)
    device = x.device
    return {
        name: part.reshape(shape).to(device)
        for name, part, shape in zip(names, parts, shapes, strict=True)
    }


def _factory(model: nn.Module, mask: Tensor) -> dict[str, Any]:
    """The dtype and device of a new GraftedReLU: the model's floating tensors', else the
    mask's device and the default dtype."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return {"dtype": t.dtype, "device": t.device}
    return {"dtype": torch.get_default_dtype(), "device": mask.device}


def graft(
    model: nn.Module, mask: dict[str, Tensor], *, max_slope: float | None = None
) -> nn.Module:
    """A deep copy of ``model`` with a `GraftedReLU` in place of each ``nn.ReLU`` ``mask``
    names.

    Each named ``nn.ReLU`` becomes ``GraftedReLU.from_relu(relu, mask[name].shape,
    mask[name])`` with the paper's initial slopes and intercepts (0.4, 0) and the
    model's dtype and device; a module with an all-zero mask computes exactly what
    the ``nn.ReLU`` did. ``model`` is not modified.

    Args:
        model: an ``nn.Module``.
        mask: ``{module name: bool tensor}``, as `graft_mask` returns, each of the
            per-sample shape of the module's input.
        max_slope: passed to every `GraftedReLU` (``None``: the paper's
            unconstrained slopes; ``1.0`` keeps each 1-Lipschitz).

    Returns:
        The grafted copy (a `GraftedReLU` itself when the model is one ``nn.ReLU``).

    Raises:
        TypeError: if ``model`` is not a module, ``mask`` not a dict of tensors, or
            a name is not an ``nn.ReLU``.
        ValueError: if a name is not a submodule of ``model``, or the ``nn.ReLU`` is
            registered under several names (shared), or a mask is not 0/1.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        >>> copy = graft(model, {"1": torch.tensor([True, False, False, True])})
        >>> copy[1]
        GraftedReLU(shape=(4,), grafted=2/4)
        >>> type(model[1]).__name__  # the original is unchanged
        'ReLU'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(mask, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in mask.items()
    ):
        raise TypeError(
            "mask must be a dict {module name: bool tensor} (what graft_mask returns), "
            f"got {type(mask).__name__}"
        )
    out = copy.deepcopy(model)
    places: dict[int, list[str]] = {}
    for name, module in out.named_modules(remove_duplicate=False):
        places.setdefault(id(module), []).append(name)
    for name, m in mask.items():
        try:
            relu = out.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"mask names {name!r}, which is not a submodule of the model"
            ) from None
        if not isinstance(relu, nn.ReLU):
            raise TypeError(
                f"mask names {name!r}, which is a {type(relu).__name__}, not an nn.ReLU"
            )
        if len(places[id(relu)]) > 1:
            raise ValueError(
                f"the nn.ReLU {name!r} is also registered as {places[id(relu)]}: give each "
                "place its own nn.ReLU before grafting"
            )
        factory = _factory(out, m)
        new = GraftedReLU.from_relu(relu, tuple(m.shape), m, max_slope=max_slope, **factory)
        if name == "":
            return new
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent), child, new)
    return out


def unstable_relus(
    model: nn.Module, x: Tensor, eps: float | Tensor, *, norm: float | str, batch_size: int = 128
) -> Tensor:
    r"""Per input, how many ReLU entries CROWN has to relax over its ball: the unstable ones.

    An entry is unstable on the ball around $x_k$ when lipnets' CROWN bounds of its
    input straddle 0 ($l < 0 < u$, the bounds `lipnets.propagation.crown_bounds`
    computes on the way to the output). Every ReLU op of the propagation graph counts
    (``nn.ReLU``, ``torch.relu``, the comparators of MaxMin and GroupSort); a grafted
    neuron of a `GraftedReLU` is exact, so never counts. These are the entries that
    branch and bound may split on (`lipnets.verify.verify`). The model runs in eval mode.

    Args:
        model: an ``nn.Module`` that `lipnets.propagation.crown_bounds` supports.
        x: the centres of the balls, a floating-point batch $(N, \dots)$ with the
            model's dtype.
        eps: the radius, a float $\ge 0$ or a tensor of shape $(N,)$.
        norm: ``2`` or ``float("inf")`` (``"l2"``, ``"inf"``, ``"linf"``).
        batch_size: inputs bounded at once (memory).

    Returns:
        An int64 CPU tensor of shape $(N,)$.

    Raises:
        ValueError, TypeError: the errors of `lipnets.propagation.crown_bounds`.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(3, 4, dtype=torch.float64)
        >>> unstable_relus(model, x, 0.0, norm="inf").tolist()  # a point: nothing straddles
        [0, 0, 0]
        >>> every = graft(model, {"1": torch.ones(8, dtype=torch.bool)})
        >>> unstable_relus(every, x, 10.0, norm="inf").tolist()  # every neuron grafted
        [0, 0, 0]
    """
    batch_size = check_int(batch_size, "batch_size")
    q = check_norm(norm)
    x, radius = check_args(model, x, eps)
    counts = []
    with session(model):
        traced = trace(model)
        for start in range(0, x.shape[0], batch_size):
            xb, rb = x[start : start + batch_size], radius[start : start + batch_size]
            graph = build(traced, xb, rb, q)
            prop = Propagator(graph, xb, rb, q, crown=True).run()
            count = torch.zeros(xb.shape[0], dtype=torch.int64)
            for node in graph.nodes:
                if isinstance(node.op, ReLU):
                    i = node.inputs[0]
                    inexact = node.op.inexact(prop.lows[i], prop.ups[i])
                    count += inexact.reshape(xb.shape[0], -1).sum(1).cpu()
            counts.append(count)
    return torch.cat(counts)
