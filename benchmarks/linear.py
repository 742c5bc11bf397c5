"""Speed and orthogonality of lipnets' orthogonal linear layers against nn.Linear.

For each width n (square n x n layers, batch 256) and each layer, the script
times a training step (forward + backward + AdamW step, median over `--steps`
steps after `--warmup` steps) and an eval forward (no_grad, eval mode), then
reports the realised singular values (float64 SVD) after those steps. Rows:

* `nn.Linear`, the reference;
* `BjorckLinear` and `CayleyLinear` (lipnets);
* `BjorckLinear export` / `CayleyLinear export`: `lipnets.to_vanilla` of the
  trained layer (eval only);
* `torchlip SpectralLinear` (deel-torchlip, if installed:
  `pip install -e ".[bench]"`), measured in the same run.

Usage:
    python benchmarks/linear.py                       # widths 256 1024 4096
    python benchmarks/linear.py --widths 1024 --markdown docs/_linear_table.md

Timings depend on the machine; docs/benchmarks.md says where each table was
measured. Nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

import torch
from _timing import describe, eval_forward, interleaved_eval_medians, median_time, tqdm
from torch import nn

import lipnets


def _torchlip() -> Callable[[int, int], nn.Module] | None:
    try:
        from deel import torchlip
    except ImportError:
        return None
    return lambda i, o: torchlip.SpectralLinear(i, o)


def _sigmas(layer: nn.Module) -> tuple[float, float]:
    layer.eval()
    with torch.no_grad():
        s = torch.linalg.svdvals(layer.weight.detach().double())
    return float(s.max()), float(s.min())


def bench_width(n: int, args, device: torch.device) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.batch, n, generator=gen).to(device)
    target = torch.randn(args.batch, n, generator=gen).to(device)
    makers: dict[str, Callable[[int, int], nn.Module]] = {
        "nn.Linear": nn.Linear,
        "BjorckLinear": lipnets.BjorckLinear,
        "CayleyLinear": lipnets.CayleyLinear,
    }
    torchlip = _torchlip()
    if torchlip is not None:
        makers["torchlip SpectralLinear"] = torchlip
    steps = max(3, args.steps if n < 4096 else args.steps // 4)
    warmup = max(1, args.warmup if n < 4096 else args.warmup // 2)
    rows = []
    plain_eval = {"nn.Linear": None}  # eval forwards of plain modules, timed interleaved below
    for name, make in makers.items():
        torch.manual_seed(0)
        layer = make(n, n).to(device)
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, weight_decay=1e-2)

        def train_step(layer=layer, opt=opt):
            layer.train()
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(layer(x), target).backward()
            opt.step()

        train = median_time(train_step, steps, warmup, device)
        layer.eval()
        evaluate = median_time(lambda layer=layer: eval_forward(layer, x), steps, warmup, device)
        smax, smin = _sigmas(layer)
        rows.append(
            {"width": n, "layer": name, "train_s": train, "eval_s": evaluate}
            | {"sigma_max": smax, "sigma_min": smin}
        )
        if name == "nn.Linear":
            plain_eval[name] = layer
        if name in ("BjorckLinear", "CayleyLinear"):
            plain = lipnets.to_vanilla(layer)
            plain_eval[f"{name} export"] = plain
            smax, smin = _sigmas(plain)
            rows.append(
                {"width": n, "layer": f"{name} export", "train_s": math.nan, "eval_s": math.nan}
                | {"sigma_max": smax, "sigma_min": smin}
            )
    medians = interleaved_eval_medians(plain_eval, x, 5 * steps, warmup, device)
    for r in rows:
        if r["layer"] in medians:
            r["eval_s"] = medians[r["layer"]]
    base = next(r for r in rows if r["layer"] == "nn.Linear")
    for r in rows:
        r["train_x"] = r["train_s"] / base["train_s"]
        r["eval_x"] = r["eval_s"] / base["eval_s"]
    return rows


def markdown(rows: list[dict], device: str, batch: int) -> str:
    lines = [
        f"Measured on {device}, batch {batch}, "
        "AdamW (lr 1e-3, weight decay 1e-2); times are medians.",
        "",
        "| width | layer | train step (ms) | × nn.Linear | eval (ms) | × nn.Linear "
        "| σ_max − 1 | 1 − σ_min |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        train = "–" if math.isnan(r["train_s"]) else f"{1e3 * r['train_s']:.1f}"
        train_x = "–" if math.isnan(r["train_s"]) else f"{r['train_x']:.2f}"
        dev_max = "–" if r["layer"] == "nn.Linear" else f"{r['sigma_max'] - 1:.1e}"
        dev_min = "–" if r["layer"] == "nn.Linear" else f"{1 - r['sigma_min']:.1e}"
        lines.append(
            f"| {r['width']} | {r['layer']} | {train} | {train_x} | {1e3 * r['eval_s']:.1f} "
            f"| {r['eval_x']:.2f} | {dev_max} | {dev_min} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (a quarter at 4096)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (half at 4096)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--json", help="also write the raw rows to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    where = describe(device)
    rows = []
    for n in tqdm(args.widths, desc="widths"):
        rows += bench_width(n, args, device)
    table = markdown(rows, where, args.batch)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "batch": args.batch, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
