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

from lipnets.bounds.compose import _compose, _kind, _unwrap
from lipnets.estimators.autolip import _autolip
from lipnets.estimators.lower import lower_bound
from lipnets.estimators.power import _eval_mode
from lipnets.estimators.seqlip import seqlip

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
        return _render(self)


def report(
    model: nn.Module,
    example_input: Tensor,
    *,
    steps: int = 50,
    restarts: int = 4,
    seqlip_max_width: int = 1024,
    generator: torch.Generator | None = None,
    progress: bool = False,
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
        progress: show a `tqdm` progress bar over the stages.

    Returns:
        A frozen [`GuaranteeReport`][lipnets.reporting.GuaranteeReport];
        ``print(report)`` shows the table.

    Raises:
        TypeError: if `model` is not an ``nn.Module`` or `example_input` is
            not a floating-point tensor (or the model's output is not).
        ValueError: if `example_input` has no batch dimension, is empty,
            holds NaN or infinite values, or does not fit the model (the
            model's error is chained).
        UnboundedModuleError: if the model has a part without a sound bound
            rule (as for `lipschitz_bound`).

    Example:
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
        composition = stages.run("bound", lambda: _compose(model, shape))
        # AutoLip walks the graph the bound just walked: an error here is a real one.
        autolip_value, autolip_leaves = stages.run(
            "autolip", lambda: _autolip(model, shape, iters=200, tol=1e-7, generator=generator)
        )
        seqlip_value = None
        try:
            seqlip_value = stages.run(
                "seqlip",
                lambda: seqlip(
                    _unwrap(model), shape, max_width=seqlip_max_width, generator=generator
                ),
            )
        except ValueError as exc:  # not a sequential network of the kind SeqLip handles
            notes.append(f"SeqLip does not apply: {exc}")
        layers = stages.run(
            "layers",
            lambda: _layer_reports(
                model, x, composition.leaves, autolip_leaves, steps, restarts, generator
            ),
        )
        lower = stages.run(
            "lower_bound",
            lambda: lower_bound(model, x, steps=steps, restarts=restarts, generator=generator),
        )
    finally:
        stages.close()
    return GuaranteeReport(
        model=_kind(_unwrap(model)),
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

    def __init__(self, progress: bool) -> None:
        self.seconds: dict[str, float] = {}
        self.bar = None
        if progress:
            try:
                from tqdm.auto import tqdm
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ImportError("progress=True needs tqdm: pip install tqdm") from exc
            self.bar = tqdm(total=len(self.names), desc="lipnets.report")

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
    root = _unwrap(model)
    seen: dict[str, list[Tensor]] = {name: [] for name in names}
    handles = []
    for name in set(names):
        module = root.get_submodule(name)

        def hook(_module: nn.Module, args: tuple, name: str = name) -> None:
            if args and isinstance(args[0], Tensor):
                seen[name].append(args[0].detach())

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with _eval_mode(model), torch.no_grad():
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
    root = _unwrap(model)
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


def _fmt(value: float | None, digits: int = 8) -> str:
    if value is None:
        return "-"
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.{digits}g}"
    return f"{value:.{digits - 1}e}"


def _render(r: GuaranteeReport) -> str:
    header = ("layer", "kind", "bound", "estimate", "est/bound", "estimator")
    rows = [
        (
            layer.name or "(model)",
            layer.kind,
            _fmt(layer.bound),
            _fmt(layer.estimate),
            _fmt(layer.ratio, 5),
            layer.estimator,
        )
        for layer in r.layers
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    right = {2, 3, 4}

    def line(row: tuple[str, ...]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    def secs(name: str) -> str:
        return f"({r.seconds[name]:.2f} s)" if name in r.seconds else ""

    summary = [
        ("sound bound (certifies)", _fmt(r.bound), secs("bound")),
        ("AutoLip (estimate)", _fmt(r.autolip), secs("autolip")),
        ("SeqLip (estimate)", _fmt(r.seqlip), secs("seqlip")),
        ("lower bound (estimate)", _fmt(r.lower_bound), secs("lower_bound")),
        ("tightness lower / bound", _fmt(r.tightness, 5), ""),
    ]
    label = max(len(s[0]) for s in summary)
    value = max(len(s[1]) for s in summary)
    out = [f"lipnets guarantee report: {r.model}, input {r.input_shape}", ""]
    out += [line(header), line(tuple("-" * w for w in widths))]
    out += [line(row) for row in rows]
    out.append(f"per-layer estimates {secs('layers')}".rstrip())
    out.append("")
    out += [f"{a.ljust(label)}  {b.rjust(value)}  {c}".rstrip() for a, b, c in summary]
    out += [f"note: {note}" for note in r.notes]
    return "\n".join(out)
