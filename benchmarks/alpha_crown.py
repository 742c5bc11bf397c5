"""lipnets' α-CROWN against auto_LiRPA's CROWN-Optimized: widths, certified counts, times.

The panel of issue 17: a random-weight ReLU MLP 64-48-48-10, a ReLU MLP
64-256-256-256-10 trained on scikit-learn's 8 x 8 digits (as in
`benchmarks/autolirpa.py --part certify`, a fixed seed, float32 training then
float64), a small random ReLU CNN (two convolutions, two linear layers), a
random residual MLP (``x + W2 relu(W1 x)`` between two ReLU layers) and a
random MaxMin MLP (64-48-48-10 with MaxMin activations); inputs in [0, 1]
(1 x 8 x 8), one l-infinity and one l2 ball per model, float64. Both libraries
get the very same weights and inputs: auto_LiRPA 0.7.1 runs in its own
virtualenv through the worker of `benchmarks/autolirpa.py` (`Worker`, the
same architecture descriptions), one job after the other with lipnets, one
thread each (``--threads``).

auto_LiRPA has no MaxMin, so its model computes the same function with one
ReLU per pair (`_autolirpa_worker.ReluMaxMin`); lipnets bounds
``lipnets.nn.MaxMin`` itself. The script checks that the two models agree to
1e-12 on random inputs before bounding them.

The settings are the same on both sides (``--steps`` Adam steps on the lower
slopes of every unstable ReLU, learning rate ``--lr``, decayed by 0.98 per
step, starting from CROWN's slopes, best bound over the iterates kept):
lipnets ``crown_bounds(model, x, eps, norm=..., optimize=steps, lr=lr)``;
auto_LiRPA ``BoundedModule(model, x, bound_opts={"optimize_bound_args":
{"iteration": steps + 1, "lr_alpha": lr, "lr_decay": 0.98,
"early_stop_patience": steps + 1}}).compute_bounds(..., method=
"CROWN-Optimized")``. auto_LiRPA's ``iteration`` counts bound evaluations,
the last without a step, so ``steps + 1`` gives ``steps`` Adam steps, as
lipnets' ``optimize=steps`` (which evaluates ``steps + 1`` bounds too); its
early stop (after 10 evaluations without improvement, by default) is off so
that both run every step. auto_LiRPA optimises the lower and the upper
bounds in two separate runs, each with its own slopes for every output row
and every intermediate bound (intermediate bounds are recomputed with their
own optimised slopes in every iteration: its default ``fix_interm_bounds``
only concerns intermediate bounds passed in); lipnets optimises all of them
in one run, on the sum of the widths.

Per model and ball: the mean width (upper - lower) of the outputs for CROWN
and α-CROWN of each library, their ratio lipnets / auto_LiRPA, the largest
relative excess of lipnets' α width over auto_LiRPA's over all outputs, the
share of outputs where lipnets is wider by more than 1e-9 relative;
soundness: each library's α bounds (and CROWN's) contain the outputs at
``--samples`` points of each ball (a quarter on the boundary, l-infinity
corners); the median wall time of ``--repeats`` calls of each library's α-CROWN
(auto_LiRPA's includes building its ``BoundedModule``, lipnets' its tracing),
timed in turns. For the digits MLP, on ``--points`` held-out digits, with the
specification ``C`` of rows ``e_y - e_j``: the number of points certified
(every margin bound > 0) by CROWN and by α-CROWN of each library, and the mean
margin lower bound; both libraries bound lower and upper margins (auto_LiRPA
its default), so the times compare the same work.

Usage:
    python benchmarks/alpha_crown.py --markdown benchmarks/results/autolirpa-alpha-cpu.md \\
        --json benchmarks/results/autolirpa-alpha-cpu.json
    python benchmarks/alpha_crown.py --batch 2 --samples 64 --repeats 1 --steps 3  # smoke run
    python benchmarks/alpha_crown.py --render RUN.json --markdown RUN.md  # tables again

The virtualenv is `benchmarks/autolirpa.py`'s (``--setup-only`` there creates it).
Nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from _autolirpa_worker import build_model
from _timing import describe, tqdm
from autolirpa import (
    HERE,
    SNAPSHOT,
    Worker,
    ball_samples,
    cnn_arch,
    contains,
    digits,
    ensure_venv,
    lipnets_source,
    margin_spec,
    mlp_arch,
    train,
)

import lipnets
from lipnets.nn import MaxMin
from lipnets.propagation import crown_bounds

LOOSER = 1e-9  # relative excess above which an output counts as "lipnets wider"
RELU = {"type": "relu"}


def residual_arch(width: int = 48) -> list[dict]:
    return [
        {"type": "flatten"},
        {"type": "linear", "in": 64, "out": width},
        RELU,
        {
            "type": "residual",
            "body": [
                {"type": "linear", "in": width, "out": width},
                RELU,
                {"type": "linear", "in": width, "out": width},
            ],
        },
        RELU,
        {"type": "linear", "in": width, "out": 10},
    ]


def maxmin_arch(width: int = 48) -> list[dict]:
    return [
        {"type": "flatten"},
        {"type": "linear", "in": 64, "out": width},
        {"type": "maxmin", "width": width},
        {"type": "linear", "in": width, "out": width},
        {"type": "maxmin", "width": width},
        {"type": "linear", "in": width, "out": 10},
    ]


#: (name, architecture, trained on digits, seed, [(norm, eps), ...])
PANEL = [
    ("MLP 64-48-48-10", mlp_arch(RELU), False, 0, [("inf", 0.05), ("2", 0.5)]),
    ("digits MLP 64-256-256-256-10", mlp_arch(RELU, (256, 256, 256)), True, 1, []),
    ("CNN 8-16 conv, 32 hidden", cnn_arch(RELU), False, 2, [("inf", 0.05), ("2", 0.5)]),
    ("residual MLP 48", residual_arch(), False, 3, [("inf", 0.05), ("2", 0.5)]),
    ("MaxMin MLP 64-48-48-10", maxmin_arch(), False, 4, [("inf", 0.05), ("2", 0.5)]),
]


def lipnets_maxmin(width: int) -> torch.nn.Module:
    return MaxMin()


def models(arch: list[dict], seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The lipnets model (lipnets' MaxMin) and auto_LiRPA's (ReluMaxMin), same weights."""
    torch.manual_seed(seed)
    ours = build_model(arch, maxmin=lipnets_maxmin).eval()
    theirs = build_model(arch).eval()
    theirs.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(7)
    probe = torch.randn(256, 1, 8, 8, dtype=torch.float64, generator=g)
    with torch.no_grad():
        gap = float((ours(probe) - theirs(probe)).abs().max())
    if gap > 1e-12:
        raise SystemExit(f"the two builds of {arch} differ by {gap:.3g}")
    return ours, theirs


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def alpha_opts(steps: int, lr: float) -> dict:
    args = {"iteration": steps + 1, "lr_alpha": lr, "lr_decay": 0.98}
    return {"optimize_bound_args": args | {"early_stop_patience": steps + 1}}


