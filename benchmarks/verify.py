"""Branch and bound against CROWN and the exact MILP on digits models (l-infinity).

For each model (a 64-32-32-10 ReLU MLP and a 64-32-32-10 MaxMin MLP, trained here with
cross-entropy on scikit-learn's 8 x 8 digits, pixels in [0, 1], fixed seeds, float64) and
each radius, on the first ``--points`` held-out digits: the number certified by CROWN
(`certify_crown`), by α-CROWN (``crown_bounds(..., optimize=20)`` on the margins), by
branch and bound (`lipnets.verify.verify`) and the exact robust count of `milp_verify`
(HiGHS); the share of the gap between CROWN and the MILP that branch and bound closes;
branch-and-bound domains and seconds per input (median and maximum); disagreements
between branch and bound and the MILP (a decided answer that differs: must be 0). One
torch thread. The balls are not intersected with [0, 1] (``domain=None`` on both sides).

Usage:
    python benchmarks/verify.py --markdown benchmarks/results/verify-cpu.md \\
        --json benchmarks/results/verify-cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch
from torch import nn

import lipnets
from lipnets.certify import certify_crown
from lipnets.functional import margin_spec
from lipnets.propagation import crown_bounds
from lipnets.verify import milp_verify, verify


def digits(seed: int = 0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float64)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def train(kind: str, x: torch.Tensor, y: torch.Tensor, epochs: int = 300) -> nn.Module:
    torch.manual_seed(0)
    act = nn.ReLU if kind == "relu" else lipnets.MaxMin
    model = nn.Sequential(
        nn.Linear(64, 32), act(), nn.Linear(32, 32), act(), nn.Linear(32, 10)
    ).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=60)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.03, 0.05, 0.07])
    parser.add_argument("--time-limit", type=float, default=30.0)
    parser.add_argument("--milp-time-limit", type=float, default=120.0)
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = digits()
    x, y = x_test[: args.points], y_test[: args.points]
    rows = []
    for kind in ("relu", "maxmin"):
        model = train(kind, x_train, y_train)
        with torch.no_grad():
            clean = int((model(x).argmax(1) == y).sum())
        for eps in args.eps:
            crown = int(certify_crown(model, x, y, eps, norm=math.inf).sum())
            spec = margin_spec(model(x).detach(), y, x.dtype)
            t = time.perf_counter()
            alpha = crown_bounds(model, x, eps, norm=math.inf, spec=spec, optimize=20)
            alpha_s = time.perf_counter() - t
            correct = model(x).argmax(1) == y
            alpha_n = int(((alpha.lower > 0).all(1) & correct).sum())
            t = time.perf_counter()
            bab = verify(model, x, y, eps, time_limit=args.time_limit, progress=False)
            bab_s = time.perf_counter() - t
            t = time.perf_counter()
            milp = milp_verify(model, x, y, eps, time_limit=args.milp_time_limit, all_margins=False)
            milp_s = time.perf_counter() - t
            disagree = sum(
                a != b and "unknown" not in (a, b)
                for a, b in zip(bab.status, milp.status, strict=True)
            )
            exact = milp.status.count("verified")
            verified = bab.status.count("verified")
            gap = exact - crown
            closed = 1.0 if gap == 0 else (verified - crown) / gap
            searched = [i for i, r in enumerate(bab.reason) if r == "branch and bound"]
            rows.append(
                {
                    "model": f"{kind} 64-32-32-10", "clean": clean, "eps": eps,
                    "crown": crown, "alpha_crown": alpha_n, "bab": verified,
                    "bab_falsified": bab.status.count("falsified"),
                    "bab_unknown": bab.status.count("unknown"), "milp": exact,
                    "milp_unknown": milp.status.count("unknown"), "gap_closed": closed,
                    "disagreements": disagree,
                    "nodes_median": statistics.median(bab.nodes.tolist()),
                    "nodes_max": int(bab.nodes.max()),
                    "nodes_searched_median": statistics.median(
                        [int(bab.nodes[i]) for i in searched]
                    ) if searched else 0,
                    "seconds_median": statistics.median(bab.time.tolist()),
                    "seconds_max": float(bab.time.max()), "bab_total_s": bab_s,
                    "milp_total_s": milp_s, "alpha_total_s": alpha_s,
                }
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    meta = {
        "command": "python benchmarks/verify.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if v is not None and k not in ("markdown", "json")
        ),
        "torch": torch.__version__, "lipnets": lipnets.__version__,
        "machine": platform.machine(), "threads": 1, "points": args.points,
    }  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.markdown:
        lines = [
            f"`{meta['command']}` (torch {meta['torch']}, one thread, {args.points} held-out "
            "digits; counts of points verified; BaB seconds and domains per input).",
            "",
            "| model | clean | eps | CROWN | α-CROWN | BaB | MILP (exact) | gap closed | "
            "BaB falsified / unknown | disagreements | domains median / max | "
            "s per input median / max | BaB total s | MILP total s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['model']} | {r['clean']} | {r['eps']} | {r['crown']} | "
                f"{r['alpha_crown']} | {r['bab']} | {r['milp']}"
                f"{' (' + str(r['milp_unknown']) + ' unknown)' if r['milp_unknown'] else ''} | "
                f"{100 * r['gap_closed']:.0f} % | {r['bab_falsified']} / {r['bab_unknown']} | "
                f"{r['disagreements']} | {r['nodes_median']:g} / {r['nodes_max']} | "
                f"{r['seconds_median']:.2f} / {r['seconds_max']:.2f} | {r['bab_total_s']:.1f} | "
                f"{r['milp_total_s']:.1f} |"
            )
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
