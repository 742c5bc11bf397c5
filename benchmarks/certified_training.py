"""Certified training on digits: CROWN-IBP against plain cross-entropy and hinge (l-inf 0.1).

The same architecture, the zoo's ``mlp`` (64-128-128-10, ReLU; ``-o activation=maxmin``
for MaxMin), is trained by `zoo.train.fit` on the zoo's digits split (inputs in [0, 1],
1347 train / 450 test) with the same optimiser, batch size, epochs and seeds, and one
loss each:

* ``ce``: plain cross-entropy (`LipschitzCrossEntropyLoss` with offset 0 and
  temperature 1, which is `torch.nn.functional.cross_entropy`);
* ``hinge``: the zoo's hinge recipe (`MulticlassHingeLoss`, margin 1);
* ``ibp``: `lipnets.certify.IBPLoss` at l-inf eps (Gowal et al. 2018);
* ``crown-ibp``: `lipnets.certify.CrownIBPLoss` at l-inf eps (Zhang et al. 2020), the
  zoo's recipe (``python -m zoo train mlp --loss crown-ibp --eps 0.1``).

The certified losses use the zoo's schedules (5 warm-up epochs, then a 30-epoch ramp of
eps from 0, beta from 1 to 0, kappa from 1 to 0). Each trained model is evaluated in
float64: clean accuracy, the share of test points that `lipnets.certify.certify_crown`
verifies at eps (CROWN, every margin bounded over the ball) and that IBP verifies, and
the share that an l-inf PGD attack (50 steps, 2 restarts, same unclamped ball) does not
break; a verified point broken by the attack would be a soundness bug and is counted.

Usage:
    python benchmarks/certified_training.py --markdown benchmarks/results/certified-training-cpu.md
    python benchmarks/certified_training.py --epochs 2 --seeds 0   # smoke run

Nothing here runs in the test suite (tests/certify/test_certified_training.py checks
the losses and their gradients).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch
from torch import nn

from lipnets.certify import certify_crown
from zoo import certified, data, models, train

LOSSES = ("ce", "hinge", "ibp", "crown-ibp")


def config(loss: str, epochs: int, seed: int) -> train.TrainConfig:
    """The zoo's ``mlp`` training options with ``loss``: only the loss differs."""
    changes = {"ce": {"margin": 0.0, "temperature": 1.0}, "hinge": {"margin": 1.0}}
    return train.default_config("mlp", epochs=epochs, seed=seed, loss=loss, **changes.get(loss, {}))


def pgd_linf(model: nn.Module, x, y, eps: float, steps: int = 50, restarts: int = 2, seed=0):
    """Which points keep their label under an l-inf PGD attack (sign steps, random starts)."""
    gen = torch.Generator().manual_seed(seed)
    robust = torch.ones(x.shape[0], dtype=torch.bool)
    for _ in range(restarts):
        delta = (torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1) * eps
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = nn.functional.cross_entropy(model(x + delta), y)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + eps / 4 * grad.sign()).clamp(-eps, eps)
        with torch.no_grad():
            robust &= model(x + delta).argmax(1) == y
    return robust


