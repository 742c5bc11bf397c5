"""lipnets against auto_LiRPA: CROWN bound widths and IBP-certified counts on the same models.

auto_LiRPA needs torch < 2.9, so it is no dependency of lipnets: this script
keeps its own virtualenv (``--venv``, default ``benchmarks/.autolirpa-venv``,
git-ignored) with ``torch<2.9`` from the package registry and auto_LiRPA
installed from a local git snapshot (``--snapshot``: a git directory, bare or
not; its ``HEAD`` is archived and installed with ``pip install --no-deps``,
plus auto_LiRPA's few import-time dependencies). The first run creates it
(pip downloads a default, CUDA, torch build of a few GB: several minutes);
later runs reuse it, reinstalling auto_LiRPA only when the snapshot's commit
changed (``--setup-only`` just prepares it). The auto_LiRPA side runs in
`_autolirpa_worker.py` inside that virtualenv, one long-lived process fed
jobs through files (a JSON architecture description, a ``torch.save`` of the
state dict, the inputs and the specification; the bounds come back the same
way), so the two libraries run interleaved, one job after the other, on the
very same float64 weights and inputs. Both sides build the ``nn.Sequential``
with the worker's `build_model`.

What it measures:

* **CROWN widths** (``--part crown``): MLPs (64-48-48-10) and small CNNs (two
  convolutions, two linear layers) on 1 x 8 x 8 inputs, random weights
  (PyTorch's default initialisation, one fixed seed per model) and inputs in
  [0, 1], with ReLU, LeakyReLU(0.1), Tanh, Sigmoid and GELU, and a ReLU CNN
  with a MaxPool2d; l-infinity and l2 balls. auto_LiRPA: ``BoundedModule(model,
  x).compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm, eps)),),
  method="CROWN")`` (backward CROWN for every node, no alpha optimisation);
  lipnets: `lipnets.propagation.crown_bounds`. Per model and ball the table
  gives the largest and smallest relative excess of lipnets' width over
  auto_LiRPA's, ``(w_lipnets - w_autolirpa) / w_autolirpa`` over all outputs
  and inputs, whether the largest is <= 1e-6 (lipnets no looser), and whether
  each library's bounds contain the outputs at ``--samples`` points of each
  ball (boundary points included). A model lipnets has no propagation rule
  for gets "no rule" (`UnboundedModuleError`), not a crash, so the script can
  be rerun as rules land.
* **Certified counts on digits** (``--part certify``): an MLP and a small
  CNN (ReLU) trained here in about a second (fixed seeds, float32, then
  bounded in float64) on scikit-learn's 8 x 8 digits scaled to [0, 1]
  (``--test`` points held out); on the held-out points, for
  each radius, the number certified, i.e. every margin ``f_y - f_j`` bounded
  above 0 over the ball, with the specification ``C`` of rows ``e_y - e_j``:
  auto_LiRPA ``compute_bounds(..., C=C, method="IBP")`` (and ``"CROWN"``)
  against lipnets' ``certify_crown(model, x, y, eps, method="ibp")``,
  ``interval_bounds(model, x, eps, norm=..., spec=C)`` (and
  ``certify_crown(..., method="crown")``); l-infinity radii ``--eps-inf-digits``
  and l2 radii ``--eps-2-digits``.

Times are wall times of one call each (auto_LiRPA's includes building its
``BoundedModule``, lipnets' its tracing), for orientation only.

Usage:
    python benchmarks/autolirpa.py --markdown benchmarks/results/autolirpa-cpu.md \\
        --json benchmarks/results/autolirpa-cpu.json
    python benchmarks/autolirpa.py --setup-only          # create or update the virtualenv
    python benchmarks/autolirpa.py --part crown --batch 4 --samples 64   # smoke run

Nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from _autolirpa_worker import build_model
from _timing import describe, tqdm

import lipnets
from lipnets.certify import certify_crown
from lipnets.errors import UnboundedModuleError
from lipnets.propagation import crown_bounds, interval_bounds

HERE = Path(__file__).resolve().parent
SNAPSHOT = "/work/.mirror/Verified-Intelligence+auto_LiRPA/repo"
# What `import auto_LiRPA` imports (its setup.py also lists test tools, torchvision and more).
LIGHT_DEPS = ["numpy", "packaging", "tqdm", "appdirs", "graphviz"]
TOLERANCE = 1e-6  # largest relative excess of lipnets' widths still counted as "no looser"


# --- the auto_LiRPA virtualenv ------------------------------------------------------------


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", *args], check=True)


def _snapshot_commit(snapshot: Path) -> str | None:
    if not snapshot.exists():
        return None
    done = subprocess.run(
        ["git", "-C", str(snapshot), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{snapshot} is not a git directory: {done.stderr.strip()}")
    return done.stdout.strip()


def ensure_venv(venv: Path, snapshot: Path, torch_spec: str, base_python: str) -> Path:
    """The Python of a virtualenv with torch_spec and auto_LiRPA from the snapshot's HEAD."""
    python = venv / "bin" / "python"
    marker = venv / "lipnets-benchmark.json"
    state = json.loads(marker.read_text()) if marker.exists() and python.exists() else {}
    commit = _snapshot_commit(snapshot)
    if commit is None and "auto_LiRPA" not in state:
        raise SystemExit(
            f"the auto_LiRPA snapshot {snapshot} does not exist: pass --snapshot with a git "
            "directory of auto_LiRPA (for example a clone of "
            "github.com/Verified-Intelligence/auto_LiRPA)"
        )
    if not python.exists():
        print(f"creating the virtualenv {venv} ...", flush=True)
        subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
        state = {}
    if state.get("deps") != [torch_spec, *LIGHT_DEPS]:
        print(f"installing {torch_spec} and {' '.join(LIGHT_DEPS)} ...", flush=True)
        _pip(python, torch_spec, *LIGHT_DEPS)
        state["deps"] = [torch_spec, *LIGHT_DEPS]
        marker.write_text(json.dumps(state))
    if commit is None:
        print(f"note: {snapshot} is missing; reusing auto_LiRPA {state['auto_LiRPA'][:12]}")
    elif state.get("auto_LiRPA") != commit:
        print(f"installing auto_LiRPA {commit[:12]} from {snapshot} ...", flush=True)
        archive = subprocess.run(
            ["git", "-C", str(snapshot), "archive", "--format=tar", "HEAD"],
            capture_output=True,
            check=True,
        ).stdout
        src = venv / "src" / "auto_LiRPA"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(src, filter="data")
        _pip(python, "--no-deps", "--force-reinstall", str(src))
        state["auto_LiRPA"] = commit
        marker.write_text(json.dumps(state))
    return python