def one_ball(worker, args, name, arch, ours, theirs, x, norm, eps, seed, spec=None) -> dict:
    """Every measurement of one model and ball (``spec``: margins, for certified counts)."""
    q = math.inf if norm == "inf" else 2.0
    row: dict = {"model": name, "norm": norm, "eps": eps, "points": len(x)}
    opts = alpha_opts(args.steps, args.lr)

    def lip(optimize):
        return crown_bounds(ours, x, eps, norm=q, spec=spec, optimize=optimize, lr=args.lr)

    def auto(method, **kw):
        answer = worker.bounds(arch, theirs, x, eps, norm, method, spec, **kw)
        if not answer["ok"]:
            raise SystemExit(f"auto_LiRPA failed on {name}: {answer['error']}")
        lo, up = answer["lower"].reshape(len(x), -1), answer["upper"].reshape(len(x), -1)
        return (lo, up), answer["seconds"]

    crown_l, row["crown_lipnets_s"] = timed(lambda: lip(False))
    crown_a, row["crown_autolirpa_s"] = auto("CROWN")
    times_l, times_a = [], []
    alpha_l = alpha_a = None
    repeats = args.repeats if spec is None else args.certify_repeats
    for r in range(repeats):  # in turns, the order alternating
        for who in ("lipnets", "autolirpa") if r % 2 == 0 else ("autolirpa", "lipnets"):
            if who == "lipnets":
                alpha_l, s = timed(lambda: lip(args.steps))
                times_l.append(s)
            else:
                alpha_a, s = auto("CROWN-Optimized", bound_opts=opts)
                times_a.append(s)
    row["alpha_lipnets_s"], row["alpha_autolirpa_s"] = map(statistics.median, (times_l, times_a))
    row["alpha_lipnets_times"], row["alpha_autolirpa_times"] = times_l, times_a
    bounds = {
        "crown_lipnets": (crown_l.lower.reshape(len(x), -1), crown_l.upper.reshape(len(x), -1)),
        "crown_autolirpa": crown_a,
        "alpha_lipnets": (alpha_l.lower.reshape(len(x), -1), alpha_l.upper.reshape(len(x), -1)),
        "alpha_autolirpa": alpha_a,
    }
    with torch.no_grad():
        outs = ours(ball_samples(x, eps, norm, args.samples, seed).flatten(0, 1))
    outs = outs.reshape(args.samples, len(x), -1)
    if spec is not None:
        outs = torch.einsum("nrm,knm->knr", spec, outs)
    for key, (lo, up) in bounds.items():
        row[f"{key}_sound"] = contains(lo, up, outs)
        row[f"{key}_mean_width"] = float((up - lo).mean())
        if spec is not None:
            row[f"{key}_certified"] = int((lo > 0).all(dim=1).sum())
            row[f"{key}_mean_lower"] = float(lo.mean())
    (lo_l, up_l), (lo_a, up_a) = bounds["alpha_lipnets"], bounds["alpha_autolirpa"]
    w_l, w_a = up_l - lo_l, up_a - lo_a
    rel = (w_l - w_a) / w_a.clamp_min(1e-300)
    row["ratio"] = row["alpha_lipnets_mean_width"] / row["alpha_autolirpa_mean_width"]
    row["max_rel_excess"] = float(rel.max())
    row["share_wider"] = float((rel > LOOSER).double().mean())
    # The lower bounds alone (what certification uses) and the upper bounds alone.
    row["lower_gain"] = float((lo_l - lo_a).mean())
    row["upper_gain"] = float((up_a - up_l).mean())
    row["no_looser"] = row["alpha_lipnets_mean_width"] <= row["alpha_autolirpa_mean_width"]
    return row


