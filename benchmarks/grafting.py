"""Linearity grafting on digits (Chen et al. 2022 at CPU scale): does it make verification easier?

The zoo's ``mlp`` (64-128-128-10, ReLU) is trained on the zoo's digits split (inputs in
[0, 1], 1347 train / 450 test) by adversarial training, FGSM from a random start plus
GradAlign (`lipnets.graft.finetune` on the un-grafted model), at l-inf ``--train-eps``.
From that baseline, each arm trains ``--extra-epochs`` more with the same recipe:

* ``baseline``: the model as trained, no extra epochs;
* ``control``: the baseline fine-tuned for the extra epochs, nothing grafted;
* ``graft``: `graft_mask(score="combined")` at ``--ratio`` on 512 training inputs, `graft`,
  then fine-tuned (slopes and intercepts at 10x the learning rate, no weight decay);
* ``random``: the same with a random mask (``score="random"``);
* ``prune``: the combined mask, slopes and intercepts fixed at 0 (those neurons output 0).

Every model is evaluated in float64 on the test set at l-inf ``--eps`` (the balls are not
intersected with [0, 1], on every side): clean accuracy; accuracy under PGD
(`lipnets.verify.attack.attack_margins`, 50 steps, 5 restarts: an upper bound of the
robust accuracy); CROWN-verified accuracy (`certify_crown`); unstable ReLUs per test
input (`lipnets.graft.unstable_relus`: CROWN pre-activation bounds straddling 0,
grafted neurons excluded); and on the first ``--points`` test inputs, complete
verification by branch and bound (`lipnets.verify.verify`, ``--time-limit`` seconds and
``--max-nodes`` domains per input): the verified share, seconds and domains per input,
and the inputs left unknown. A CROWN- or BaB-verified point that PGD breaks would be a
soundness bug and is counted. Medians over the seeds (each seed: initialisation, data
order and random masks). One torch thread.

Usage:
    python benchmarks/grafting.py --markdown benchmarks/results/grafting-cpu.md \\
        --json benchmarks/results/grafting-cpu.json
    python benchmarks/grafting.py --seeds 0 --base-epochs 2 --extra-epochs 1 --points 5  # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time

import torch
from torch import nn

from lipnets.certify import certify_crown
from lipnets.functional import margin_spec
from lipnets.graft import finetune, graft, graft_mask, unstable_relus
from lipnets.nn import GraftedReLU
from lipnets.verify import verify
from lipnets.verify.attack import attack_margins
from zoo import data, models, train

ARMS = ("baseline", "control", "graft", "random", "prune")
LABELS = {
    "baseline": "baseline (un-grafted)",
    "control": "control (+ extra epochs)",
    "graft": "graft, combined score",
    "random": "graft, random mask",
    "prune": "prune (a = b = 0 fixed)",
}


def recipe(args: argparse.Namespace, epochs: int, lr: float) -> dict:
    return {
        "norm": math.inf,
        "epochs": epochs,
        "lr": lr,
        "grad_align": args.grad_align,
        "optimizer": "adam",
        "batch_size": args.batch_size,
        "slope_lr_scale": 10.0,
        "progress": False,
    }


def pgd_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Which inputs keep every margin > 0 at the point PGD finds (an estimate)."""
    with torch.no_grad():
        spec = margin_spec(model(x), y, x.dtype)
    radius = torch.full((x.shape[0],), eps, dtype=x.dtype)
    gen = torch.Generator().manual_seed(0)
    point = attack_margins(model, x, spec, radius, math.inf, gen, steps=50, restarts=5)
    with torch.no_grad():
        margins = torch.bmm(spec, model(point).unsqueeze(-1))[..., 0]
    return (margins > 0).all(1)


def evaluate(model: nn.Module, x, y, args: argparse.Namespace) -> dict:
    frozen = copy.deepcopy(model).double().eval()
    x = x.double()
    with torch.no_grad():
        clean = frozen(x).argmax(1) == y
    robust = pgd_robust(frozen, x, y, args.eps) & clean
    crown = certify_crown(frozen, x, y, args.eps, norm="inf")
    unstable = unstable_relus(frozen, x, args.eps, norm="inf")
    p = max(args.points, 1)  # at least one input (--points 0: a quick look, BaB on one)
    start = time.perf_counter()
    bab = verify(
        frozen,
        x[:p],
        y[:p],
        args.eps,
        norm="inf",
        time_limit=args.time_limit,
        max_nodes=args.max_nodes,
        progress=False,
    )
    bab_seconds = time.perf_counter() - start
    verified = bab.verified
    return {
        "clean": float(clean.double().mean()),
        "pgd": float(robust.double().mean()),
        "crown": float(crown.double().mean()),
        "unstable": float(unstable.double().mean()),
        "bab": float(verified.double().mean()),
        "bab_crown": float(crown[:p].double().mean()),
        "bab_unknown": sum(s == "unknown" for s in bab.status),
        "bab_time": float(bab.time.mean()),
        "bab_time_median": float(bab.time.median()),
        "bab_nodes": float(bab.nodes.double().mean()),
        "bab_seconds": bab_seconds,
        "broken": int((crown & ~robust).sum()) + int((verified & ~robust[:p]).sum()),
    }


