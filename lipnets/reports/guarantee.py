r"""The guarantee report: a model's sound bound next to the estimates that check it.

``lipnets.report(model, example_input)`` answers "is my model really
$L$-Lipschitz?" with two kinds of numbers kept apart (DESIGN.md, "Two numbers,
never mixed"):

- **bounds** (sound, may certify): each leaf module's bound and the bound
  composed over the traced graph, from [`lipnets.bounds`][lipnets.bounds];
- **estimates** (only check): per layer, power iteration on affine layers and
  a gradient-ascent lower bound on the others (fed with the inputs that layer
  sees on `example_input`); for the whole model, AutoLip and SeqLip (built on
  power iteration and SVDs) and a gradient-ascent lower bound.

The tightness ratio ``lower_bound / bound`` says how much of the bound the
model is seen to use: 1 for a gradient-norm-preserving network with an exact
bound, far below 1 when the bound is loose or the model flat.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lipnets._progress import progress_bar
from lipnets._state import eval_mode, restored_buffers
from lipnets.bounds import compose
from lipnets.errors import InvalidModelError, LipnetsError
from lipnets.estimators.autolip import autolip_leaves
from lipnets.estimators.lower import lower_bound
from lipnets.estimators.seqlip import seqlip
from lipnets.graph import module_kind, unwrap
from lipnets.reports.render import render_guarantee

__all__ = ["GuaranteeReport", "LayerReport", "report"]

_LAYER_POINTS = 32  # inputs per layer that start its lower-bound search


@dataclass(frozen=True)
class LayerReport:
    """One leaf module of the traced graph (one row per call of the module)."""

    name: str
    """Qualified module name (``""`` for the model itself)."""
    kind: str
    """The module's class name."""
    input_shape: tuple[int, ...]
    """Shape of one sample's input to the layer, with a batch dimension of 1."""
    bound: float
    """Its sound bound."""
    estimate: float | None
    """An estimate (a lower bound) of its Lipschitz constant; ``None`` if it could not run."""
    estimator: str
    """``"power iteration"`` (affine layers) or ``"lower bound"`` (gradient ascent)."""

    @property
    def ratio(self) -> float | None:
        """``estimate / bound`` (1 means the bound is tight); ``None`` without an estimate."""
        if self.estimate is None:
            return None
        return self.estimate / self.bound if self.bound > 0 else math.nan


@dataclass(frozen=True)
class GuaranteeReport:
    """Sound bound and estimates of one model; ``str()`` renders the terminal table."""

    model: str
    """The model's class name."""
    input_shape: tuple[int, ...]
    """Shape of one sample, with a batch dimension of 1."""
    layers: tuple[LayerReport, ...]
    """Per-leaf bound and estimate, in graph order."""
    bound: float
    """The sound bound composed over the graph: the only number here that certifies."""
    autolip: float
    """AutoLip estimate."""
    seqlip: float | None
    """SeqLip estimate, or ``None`` for a network SeqLip does not apply to (see `notes`)."""
    lower_bound: float
    """Gradient-ascent lower bound on the model's Lipschitz constant, near `example_input`."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Time each quantity took: ``"bound"``, ``"layers"``, ``"autolip"``, ``"seqlip"``,
    ``"lower_bound"``."""
    notes: tuple[str, ...] = ()
    """Why an estimate is missing, and other remarks."""

    @property
    def tightness(self) -> float:
        """``lower_bound / bound``: the fraction of the bound the model is seen to use."""
        return self.lower_bound / self.bound if self.bound > 0 else math.nan

    def __str__(self) -> str:
        return render_guarantee(self)


