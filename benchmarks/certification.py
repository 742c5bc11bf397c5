"""`certification_report` on a digits CNN in float64: this checkout against an earlier one.

The model is the digits CNN of `benchmarks/autolirpa.py` (two convolutions with 16
and 32 channels, 64 hidden units, ReLU), trained here for ``--epochs`` epochs with a
fixed seed, then float64. The report runs with its defaults (Lipschitz bound, CROWN
and PGD at l2 radii 0.1, 0.25 and 0.5, batches of 256) on ``--points`` held-out
digits, and its per-part seconds are recorded. With ``--before REV`` the same
measurement also runs on a git worktree of ``REV`` (a temporary one, removed after),
each in a fresh process, alternating before / after for ``--repeats`` rounds; the
table gives the medians and checks that both report the same counts, or that the
new one certifies more (never fewer).

    python benchmarks/certification.py --before 1a0ffa4 \\
        --markdown benchmarks/results/certification-cpu.md

Nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def measure(points: int, epochs: int, threads: int) -> dict:
    """One report in this process (the lipnets on ``sys.path``)."""
    import torch
    from autolirpa import ACTS, cnn_arch, digits, seeded, train

    import lipnets

    torch.set_num_threads(threads)
    x_train, y_train, x_test, y_test = digits(points)
    model = seeded(cnn_arch(ACTS["ReLU"], (16, 32), 64), 4001)
    train(model, x_train, y_train, epochs, 5001)
    start = time.perf_counter()
    report = lipnets.certification_report(
        model, x_test, y_test, (0.1, 0.25, 0.5), generator=torch.Generator().manual_seed(0),
        progress=False,
    )  # fmt: skip
    return {
        "lipnets": lipnets.__file__,
        "total_s": time.perf_counter() - start,
        "seconds": report.seconds,
        "clean": report.clean_count,
        "rows": [
            {
                "eps": r.eps,
                "lipschitz": r.lipschitz_count,
                "crown": r.crown_count,
                "attack": r.attack_count,
                "broken": r.broken_certified,
            }
            for r in report.rows
        ],
    }


def run_in(checkout: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{checkout}{os.pathsep}{HERE}")
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--measure",
        "--points",
        str(args.points),
        "--epochs",
        str(args.epochs),
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"the measurement in {checkout} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="git revision to compare with (a worktree is made)")
    parser.add_argument("--points", type=int, default=450, help="held-out digits")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--markdown")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.points, args.epochs, args.threads)))
        return

    sides: dict[str, list[dict]] = {"after": []}
    with tempfile.TemporaryDirectory(prefix="lipnets-before-") as tmp:
        before = None
        if args.before:
            before = Path(tmp) / "before"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before),
                            args.before], check=True, capture_output=True)  # fmt: skip
            sides = {"before": [], "after": []}
        try:
            for _ in range(args.repeats):
                if before is not None:
                    sides["before"].append(run_in(before, args))
                sides["after"].append(run_in(ROOT, args))
        finally:
            if before is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(before)], check=False)  # fmt: skip

    def med(runs: list[dict], part: str | None) -> float:
        values = [r["total_s"] if part is None else r["seconds"].get(part, 0.0) for r in runs]
        return statistics.median(values)

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [
        f"`certification_report` (float64, l2 radii 0.1, 0.25, 0.5, CROWN and PGD 50 x 4, "
        f"batches of 256) on the digits CNN of benchmarks/autolirpa.py, {args.points} held-out "
        f"digits, {args.threads} thread(s); medians of {args.repeats} run(s) per side, "
        f"alternating; load average {load} at the end.",
        "",
        "| checkout | total (s) | Lipschitz (s) | CROWN (s) | attack (s) | CROWN-certified "
        "per radius | attack-robust per radius |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for side, runs in sides.items():
        rows = runs[0]["rows"]
        label = f"before ({args.before})" if side == "before" else "after (this checkout)"
        lines.append(
            f"| {label} | {med(runs, None):.1f} | {med(runs, 'lipschitz'):.1f} | "
            f"{med(runs, 'crown'):.1f} | {med(runs, 'attack'):.1f} | "
            f"{', '.join(str(r['crown']) for r in rows)} | "
            f"{', '.join(str(r['attack']) for r in rows)} |"
        )
    if "before" in sides:
        old, new = sides["before"][0]["rows"], sides["after"][0]["rows"]
        fewer = [o["eps"] for o, n in zip(old, new, strict=True) if n["crown"] < o["crown"]]
        lines += ["", "CROWN certifies fewer points after than before at: "
                  + (", ".join(map(str, fewer)) if fewer else "no radius") + "."]  # fmt: skip
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)


if __name__ == "__main__":
    main()
