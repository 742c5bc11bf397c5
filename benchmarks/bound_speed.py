"""Time per call of IBP and CROWN, lipnets against auto_LiRPA, side by side.

auto_LiRPA traces a model once into a ``BoundedModule`` and then answers
``compute_bounds`` calls. lipnets' counterpart is a call inside
`lipnets.graph.reuse_traces()`, where the traced graph and the propagation graph
are kept while the model's tensors are unchanged (Note [Propagation graphs
reused] in `lipnets.propagation.graph`). Outside that context every lipnets call
traces, builds and checks afresh; that column is reported too.

The panel is the digits models of `benchmarks/autolirpa.py` (trained here in a
few seconds, fixed seeds, then float64): MLPs 64-64-64-10 and 64-256-256-10 and a
CNN (two convolutions, 16 and 32 channels, then 64 hidden units), each at batch
1 and 64 of held-out digits, with the margin specification ``C`` (rows
``e_y - e_j``) that certification uses, over l-infinity balls of radius
``--eps``. Per configuration and round, in this order: ``--calls`` lipnets calls
in the context (after one untimed call that builds), ``--calls`` auto_LiRPA
``compute_bounds`` calls (after building its ``BoundedModule``, whose time is
reported apart), ``--calls`` lipnets calls outside the context; medians over
``--rounds`` rounds. One thread each. The mean width of the specification's
bounds is compared too (ratio lipnets / auto_LiRPA: the same bounds, or tighter).

    python benchmarks/bound_speed.py --markdown benchmarks/results/bound-speed-cpu.md \\
        --json benchmarks/results/bound-speed-cpu.json
    python benchmarks/bound_speed.py --rounds 1 --calls 2          # smoke run

The auto_LiRPA virtualenv is `benchmarks/autolirpa.py`'s (``--venv``); nothing
here runs in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from _timing import describe, tqdm
from autolirpa import (
    ACTS,
    HERE,
    SNAPSHOT,
    Worker,
    cnn_arch,
    digits,
    ensure_venv,
    margin_spec,
    mlp_arch,
    seeded,
    train,
)

import lipnets
from lipnets.graph import reuse_traces
from lipnets.propagation import crown_bounds, interval_bounds

METHODS = {"IBP": interval_bounds, "CROWN": crown_bounds}


def panel(epochs: int) -> list[tuple[str, list[dict], torch.nn.Module]]:
    x_train, y_train, _, _ = digits(540)
    nets = {
        "MLP 64-64-64-10": mlp_arch(ACTS["ReLU"], (64, 64)),
        "MLP 64-256-256-10": mlp_arch(ACTS["ReLU"], (256, 256)),
        "CNN 16-32 conv, 64 hidden": cnn_arch(ACTS["ReLU"], (16, 32), 64),
    }
    models = []
    for i, (name, arch) in enumerate(nets.items()):
        model = seeded(arch, 6000 + i)
        train(model, x_train, y_train, epochs, 7000 + i)
        models.append((name, arch, model))
    return models


def timed(fn, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", default=SNAPSHOT, help="git directory of auto_LiRPA")
    parser.add_argument("--venv", default=str(HERE / ".autolirpa-venv"))
    parser.add_argument("--torch", default="torch<2.9", help="pip requirement for the venv")
    parser.add_argument("--base-python", default="python3", help="creates the venv")
    parser.add_argument("--eps", type=float, default=0.01, help="l-inf radius")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--calls", type=int, default=5, help="timed calls per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20, help="training epochs on digits")
    parser.add_argument("--markdown", help="write the table to this file")
    parser.add_argument("--json", help="write every measurement to this file")
    args = parser.parse_args()

    torch.set_num_threads(1)
    python = ensure_venv(Path(args.venv), Path(args.snapshot), args.torch, args.base_python)
    worker = Worker(python, Path(args.venv) / "worker.log", 1)
    started = time.perf_counter()
    models = panel(args.epochs)
    _, _, x_test, y_test = digits(540)
    configs = [
        (name, arch, model, b, method)
        for name, arch, model in models
        for b in args.batches
        for method in METHODS
    ]
    rows = {
        i: {"model": c[0], "batch": c[3], "method": c[4], "ours": [], "theirs": [], "fresh": []}
        for i, c in enumerate(configs)
    }
    try:
        for _ in tqdm(range(args.rounds), desc="rounds"):
            for i, (name, arch, model, b, method) in enumerate(configs):
                x, y = x_test[:b], y_test[:b]
                spec = margin_spec(y)
                fn = METHODS[method]

                def call(fn=fn, model=model, x=x, spec=spec):
                    return fn(model, x, args.eps, norm=float("inf"), spec=spec)

                row = rows[i]
                with reuse_traces():
                    start = time.perf_counter()
                    ours = call()
                    row.setdefault("ours_first", []).append(time.perf_counter() - start)
                    row["ours"] += timed(call, args.calls)
                answer = worker.bounds(
                    arch, model, x, args.eps, "inf", method, spec, repeat=args.calls
                )
                if not answer["ok"]:
                    raise SystemExit(f"auto_LiRPA failed on {name}: {answer['error']}")
                row["theirs"] += answer["calls"]
                row.setdefault("theirs_build", []).append(answer["build_s"])
                row["fresh"] += timed(call, args.calls)
                w_ours = float((ours.upper - ours.lower).mean())
                w_theirs = float((answer["upper"] - answer["lower"]).mean())
                row["width_ratio"] = w_ours / w_theirs
    finally:
        worker.close()
    wall = time.perf_counter() - started

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1e3:.2f}"

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [
        f"lipnets {lipnets.__version__} on {describe(torch.device('cpu'))} against auto_LiRPA "
        f"{worker.info['auto_LiRPA']} on torch {worker.info['torch']}, one thread each, "
        f"float64, l∞ radius {args.eps:g}, margin specification; medians of "
        f"{args.rounds} x {args.calls} calls, interleaved; load average {load} at the end, "
        f"{wall:.0f} s in all.",
        "",
        "| model | batch | method | lipnets (ms) | auto_LiRPA (ms) | lipnets / auto_LiRPA "
        "| lipnets, no reuse (ms) | lipnets first call (ms) | auto_LiRPA build (ms) "
        "| width ratio |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows.values():
        ratio = statistics.median(row["ours"]) / statistics.median(row["theirs"])
        row["ratio"] = ratio
        lines.append(
            f"| {row['model']} | {row['batch']} | {row['method']} | {ms(row['ours'])} | "
            f"{ms(row['theirs'])} | {ratio:.2f} | {ms(row['fresh'])} | {ms(row['ours_first'])} "
            f"| {ms(row['theirs_build'])} | {row['width_ratio']:.6f} |"
        )
    lines.append("")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "rows": list(rows.values()), "wall_s": wall}, f, indent=1
            )


if __name__ == "__main__":
    main()
