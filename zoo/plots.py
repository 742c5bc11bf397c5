"""PNG plots of a run: certified (or CROWN-verified) accuracy against the radius, a critic's
contours."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["certified_curve", "critic_contour", "robustness_curves", "verified_curve"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def certified_curve(
    path: str | Path,
    radii: Tensor,
    marks: Mapping[float, float],
    *,
    title: str,
    bound: float,
    attack: Mapping[float, float] | None = None,
    attack_label: str = "attack-robust",
    crown: Mapping[float, float] | None = None,
    crown_label: str = "CROWN-certified",
) -> Path:
    """Plot the share of test samples whose certified radius exceeds each eps.

    The legend lies outside the axes, to the right, so that it never covers a curve; the
    bound is printed with every digit of its float64 value (``L ≤ 1.0000007602333363``, not
    ``1.000000``).

    Args:
        path: the PNG to write.
        radii: the certified radius of every test sample.
        marks: ``{eps: accuracy}`` points to mark (the card's numbers).
        title: the figure title.
        bound: the sound Lipschitz bound the radii come from (shown in the legend).
        attack: ``{eps: accuracy}`` that an attack does not break (an upper bound on the
            robust accuracy), drawn beside the certified curve; ``None``: not drawn.
        attack_label: its legend entry (say which samples and which attack).
        crown: ``{eps: accuracy}`` certified by CROWN, drawn as points; ``None``: not
            drawn.
        crown_label: its legend entry (say which samples).
    """
    plt = _pyplot()
    radii = radii.detach().double().cpu()
    extra = [*marks, *(attack or {}), *(crown or {})]
    top = max(float(radii.max()), max(extra, default=0.0)) * 1.05 or 1.0
    grid = torch.linspace(0.0, top, 400, dtype=torch.float64)
    curve = (radii[None, :] > grid[:, None]).double().mean(dim=1)
    fig, ax = plt.subplots(figsize=(9, 4), dpi=100)
    ax.plot(grid.numpy(), 100 * curve.numpy(),
            label=f"Lipschitz-certified (sound)\nL ≤ {float(bound)!r}")  # fmt: skip
    if attack:
        eps = sorted(attack)
        ax.plot(eps, [100 * attack[e] for e in eps], marker="s", color="C1", linestyle="--",
                label=attack_label)  # fmt: skip
    if crown:
        eps = sorted(crown)
        ax.plot(eps, [100 * crown[e] for e in eps], marker="^", color="C2", linestyle=":",
                label=crown_label)  # fmt: skip
    if marks:
        ax.scatter(
            list(marks), [100 * a for a in marks.values()], color="C3", zorder=3,
            label="card (Lipschitz-certified)",
        )  # fmt: skip
        for eps, acc in marks.items():
            ax.annotate(f"{100 * acc:.1f}%", (eps, 100 * acc), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)  # fmt: skip
    ax.set_xlabel("l2 radius eps")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, top)
    ax.grid(alpha=0.3)
    ax.set_title(f"{title} (L ≤ {float(bound)!r})", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def robustness_curves(fields: Mapping[str, Any], test_size: int) -> dict[str, Any]:
    """`certified_curve`'s ``attack``/``crown`` arguments and labels from a card's
    ``attack_robust_accuracy`` and ``crown_certified_accuracy`` (`zoo.robustness`); the
    labels say which samples each is of."""
    out: dict[str, Any] = {}
    attack, crown = fields.get("attack_robust_accuracy"), fields.get("crown_certified_accuracy")

    def of(points: int) -> str:
        return "all test samples" if points == test_size else f"first {points} test samples"

    if attack:
        out["attack"] = {float(k): v for k, v in attack["accuracy"].items()}
        out["attack_label"] = (
            f"attack-robust (upper bound)\npgd_l2 {attack['steps']}x{attack['restarts']}, "
            f"{of(attack['points'])}"
        )
    if crown:
        out["crown"] = {float(k): v for k, v in crown["accuracy"].items()}
        out["crown_label"] = f"CROWN-certified (sound)\n{of(crown['points'])}"
    return out


def verified_curve(
    path: str | Path, curve: Mapping[float, float], marks: Mapping[float, float], *, title: str
) -> Path:
    """Plot the CROWN-verified accuracy at each l-infinity radius of ``curve``.

    Args:
        path: the PNG to write.
        curve: ``{eps: accuracy}`` at the radii of the curve.
        marks: ``{eps: accuracy}`` points to mark (the card's numbers).
        title: the figure title.
    """
    plt = _pyplot()
    radii = sorted(curve)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(radii, [100 * curve[e] for e in radii], marker="o", label="CROWN-verified (float64)")
    if marks:
        ax.scatter(
            list(marks), [100 * a for a in marks.values()], color="C3", zorder=3, label="card"
        )
        for eps, acc in marks.items():
            ax.annotate(f"{100 * acc:.1f}%", (eps, 100 * acc), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)  # fmt: skip
    ax.set_xlabel("l-infinity radius eps (inputs in [0, 1])")
    ax.set_ylabel("verified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, max(radii, default=0.0) * 1.05 or 1.0)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def critic_contour(
    path: str | Path,
    critic: nn.Module,
    x_p: Tensor,
    x_q: Tensor,
    *,
    title: str,
    labels: tuple[str, str] = ("P", "Q"),
    resolution: int = 200,
) -> Path:
    """Contour plot of a 2-D critic over a box around the two samples, with the samples on top."""
    plt = _pyplot()
    both = torch.cat([x_p, x_q]).detach().cpu().double()
    low, high = both.min(dim=0).values, both.max(dim=0).values
    pad = 0.15 * (high - low)
    low, high = low - pad, high + pad
    gx = torch.linspace(float(low[0]), float(high[0]), resolution)
    gy = torch.linspace(float(low[1]), float(high[1]), resolution)
    mesh_x, mesh_y = torch.meshgrid(gx, gy, indexing="xy")
    grid = torch.stack([mesh_x.reshape(-1), mesh_y.reshape(-1)], dim=1)
    device = next(critic.parameters()).device
    was_training = critic.training
    critic.eval()
    with torch.no_grad():
        values = critic(grid.to(device)).reshape(resolution, resolution).cpu()
    critic.train(was_training)
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    filled = ax.contourf(mesh_x.numpy(), mesh_y.numpy(), values.numpy(), levels=30, cmap="RdBu_r")
    ax.contour(mesh_x.numpy(), mesh_y.numpy(), values.numpy(), levels=15, colors="k",
               linewidths=0.3, alpha=0.5)  # fmt: skip
    fig.colorbar(filled, ax=ax, label="critic")
    step = max(1, x_p.shape[0] // 500)
    ax.scatter(*x_p[::step].cpu().T.numpy(), s=3, c="C3", label=labels[0])
    ax.scatter(*x_q[::step].cpu().T.numpy(), s=3, c="C0", label=labels[1])
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", markerscale=3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
