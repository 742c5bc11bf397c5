"""Certified training in the zoo: ``python -m zoo train MODEL --loss crown-ibp --eps 0.1``.

With ``--loss crown-ibp`` (or ``ibp``) a classifier is trained on the loss of
`lipnets.certify.CrownIBPLoss` (`lipnets.certify.IBPLoss`): the cross-entropy of the
worst-case margins over l-infinity balls (inputs in [0, 1]), bounded by the same
propagation code that certifies. ``--eps`` then gives the l-infinity radii: the model
is trained at the largest, and the card records the CROWN-verified accuracy at each
(`lipnets.certify.certify_crown`, float64), next to the usual Lipschitz numbers. The
schedules are `lipnets.certify.CertifiedSchedule`'s: ``--warmup`` epochs of clean
training, then ``--ramp`` epochs over which the radius grows from 0, beta goes from 1
to 0 and kappa (the weight of the clean loss) from 1 to ``--kappa-end``.

The ``mlp`` model (plain ``nn.Linear`` layers with ReLU or MaxMin) is the one this
recipe is meant for; the 1-Lipschitz models train with it too.
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lipnets.certify import CertifiedSchedule, CrownIBPLoss, IBPLoss, certify_crown
from zoo import arguments
from zoo.errors import ZooError

__all__ = [
    "CERTIFIED_LOSSES",
    "CURVE",
    "CertifiedOptions",
    "add_arguments",
    "describe",
    "eval_rows",
    "options_from",
    "step_loss",
    "verified_accuracy",
    "verified_run",
]

CERTIFIED_LOSSES = ("ibp", "crown-ibp")
#: Radii of the verified-accuracy curve, as multiples of the largest training radius.
CURVE = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


@dataclass(frozen=True)
class CertifiedOptions:
    """The options of certified training (``--eps``, ``--warmup``, ``--ramp``, ``--kappa-end``).

    Attributes:
        eps: the l-infinity radii to verify; the model trains at the largest.
        warmup: epochs of clean training before the radius grows.
        ramp: epochs over which the radius grows to its target, beta goes from 1 to 0
            and kappa from 1 to ``kappa_end``.
        kappa_end: the weight of the clean cross-entropy after the ramp.
    """

    eps: tuple[float, ...]
    warmup: float = 5.0
    ramp: float = 30.0
    kappa_end: float = 0.0

    @property
    def train_eps(self) -> float:
        return max(self.eps)

    def schedule(self) -> CertifiedSchedule:
        return CertifiedSchedule(
            eps=self.train_eps, warmup=self.warmup, ramp=self.ramp, kappa_end=self.kappa_end
        )

    def loss(self, name: str) -> CrownIBPLoss:
        """The loss module of ``name`` (``"ibp"`` or ``"crown-ibp"``), l-infinity balls."""
        if name == "ibp":
            return IBPLoss(self.train_eps, norm=math.inf)
        return CrownIBPLoss(self.train_eps, norm=math.inf)

    def as_dict(self) -> dict[str, Any]:
        return {"norm": "inf", **asdict(self), "eps": list(self.eps)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m zoo train`` that only certified losses read."""
    p.add_argument(
        "--warmup",
        type=arguments.nonnegative,
        help="with --loss ibp/crown-ibp: epochs of clean training before the radius grows, "
        f">= 0 (default {CertifiedOptions.warmup:g})",
    )
    p.add_argument(
        "--ramp",
        type=arguments.nonnegative,
        help="with --loss ibp/crown-ibp: epochs over which the radius grows to --eps, >= 0 "
        f"(default {CertifiedOptions.ramp:g})",
    )
    p.add_argument(
        "--kappa-end",
        type=arguments.unit,
        help="with --loss ibp/crown-ibp: weight of the clean loss after the ramp, in [0, 1] "
        f"(default {CertifiedOptions.kappa_end:g})",
    )