def run_panel(worker: Worker, args) -> tuple[list[dict], list[dict]]:
    rows, trained = [], []
    warm = build_model(mlp_arch(RELU)).eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    crown_bounds(warm, x, 0.01, norm=math.inf, optimize=2)  # imports, first trace
    worker.bounds(mlp_arch(RELU), warm, x, 0.01, "inf", "CROWN-Optimized")
    jobs = []
    for name, arch, on_digits, seed, balls in PANEL:
        ours, theirs = models(arch, 6000 + seed)
        if on_digits:
            x_train, y_train, x_test, y_test = digits(args.test)
            start = time.perf_counter()
            loss = train(ours, x_train, y_train, args.epochs, 7000 + seed)
            theirs.load_state_dict(ours.state_dict())
            with torch.no_grad():
                acc = float((ours(x_test).argmax(1) == y_test).double().mean())
            trained.append(
                {"model": name, "epochs": args.epochs, "train_s": time.perf_counter() - start}
                | {"last_loss": loss, "test_accuracy": acc}
            )
            x, y = x_test[: args.points], y_test[: args.points]
            balls = [("inf", e) for e in args.eps_inf_digits] + [
                ("2", e) for e in args.eps_2_digits
            ]
            for norm, eps in balls:
                jobs.append((name, arch, ours, theirs, x, norm, eps, margin_spec(y)))
            x = x[: args.batch]
            balls = [("inf", args.eps_inf_digits[0]), ("2", args.eps_2_digits[0])]
        else:
            torch.manual_seed(8000 + seed)
            x = torch.rand(args.batch, 1, 8, 8, dtype=torch.float64)
        for norm, eps in balls:
            jobs.append((name, arch, ours, theirs, x, norm, eps, None))
    for j, (name, arch, ours, theirs, x, norm, eps, spec) in enumerate(tqdm(jobs, desc="α-CROWN")):
        row = one_ball(worker, args, name, arch, ours, theirs, x, norm, eps, 9000 + j, spec)
        row["spec"] = "margins" if spec is not None else "outputs"
        rows.append(row)
    return rows, trained


