"""Training and evaluation of zoo classifiers, on one process or under torchrun (DDP).

`fit` trains with a `DistributedSampler` in every case: with one process it is
a seeded shuffle, with ``N`` processes each rank reads every ``N``-th index of
the same permutation and a global batch of ``B`` samples is split into ``N``
local batches of ``B / N``. Every zoo loss is a mean of per-sample values that
do not depend on the batch (see `lipnets.losses`) and DDP averages the ranks'
gradients, so an ``N``-process step equals a one-process step on the same
global batch up to float rounding. lipnets layers hold no buffers and no
rank-dependent state: a Björck layer's write-back of its polar factor
(Note [Bjorck reprojection]) is a function of the parameters, which DDP keeps
equal on every rank.

`evaluate` computes what a model card reports, from the sound bound
`lipnets.lipschitz_bound`, never from an assumed 1.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import lipnets
from lipnets.certify import certified_radius
from lipnets.estimators import lower_bound
from lipnets.graph import reuse_traces
from lipnets.losses import HKRLoss, LipschitzCrossEntropyLoss, MulticlassHingeLoss
from zoo import certified as cert
from zoo.certified import CERTIFIED_LOSSES, CertifiedOptions
from zoo.data import DataInfo
from zoo.errors import ZooError, unknown

__all__ = [
    "LOSSES",
    "LOWER_BOUND",
    "Distributed",
    "Evaluation",
    "History",
    "TrainConfig",
    "check_finite",
    "default_config",
    "eps_key",
    "evaluate",
    "fit",
    "make_loss",
    "tensors_of",
    "write_run",
]

LOSSES = ("hinge", "hkr", "ce", "ibp", "crown-ibp")
"""The zoo's losses; ``ibp`` and ``crown-ibp`` are certified training (`zoo.certified`)."""


@dataclass(frozen=True)
class TrainConfig:
    """Options of `fit`; every field has a ``--flag`` of ``python -m zoo train``.

    Attributes:
        epochs: passes over the training set.
        batch_size: the *global* batch size (split over the DDP processes).
        lr: peak learning rate of Adam.
        schedule: ``"cosine"`` (cosine decay to 0 over all steps) or ``"constant"``.
        loss: ``"hinge"`` (`MulticlassHingeLoss`), ``"hkr"`` (`HKRLoss`),
            ``"ce"`` (`LipschitzCrossEntropyLoss`), or a certified loss, ``"ibp"``
            (`lipnets.certify.IBPLoss`) or ``"crown-ibp"``
            (`lipnets.certify.CrownIBPLoss`), whose radius and schedules are
            `zoo.certified.CertifiedOptions`.
        margin: the hinge/HKR margin, or the cross-entropy offset. A
            1-Lipschitz network trained to margin ``m`` aims at certified
            radius ``m / sqrt(2)``.
        alpha: the hinge weight of HKR.
        temperature: the cross-entropy temperature.
        weight_decay: Adam's (L2) weight decay.
        seed: seed of the initialisation and of the data order.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 3e-3
    schedule: str = "cosine"
    loss: str = "hinge"
    margin: float = 1.0
    alpha: float = 10.0
    temperature: float = 0.25
    weight_decay: float = 0.0
    seed: int = 0


#: Defaults per model. ``groupsort-mlp``'s are the digits main job's, chosen by a sweep
#: over width, group size, loss, margin, learning rate and epochs (see the zoo's docs).
_DEFAULTS: dict[str, TrainConfig] = {
    "groupsort-mlp": TrainConfig(epochs=150, batch_size=128, lr=1e-2, loss="hinge", margin=1.1),
    "lipconvnet": TrainConfig(epochs=30, batch_size=128, lr=1e-2, loss="hinge", margin=1.1),
    # Certified training (benchmarks/certified_training.py): CROWN-IBP at l-inf 0.1 on digits.
    "mlp": TrainConfig(epochs=60, batch_size=64, lr=1e-3, loss="crown-ibp"),
}


def default_config(model: str, **changes: Any) -> TrainConfig:
    """The training defaults of ``model`` with the non-``None`` ``changes`` applied."""
    base = _DEFAULTS.get(model, TrainConfig())
    return replace(base, **{k: v for k, v in changes.items() if v is not None})


def make_loss(config: TrainConfig) -> nn.Module:
    """The loss module that ``config.loss`` names."""
    if config.loss == "hinge":
        return MulticlassHingeLoss(margin=config.margin)
    if config.loss == "hkr":
        return HKRLoss(alpha=config.alpha, margin=config.margin)
    if config.loss == "ce":
        return LipschitzCrossEntropyLoss(offset=config.margin, temperature=config.temperature)
    if config.loss in CERTIFIED_LOSSES:
        raise ZooError(
            f"--loss {config.loss} is certified training: it reads the model and a radius "
            "(fit(..., certified=CertifiedOptions(...)), python -m zoo train ... --eps)"
        )
    raise unknown("loss", config.loss, LOSSES)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (``world_size == 1``: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        """Read torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (absent: one process)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    def device(self, requested: str = "auto") -> torch.device:
        """``cuda:LOCAL_RANK`` when CUDA is available (or requested), else the CPU."""
        if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise ZooError("--device cuda was requested but CUDA is not available")
        return torch.device("cuda", self.local_rank if self.active else 0)

    def init(self, device: torch.device) -> None:
        """Join the process group: nccl on GPU, gloo on CPU (torchrun's env:// rendezvous)."""
        if self.active and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend, rank=self.rank, world_size=self.world_size)

    def barrier(self) -> None:
        if self.active and dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


