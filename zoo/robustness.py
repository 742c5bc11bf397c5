"""CROWN-certified and attack-robust accuracy for a classifier's card, by
`lipnets.certification_report`.

At the end of ``python -m zoo train``, `measure` adds two numbers per radius to the card,
next to the Lipschitz-certified accuracy of `zoo.train.evaluate`:

- ``crown_certified_accuracy``: the share of samples that
  `lipnets.certify.certify_crown` certifies in the l2 ball of each radius (sound, like the
  Lipschitz certificate, but from bound propagation instead of the global bound), with the
  Lipschitz-certified share of the *same* samples beside it (``lipschitz_accuracy``);
- ``attack_robust_accuracy``: the share of samples classified correctly that
  `lipnets.estimators.pgd_l2` does not break at that radius (an estimate: an *upper* bound
  on the robust accuracy, never a certificate), with the Lipschitz-certified share of the
  same samples (``lipschitz_accuracy``) and the number of certified samples the attack
  broke (``broken_certified``, 0 unless a certificate is wrong).

Each field records what was computed: the samples (``points``: the first ``points``
samples of the test set, in its order), the attack's steps, restarts and seed, the dtype
and the seconds it took. ``python -m zoo eval`` recomputes both from those records
(`eval_rows`); a card written before these fields existed has neither and is evaluated
without them.

# Note [Robustness on the realised weights]

Both numbers are computed on ``to_vanilla(model)`` cast to float64: plain torch layers
holding the weights the checkpoint realises (float32 values), evaluated in float64, where
the propagated bounds carry no float32 rounding. Casting the lipnets model itself to
float64 would certify another network: a Björck layer recomputes its orthogonal weight
from the raw parameters in float64, and that weight differs from the float32 one the
checkpoint computes (by about 1e-7 on the digits models). Running the checkpoint in
float32 rounds its logits by about 1e-6, so a sample whose margin is that close to the
certificate's threshold may be certified here and not under float32 inference.

# Note [Robustness budget]

On the 450 digits test samples, the GroupSort MLP's CROWN passes at the five card radii
took 13 s in float64 on one thread (one pass per radius and batch), more than training
itself (about 9 s); the attack (``pgd_l2``, 50 steps) took 1.5 s per restart. `ROBUSTNESS`
therefore certifies by CROWN the first 100 test samples of an MLP at every radius and
attacks all of them with 2 restarts; the convolutional model (CROWN about 0.9 s per
sample, the attack 3 s per restart on 100 samples) gets 10 CROWN samples and 100 attacked
ones. The card says which samples each number is of.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

import lipnets
from lipnets.export import to_vanilla

__all__ = [
    "ROBUSTNESS",
    "RobustnessOptions",
    "add_arguments",
    "describe",
    "eval_rows",
    "measure",
    "options_from",
]


@dataclass(frozen=True)
class RobustnessOptions:
    """What `measure` computes.

    Attributes:
        crown_points: CROWN certifies the first ``crown_points`` test samples at every
            radius (0: no CROWN numbers).
        attack_points: ``pgd_l2`` attacks the first ``attack_points`` test samples
            (``None``: all of them; 0: no attack numbers).
        attack_steps: steps per restart of the attack.
        attack_restarts: random restarts of the attack.
        seed: seed of the attack's random starts.
    """

    crown_points: int = 0
    attack_points: int | None = None
    attack_steps: int = 50
    attack_restarts: int = 2
    seed: int = 0


#: Per model, what the card's CROWN and attack numbers are computed on (Note [Robustness
#: budget]).
ROBUSTNESS: dict[str, RobustnessOptions] = {
    "groupsort-mlp": RobustnessOptions(crown_points=100),
    "mlp": RobustnessOptions(crown_points=100),
    "lipconvnet": RobustnessOptions(crown_points=10, attack_points=100, attack_restarts=1),
}


def points(text: str) -> int:
    """The argparse type of ``--crown-points`` and ``--attack-points``: an integer >= 0."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def add_arguments(parser: Any) -> None:
    """``python -m zoo train``'s ``--crown-points`` and ``--attack-points``."""
    parser.add_argument(
        "--crown-points",
        type=points,
        metavar="N",
        help="CROWN-certify the first N test samples at every radius for the card (default: "
        "the model's, zoo.robustness.ROBUSTNESS; 0: none)",
    )
    parser.add_argument(
        "--attack-points",
        type=points,
        metavar="N",
        help="attack the first N test samples with pgd_l2 for the card (default: the "
        "model's; 0: none)",
    )


def options_from(args: Any) -> RobustnessOptions | None:
    """The `RobustnessOptions` of ``python -m zoo train``: the model's (`ROBUSTNESS`) with
    ``--crown-points`` and ``--attack-points`` applied; ``None`` when nothing is to run."""
    base = ROBUSTNESS.get(args.model, RobustnessOptions())
    changes = {}
    if args.crown_points is not None:
        changes["crown_points"] = args.crown_points
    if args.attack_points is not None:
        changes["attack_points"] = args.attack_points
    options = replace(base, **changes)
    if options.crown_points == 0 and options.attack_points == 0:
        return None
    return options


def _key(eps: float) -> str:
    from zoo.train import eps_key

    return eps_key(eps)


def _float64(model: nn.Module) -> nn.Module:
    """Note [Robustness on the realised weights]."""
    return to_vanilla(copy.deepcopy(model).eval()).to(torch.float64).eval()


