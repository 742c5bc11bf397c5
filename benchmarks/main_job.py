"""Wall time of the main job, ``python -m zoo train groupsort-mlp``, idle and under load.

Each repetition runs the main job in a fresh process (interpreter start, imports, data,
150 epochs of training, evaluation, the card's CROWN and attack numbers, the run folder),
once on the machine as it is ("idle") and once next to one competing CPU-bound process
(a Python busy loop, one core: "one other job"), the order of the two arms alternating
between repetitions. The table reports the median wall time of each arm, with the
``train_seconds`` and the seconds of the CROWN and attack step that the card records, and
the load average before each run: on a shared machine "idle" means "without our
competitor", and the load average says what else ran.

    python benchmarks/main_job.py --repeats 3 --markdown benchmarks/results/main-job-cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ["-m", "zoo", "train", "groupsort-mlp"]
#: One core of CPU-bound work, standing for "one other job" on the machine.
BUSY = "while True:\n    pass\n"
_TOTAL = re.compile(r"trained in ([0-9.]+) s \((\d+) steps\), ([0-9.]+) s with evaluation")


def run_once(out: Path, timeout: float) -> dict:
    """One main job in a fresh process; its wall time and what its card and output say."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *COMMAND, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the main job failed ({done.returncode}):\n{done.stderr[-3000:]}")
    (folder,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    card = json.loads((folder / "card.json").read_text())
    match = _TOTAL.search(done.stdout)
    return {
        "wall": wall,
        "load": load,
        "train_seconds": card["training"]["train_seconds"],
        "threads": card["training"].get("threads"),
        "with_evaluation": float(match.group(3)) if match else None,
        "crown_seconds": card.get("crown_certified_accuracy", {}).get("seconds"),
        "attack_seconds": card.get("attack_robust_accuracy", {}).get("seconds"),
        "numbers": (card["clean_accuracy"], card["certified_accuracy"], card["lipschitz_bound"]),
    }


def run_arm(arm: str, timeout: float) -> dict:
    """One repetition of ``arm`` (``"idle"`` or ``"load"``) in a fresh temporary ``--out``."""
    competitor = None
    if arm == "load":
        competitor = subprocess.Popen([sys.executable, "-c", BUSY])
        time.sleep(1.0)  # let it occupy its core
    try:
        with tempfile.TemporaryDirectory(prefix="main-job-") as tmp:
            return run_once(Path(tmp), timeout)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def report(results: dict[str, list[dict]], shipped: tuple | None) -> str:
    import torch

    lines = [
        f"`python -m zoo train groupsort-mlp --out TMP` in a fresh process, torch "
        f"{torch.__version__}, {os.cpu_count()} CPUs; arms interleaved (order alternating), "
        f"{max(len(r) for r in results.values())} repetitions each. *load*: one competing "
        "CPU-bound process (a Python busy loop) on the other core.",
        "",
        "| arm | median wall time | min | max | median train_seconds | median with "
        "evaluation | median CROWN + attack (card) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, runs in results.items():
        walls = [r["wall"] for r in runs]
        step = [
            r["crown_seconds"] + r["attack_seconds"]
            for r in runs
            if r["crown_seconds"] is not None and r["attack_seconds"] is not None
        ]
        lines.append(
            f"| {arm} | {_s(statistics.median(walls))} | {_s(min(walls))} | {_s(max(walls))} "
            f"| {_s(_median([r['train_seconds'] for r in runs]))} "
            f"| {_s(_median([r['with_evaluation'] for r in runs]))} | {_s(_median(step))} |"
        )
    lines += ["", "Every run (in the order they ran):", "",
              "| arm | wall | train_seconds | with evaluation | CROWN | attack | threads "
              "| 1-min load average before |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for arm, run in sorted(
        ((arm, r) for arm, runs in results.items() for r in runs), key=lambda t: t[1]["order"]
    ):
        lines.append(
            f"| {arm} | {_s(run['wall'])} | {_s(run['train_seconds'])} "
            f"| {_s(run['with_evaluation'])} | {_s(run['crown_seconds'])} "
            f"| {_s(run['attack_seconds'])} | {run['threads']} | {run['load']:.2f} |"
        )
    numbers = {json.dumps(r["numbers"]) for runs in results.values() for r in runs}
    same = len(numbers) == 1
    lines += [
        "",
        "Every run's clean and certified accuracy and bound were "
        + ("identical" if same else "NOT identical (see the cards)")
        + (
            "; identical to the shipped card `groupsort-mlp-digits`."
            if same and shipped is not None and json.dumps(shipped) in numbers
            else "; different from the shipped card `groupsort-mlp-digits`."
            if shipped is not None
            else "."
        ),
        f"Load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per arm")
    parser.add_argument(
        "--arms", nargs="+", default=["idle", "load"], choices=["idle", "load"],
        help="which arms to run (default: both, interleaved)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per job")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be an integer >= 1, got {args.repeats}")
    results: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    order = 0
    for k in range(args.repeats):
        arms = args.arms if k % 2 == 0 else list(reversed(args.arms))
        for arm in arms:
            run = run_arm(arm, args.timeout)
            run["order"] = order
            order += 1
            results[arm].append(run)
            print(f"{arm:5s} repetition {k + 1}: {run['wall']:.1f} s wall, "
                  f"{run['train_seconds']:.1f} s training, load {run['load']:.2f}",
                  flush=True)  # fmt: skip
    shipped_card = ROOT / "zoo" / "pretrained" / "groupsort-mlp-digits" / "card.json"
    shipped = None
    if shipped_card.is_file():
        card = json.loads(shipped_card.read_text())
        shipped = (card["clean_accuracy"], card["certified_accuracy"], card["lipschitz_bound"])
    text = report(results, shipped)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