SMALL_MODEL = 100_000
"""Models with fewer parameters train on one thread by default (`set_threads`)."""


def set_threads(requested: int | None, model: nn.Module) -> int:
    """Set torch's intra-op thread count for ``model`` and return it.

    ``requested`` (``--threads``) wins; by default a model with fewer than
    `SMALL_MODEL` parameters gets 1 thread and a larger one torch's default. On a
    shared 2-core machine a small model's step at 2 threads cost up to 40 times its
    1-thread step, while large models gain a little from 2 (benchmarks/threads.py,
    benchmarks/results/threads.md).
    """
    if requested is None:
        params = sum(p.numel() for p in model.parameters())
        requested = 1 if params < SMALL_MODEL else torch.get_num_threads()
    torch.set_num_threads(requested)
    return requested


@dataclass
class History:
    """What `fit` measured: mean training loss per epoch, steps, seconds."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def _progress(iterable: Any, enabled: bool, **kwargs: Any) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def fit(
    model: nn.Module,
    train_set: Dataset,
    config: TrainConfig,
    *,
    distributed: Distributed | None = None,
    device: torch.device | str = "cpu",
    max_steps: int | None = None,
    progress: bool = False,
    certified: CertifiedOptions | None = None,
) -> History:
    """Train ``model`` on ``train_set`` with Adam and the loss of ``config``.

    With ``distributed.active`` the process group must be initialised; the model
    is wrapped in `DistributedDataParallel` for the duration of training (its
    initial weights are broadcast from rank 0). The model is left in eval mode.

    Args:
        model: the model to train in place.
        train_set: a dataset of ``(input, label)`` pairs.
        config: the training options.
        distributed: this process's rank and world size (default: one process).
        device: where the model and the batches go.
        max_steps: stop after this many optimiser steps (tests, smoke runs).
        progress: show a tqdm bar over epochs (rank 0 only).
        certified: the radius and schedules of a certified loss (``config.loss`` ``"ibp"``
            or ``"crown-ibp"``, `zoo.certified`); one process only. The model is traced
            once for the whole run (`lipnets.graph.reuse_traces`).

    Returns:
        The `History` of the run on this rank.
    """
    distributed = distributed or Distributed()
    world = distributed.world_size
    if config.batch_size % world:
        raise ZooError(
            f"--batch-size {config.batch_size} must be divisible by the number of processes "
            f"({world}): it is the global batch, split evenly over them"
        )
    if config.schedule not in ("cosine", "constant"):
        raise unknown("schedule", config.schedule, ["cosine", "constant"])
    if (certified is not None) != (config.loss in CERTIFIED_LOSSES):
        raise ZooError(
            f"--loss {config.loss} and the certified options (the radius --eps) go together: "
            "fit(..., certified=CertifiedOptions(...)) with --loss ibp or crown-ibp only"
        )
    if certified is not None and world > 1:
        raise ZooError(
            f"--loss {config.loss} runs on one process: its bounds are not computed through "
            "DistributedDataParallel's forward, so DDP would not average their gradients"
        )
    loss_fn = make_loss(config) if certified is None else None
    device = torch.device(device)
    model.to(device)
    sampler = DistributedSampler(
        train_set, num_replicas=world, rank=distributed.rank, shuffle=True, seed=config.seed
    )
    loader = DataLoader(train_set, batch_size=config.batch_size // world, sampler=sampler)
    net: nn.Module = model
    if distributed.active:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total = config.epochs * len(loader)
    if max_steps is not None:
        total = min(total, max_steps)
    scheduler = None
    if config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
    history = History()
    start = time.perf_counter()
    # The bar counts the epochs that will run, and each is counted when it ends, so a
    # finished run shows N/N (iterating a bar over range() left it at N-1/N on the break).
    planned = min(config.epochs, math.ceil(total / max(len(loader), 1)))
    bar = _progress(
        None, progress and distributed.main, total=planned, desc="train", unit="epoch",
        dynamic_ncols=True,
    )  # fmt: skip
    step_loss = None if certified is None else cert.step_loss(config.loss, certified, len(loader))
    net.train()
    # Certified training propagates bounds through the model at every step: one trace.
    with reuse_traces() if certified is not None else contextlib.nullcontext():
        for epoch in range(config.epochs):
            sampler.set_epoch(epoch)
            running, seen = torch.zeros((), device=device, dtype=torch.float64), 0
            for k, (x, y) in enumerate(loader):
                if history.steps >= total:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if step_loss is None:
                    loss = loss_fn(net(x), y)
                else:  # certified training: the model itself (one process), the schedules
                    loss = step_loss(model, x, y, epoch, k)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                history.steps += 1
                running += loss.detach() * x.shape[0]  # no host sync per step
                seen += x.shape[0]
            if seen:
                history.losses.append(float(running) / seen)
                if bar is not None:
                    bar.set_postfix(loss=f"{history.losses[-1]:.4f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if history.steps >= total:
                break
    if bar is not None:
        bar.close()
    history.seconds = time.perf_counter() - start
    model.eval()
    return history


@dataclass(frozen=True)
class Evaluation:
    """What a card reports about a classifier on its test set.

    Attributes:
        clean_accuracy: share of test samples classified correctly with a
            nonzero margin (a tie is an error, as in `certified_accuracy` at 0).
        certified_accuracy: ``{eps: share}`` of samples correct with certified
            l2 radius ``> eps``, the radius being margin / (sqrt(2) L).
        lipschitz_bound: L, the sound bound `lipnets.lipschitz_bound` computed
            from the realised weights.
        lower_bound: a lower bound on the true constant found by
            `lipnets.estimators.lower_bound` near test points (an estimate: it
            checks L, it certifies nothing).
        radii: the certified radius of every test sample (float64).
    """

    clean_accuracy: float
    certified_accuracy: dict[float, float]
    lipschitz_bound: float
    lower_bound: float | None
    radii: Tensor

    def card_fields(self) -> dict[str, Any]:
        return {
            "clean_accuracy": self.clean_accuracy,
            "certified_accuracy": {eps_key(e): a for e, a in self.certified_accuracy.items()},
            "lipschitz_bound": self.lipschitz_bound,
            "lower_bound": self.lower_bound,
        }


def eps_key(eps: float) -> str:
    """The JSON key of a radius (``0.25`` -> ``"0.25"``, 36/255 -> ``"0.141176"``)."""
    return f"{eps:.6g}"


#: How `evaluate` searches for the lower bound, per model: seeded, so that a card is
#: reproducible; recorded in the card (``lower_bound_search``) and reused by ``eval``.
#: Convolutions are evaluated in float64 by `lower_bound`, which is slow on a CPU, so
#: the convolutional model gets a shorter search.
LOWER_BOUND: dict[str, dict[str, int]] = {
    "groupsort-mlp": {"points": 16, "steps": 50, "restarts": 1, "seed": 0},
    "mlp": {"points": 16, "steps": 50, "restarts": 1, "seed": 0},
    "lipconvnet": {"points": 8, "steps": 10, "restarts": 1, "seed": 0},
}


def tensors_of(dataset: Dataset, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """All ``(input, label)`` pairs of ``dataset``, stacked, in order."""
    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    return torch.cat(xs), torch.cat(ys)


def evaluate(
    model: nn.Module,
    test_set: Dataset,
    eps: Sequence[float],
    *,
    device: torch.device | str = "cpu",
    lower: Mapping[str, int] | None = None,
    batch_size: int = 512,
    progress: bool = False,
) -> Evaluation:
    """Clean and certified accuracy on ``test_set``, the sound bound and a lower bound.

    The bound is `lipnets.lipschitz_bound` of the model in eval mode, with the
    test inputs' shape (convolution bounds may depend on it); every radius is
    `lipnets.certify.certified_radius` of the logits with that bound. With
    ``lower`` (``{"points", "steps", "restarts", "seed"}``, see `LOWER_BOUND`) a
    lower bound is searched by `lipnets.estimators.lower_bound` from the first
    ``points`` test inputs with a seeded generator (reproducible on the same
    machine); ``None`` skips it.
    """
    model.eval()
    device = torch.device(device)
    x, y = tensors_of(test_set)
    bound = lipnets.lipschitz_bound(model, input_shape=(1, *x.shape[1:]))
    chunks = range(0, x.shape[0], batch_size)
    logits = []
    with torch.no_grad():
        for start in _progress(chunks, progress, desc="certify", unit="batch", leave=False):
            logits.append(model(x[start : start + batch_size].to(device)).cpu())
    radii = certified_radius(torch.cat(logits), y, bound)
    n = radii.shape[0]
    accuracy = {float(e): int((radii > e).sum()) / n for e in eps}
    clean = int((radii > 0).sum()) / n
    found = None
    if lower is not None:
        generator = torch.Generator(device=device).manual_seed(lower["seed"])
        found = float(
            lower_bound(
                model,
                x[: lower["points"]].to(device),
                steps=lower["steps"],
                restarts=lower["restarts"],
                generator=generator,
                progress=progress,
            ).value
        )
    return Evaluation(clean, accuracy, float(bound), found, radii)


def config_dict(config: TrainConfig) -> dict[str, Any]:
    return asdict(config)


def write_run(
    out: str | Path,
    name: str,
    model: nn.Module,
    arch: Mapping[str, Any],
    info: DataInfo,
    evaluation: Evaluation,
    *,
    training: Mapping[str, Any],
    lower_bound_search: Mapping[str, int] | None,
    command: str,
    verified: Mapping[str, Any] | None = None,
    robustness: Mapping[str, Any] | None = None,
) -> Path:
    """Write a classifier's run folder: ``model.safetensors``, ``card.json``, ``certified.png``
    and ``README.md`` (the model card rendered from ``card.json``, `zoo.modelcard`).

    The folder is ``out/name``, or ``out/name-2``, ... when that name is
    taken: it is written whole into a hidden temporary folder and renamed
    into place (`zoo.runs.write_run_folder`), never over an earlier run.
    The card holds the architecture (``model``, ``options``), the data
    (`DataInfo`, enough to rebuild the same test set), the numbers of
    ``evaluation``, how the lower bound was searched, the lipnets and torch
    versions, the command, the training options and the checkpoint's
    SHA-256; ``python -m zoo eval`` recomputes its numbers from the checkpoint.

    A run of certified training passes ``verified`` (`zoo.certified.verified_run`): its
    ``field`` goes into the card as ``crown_verified_accuracy``, and its ``plot(path)``
    writes ``verified.png``.

    ``robustness`` (`zoo.robustness.measure`) adds the card's ``crown_certified_accuracy``
    and ``attack_robust_accuracy``, drawn in ``certified.png`` beside the certified curve.

    Returns:
        The run folder written.
    """
    from zoo import cards, plots, runs

    def checkpoint(path: Path) -> None:
        cards.save_checkpoint(path, model, cards.Architecture(arch))

    def card(path: Path) -> None:
        fields = {
            "model": arch["model"],
            "options": dict(arch["options"]),
            "data": info.as_dict(),
            **evaluation.card_fields(),
            "lower_bound_search": None if lower_bound_search is None else dict(lower_bound_search),
            "training": dict(training),
            **({} if verified is None else {"crown_verified_accuracy": verified["field"]}),
            **dict(robustness or {}),
            **cards.provenance(path.parent, command),
        }
        cards.write_card(path.parent, fields)

    def plot(path: Path) -> None:
        plots.certified_curve(
            path,
            evaluation.radii,
            evaluation.certified_accuracy,
            title=f"{arch['model']} on {info.name}: certified accuracy",
            bound=evaluation.lipschitz_bound,
            **plots.robustness_curves(robustness or {}, info.test_size),
        )

    files = [(cards.WEIGHTS, checkpoint), (cards.CARD, card), ("certified.png", plot)]
    if verified is not None:
        files.append(("verified.png", verified["plot"]))
    return runs.write_run_folder(out, name, files)


def check_finite(history: History) -> None:
    """Refuse to write a card for a run whose loss became NaN or infinite."""
    if history.losses and not math.isfinite(history.losses[-1]):
        raise ZooError(
            f"training diverged: the last epoch's loss is {history.losses[-1]}; lower --lr"
        )
