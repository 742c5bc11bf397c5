"""Time of CROWN (and IBP) bound propagation at batch 100: a 3x1024 MLP and a small CNN.

Two ReLU networks with random weights (PyTorch's default initialisation,
seeded) on random inputs in [0, 1] (MNIST-sized, no download):

* ``mlp``: 784 -> 1024 -> 1024 -> 1024 -> 10 (three hidden layers of 1024);
* ``cnn``: the "small" CNN of the CROWN-IBP papers, Conv(1, 16, 4, stride 2,
  padding 1) - Conv(16, 32, 4, stride 2, padding 1) - Linear(1568, 100) -
  Linear(100, 10), ReLU after each but the last.

For each network and ball (l-infinity and l2, radii in ``--eps-inf`` and
``--eps-2``) the script reports the median wall time of
`lipnets.propagation.crown_bounds` and `interval_bounds` over ``--repeats``
calls (and CROWN's process CPU time, which other load on the machine inflates
less), the share of ReLUs that IBP leaves unstable, and the mean width of the
output bounds of each method. Every call traces the model and runs the whole
propagation (nothing is cached between calls).

Usage:
    python benchmarks/propagation.py --markdown benchmarks/results/propagation-cpu.md \\
        --json benchmarks/results/propagation-cpu.json
    python benchmarks/propagation.py --repeats 1 --batch 8   # smoke run

Nothing here runs in the test suite (tests/propagation/ checks the
bounds themselves).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from _timing import describe, median_time, tqdm
from torch import nn

from lipnets.propagation import crown_bounds, interval_bounds


def mlp() -> nn.Sequential:
    sizes = [784, 1024, 1024, 1024, 10]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(nn.Flatten(), *layers)


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def unstable_share(model: nn.Sequential, x: torch.Tensor, eps: float, norm: float) -> float:
    """Share of ReLU inputs whose IBP interval contains 0 (before CROWN tightens them)."""
    total = unstable = 0
    for i, layer in enumerate(model):
        if isinstance(layer, nn.ReLU):
            lo, up = interval_bounds(model[:i], x, eps, norm=norm)
            total += lo.numel()
            unstable += int(((lo < 0) & (up > 0)).sum())
    return unstable / max(total, 1)


def measure(name: str, model: nn.Module, x: torch.Tensor, eps: float, norm: float, args) -> dict:
    device = x.device
    row: dict = {"network": name, "norm": "inf" if norm == float("inf") else "2", "eps": eps}
    crown = crown_bounds(model, x, eps, norm=norm)
    ibp = interval_bounds(model, x, eps, norm=norm)
    cpu = time.process_time()
    row["crown_s"] = median_time(
        lambda: crown_bounds(model, x, eps, norm=norm), args.repeats, 0, device
    )
    row["crown_cpu_s"] = (time.process_time() - cpu) / args.repeats
    row["ibp_s"] = median_time(
        lambda: interval_bounds(model, x, eps, norm=norm), args.repeats, 1, device
    )
    row["crown_width"] = float((crown.upper - crown.lower).mean())
    row["ibp_width"] = float((ibp.upper - ibp.lower).mean())
    row["unstable_ibp"] = unstable_share(model, x, eps, norm)
    with torch.no_grad():
        y = model(x)
    row["sound_at_centre"] = bool(((crown.lower <= y) & (y <= crown.upper)).all())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eps-inf", type=float, default=0.01, help="l-infinity radius")
    parser.add_argument("--eps-2", type=float, default=0.1, help="l2 radius")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", help="write the table to this file")
    parser.add_argument("--json", help="write every measurement to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 1, 28, 28, device=device, dtype=dtype)
    nets = {"mlp": mlp(), "cnn": cnn()}
    jobs = [
        (name, norm, eps)
        for name in nets
        for norm, eps in ((float("inf"), args.eps_inf), (2.0, args.eps_2))
    ]
    rows = []
    for name, norm, eps in tqdm(jobs, desc="runs"):
        model = nets[name].to(device=device, dtype=dtype).eval()
        rows.append(measure(name, model, x, eps, norm, args))
    labels = {"mlp": "MLP 784-1024-1024-1024-10", "cnn": "CNN small (2 conv, 2 linear)"}
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [
        f"Measured on {describe(device)} (load average {load} at the end); batch "
        f"{args.batch}, {args.dtype}, random weights (seed 0) and inputs in [0, 1]; median "
        f"wall time of {args.repeats} calls (each traces the model and propagates "
        "everything), and the mean process CPU time of a call (all threads).",
        "",
        "| network | ball | CROWN time | CROWN CPU time | IBP time | ReLUs unstable under IBP "
        "| mean width CROWN | mean width IBP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ball = f"l{'∞' if r['norm'] == 'inf' else '2'}, eps = {r['eps']:g}"
        lines.append(
            f"| {labels[r['network']]} | {ball} | {r['crown_s']:.2f} s | {r['crown_cpu_s']:.2f} s "
            f"| {r['ibp_s'] * 1e3:.1f} ms "
            f"| {100 * r['unstable_ibp']:.1f} % | {r['crown_width']:.4g} | {r['ibp_width']:.4g} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    for r in rows:
        if not (r["sound_at_centre"] and r["crown_width"] <= r["ibp_width"]):
            raise SystemExit(f"unexpected bounds: {r}")


if __name__ == "__main__":
    main()
