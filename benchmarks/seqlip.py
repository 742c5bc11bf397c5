"""AutoLip against SeqLip on spectral-normalised ReLU MLPs (Scaman & Virmaux 2018).

For depths 4 and 10 (number of Linear layers; ReLU between them), input 64,
hidden width `--width`, output 10, every Linear wrapped in torch's
`spectral_norm` parametrization, the script builds `--seeds` networks and
measures on each, before and after a brief training on scikit-learn's digits
(`--steps` Adam steps, batch 128, cross-entropy):

* the sound bound `lipnets.lipschitz_bound` (certifies);
* AutoLip and SeqLip (`lipnets.estimators`; SeqLip with the greedy search on
  layers wider than 12, exhaustive below), both estimates;
* `lower_bound` from 64 test digits (a slope the network really has);

and reports AutoLip / SeqLip, the improvement SeqLip brings, with the time
each took. Scaman & Virmaux report an improvement of about 1.5x for their
4-layer MLP and 7.8x for 10 layers (MLPs trained on a synthetic dataset).

Usage:
    python benchmarks/seqlip.py --markdown benchmarks/results/seqlip-cpu.md
    python benchmarks/seqlip.py --seeds 1 --steps 20 --width 16   # smoke run

Nothing here runs in the test suite (tests/estimators/test_estimators_autolip_seqlip.py
checks seqlip < autolip on small networks of the same kind).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _timing import describe, tqdm
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import lipnets
from lipnets.estimators import autolip, lower_bound, seqlip


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


def mlp(depth: int, width: int) -> nn.Sequential:
    sizes = [64] + [width] * (depth - 1) + [10]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(spectral_norm(nn.Linear(sizes[i], sizes[i + 1])))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (128,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def measure(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    row: dict = {}
    for name, fn in (
        ("bound", lambda: lipnets.lipschitz_bound(model, (1, 64))),
        ("autolip", lambda: autolip(model, (1, 64), generator=g)),
        ("seqlip", lambda: seqlip(model, (1, 64), generator=g)),
        ("lower", lambda: lower_bound(model, x_test[:64], steps=50, generator=g).value),
    ):
        start = time.perf_counter()
        row[name] = float(fn())
        row[f"{name}_s"] = time.perf_counter() - start
    with torch.no_grad():
        row["accuracy"] = float((model(x_test).argmax(1) == y_test).float().mean())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 10])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--markdown", help="write the table to this file")
    parser.add_argument("--json", help="write every measurement to this file")
    args = parser.parse_args()
    x_train, y_train, x_test, y_test = digits()
    rows = []
    jobs = [(d, s) for d in args.depths for s in range(args.seeds)]
    for depth, seed in tqdm(jobs, desc="networks"):
        torch.manual_seed(seed)
        model = mlp(depth, args.width).eval()
        rows.append(
            {"depth": depth, "seed": seed, "state": "random"} | measure(model, x_test, y_test, seed)
        )
        loss = train(model, x_train, y_train, args.steps, seed)
        rows.append(
            {"depth": depth, "seed": seed, "state": "trained", "loss": loss}
            | measure(model, x_test, y_test, seed)
        )

    def median(group: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in group)

    lines = [
        f"Measured on {describe(torch.device('cpu'))}; width {args.width}, {args.seeds} seeds, "
        f"{args.steps} training steps; medians over seeds.",
        "",
        "| layers | weights | test acc. | sound bound | AutoLip | SeqLip | AutoLip / SeqLip "
        "| lower bound | time AutoLip | time SeqLip | paper's AutoLip / SeqLip |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    paper = {4: "about 1.5x", 10: "7.8x"}
    for depth in args.depths:
        for state in ("random", "trained"):
            group = [r for r in rows if r["depth"] == depth and r["state"] == state]
            ratios = [r["autolip"] / r["seqlip"] for r in group]
            lines.append(
                f"| {depth} | {state} | {median(group, 'accuracy'):.3f} "
                f"| {median(group, 'bound'):.4f} | {median(group, 'autolip'):.4f} "
                f"| {median(group, 'seqlip'):.4f} | {statistics.median(ratios):.2f}x "
                f"(min {min(ratios):.2f}, max {max(ratios):.2f}) "
                f"| {median(group, 'lower'):.4f} | {median(group, 'autolip_s'):.2f} s "
                f"| {median(group, 'seqlip_s'):.2f} s | {paper.get(depth, '-')} |"
            )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    for r in rows:  # what the estimates must satisfy: lower <= SeqLip < AutoLip
        if not (r["lower"] <= r["seqlip"] * (1 + 1e-4) and r["seqlip"] < r["autolip"]):
            raise SystemExit(f"unexpected ordering of the estimates: {r}")


if __name__ == "__main__":
    main()
