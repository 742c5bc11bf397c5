"""Training-step time of the zoo's models at 1 and 2 torch threads, interleaved.

The zoo picks 1 thread for models under `zoo.train.SMALL_MODEL` parameters and
torch's default otherwise (`zoo.train.set_threads`); this script measures why.
Each repetition times 15 Adam steps (batch 128, 8x8 digits-shaped inputs) at
1 thread, then at 2, and the table reports medians over the repetitions. Run
it on the machine as it is (other jobs included): the point is a shared one.

    python benchmarks/threads.py --markdown benchmarks/results/threads.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the zoo, from a checkout

from lipnets.losses import MulticlassHingeLoss
from zoo import models

PANEL = [("groupsort-mlp", {"width": 64}), ("groupsort-mlp", {"width": 256}),
         ("lipconvnet", {}), ("groupsort-mlp", {"width": 1024})]  # fmt: skip


def step_time(name: str, options: dict, threads: int, steps: int = 15) -> tuple[float, int]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = models.build(name, input_shape=(1, 8, 8), num_outputs=10, **options)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.rand(128, 1, 8, 8), torch.randint(0, 10, (128,))
    loss = MulticlassHingeLoss(1.0)
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            start = time.perf_counter()
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - start) / steps, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    rows = []
    for name, options in PANEL:
        times: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.repeats):
            for threads in (1, 2):
                seconds, params = step_time(name, options, threads)
                times[threads].append(seconds)
        one, two = statistics.median(times[1]), statistics.median(times[2])
        label = name + "".join(f" {k}={v}" for k, v in options.items())
        rows.append(f"| {label} | {params:,} | {1e3 * one:.1f} ms | {1e3 * two:.1f} ms "
                    f"| {two / one:.2f} |")  # fmt: skip
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    text = "\n".join([
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load} at the end; "
        f"medians of {args.repeats} interleaved repetitions of 15 training steps (batch 128).",
        "",
        "| model | parameters | 1 thread | 2 threads | 2 threads / 1 thread |",
        "|---|---|---|---|---|",
        *rows,
    ])  # fmt: skip
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
