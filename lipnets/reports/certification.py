r"""The certification report: certified fractions next to the fraction an attack cannot break.

``lipnets.certification_report(model, x, y, eps)`` answers "how robust is my
model?" with the two kinds of numbers kept apart (DESIGN.md, "Two numbers,
never mixed"): on the same points and radii, the fractions certified by the
Lipschitz bound and by CROWN (sound: lower bounds on the robust accuracy) next
to the fraction that an attack fails to break (an estimate: an upper bound on
it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lipnets._checks import check_norm, check_radii
from lipnets._progress import progress_bar
from lipnets._state import eval_mode, restored_buffers
from lipnets.bounds import lipschitz_bound
from lipnets.certify.crown import certify_crown
from lipnets.certify.lipschitz import certified_radius, check_lipschitz, model_device
from lipnets.errors import InvalidModelError
from lipnets.estimators.attack import pgd_l2
from lipnets.functional.margins import margin
from lipnets.graph import module_kind, reuse_traces, unwrap
from lipnets.propagation.lirpa import check_args, check_batch
from lipnets.reports.render import render_certification

__all__ = ["CertificationReport", "CertificationRow", "certification_report"]


@dataclass(frozen=True)
class CertificationRow:
    """One radius of a [`CertificationReport`][lipnets.reports.certification.CertificationReport].

    Fractions are of all the samples of the report; each comes with the count
    it is made of.
    """

    eps: float
    """The radius, in the report's norm."""
    lipschitz_certified: float
    """Fraction certified by the sound Lipschitz bound (certified radius ``> eps``): sound."""
    crown_certified: float | None
    """Fraction certified by [`certify_crown`][lipnets.certify.crown.certify_crown]: sound;
    ``None`` when CROWN did not run (``crown=False``)."""
    attack_robust: float | None
    """Fraction classified correctly that the attack did not break: an empirical *upper*
    bound on the robust accuracy; ``None`` when no attack ran."""
    lipschitz_count: int
    """Number of samples certified by the Lipschitz bound."""
    crown_count: int | None
    """Number of samples certified by CROWN (``None`` when it did not run)."""
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
        return render_certification(self)


@reuse_traces()  # one trace for the bound and every radius and batch
def certification_report(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Sequence[float] = (0.1, 0.25, 0.5),
    *,
    norm: float | str = 2,
    crown: bool = True,
    attack: bool = True,
    attack_steps: int = 50,
    attack_restarts: int = 4,
    generator: torch.Generator | None = None,
    lipschitz: float | Tensor | None = None,
    batch_size: int = 256,
    progress: bool | None = None,
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
    - **CROWN-certified** (sound): [`certify_crown`][lipnets.certify.crown.certify_crown].
      The radii are bounded from the largest down, and a point certified at one radius
      counts as certified at every smaller one (its ball holds theirs) without another
      CROWN pass; misclassified points are never bounded (no certificate exists);
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
        crown: run `certify_crown` (the costly column: a CROWN pass per radius and
            batch); ``False`` leaves it out (``crown_certified`` is ``None``).
        attack: run ``pgd_l2`` (l2 only, see above).
        attack_steps: steps per restart of the attack.
        attack_restarts: restarts of the attack.
        generator: random generator of the attack's random starts.
        lipschitz: a sound l2 Lipschitz bound of the model to use instead of
            computing one (a number or a 0-dim tensor).
        batch_size: samples per batch of forward passes, bounds and attacks.
        progress: show a `tqdm` progress bar over batches; ``None`` (the default):
            when stderr is a terminal.

    Returns:
        A frozen [`CertificationReport`][lipnets.reports.certification.CertificationReport];
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

    Examples:
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
    radii = check_radii(eps)
    q = check_norm(norm)
    for name, value in (
        ("attack_steps", attack_steps),
        ("attack_restarts", attack_restarts),
        ("batch_size", batch_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    core = unwrap(model)
    device = model_device(core)
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
    if not crown:
        notes.append("no CROWN column: crown=False")
    if x.dtype != torch.float64:
        notes.append(
            f"inputs are {x.dtype}: bounds carry its rounding (Note [Floating-point rounding] "
            "in lipnets.propagation.lirpa); certify in float64"
        )
    seconds = {"lipschitz": 0.0}
    if crown:
        seconds["crown"] = 0.0
    if run_attack:
        seconds["attack"] = 0.0
    order = sorted(range(len(radii)), key=lambda k: radii[k])
    k_count = len(radii)
    lip = [0] * k_count
    by_crowns = [0] * k_count
    robust = [0] * k_count
    broken = [0] * k_count
    clean = 0
    with eval_mode(core), restored_buffers(core):  # the attack's forwards leave nothing
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
            bound = check_lipschitz(value, 1)
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
                with torch.no_grad(), restored_buffers(core):  # the state the bounds see
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
                certified: list[Tensor] = [correct] * k_count
                # Largest radius first: a point CROWN certifies there is certified at every
                # smaller radius (its ball holds theirs) and is not bounded again, and a
                # misclassified point is never certified, so neither costs a CROWN pass.
                done = torch.zeros_like(correct)
                for k in reversed(order):
                    by_lipschitz = radius > radii[k]
                    lip[k] += int(by_lipschitz.sum())
                    if not crown:
                        certified[k] = by_lipschitz
                        continue
                    start = time.perf_counter()
                    todo = correct & ~done
                    if bool(todo.any()):
                        xs, ys = xb[todo.to(xb.device)], yb[todo.to(yb.device)]
                        done = done.clone()
                        done[todo] = certify_crown(core, xs, ys, radii[k], norm=q).cpu()
                    seconds["crown"] += time.perf_counter() - start
                    by_crowns[k] += int(done.sum())
                    certified[k] = done | by_lipschitz
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
            crown_certified=by_crowns[k] / n if crown else None,
            attack_robust=robust[k] / n if run_attack else None,
            lipschitz_count=lip[k],
            crown_count=by_crowns[k] if crown else None,
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
    try:
        adv = pgd_l2(model, xs, ys, eps, steps=steps, restarts=restarts, generator=generator)
    except RuntimeError as exc:  # e.g. an output detached from the input: no gradient
        raise InvalidModelError(
            f"pgd_l2 cannot attack {module_kind(model)} ({exc}); pass attack=False"
        ) from exc
    with eval_mode(model), torch.no_grad():
        still = (margin(model(adv), ys.to(adv.device)) > 0).cpu()
    out = alive.clone()
    out[index] = still
    return out