def ball_name(r: dict) -> str:
    return f"l{'∞' if r['norm'] == 'inf' else '2'} {r['eps']:g}"


def yes(flag: bool) -> str:
    return "yes" if flag else "**NO**"


def width_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | ball | inputs | CROWN width lipnets / auto_LiRPA | α width lipnets "
        "| α width auto_LiRPA | ratio | ≤ | max rel. excess | outputs wider | sound "
        "lipnets / auto_LiRPA | α time lipnets | α time auto_LiRPA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["spec"] != "outputs":
            continue
        sound = all(r[f"{k}_sound"] for k in ("crown_lipnets", "alpha_lipnets"))
        sound_a = all(r[f"{k}_sound"] for k in ("crown_autolirpa", "alpha_autolirpa"))
        lines.append(
            f"| {r['model']} | {ball_name(r)} | {r['points']} "
            f"| {r['crown_lipnets_mean_width']:.4g} / {r['crown_autolirpa_mean_width']:.4g} "
            f"| {r['alpha_lipnets_mean_width']:.5g} | {r['alpha_autolirpa_mean_width']:.5g} "
            f"| {r['ratio']:.5f} | {'yes' if r['no_looser'] else '**no**'} "
            f"| {r['max_rel_excess']:.2e} | {100 * r['share_wider']:.1f} % "
            f"| {yes(sound)} / {yes(sound_a)} | {1e3 * r['alpha_lipnets_s']:.0f} ms "
            f"| {1e3 * r['alpha_autolirpa_s']:.0f} ms |"
        )
    return lines