def run(loss: str, activation: str, epochs: int, seed: int, eps: float, split) -> dict:
    torch.manual_seed(seed)
    info = split.info
    model = models.build("mlp", input_shape=info.input_shape, num_outputs=info.num_classes,
                         activation=activation)  # fmt: skip
    cfg = config(loss, epochs, seed)
    options = certified.CertifiedOptions(eps=(eps,)) if loss in certified.CERTIFIED_LOSSES else None
    history = train.fit(model, split.train, cfg, certified=options)
    frozen = copy.deepcopy(model).double().eval()
    x, y = train.tensors_of(split.test)
    x = x.double()
    with torch.no_grad():
        clean = frozen(x).argmax(1) == y
    crown = certify_crown(frozen, x, y, eps, norm="inf")
    ibp = certify_crown(frozen, x, y, eps, norm="inf", method="ibp")
    robust = pgd_linf(frozen, x, y, eps, seed=seed)
    return {
        "loss": loss,
        "activation": activation,
        "seed": seed,
        "clean": float(clean.double().mean()),
        "crown": float(crown.double().mean()),
        "ibp": float(ibp.double().mean()),
        "pgd": float(robust.double().mean()),
        "broken": int((crown & ~robust).sum()),
        "seconds": history.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--maxmin", action="store_true", help="also MaxMin with crown-ibp")
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    split = data.load("digits", seed=0)
    rows = []
    jobs = [(loss, "relu") for loss in args.losses]
    if args.maxmin:
        jobs += [("hinge", "maxmin"), ("crown-ibp", "maxmin")]
    for loss, activation in jobs:
        for seed in args.seeds:
            row = run(loss, activation, args.epochs, seed, args.eps, split)
            rows.append(row)
            print(
                f"{loss:9s} {activation:6s} seed {seed}: clean {100 * row['clean']:.1f}%  "
                f"CROWN-verified {100 * row['crown']:.1f}%  IBP-verified {100 * row['ibp']:.1f}%  "
                f"PGD-robust {100 * row['pgd']:.1f}%  broken {row['broken']}  "
                f"{row['seconds']:.1f} s",
                flush=True,
            )
    if args.markdown:
        write_markdown(args, rows, jobs)


def write_markdown(args, rows: list[dict], jobs) -> None:
    def mean(values):
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    lines = [
        "Command: `python benchmarks/certified_training.py"
        + (f" --epochs {args.epochs}" if args.epochs != 60 else "")
        + (" --maxmin" if args.maxmin else "")
        + f" --markdown {args.markdown}`",
        "",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, 1 thread, load average "
        + ", ".join(f"{v:.1f}" for v in os.getloadavg())
        + " at the end.",
        "",
        f"zoo `mlp` (64-128-128-10), digits split of the zoo (seed 0: 1347 train / 450 test, "
        f"inputs in [0, 1]), `zoo.train.fit`: Adam, lr 1e-3 with cosine decay, batch 64, "
        f"{args.epochs} epochs, seeds {', '.join(map(str, args.seeds))} (initialisation and "
        "data order). Certified losses: 5 warm-up epochs, then 30 epochs of ramp (eps 0 to "
        "target, beta 1 to 0, kappa 1 to 0). Evaluation in float64 on the 450 test points: "
        "clean accuracy; verified accuracy by `certify_crown` (CROWN, method='crown') and by "
        "IBP (method='ibp'); accuracy under an l-inf PGD attack (50 steps of eps/4, 2 random "
        "restarts, the same unclamped ball), an upper bound of the robust accuracy; "
        "'broken' counts CROWN-verified points the attack broke (must be 0).",
        "",
        "| loss | activation | clean | CROWN-verified | IBP-verified | PGD-robust | broken "
        "| train time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for loss, activation in jobs:
        group = [r for r in rows if r["loss"] == loss and r["activation"] == activation]
        cells = []
        for key in ("clean", "crown", "ibp", "pgd"):
            m, s = mean([100 * r[key] for r in group])
            cells.append(f"{m:.1f} ± {s:.1f} %")
        broken = sum(r["broken"] for r in group)
        secs = statistics.mean(r["seconds"] for r in group)
        lines.append(f"| {loss} | {activation} | " + " | ".join(cells) + f" | {broken} | "
                     f"{secs:.1f} s |")  # fmt: skip
    lines += ["", "Per seed:", "", "| loss | activation | seed | clean | CROWN | IBP | PGD |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['loss']} | {r['activation']} | {r['seed']} | {100 * r['clean']:.1f} | "
            f"{100 * r['crown']:.1f} | {100 * r['ibp']:.1f} | {100 * r['pgd']:.1f} |"
        )
    with open(args.markdown, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.markdown}")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s")