def report(
    model: nn.Module,
    example_input: Tensor,
    *,
    steps: int = 50,
    restarts: int = 4,
    seqlip_max_width: int = 1024,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
) -> GuaranteeReport:
    r"""Sound bound, AutoLip, SeqLip and a lower bound of a model, with per-layer detail.

    The composed sound bound ([`lipschitz_bound`][lipnets.bounds.lipschitz_bound])
    and each leaf's bound are computed at the shape of one sample of
    `example_input`. Each leaf also gets an estimate: power iteration on its
    linear part when it is affine, else a gradient-ascent lower bound started
    from the inputs it receives when the model runs on `example_input` (the
    first 32 samples). For
    the whole model: AutoLip, SeqLip (for sequential networks of affine
    layers and activations with derivatives in $[0, 1]$; ``None`` with a note
    otherwise) and [`lower_bound`][lipnets.estimators.lower_bound] started
    from `example_input`. Estimates run in eval mode; put the model in
    ``eval()`` first so that the bound is about the same function.

    Only `bound` certifies. The estimates are below the true constant (lower
    bounds) or approximate it (AutoLip, SeqLip); each should be at most the
    bound, up to the power-iteration tolerance.

    Args:
        model: the network (an ``nn.Module``).
        example_input: a floating-point batch ``(B, ...)`` of typical inputs.
        steps: gradient-ascent steps of each lower bound.
        restarts: starts per data point of each lower bound.
        seqlip_max_width: passed to [`seqlip`][lipnets.estimators.seqlip] as
            ``max_width``; wider networks get no SeqLip value.
        generator: random generator for every estimate.
        progress: show a `tqdm` progress bar over the stages; ``None`` (the default):
            when stderr is a terminal.

    Returns:
        A frozen [`GuaranteeReport`][lipnets.reports.guarantee.GuaranteeReport];
        ``print(report)`` shows the table.

    Raises:
        TypeError: if `model` is not an ``nn.Module`` or `example_input` is
            not a floating-point tensor (or the model's output is not).
        ValueError: if `example_input` has no batch dimension, is empty,
            holds NaN or infinite values, or does not fit the model (the
            model's error is chained).
        UnboundedModuleError: if the model has a part without a sound bound
            rule (as for `lipschitz_bound`).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import lipnets
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(lipnets.BjorckLinear(8, 8), lipnets.GroupSort(2),
        ...                       lipnets.BjorckLinear(8, 4))
        >>> r = lipnets.report(model, torch.randn(16, 8), steps=10)
        >>> r.lower_bound <= r.bound and r.tightness > 0.99
        True
        >>> r.layers[0].estimator, r.layers[1].estimator
        ('power iteration', 'lower bound')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    x = _check_input(example_input)
    shape = (1, *x.shape[1:])
    stages = _Stages(progress)
    notes: list[str] = []
    try:
        composition = stages.run("bound", lambda: compose(model, shape))
        # AutoLip walks the graph the bound just walked: an error here is a real one.
        autolip_value, auto_leaves = stages.run(
            "autolip",
            lambda: autolip_leaves(model, shape, iters=200, tol=1e-7, generator=generator),
        )
        seqlip_value = None
        try:
            seqlip_value = stages.run(
                "seqlip",
                lambda: seqlip(
                    unwrap(model), shape, max_width=seqlip_max_width, generator=generator
                ),
            )
        except ValueError as exc:  # not a sequential network of the kind SeqLip handles
            notes.append(f"SeqLip does not apply: {exc}")
        layers = stages.run(
            "layers",
            lambda: _layer_reports(
                model, x, composition.leaves, auto_leaves, steps, restarts, generator
            ),
        )
        lower = stages.run(
            "lower_bound",
            lambda: _lower(model, x, steps, restarts, generator),
        )
    finally:
        stages.close()
    return GuaranteeReport(
        model=module_kind(unwrap(model)),
        input_shape=shape,
        layers=tuple(layers),
        bound=float(composition.bound),
        autolip=float(autolip_value),
        seqlip=None if seqlip_value is None else float(seqlip_value),
        lower_bound=float(lower.value),
        seconds=stages.seconds,
        notes=tuple(notes),
    )


def _check_input(example_input: object) -> Tensor:
    if not isinstance(example_input, Tensor) or not example_input.is_floating_point():
        got = example_input.dtype if isinstance(example_input, Tensor) else type(example_input)
        raise TypeError(f"example_input must be a floating-point tensor, got {got}")
    if example_input.ndim < 2 or example_input.shape[0] == 0:
        raise ValueError(
            "example_input must be a non-empty batch of shape (B, ...) with at least 2 "
            f"dimensions, got shape {tuple(example_input.shape)}"
        )
    if not bool(torch.isfinite(example_input).all()):
        raise ValueError("example_input contains NaN or infinite values")
    return example_input.detach()


class _Stages:
    """Times each stage, and shows a progress bar over them if asked."""

    names = ("bound", "autolip", "seqlip", "layers", "lower_bound")

    def __init__(self, progress: bool | None) -> None:
        self.seconds: dict[str, float] = {}
        self.bar = progress_bar(progress, len(self.names), "lipnets.report")

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        if self.bar is not None:
            self.bar.set_postfix_str(name)
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds[name] = time.perf_counter() - start
            if self.bar is not None:
                self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _leaf_inputs(model: nn.Module, x: Tensor, names: list[str]) -> dict[str, list[Tensor]]:
    """The first positional input of each named leaf, per call, on `x` (eval mode)."""
    root = unwrap(model)
    seen: dict[str, list[Tensor]] = {name: [] for name in names}
    handles = []
    for name in set(names):
        module = root.get_submodule(name)

        def hook(_module: nn.Module, args: tuple, name: str = name) -> None:
            if args and isinstance(args[0], Tensor):
                seen[name].append(args[0].detach())

        handles.append(module.register_forward_pre_hook(hook))
    try:
        # restored_buffers: a parametrization that steps in every forward (orthogonium's power
        # iteration) leaves the model as the bound saw it (Note [State restored])
        with eval_mode(model), restored_buffers(root), torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise ValueError(
            f"the model fails on example_input of shape {tuple(x.shape)}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(out, Tensor) or not out.is_floating_point():
        got = out.dtype if isinstance(out, Tensor) else type(out).__name__
        raise TypeError(f"the model must return a floating-point tensor, got {got}")
    return seen


def _layer_reports(model, x, leaves, autolip_leaves, steps, restarts, generator):
    names = [leaf.name for leaf in leaves]
    inputs = _leaf_inputs(model, x, names)
    calls: dict[str, int] = {}
    estimates = {}
    if [leaf.name for leaf in autolip_leaves] == names:  # the same graph walk
        estimates = dict(enumerate(autolip_leaves))
    root = unwrap(model)
    rows = []
    for i, leaf in enumerate(leaves):
        call = calls.get(leaf.name, 0)
        calls[leaf.name] = call + 1
        module = root.get_submodule(leaf.name)
        seen = inputs[leaf.name]
        sample = seen[call] if call < len(seen) else (x if leaf.name == "" else None)
        if sample is not None:
            sample = sample[:_LAYER_POINTS]
        shape = (1, *sample.shape[1:]) if sample is not None else ()
        estimate, estimator = None, "lower bound"
        auto = estimates.get(i)
        if auto is not None and auto.affine:
            estimate, estimator = float(auto.value), "power iteration"
            shape = auto.input_shape
        elif sample is not None and sample.is_floating_point() and sample.shape[0] > 0:
            est = lower_bound(module, sample, steps=steps, restarts=restarts, generator=generator)
            estimate = float(est.value)
        rows.append(
            LayerReport(
                name=leaf.name,
                kind=leaf.kind,
                input_shape=tuple(shape),
                bound=float(leaf.bound),
                estimate=estimate,
                estimator=estimator,
            )
        )
    return rows


def _lower(model: nn.Module, x: Tensor, steps: int, restarts: int, generator: Any) -> Any:
    """The lower-bound search; a model it cannot run on (under autograd) is refused typed."""
    try:
        return lower_bound(model, x, steps=steps, restarts=restarts, generator=generator)
    except LipnetsError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise InvalidModelError(
            f"the gradient-ascent lower bound cannot run {module_kind(unwrap(model))}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