class Worker:
    """The auto_LiRPA process: one job (a folder of files) at a time."""

    def __init__(self, python: Path, log: Path, threads: int) -> None:
        self.log_path = log
        self.log = open(log, "w")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the venv's own torch
        self.proc = subprocess.Popen(
            [str(python), str(HERE / "_autolirpa_worker.py"), str(threads)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
        )
        self.info = self._answer()
        self.tmp = tempfile.TemporaryDirectory(prefix="lipnets-autolirpa-")
        self.count = 0

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.close()
            tail = self.log_path.read_text()[-3000:]
            raise SystemExit(f"the auto_LiRPA worker stopped; the end of its log:\n{tail}")
        return json.loads(line)

    def bounds(self, arch, model, x, eps, norm, method, spec=None, **options) -> dict:
        """auto_LiRPA's lower and upper bounds in a dict (or an error) with the job's seconds;
        ``options``: ``bound_opts`` for ``BoundedModule``, ``bound_lower`` and ``bound_upper``
        for ``compute_bounds``."""
        self.count += 1
        job = Path(self.tmp.name) / f"job{self.count}"
        job.mkdir()
        (job / "job.json").write_text(
            json.dumps({"arch": arch, "eps": eps, "norm": norm, "method": method} | options)
        )
        tensors = {"state": model.state_dict(), "x": x}
        if spec is not None:
            tensors["C"] = spec
        torch.save(tensors, job / "tensors.pt")
        start = time.perf_counter()
        self.proc.stdin.write(json.dumps({"job": str(job)}) + "\n")
        self.proc.stdin.flush()
        answer = self._answer()
        answer["wall_s"] = time.perf_counter() - start
        if answer["ok"]:
            answer.update(torch.load(job / "bounds.pt", weights_only=True))
        shutil.rmtree(job)
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.tmp.cleanup()


# --- models ---------------------------------------------------------------------------------

ACTS = {
    "ReLU": {"type": "relu"},
    "LeakyReLU(0.1)": {"type": "leaky_relu", "slope": 0.1},
    "Tanh": {"type": "tanh"},
    "Sigmoid": {"type": "sigmoid"},
    "GELU": {"type": "gelu"},
}


def mlp_arch(act: dict, widths=(48, 48)) -> list[dict]:
    sizes = [64, *widths, 10]
    arch: list[dict] = [{"type": "flatten"}]
    for i in range(len(sizes) - 1):
        arch.append({"type": "linear", "in": sizes[i], "out": sizes[i + 1]})
        if i < len(sizes) - 2:
            arch.append(dict(act))
    return arch


def cnn_arch(act: dict, channels=(8, 16), hidden=32) -> list[dict]:
    a, b = channels
    return [
        {"type": "conv2d", "in": 1, "out": a, "kernel": 3, "padding": 1},
        dict(act),
        {"type": "conv2d", "in": a, "out": b, "kernel": 3, "stride": 2, "padding": 1},
        dict(act),
        {"type": "flatten"},
        {"type": "linear", "in": b * 16, "out": hidden},
        dict(act),
        {"type": "linear", "in": hidden, "out": 10},
    ]


def maxpool_arch() -> list[dict]:
    return [
        {"type": "conv2d", "in": 1, "out": 8, "kernel": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel": 2, "stride": 2},
        {"type": "conv2d", "in": 8, "out": 16, "kernel": 3, "padding": 1},
        {"type": "relu"},
        {"type": "flatten"},
        {"type": "linear", "in": 16 * 16, "out": 10},
    ]


def crown_models() -> list[tuple[str, list[dict]]]:
    models = [(f"MLP {name}", mlp_arch(act)) for name, act in ACTS.items()]
    models += [(f"CNN {name}", cnn_arch(act)) for name, act in ACTS.items()]
    models.append(("CNN ReLU + MaxPool2d", maxpool_arch()))
    return models


def seeded(arch: list[dict], seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return build_model(arch).eval()


# --- the lipnets side -----------------------------------------------------------------------


def lipnets_call(fn) -> tuple[object, float, str | None]:
    """fn's result, its wall time, and "no rule" or an error message instead of raising."""
    start = time.perf_counter()
    try:
        result = fn()
    except UnboundedModuleError as err:
        return None, time.perf_counter() - start, f"no rule ({str(err).splitlines()[0][:120]})"
    except Exception as err:  # recorded, so one failure does not stop the benchmark
        return None, time.perf_counter() - start, f"error: {type(err).__name__}: {err}"[:200]
    return result, time.perf_counter() - start, None


def ball_samples(x: torch.Tensor, eps: float, norm: str, k: int, seed: int) -> torch.Tensor:
    """k points of each ball (k, N, ...): a quarter on the boundary and corners, the rest inside."""
    g = torch.Generator().manual_seed(seed)
    shape = (k, *x.shape)
    if norm == "inf":
        d = 2 * torch.rand(shape, generator=g, dtype=x.dtype) - 1
        corners = k // 4
        d[:corners] = torch.sign(d[:corners])
    else:
        d = torch.randn(shape, generator=g, dtype=x.dtype)
        flat = d.flatten(2)
        flat /= flat.norm(dim=2, keepdim=True)
        inside = torch.rand((k, x.shape[0]), generator=g, dtype=x.dtype)
        inside[: k // 4] = 1
        flat *= inside.pow(1 / flat.shape[2]).unsqueeze(2)
        d = flat.reshape(shape)
    return x + eps * d


def contains(lower, upper, outs: torch.Tensor) -> bool:
    slack = 1e-9 * (1 + outs.abs())
    return bool(((lower - slack <= outs) & (outs <= upper + slack)).all())


# --- part (a): CROWN widths -----------------------------------------------------------------


def crown_part(worker: Worker, args) -> list[dict]:
    rows = []
    balls = [("inf", e) for e in args.eps_inf] + [("2", e) for e in args.eps_2]
    jobs = [(i, name, arch, b) for i, (name, arch) in enumerate(crown_models()) for b in balls]
    # One untimed call each first (imports, first trace, thread pools).
    warm = seeded(jobs[0][2], 0)
    x = torch.rand(args.batch, 1, 8, 8, dtype=torch.float64)
    lipnets_call(lambda: crown_bounds(warm, x, 0.01, norm=math.inf))
    worker.bounds(jobs[0][2], warm, x, 0.01, "inf", "CROWN")
    for i, name, arch, (norm, eps) in tqdm(jobs, desc="CROWN widths"):
        model = seeded(arch, 1000 + i)
        torch.manual_seed(2000 + i)
        x = torch.rand(args.batch, 1, 8, 8, dtype=torch.float64)
        q = math.inf if norm == "inf" else 2.0
        row: dict = {"model": name, "norm": norm, "eps": eps, "arch": arch}
        ours, row["lipnets_s"], row["lipnets_status"] = lipnets_call(
            lambda m=model, x=x, q=q, eps=eps: crown_bounds(m, x, eps, norm=q)
        )
        theirs = worker.bounds(arch, model, x, eps, norm, "CROWN")
        row["autolirpa_s"] = theirs.get("seconds", theirs["wall_s"])
        row["autolirpa_status"] = None if theirs["ok"] else f"error: {theirs['error']}"
        with torch.no_grad():
            outs = model(ball_samples(x, eps, norm, args.samples, 3000 + i).flatten(0, 1))
        outs = outs.reshape(args.samples, args.batch, -1)
        if ours is not None:
            row["lipnets_sound"] = contains(ours.lower, ours.upper, outs)
            row["lipnets_mean_width"] = float((ours.upper - ours.lower).mean())
        if theirs["ok"]:
            lo, up = (
                theirs["lower"].reshape(args.batch, -1),
                theirs["upper"].reshape(args.batch, -1),
            )
            row["autolirpa_sound"] = contains(lo, up, outs)
            row["autolirpa_mean_width"] = float((up - lo).mean())
        if ours is not None and theirs["ok"]:
            ours_w = (ours.upper - ours.lower).reshape(args.batch, -1)
            theirs_w = up - lo
            rel = (ours_w - theirs_w) / theirs_w.clamp_min(1e-300)
            row["max_rel_excess"] = float(rel.max())
            row["min_rel_excess"] = float(rel.min())
            row["no_looser"] = row["max_rel_excess"] <= TOLERANCE
        rows.append(row)
    return rows


def crown_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | ball | lipnets | max rel. excess | <= 1e-6 | min rel. excess "
        "| mean width lipnets | mean width auto_LiRPA | sound (samples) lipnets / auto_LiRPA "
        "| time lipnets | time auto_LiRPA |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ball = f"l{'∞' if r['norm'] == 'inf' else '2'}, eps = {r['eps']:g}"
        status = r["lipnets_status"] or "ok"
        if status.startswith("no rule"):
            status = "no rule"
        if r["autolirpa_status"]:
            status += f"; auto_LiRPA {r['autolirpa_status']}"
        if "max_rel_excess" in r:
            excess = f"{r['max_rel_excess']:.2e} | {'yes' if r['no_looser'] else '**no**'} "
            excess += f"| {r['min_rel_excess']:.2e}"
        else:
            excess = "- | - | -"

        def fmt(key: str, spec: str, r: dict = r) -> str:
            return format(r[key], spec) if key in r else "-"

        sound = " / ".join(
            "-" if f"{who}_sound" not in r else ("yes" if r[f"{who}_sound"] else "**NO**")
            for who in ("lipnets", "autolirpa")
        )
        times = f"{1e3 * r['lipnets_s']:.0f} ms | {1e3 * r['autolirpa_s']:.0f} ms"
        if r["lipnets_status"]:
            times = f"- | {1e3 * r['autolirpa_s']:.0f} ms"
        lines.append(
            f"| {r['model']} | {ball} | {status} | {excess} | {fmt('lipnets_mean_width', '.4g')} "
            f"| {fmt('autolirpa_mean_width', '.4g')} | {sound} | {times} |"
        )
    return lines


# --- part (b): certified counts on digits --------------------------------------------------


def digits(test: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float64).unsqueeze(1)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[test:], y[test:], x[:test], y[:test]


def train(model, x, y, epochs: int, seed: int) -> float:
    """Adam on minibatches of 64, in float32 (faster); the model is float64 again afterwards."""
    g = torch.Generator().manual_seed(seed)
    model.float().train()
    x = x.float()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for idx in perm.split(64):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.double().eval()
    return loss.item()


def margin_spec(y: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """(N, classes - 1, classes): rows e_y - e_j, j != y."""
    eye = torch.eye(classes, dtype=torch.float64)
    others = torch.stack([torch.cat([torch.arange(c), torch.arange(c + 1, classes)]) for c in y])
    return eye[y].unsqueeze(1) - eye[others]


def certify_part(worker: Worker, args) -> tuple[list[dict], list[dict]]:
    x_train, y_train, x_test, y_test = digits(args.test)
    spec = margin_spec(y_test)
    nets = {
        "MLP 64-64-64-10": (mlp_arch(ACTS["ReLU"], (64, 64)), args.epochs),
        "CNN 16-32 conv, 64 hidden": (cnn_arch(ACTS["ReLU"], (16, 32), 64), args.epochs),
    }
    models, trained = [], []
    for i, (name, (arch, epochs)) in enumerate(nets.items()):
        model = seeded(arch, 4000 + i)
        start = time.perf_counter()
        loss = train(model, x_train, y_train, epochs, 5000 + i)
        with torch.no_grad():
            acc = float((model(x_test).argmax(1) == y_test).double().mean())
        trained.append(
            {"model": name, "epochs": epochs, "train_s": time.perf_counter() - start}
            | {"last_loss": loss, "test_accuracy": acc}
        )
        models.append((name, arch, model))
    radii = [("inf", e) for e in args.eps_inf_digits] + [("2", e) for e in args.eps_2_digits]
    jobs = [(m, b) for m in models for b in radii]
    rows = []
    for (name, arch, model), (norm, eps) in tqdm(jobs, desc="certified counts"):
        q = math.inf if norm == "inf" else 2.0
        row: dict = {"model": name, "norm": norm, "eps": eps, "points": len(x_test)}
        calls = lipnets_calls(model, x_test, y_test, spec, eps, q)
        for key, fn in calls.items():
            out, row[f"{key}_s"], status = lipnets_call(fn)
            if status:
                row[key] = status
            elif out.dim() == 1:
                row[key] = int(out.sum())
            else:
                row[key] = int((out > 0).all(dim=1).sum())
                row[f"{key}_mean_lower"] = float(out.mean())
            if key == "lipnets_interval_spec":
                theirs = worker.bounds(arch, model, x_test, eps, norm, "IBP", spec)
                put(row, "autolirpa_ibp", theirs)
        theirs = worker.bounds(arch, model, x_test, eps, norm, "CROWN", spec)
        put(row, "autolirpa_crown", theirs)
        rows.append(row)
    return trained, rows


def lipnets_calls(model, x, y, spec, eps: float, q: float) -> dict:
    """The lipnets calls of one row, by result key."""
    return {
        "lipnets_certify_ibp": lambda: certify_crown(model, x, y, eps, norm=q, method="ibp"),
        "lipnets_interval_spec": lambda: interval_bounds(model, x, eps, norm=q, spec=spec).lower,
        "lipnets_certify_crown": lambda: certify_crown(model, x, y, eps, norm=q, method="crown"),
    }


def put(row: dict, key: str, answer: dict) -> None:
    row[f"{key}_s"] = answer.get("seconds", answer["wall_s"])
    if answer["ok"]:
        lower = answer["lower"]
        row[key] = int((lower > 0).all(dim=1).sum())
        row[f"{key}_mean_lower"] = float(lower.mean())
    else:
        row[key] = f"error: {answer['error']}"


def certify_table(rows: list[dict], norm: str) -> list[str]:
    lines = [
        "| model | eps | auto_LiRPA IBP (C) | lipnets certify_crown ibp "
        "| lipnets interval_bounds(spec=C) | auto_LiRPA CROWN (C) | lipnets certify_crown crown "
        "| mean margin lower bound IBP: auto_LiRPA / lipnets |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = (
        "autolirpa_ibp",
        "lipnets_certify_ibp",
        "lipnets_interval_spec",
        "autolirpa_crown",
        "lipnets_certify_crown",
    )
    for r in rows:
        if r["norm"] != norm:
            continue
        cells = [
            f"{r[k]} / {r['points']}" if isinstance(r[k], int) else str(r[k])[:40] for k in keys
        ]
        means = " / ".join(
            f"{r[k]:.4g}" if k in r else "-"
            for k in ("autolirpa_ibp_mean_lower", "lipnets_interval_spec_mean_lower")
        )
        lines.append(f"| {r['model']} | {r['eps']:g} | {' | '.join(cells)} | {means} |")
    return lines


def lipnets_source() -> str:
    """The commit of the checkout lipnets is imported from, and whether lipnets/ has changes."""
    root = Path(lipnets.__file__).resolve().parent.parent

    def git(*cmd: str) -> str | None:
        done = subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short=12", "HEAD")
    if commit is None:
        return f"{root} (not a git checkout)"
    changed = git("status", "--porcelain", "--", "lipnets")
    return f"commit {commit}" + (" with local changes in lipnets/" if changed else "")


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", default=SNAPSHOT, help="git directory of auto_LiRPA")
    parser.add_argument("--venv", default=str(HERE / ".autolirpa-venv"))
    parser.add_argument("--torch", default="torch<2.9", help="pip requirement for the venv")
    parser.add_argument("--base-python", default="python3", help="creates the venv")
    parser.add_argument("--setup-only", action="store_true")
    parser.add_argument("--part", choices=["all", "crown", "certify"], default="all")
    parser.add_argument("--batch", type=int, default=16, help="inputs per CROWN-width model")
    parser.add_argument("--samples", type=int, default=512, help="sampled points per ball")
    parser.add_argument(
        "--eps-inf", type=float, nargs="+", default=[0.02, 0.1], help="l-inf radii, widths"
    )
    parser.add_argument("--eps-2", type=float, nargs="+", default=[0.1, 0.5], help="l2 radii")
    parser.add_argument("--test", type=int, default=540, help="held-out digits")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs on digits")
    parser.add_argument(
        "--eps-inf-digits", type=float, nargs="+", default=[0.001, 0.002, 0.005, 0.01]
    )
    parser.add_argument("--eps-2-digits", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1])
    parser.add_argument("--markdown", help="write the tables to this file")
    parser.add_argument("--json", help="write every measurement to this file")
    args = parser.parse_args()

    start = time.perf_counter()
    python = ensure_venv(Path(args.venv), Path(args.snapshot), args.torch, args.base_python)
    setup_s = time.perf_counter() - start
    print(f"virtualenv ready in {setup_s:.0f} s: {python}", flush=True)
    if args.setup_only:
        return
    start = time.perf_counter()
    threads = torch.get_num_threads()
    worker = Worker(python, Path(args.venv) / "worker.log", threads)
    commit = json.loads((Path(args.venv) / "lipnets-benchmark.json").read_text())["auto_LiRPA"]
    result: dict = {
        "lipnets": lipnets.__version__,
        "lipnets_source": lipnets_source(),
        "torch": torch.__version__,
        "autolirpa": worker.info["auto_LiRPA"],
        "autolirpa_commit": commit,
        "autolirpa_torch": worker.info["torch"],
        "threads": threads,
    }
    try:
        if args.part in ("all", "crown"):
            result["crown"] = crown_part(worker, args)
        if args.part in ("all", "certify"):
            result["trained"], result["certify"] = certify_part(worker, args)
    finally:
        worker.close()
    result["wall_s"] = time.perf_counter() - start

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [
        f"lipnets {result['lipnets']} ({result['lipnets_source']}) on "
        f"{describe(torch.device('cpu'))} against auto_LiRPA "
        f"{result['autolirpa']} (commit {commit[:12]}) on torch {result['autolirpa_torch']}, "
        f"{threads} threads each, float64, run one job after the other; load average {load} "
        f"at the end, {result['wall_s']:.0f} s in all (virtualenv set-up excluded).",
        "",
    ]
    if "crown" in result:
        lines += [
            f"CROWN output bounds, {args.batch} inputs in [0, 1] per model, random weights; "
            "relative excess = (width lipnets - width auto_LiRPA) / width auto_LiRPA over all "
            f"outputs (max > 0: lipnets looser somewhere); sound: the bounds contain the "
            f"outputs at {args.samples} points of each ball.",
            "",
            *crown_table(result["crown"]),
            "",
        ]
    if "certify" in result:
        trained = "; ".join(
            f"{t['model']}: {t['epochs']} epochs in {t['train_s']:.1f} s, test accuracy "
            f"{t['test_accuracy']:.3f}"
            for t in result["trained"]
        )
        lines.append(
            f"Certified points of {args.test} held-out digits (8 x 8 in [0, 1]), ReLU "
            f"networks trained here ({trained}); certified: every margin bound > 0."
        )
        for norm, label in (("inf", "l∞"), ("2", "l2")):
            if any(r["norm"] == norm for r in result["certify"]):
                lines += ["", f"{label} balls:", "", *certify_table(result["certify"], norm)]
        lines.append("")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    unsound = [
        (r["model"], r["norm"])
        for r in result.get("crown", [])
        if r.get("lipnets_sound") is False or r.get("autolirpa_sound") is False
    ]
    if unsound:
        raise SystemExit(f"bounds that miss sampled outputs: {unsound}")


if __name__ == "__main__":
    main()