def _tensors(test_set: Dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from zoo.train import tensors_of

    x, y = tensors_of(test_set)
    return x.to(device=device, dtype=torch.float64), y.to(device)


def _crown(model, x, y, eps, points: int, progress: bool) -> dict[str, Any]:
    start = time.perf_counter()
    report = lipnets.certification_report(
        model, x[:points], y[:points], eps, crown=True, attack=False, progress=progress
    )
    return {
        "method": "crown",
        "norm": "2",
        "dtype": "float64",
        "points": report.samples,
        "accuracy": {_key(r.eps): r.crown_certified for r in report.rows},
        "lipschitz_accuracy": {_key(r.eps): r.lipschitz_certified for r in report.rows},
        "seconds": round(time.perf_counter() - start, 2),
    }


def _attack(model, x, y, eps, options: Mapping[str, Any], progress: bool) -> dict[str, Any]:
    start = time.perf_counter()
    points = options["points"]
    report = lipnets.certification_report(
        model,
        x[:points],
        y[:points],
        eps,
        crown=False,
        attack=True,
        attack_steps=options["steps"],
        attack_restarts=options["restarts"],
        generator=torch.Generator(device=x.device).manual_seed(options["seed"]),
        progress=progress,
    )
    return {
        "attack": "pgd_l2",
        "norm": "2",
        "steps": options["steps"],
        "restarts": options["restarts"],
        "seed": options["seed"],
        "dtype": "float64",
        "points": report.samples,
        "accuracy": {_key(r.eps): r.attack_robust for r in report.rows},
        "lipschitz_accuracy": {_key(r.eps): r.lipschitz_certified for r in report.rows},
        "broken_certified": sum(r.broken_certified or 0 for r in report.rows),
        "seconds": round(time.perf_counter() - start, 2),
    }


def measure(
    model: nn.Module,
    test_set: Dataset,
    eps: Sequence[float],
    options: RobustnessOptions,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """The card's ``crown_certified_accuracy`` and ``attack_robust_accuracy`` fields.

    Args:
        model: the trained classifier (left unchanged: a float64 copy of its realised
            weights is certified and attacked, Note [Robustness on the realised weights]).
        test_set: the test set of the card, in its order.
        eps: the l2 radii of the card's ``certified_accuracy``.
        options: which samples, and the attack's budget (`ROBUSTNESS`).
        progress: show `lipnets.certification_report`'s progress bars.

    Returns:
        ``{"crown_certified_accuracy": {...}, "attack_robust_accuracy": {...}}``, each
        with its ``accuracy`` map from radius to share and a record of what was computed;
        a field whose samples are 0 (``crown_points``, ``attack_points``) is left out.
    """
    frozen = _float64(model)
    device = next(frozen.parameters()).device
    x, y = _tensors(test_set, device)
    fields = {}
    if options.crown_points > 0:
        fields["crown_certified_accuracy"] = _crown(
            frozen, x, y, eps, options.crown_points, progress
        )
    if options.attack_points != 0:
        attack = {
            "points": x.shape[0] if options.attack_points is None else options.attack_points,
            "steps": options.attack_steps,
            "restarts": options.attack_restarts,
            "seed": options.seed,
        }
        fields["attack_robust_accuracy"] = _attack(frozen, x, y, eps, attack, progress)
    return fields


def describe(fields: Mapping[str, Any]) -> list[str]:
    """``python -m zoo train``'s summary lines for the fields of `measure`."""
    crown, attack = fields.get("crown_certified_accuracy"), fields.get("attack_robust_accuracy")

    def shares(accuracy: Mapping[str, float]) -> str:
        return "  ".join(f"eps={float(k):g}: {100 * v:.1f}%" for k, v in accuracy.items())

    lines = []
    if crown:
        lines.append(
            f"  CROWN-certified (l2)    {shares(crown['accuracy'])}  (first {crown['points']} "
            f"test samples, float64; Lipschitz-certified on them: "
            f"{shares(crown['lipschitz_accuracy'])})"
        )
    if attack:
        lines.append(
            f"  attack-robust (l2)      {shares(attack['accuracy'])}  (pgd_l2 {attack['steps']} "
            f"steps x {attack['restarts']} restart(s) on the first {attack['points']} test "
            f"samples: an upper bound; certified samples broken: {attack['broken_certified']})"
        )
    return lines


def eval_rows(
    card: Mapping[str, Any], model: nn.Module, test_set: Dataset, *, progress: bool = False
) -> list[tuple[str, float, float, float]]:
    """``python -m zoo eval``'s rows for the card's CROWN and attack numbers, recomputed
    from what the card records (none for a card without them)."""
    crown, attack = card.get("crown_certified_accuracy"), card.get("attack_robust_accuracy")
    if crown is None and attack is None:
        return []
    frozen = _float64(model)
    x, y = _tensors(test_set, next(frozen.parameters()).device)
    from zoo.reproduce import TOLERANCE

    rows = []
    if crown is not None:
        eps = [float(k) for k in crown["accuracy"]]
        now = _crown(frozen, x, y, eps, crown["points"], progress)
        for key, was in crown["accuracy"].items():
            now_value = now["accuracy"][_key(float(key))]
            rows.append((f"crown_certified[{key}]", was, now_value, TOLERANCE["crown_certified"]))
    if attack is not None:
        eps = [float(k) for k in attack["accuracy"]]
        now = _attack(frozen, x, y, eps, attack, progress)
        for key, was in attack["accuracy"].items():
            now_value = now["accuracy"][_key(float(key))]
            rows.append((f"attack_robust[{key}]", was, now_value, TOLERANCE["attack_robust"]))
    return rows
