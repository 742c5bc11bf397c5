"""Terminal tables of the guarantee and certification reports (what ``str(report)`` shows).

Plain text only: fixed-width columns, numbers in 8 significant digits (or
scientific notation outside $[10^{-3}, 10^4)$), one note per line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lipnets.reports.certification import CertificationReport
    from lipnets.reports.guarantee import GuaranteeReport

__all__ = ["fmt", "render_certification", "render_guarantee"]


def fmt(value: float | None, digits: int = 8) -> str:
    """``value`` in ``digits`` significant digits, ``"-"`` for ``None``."""
    if value is None:
        return "-"
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.{digits}g}"
    return f"{value:.{digits - 1}e}"


def render_guarantee(r: GuaranteeReport) -> str:
    """The table of a guarantee report: one row per leaf, then the model's numbers."""
    header = ("layer", "kind", "bound", "estimate", "est/bound", "estimator")
    rows = [
        (
            layer.name or "(model)",
            layer.kind,
            fmt(layer.bound),
            fmt(layer.estimate),
            fmt(layer.ratio, 5),
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
        ("sound bound (certifies)", fmt(r.bound), secs("bound")),
        ("AutoLip (estimate)", fmt(r.autolip), secs("autolip")),
        ("SeqLip (estimate)", fmt(r.seqlip), secs("seqlip")),
        ("lower bound (estimate)", fmt(r.lower_bound), secs("lower_bound")),
        ("tightness lower / bound", fmt(r.tightness, 5), ""),
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


def _percent(fraction: float | None, count: int | None) -> str:
    if fraction is None or count is None:
        return "-"
    return f"{100 * fraction:.2f}% ({count})"


def render_certification(r: CertificationReport) -> str:
    """The table of a certification report: one row per radius, then notes."""
    ball = "l2" if r.norm == 2.0 else "l-inf"
    # A column per method that ran (no attack or no CROWN, no column: see the notes).
    shown = [True, True, any(row.crown_count is not None for row in r.rows)]
    shown.append(r.attack is not None)
    header = tuple(
        tuple(c for c, keep in zip(cells, shown, strict=True) if keep)
        for cells in (
            (f"eps ({ball})", "Lipschitz-certified", "CROWN-certified", "attack-robust"),
            ("", "(sound)", "(sound)", "(empirical)"),
        )
    )
    rows = [
        tuple(
            c
            for c, keep in zip(
                (
                    f"{row.eps:g}",
                    _percent(row.lipschitz_certified, row.lipschitz_count),
                    _percent(row.crown_certified, row.crown_count),
                    _percent(row.attack_robust, row.attack_count),
                ),
                shown,
                strict=True,
            )
            if keep
        )
        for row in r.rows
    ]
    table = [*header, *rows]
    columns = len(header[0])
    widths = [max(len(row[i]) for row in table) for i in range(columns)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    secs = ", ".join(f"{name} {value:.2f} s" for name, value in r.seconds.items())
    out = [
        f"lipnets certification report: {r.model}, {r.samples} points, {ball} balls of radius eps",
        f"clean accuracy: {_percent(r.clean_accuracy, r.clean_count)}",
        f"sound Lipschitz bound (l2): {fmt(r.lipschitz_bound)}",
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