def certify_table(rows: list[dict]) -> list[str]:
    lines = [
        "| ball | points | certified CROWN lipnets / auto_LiRPA | certified α lipnets "
        "| certified α auto_LiRPA | mean margin lower bound α lipnets / auto_LiRPA "
        "| mean margin width ratio | sound lipnets / auto_LiRPA | α time lipnets "
        "| α time auto_LiRPA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["spec"] != "margins":
            continue
        sound = r["crown_lipnets_sound"] and r["alpha_lipnets_sound"]
        sound_a = r["crown_autolirpa_sound"] and r["alpha_autolirpa_sound"]
        lines.append(
            f"| {ball_name(r)} | {r['points']} "
            f"| {r['crown_lipnets_certified']} / {r['crown_autolirpa_certified']} "
            f"| {r['alpha_lipnets_certified']} | {r['alpha_autolirpa_certified']} "
            f"| {r['alpha_lipnets_mean_lower']:.5g} / {r['alpha_autolirpa_mean_lower']:.5g} "
            f"| {r['ratio']:.5f} | {yes(sound)} / {yes(sound_a)} "
            f"| {1e3 * r['alpha_lipnets_s']:.0f} ms | {1e3 * r['alpha_autolirpa_s']:.0f} ms |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", default=SNAPSHOT, help="git directory of auto_LiRPA")
    parser.add_argument("--venv", default=str(HERE / ".autolirpa-venv"))
    parser.add_argument("--torch", default="torch<2.9", help="pip requirement for the venv")
    parser.add_argument("--base-python", default="python3", help="creates the venv")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, each library")
    parser.add_argument("--steps", type=int, default=20, help="Adam steps, both libraries")
    parser.add_argument("--lr", type=float, default=0.5, help="Adam's learning rate, both")
    parser.add_argument("--batch", type=int, default=8, help="inputs per width row")
    parser.add_argument("--samples", type=int, default=1024, help="sampled points per ball")
    parser.add_argument("--repeats", type=int, default=3, help="timed α calls per library")
    parser.add_argument("--test", type=int, default=540, help="held-out digits")
    parser.add_argument("--points", type=int, default=32, help="digits certified per ball")
    parser.add_argument(
        "--certify-repeats", type=int, default=1, help="timed α calls per library, margins"
    )
    parser.add_argument("--epochs", type=int, default=20, help="training epochs on digits")
    parser.add_argument("--eps-inf-digits", type=float, nargs="+", default=[0.05])
    parser.add_argument("--eps-2-digits", type=float, nargs="+", default=[0.3])
    parser.add_argument("--markdown", help="write the tables to this file")
    parser.add_argument("--json", help="write every measurement to this file")
    parser.add_argument("--render", help="only rewrite --markdown from this JSON of a run")
    args = parser.parse_args()
    if args.render:
        write(json.loads(Path(args.render).read_text()), args.markdown, None)
        return

    torch.set_num_threads(args.threads)
    python = ensure_venv(Path(args.venv), Path(args.snapshot), args.torch, args.base_python)
    start = time.perf_counter()
    worker = Worker(python, Path(args.venv) / "worker-alpha.log", args.threads)
    commit = json.loads((Path(args.venv) / "lipnets-benchmark.json").read_text())["auto_LiRPA"]
    result: dict = {
        "lipnets": lipnets.__version__,
        "lipnets_source": lipnets_source(),
        "torch": torch.__version__,
        "autolirpa": worker.info["auto_LiRPA"],
        "autolirpa_commit": commit,
        "autolirpa_torch": worker.info["torch"],
        "threads": args.threads,
        "args": vars(args),
    }
    try:
        result["rows"], result["trained"] = run_panel(worker, args)
    finally:
        worker.close()
    result["wall_s"] = time.perf_counter() - start
    result["load"] = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    result["cpu"] = describe(torch.device("cpu"))
    result["command"] = " ".join(["python", "benchmarks/alpha_crown.py", *sys.argv[1:]])
    write(result, args.markdown, args.json)


def render(result: dict) -> str:
    """The markdown report of a run's ``result``."""
    args = argparse.Namespace(**result["args"])
    rows = result["rows"]
    trained = "; ".join(
        f"{t['model']}: {t['epochs']} epochs in {t['train_s']:.1f} s, test accuracy "
        f"{t['test_accuracy']:.3f}"
        for t in result["trained"]
    )
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"lipnets {result['lipnets']} ({result['lipnets_source']}) on {result['cpu']} against "
        f"auto_LiRPA {result['autolirpa']} (commit {result['autolirpa_commit'][:12]}) on torch "
        f"{result['autolirpa_torch']}, {args.threads} thread(s) each, float64, run one job "
        f"after the other; load average {result['load']} at the end, {result['wall_s']:.0f} s "
        "in all.",
        "",
        f"α-CROWN: {args.steps} Adam steps, lr {args.lr:g} decayed by 0.98 per step, on both "
        f"sides (auto_LiRPA `CROWN-Optimized` with iteration = {args.steps + 1}). Output bounds "
        f"of {args.batch} inputs in [0, 1] per row; width = upper - lower, mean over outputs and "
        "inputs; ratio = α width lipnets / α width auto_LiRPA (≤: ratio ≤ 1); max rel. excess: "
        "the largest (w_lipnets - w_auto_LiRPA) / w_auto_LiRPA over the outputs; outputs wider: "
        f"the share with an excess > {LOOSER:g}; sound: CROWN's and α-CROWN's bounds contain "
        f"the outputs at {args.samples} points of each ball (a quarter on the boundary); "
        f"times: median of {args.repeats} calls each, in turns ({args.certify_repeats} for the "
        "margins below).",
        "",
        *width_table(rows),
        "",
        f"Digits MLP ({trained}): the first {args.points} of {args.test} held-out digits, "
        "specification C of rows e_y - e_j; certified: every margin lower bound > 0; ratio: "
        "mean margin width (upper - lower) lipnets / auto_LiRPA.",
        "",
        *certify_table(rows),
        "",
    ]
    return "\n".join(lines)


def write(result: dict, markdown: str | None, json_path: str | None) -> None:
    rows = result["rows"]
    table = render(result)
    print(table)
    if markdown:
        Path(markdown).write_text(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1, default=str)
    unsound = [
        (r["model"], r["norm"], k)
        for r in rows
        for k in ("crown_lipnets", "crown_autolirpa", "alpha_lipnets", "alpha_autolirpa")
        if not r[f"{k}_sound"]
    ]
    if unsound:
        raise SystemExit(f"bounds that miss sampled outputs: {unsound}")


if __name__ == "__main__":
    main()