def grafted_count(model: nn.Module) -> int:
    return sum(int(m.mask.sum()) for m in model.modules() if isinstance(m, GraftedReLU))


def run_seed(seed: int, split, args: argparse.Namespace) -> dict[str, dict]:
    info = split.info
    xtr, ytr = train.tensors_of(split.train)
    xte, yte = train.tensors_of(split.test)
    torch.manual_seed(seed)
    base = models.build("mlp", input_shape=info.input_shape, num_outputs=info.num_classes)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    finetune(
        base, (xtr, ytr), args.train_eps, generator=gen, **recipe(args, args.base_epochs, args.lr)
    )
    base_seconds = time.perf_counter() - t0
    calib = xtr[: args.calib].double()
    masks = {
        score: graft_mask(
            copy.deepcopy(base).double(),
            calib,
            args.train_eps,
            norm="inf",
            ratio=args.ratio,
            score=score,
            generator=torch.Generator().manual_seed(seed),
        )
        for score in ("combined", "random")
    }
    arms: dict[str, nn.Module] = {"baseline": base}
    arms["control"] = copy.deepcopy(base)
    arms["graft"] = graft(base, masks["combined"])
    arms["random"] = graft(base, masks["random"])
    arms["prune"] = graft(base, masks["combined"])
    for module in arms["prune"].modules():
        if isinstance(module, GraftedReLU):
            with torch.no_grad():
                module.slope.zero_()
                module.intercept.zero_()
            module.slope.requires_grad_(False)
            module.intercept.requires_grad_(False)
    results = {}
    for name, model in arms.items():
        seconds = 0.0
        if name != "baseline":
            t0 = time.perf_counter()
            finetune(
                model,
                (xtr, ytr),
                args.train_eps,
                generator=torch.Generator().manual_seed(1000 + seed),
                **recipe(args, args.extra_epochs, args.finetune_lr),
            )
            seconds = time.perf_counter() - t0
        row = evaluate(model, xte, yte, args)
        row["train_seconds"] = base_seconds + seconds
        row["grafted"] = grafted_count(model)
        results[name] = row
        print(
            f"seed {seed} {name:9s} "
            + " ".join(
                f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            ),
            flush=True,
        )
    return results


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def markdown(
    per_seed: dict[int, dict[str, dict]],
    args: argparse.Namespace,
    total: float,
    command: str,
    machine: str,
) -> str:
    seeds = sorted(per_seed)
    by_arm = {arm: [per_seed[s][arm] for s in seeds] for arm in ARMS}
    med = {arm: {k: median(rows, k) for k in rows[0]} for arm, rows in by_arm.items()}
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = [
        f"Command: `{command}`",
        "",
        f"{machine}; total {total / 60:.1f} min.",
        "",
        f"zoo `mlp` (64-128-128-10, ReLU) on the zoo's digits split (1347 train / 450 test, "
        f"inputs in [0, 1]). Baseline: {args.base_epochs} epochs of FGSM from a random start "
        f"+ GradAlign (lambda {args.grad_align:g}) at l-inf {args.train_eps:g}, Adam lr "
        f"{args.lr:g} (cosine), batch {args.batch_size}. Every other arm: "
        f"{args.extra_epochs} more epochs of the same recipe at lr {args.finetune_lr:g} "
        f"(grafted slopes and intercepts at 10x, no weight decay). Grafting ratio "
        f"{args.ratio:g} ({round(args.ratio * 256)} of 256 neurons), masks from "
        f"{args.calib} training inputs. Evaluation in float64 at l-inf eps {args.eps:g}: "
        f"clean, PGD (50 steps, 5 restarts) and CROWN-verified accuracy and unstable ReLUs "
        f"per input on the 450 test inputs; branch and bound (`lipnets.verify.verify`, "
        f"{args.time_limit:g} s and {args.max_nodes} domains per input) on the first "
        f"{args.points}. Medians over seeds {', '.join(map(str, seeds))}; 'broken' counts "
        "verified points PGD broke (must be 0).",
        "",
        "| arm | clean | PGD | CROWN-verified | BaB-verified | BaB unknown | unstable ReLUs "
        "per input | BaB s per input | BaB domains per input | broken |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        m = med[arm]
        broken = sum(r["broken"] for r in by_arm[arm])
        lines.append(
            f"| {LABELS[arm]} | {pct(m['clean'])} % | {pct(m['pgd'])} % | {pct(m['crown'])} % "
            f"| {pct(m['bab'])} % | {m['bab_unknown']:g} / {args.points} | {m['unstable']:.1f} "
            f"| {m['bab_time']:.3f} | {m['bab_nodes']:.1f} | {broken} |"
        )
    lines += [
        "",
        "Per seed:",
        "",
        "| arm | seed | clean | PGD | CROWN | BaB | unstable | BaB s | domains |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        for seed, r in zip(seeds, by_arm[arm], strict=True):
            lines.append(
                f"| {arm} | {seed} | {pct(r['clean'])} | {pct(r['pgd'])} | {pct(r['crown'])} "
                f"| {pct(r['bab'])} | {r['unstable']:.1f} | {r['bab_time']:.3f} "
                f"| {r['bab_nodes']:.1f} |"
            )
    c, g, rnd, b = med["control"], med["graft"], med["random"], med["baseline"]
    checks = [
        (
            "unstable ReLUs per input <= 50 % of the control's",
            g["unstable"] <= 0.5 * c["unstable"],
            f"{g['unstable']:.1f} vs {c['unstable']:.1f}",
        ),
        (
            "CROWN-verified >= control + 10 points",
            g["crown"] >= c["crown"] + 0.10,
            f"{pct(g['crown'])} vs {pct(c['crown'])}",
        ),
        (
            "CROWN-verified >= random-mask graft + 5 points",
            g["crown"] >= rnd["crown"] + 0.05,
            f"{pct(g['crown'])} vs {pct(rnd['crown'])}",
        ),
        (
            "clean >= baseline - 1 point",
            g["clean"] >= b["clean"] - 0.01,
            f"{pct(g['clean'])} vs {pct(b['clean'])}",
        ),
        (
            "PGD >= baseline - 3 points",
            g["pgd"] >= b["pgd"] - 0.03,
            f"{pct(g['pgd'])} vs {pct(b['pgd'])}",
        ),
        (
            "BaB s per input < control's",
            g["bab_time"] < c["bab_time"],
            f"{g['bab_time']:.3f} vs {c['bab_time']:.3f}",
        ),
        (
            "BaB domains per input < control's",
            g["bab_nodes"] < c["bab_nodes"],
            f"{g['bab_nodes']:.1f} vs {c['bab_nodes']:.1f}",
        ),
        ("BaB-verified > control's", g["bab"] > c["bab"], f"{pct(g['bab'])} vs {pct(c['bab'])}"),
    ]
    lines += [
        "",
        "The issue's checks (medians, graft with the combined score):",
        "",
        "| check | holds | graft vs reference |",
        "|---|---|---|",
    ]
    lines += [f"| {what} | {'yes' if ok else 'no'} | {value} |" for what, ok, value in checks]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eps", type=float, default=0.1, help="l-inf radius of evaluation")
    p.add_argument("--train-eps", type=float, default=None, help="default: --eps")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--base-epochs", type=int, default=40)
    p.add_argument("--extra-epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--grad-align", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--points", type=int, default=50)
    p.add_argument("--time-limit", type=float, default=1.0)
    p.add_argument("--max-nodes", type=int, default=2000)
    p.add_argument("--markdown")
    p.add_argument("--json")
    p.add_argument("--render", metavar="JSON", help="only rewrite --markdown from a --json")
    args = p.parse_args()
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        command, options = saved["command"], argparse.Namespace(**saved["args"])
        per_seed = {int(k): v for k, v in saved["results"].items()}
        text = markdown(per_seed, options, saved["seconds"], command, saved["machine"])
        print(text)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text)
        return
    if args.train_eps is None:
        args.train_eps = args.eps
    torch.set_num_threads(1)
    split = data.load("digits", seed=0)
    start = time.perf_counter()
    per_seed = {seed: run_seed(seed, split, args) for seed in args.seeds}
    total = time.perf_counter() - start
    command = "python benchmarks/grafting.py " + shlex.join(sys.argv[1:])
    machine = (
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, 1 thread, "
        f"load average {', '.join(f'{v:.1f}' for v in os.getloadavg())} at the end"
    )
    text = markdown(per_seed, args, total, command, machine)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            saved = {"command": command, "machine": machine, "seconds": total, "args": vars(args)}
            json.dump({**saved, "results": per_seed}, f, indent=1)


if __name__ == "__main__":
    main()