def options_from(
    args: argparse.Namespace, loss: str, world_size: int = 1
) -> CertifiedOptions | None:
    """The certified-training options of a command line, or None for another loss.

    Checked before any data are loaded: a certified loss needs ``--eps`` and one
    process, and the schedule options are refused with another loss.
    """
    given = {"--warmup": args.warmup, "--ramp": args.ramp, "--kappa-end": args.kappa_end}
    if loss not in CERTIFIED_LOSSES:
        for flag, value in given.items():
            if value is not None:
                raise ZooError(
                    f"{flag} is an option of certified training: it needs --loss ibp or "
                    f"--loss crown-ibp, got --loss {loss}"
                )
        return None
    if not args.eps:
        raise ZooError(
            f"--loss {loss} trains over l-infinity balls: give their radius with --eps "
            "(for example --eps 0.1; inputs are in [0, 1])"
        )
    if max(args.eps) <= 0:
        raise ZooError(f"--loss {loss} needs a radius --eps > 0, got {max(args.eps):g}")
    if world_size > 1:
        raise ZooError(
            f"--loss {loss} runs on one process, got {world_size} (torchrun): its bounds do "
            "not go through DistributedDataParallel's forward, which averages the gradients"
        )
    changes = {
        key: value
        for key, value in (("warmup", args.warmup), ("ramp", args.ramp),
                           ("kappa_end", args.kappa_end))
        if value is not None
    }  # fmt: skip
    return CertifiedOptions(eps=tuple(args.eps), **changes)


def verified_accuracy(
    model: nn.Module, test_set: Dataset, eps: Sequence[float], *, batch_size: int = 512
) -> dict[float, float]:
    """The share of ``test_set`` that CROWN verifies at each l-infinity radius (float64).

    `lipnets.certify.certify_crown` on a float64 copy of the model in eval mode: a
    sample counts when it is classified correctly and every margin's lower bound over
    the ball is > 0.
    """
    from zoo.train import tensors_of

    x, y = tensors_of(test_set)
    device = next(model.parameters()).device
    frozen = copy.deepcopy(model).to(device=device, dtype=torch.float64).eval()
    x = x.to(device=device, dtype=torch.float64)
    result = {}
    for e in eps:
        count = 0
        for start in range(0, x.shape[0], batch_size):
            xs, ys = x[start : start + batch_size], y[start : start + batch_size]
            count += int(certify_crown(frozen, xs, ys.to(device), float(e), norm="inf").sum())
        result[float(e)] = count / x.shape[0]
    return result


def verified_run(
    model: nn.Module, test_set: Dataset, options: CertifiedOptions, *, title: str
) -> dict[str, Any]:
    """What a certified-training run adds to its folder (`zoo.train.write_run`'s
    ``verified``): the card's ``crown_verified_accuracy`` (``field``), the numbers
    (``accuracy``: ``{eps: share}`` at the ``--eps`` radii) and ``plot(path)``, which
    writes the verified accuracy at multiples of the training radius (`CURVE`)."""
    from zoo import plots
    from zoo.train import eps_key

    radii = sorted({round(f * options.train_eps, 6) for f in CURVE} | set(options.eps))
    curve = verified_accuracy(model, test_set, radii)
    accuracy = {float(e): curve[float(e)] for e in options.eps}
    field = {
        "norm": "inf",
        "method": "crown",
        "dtype": "float64",
        "accuracy": {eps_key(e): a for e, a in accuracy.items()},
    }

    def plot(path: Path) -> None:
        plots.verified_curve(path, curve, accuracy, title=title)

    return {"field": field, "accuracy": accuracy, "plot": plot}


def describe(verified: Mapping[str, Any]) -> str:
    """One line of ``python -m zoo train``'s summary: the CROWN-verified accuracies."""
    shares = "  ".join(f"eps={e:g}: {100 * a:.1f}%" for e, a in verified["accuracy"].items())
    return f"  CROWN-verified (l-inf)  {shares}  (lipnets.certify.certify_crown, float64)"


def eval_rows(card: Mapping[str, Any], model: nn.Module, test_set: Dataset) -> list[tuple]:
    """``python -m zoo eval``'s rows for a card's CROWN-verified accuracy (none without one)."""
    field = card.get("crown_verified_accuracy")
    if field is None:
        return []
    eps = [float(k) for k in field["accuracy"]]
    now = verified_accuracy(model, test_set, eps)
    return [
        (f"crown_verified_accuracy[{key}]", value, now[float(key)], 0.0)
        for key, value in field["accuracy"].items()
    ]


def step_loss(loss_name: str, options: CertifiedOptions, steps_per_epoch: int) -> Any:
    """The per-step loss of certified training, ``(model, x, y, epoch, step) -> loss``:
    the schedule's values at ``epoch + step / steps_per_epoch`` set on the loss, then the
    loss of the model on the batch."""
    loss = options.loss(loss_name)
    schedule = options.schedule()

    def of(model: nn.Module, x: Tensor, y: Tensor, epoch: int, step: int) -> Tensor:
        schedule.apply(loss, epoch + step / max(steps_per_epoch, 1))
        return loss(model, x, y)

    return of
