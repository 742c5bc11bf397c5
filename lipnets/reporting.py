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

``lipnets.certification_report(model, x, y, eps)`` does the same for
robustness: on the same points and radii, the fractions certified by the
Lipschitz bound and by CROWN (sound: lower bounds on the robust accuracy) next
to the fraction that an attack fails to break (an estimate: an upper bound on
it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lipnets._modes import eval_mode
from lipnets._progress import progress_bar
from lipnets.bounds import compose, lipschitz_bound
from lipnets.certify.crown import certify_crown
from lipnets.certify.lipschitz import (
    _check_eps,
    _check_lipschitz,
    _check_norm,
    _device,
    certified_radius,
)
from lipnets.estimators.attack import pgd_l2
from lipnets.estimators.autolip import _autolip
from lipnets.estimators.lower import lower_bound
from lipnets.estimators.seqlip import seqlip
from lipnets.functional.margins import margin
from lipnets.graph import module_kind, unwrap
from lipnets.propagation.lirpa import check_args, check_batch

__all__ = [
    "CertificationReport",
    "CertificationRow",
    "GuaranteeReport",
    "LayerReport",
    "certification_report",
    "report",
]

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
        composition = stages.run("bound", lambda: compose(model, shape))
        # AutoLip walks the graph the bound just walked: an error here is a real one.
        autolip_value, autolip_leaves = stages.run(
            "autolip", lambda: _autolip(model, shape, iters=200, tol=1e-7, generator=generator)
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

    def __init__(self, progress: bool) -> None:
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
        with eval_mode(model), torch.no_grad():
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


# ---------------------------------------------------------------------------
# The certification report: certified fractions next to an attack
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificationRow:
    """One radius of a [`CertificationReport`][lipnets.reporting.CertificationReport].

    Fractions are of all the samples of the report; each comes with the count
    it is made of.
    """

    eps: float
    """The radius, in the report's norm."""
    lipschitz_certified: float
    """Fraction certified by the sound Lipschitz bound (certified radius ``> eps``): sound."""
    crown_certified: float
    """Fraction certified by [`certify_crown`][lipnets.certify.crown.certify_crown]: sound."""
    attack_robust: float | None
    """Fraction classified correctly that the attack did not break: an empirical *upper*
    bound on the robust accuracy; ``None`` when no attack ran."""
    lipschitz_count: int
    """Number of samples certified by the Lipschitz bound."""
    crown_count: int
    """Number of samples certified by CROWN."""
    attack_count: int | None
    """Number of samples the attack did not break (``None`` when no attack ran)."""
    broken_certified: int | None
    """Samples certified (by either method) that the attack broke: always 0 unless a
    certificate is wrong (e.g. float32 rounding); ``None`` when no attack ran."""


@dataclass(frozen=True)
class CertificationReport:
    """Certified and attacked fractions of one model on one set of points; ``str()`` renders
    the table."""

    model: str
    """The model's class name."""
    norm: float
    """The norm of the balls: ``2.0`` or ``math.inf``."""
    samples: int
    """Number of points."""
    clean_count: int
    """Points classified correctly (a tie counts as an error)."""
    clean_accuracy: float
    """``clean_count / samples``."""
    lipschitz_bound: float
    """The sound l2 Lipschitz bound the Lipschitz certificates use."""
    rows: tuple[CertificationRow, ...]
    """One row per radius, in the order given."""
    attack: str | None
    """The attack that ran (``"pgd_l2, 50 steps x 4 restarts"``), or ``None``."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Time spent on ``"lipschitz"`` (forward pass, bound and radii), ``"crown"`` and
    ``"attack"``."""
    notes: tuple[str, ...] = ()
    """Remarks: why no attack ran, float32 inputs, a broken certificate."""

    def __str__(self) -> str:
        return _render_certification(self)


def certification_report(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Sequence[float] = (0.1, 0.25, 0.5),
    *,
    norm: float | str = 2,
    attack: bool = True,
    attack_steps: int = 50,
    attack_restarts: int = 4,
    generator: torch.Generator | None = None,
    lipschitz: float | Tensor | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> CertificationReport:
    r"""Certified fractions (Lipschitz, CROWN) next to the fraction an attack cannot break.

    For each radius, on the same points:

    - **clean accuracy**: correct predictions, ties counted as errors;
    - **Lipschitz-certified** (sound): certified radius ``> eps`` from the
      margin and the model's sound bound
      ([`lipschitz_bound`][lipnets.bounds.lipschitz_bound], computed here in
      eval mode unless ``lipschitz=`` is given; never an assumed 1), as
      [`certified_accuracy`][lipnets.certify.lipschitz.certified_accuracy]
      counts it (``mode="vector"``);
    - **CROWN-certified** (sound): [`certify_crown`][lipnets.certify.crown.certify_crown];
    - **attack-robust** (empirical): correct points that
      [`pgd_l2`][lipnets.estimators.attack.pgd_l2] does not break at that
      radius. Breaking a point at a radius breaks it at every larger one, so
      the radii are attacked in increasing order and a broken point is not
      attacked again.

    Certified fractions are lower bounds on the robust accuracy and the
    attack-robust fraction an upper bound, so every row satisfies
    ``certified <= attack_robust <= clean_accuracy``; a certified point that
    the attack breaks is counted in ``broken_certified`` and named in a note
    (it means a certificate is wrong, e.g. from float32 rounding).

    ``pgd_l2`` searches l2 balls only and lipnets has no l-infinity attack,
    so with ``norm=inf`` no attack runs (``attack_robust`` is ``None`` and
    the table has no attack column; a note says why): the certified columns
    are still computed.

    Args:
        model: the classifier (an ``nn.Module`` that both `lipschitz_bound`
            and [`crown_bounds`][lipnets.propagation.crown_bounds] support).
            It runs in eval mode; each submodule's mode is restored afterwards.
        x: inputs, a floating-point tensor ``(N, ...)`` with the model's dtype
            (float64 is recommended for certification); moved to the model's
            device.
        y: labels: class indices, one-hot rows or binary labels (Note [Label
            conventions] in `lipnets.functional.margins`).
        eps: one radius or a sequence of radii, each finite and ``>= 0``, in
            the norm ``norm``.
        norm: ``2`` or ``float("inf")`` (also ``"l2"``, ``"inf"``, ``"linf"``).
        attack: run ``pgd_l2`` (l2 only, see above).
        attack_steps: steps per restart of the attack.
        attack_restarts: restarts of the attack.
        generator: random generator of the attack's random starts.
        lipschitz: a sound l2 Lipschitz bound of the model to use instead of
            computing one (a number or a 0-dim tensor).
        batch_size: samples per batch of forward passes, bounds and attacks.
        progress: show a `tqdm` progress bar over batches.

    Returns:
        A frozen [`CertificationReport`][lipnets.reporting.CertificationReport];
        ``print(report)`` shows the table.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``x`` or ``y`` is not
            a tensor, or ``x`` is not floating point or not of the model's
            dtype.
        ValueError: for labels of another length or out of range, NaN or
            infinite inputs, a negative or NaN radius, an unknown ``norm``, or
            a bad count (``attack_steps``, ``attack_restarts``,
            ``batch_size``).
        UnboundedModuleError: if the model has no sound Lipschitz bound (and
            none is given) or an operation without a propagation rule.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import lipnets
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(lipnets.BjorckLinear(4, 8), lipnets.MaxMin(),
        ...                       lipnets.BjorckLinear(8, 3)).double()
        >>> x = torch.randn(32, 4, dtype=torch.float64)
        >>> with torch.no_grad():
        ...     y = model(x).argmax(dim=1)
        >>> r = lipnets.certification_report(model, x, y, [0.01, 0.1], attack_steps=10,
        ...                                  generator=torch.Generator().manual_seed(0))
        >>> r.clean_accuracy
        1.0
        >>> all(row.lipschitz_certified <= row.attack_robust <= r.clean_accuracy
        ...     and row.crown_certified <= row.attack_robust for row in r.rows)
        True
    """
    check_batch(model, x)
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a tensor of labels, got {type(y).__name__}")
    if y.ndim == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"x and y must have the same length: {x.shape[0]} inputs, labels of shape "
            f"{tuple(y.shape)}"
        )
    radii = _check_eps(eps)
    q = _check_norm(norm)
    for name, value in (
        ("attack_steps", attack_steps),
        ("attack_restarts", attack_restarts),
        ("batch_size", batch_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    core = unwrap(model)
    device = _device(core)
    if device is not None:
        x = x.to(device)
    x, _ = check_args(core, x, 0.0)  # finite inputs of the model's dtype
    y = y.detach()
    notes: list[str] = []
    run_attack = bool(attack) and q == 2.0
    if attack and not run_attack:
        notes.append(
            "no attack column: pgd_l2 searches l2 balls and lipnets has no l-inf attack, so "
            "only the certified (sound) fractions are shown"
        )
    if x.dtype != torch.float64:
        notes.append(
            f"inputs are {x.dtype}: bounds carry its rounding (Note [Floating-point rounding] "
            "in lipnets.propagation.lirpa); certify in float64"
        )
    seconds = {"lipschitz": 0.0, "crown": 0.0}
    if run_attack:
        seconds["attack"] = 0.0
    order = sorted(range(len(radii)), key=lambda k: radii[k])
    k_count = len(radii)
    lip = [0] * k_count
    crown = [0] * k_count
    robust = [0] * k_count
    broken = [0] * k_count
    clean = 0
    with eval_mode(core):
        start = time.perf_counter()
        if lipschitz is None:
            bound = lipschitz_bound(core, input_shape=(1, *x.shape[1:]))
        else:
            if isinstance(lipschitz, Tensor) and lipschitz.numel() != 1:
                raise ValueError(
                    "lipschitz must be one bound for the model, got a tensor of shape "
                    f"{tuple(lipschitz.shape)}"
                )
            value = lipschitz.reshape(()) if isinstance(lipschitz, Tensor) else lipschitz
            bound = _check_lipschitz(value, 1)
            notes.append(
                "the Lipschitz bound was given (lipschitz=), not computed: the Lipschitz column "
                "is only as sound as that bound"
            )
        seconds["lipschitz"] += time.perf_counter() - start
        bar = progress_bar(progress, math.ceil(x.shape[0] / batch_size), "certification_report")
        try:
            for first in range(0, x.shape[0], batch_size):
                xb, yb = x[first : first + batch_size], y[first : first + batch_size]
                start = time.perf_counter()
                with torch.no_grad():
                    scores = core(xb)
                correct = (margin(scores, yb.to(scores.device)) > 0).cpu()
                radius = certified_radius(
                    scores,
                    yb,
                    bound,
                    norm=q,
                    input_dim=xb[0].numel() if q == math.inf else None,
                )
                clean += int(correct.sum())
                seconds["lipschitz"] += time.perf_counter() - start
                certified = []
                for k, e in enumerate(radii):
                    start = time.perf_counter()
                    by_crown = certify_crown(core, xb, yb, e, norm=q).cpu()
                    seconds["crown"] += time.perf_counter() - start
                    by_lipschitz = radius > e
                    lip[k] += int(by_lipschitz.sum())
                    crown[k] += int(by_crown.sum())
                    certified.append(by_crown | by_lipschitz)
                if run_attack:
                    start = time.perf_counter()
                    alive = correct.clone()
                    for k in order:
                        alive = _survivors(
                            core, xb, yb, alive, radii[k], attack_steps, attack_restarts, generator
                        )
                        robust[k] += int(alive.sum())
                        broken[k] += int((certified[k] & ~alive).sum())
                    seconds["attack"] += time.perf_counter() - start
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    n = x.shape[0]
    rows = tuple(
        CertificationRow(
            eps=radii[k],
            lipschitz_certified=lip[k] / n,
            crown_certified=crown[k] / n,
            attack_robust=robust[k] / n if run_attack else None,
            lipschitz_count=lip[k],
            crown_count=crown[k],
            attack_count=robust[k] if run_attack else None,
            broken_certified=broken[k] if run_attack else None,
        )
        for k in range(k_count)
    )
    wrong = [row for row in rows if row.broken_certified]
    if wrong:
        notes.append(
            "CERTIFICATE BROKEN: the attack broke "
            + ", ".join(
                f"{row.broken_certified} certified points at eps={row.eps:g}" for row in wrong
            )
            + "; a certificate is wrong (float32 rounding, or a bug: please report it)"
        )
    return CertificationReport(
        model=module_kind(core),
        norm=q,
        samples=n,
        clean_count=clean,
        clean_accuracy=clean / n,
        lipschitz_bound=float(bound),
        rows=rows,
        attack=f"pgd_l2, {attack_steps} steps x {attack_restarts} restarts" if run_attack else None,
        seconds=seconds,
        notes=tuple(notes),
    )


def _survivors(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    alive: Tensor,
    eps: float,
    steps: int,
    restarts: int,
    generator: torch.Generator | None,
) -> Tensor:
    """``alive`` with the points that pgd_l2 breaks at ``eps`` removed (CPU bool mask)."""
    index = alive.nonzero()[:, 0]
    if index.numel() == 0 or eps == 0:
        return alive
    xs, ys = x[index.to(x.device)], y[index.to(y.device)]
    adv = pgd_l2(model, xs, ys, eps, steps=steps, restarts=restarts, generator=generator)
    with eval_mode(model), torch.no_grad():
        still = (margin(model(adv), ys.to(adv.device)) > 0).cpu()
    out = alive.clone()
    out[index] = still
    return out


def _percent(fraction: float | None, count: int | None) -> str:
    if fraction is None or count is None:
        return "-"
    return f"{100 * fraction:.2f}% ({count})"


def _render_certification(r: CertificationReport) -> str:
    ball = "l2" if r.norm == 2.0 else "l-inf"
    columns = 4 if r.attack is not None else 3  # no attack, no column (see the notes)
    header = (
        (f"eps ({ball})", "Lipschitz-certified", "CROWN-certified", "attack-robust")[:columns],
        ("", "(sound)", "(sound)", "(empirical)")[:columns],
    )
    rows = [
        (
            f"{row.eps:g}",
            _percent(row.lipschitz_certified, row.lipschitz_count),
            _percent(row.crown_certified, row.crown_count),
            _percent(row.attack_robust, row.attack_count),
        )[:columns]
        for row in r.rows
    ]
    table = [*header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(columns)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    secs = ", ".join(f"{name} {value:.2f} s" for name, value in r.seconds.items())
    out = [
        f"lipnets certification report: {r.model}, {r.samples} points, {ball} balls of radius eps",
        f"clean accuracy: {_percent(r.clean_accuracy, r.clean_count)}",
        f"sound Lipschitz bound (l2): {_fmt(r.lipschitz_bound)}",
        "",
        *(line(row) for row in header),
        line(tuple("-" * w for w in widths)),
        *(line(row) for row in rows),
        "",
        "certified (sound): a lower bound on the robust accuracy; Lipschitz = certified radius",
        "  > eps from the margin and the sound bound, CROWN = bound propagation of the margins",
    ]
    if r.attack is not None:
        out += [
            f"attack-robust (empirical): correct and not broken by {r.attack}; an upper bound",
            "  on the robust accuracy, so certified <= attack-robust <= clean accuracy",
        ]
    out.append(f"time: {secs}")
    out += [f"note: {note}" for note in r.notes]
    return "\n".join(out)
