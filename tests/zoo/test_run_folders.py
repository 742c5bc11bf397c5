"""Run folders are written whole or not at all, and never over an earlier run (`zoo.runs`).

A writer killed between two files (SIGINT or SIGKILL, paused there by the
test-only hook of Note [Run folder test hook]) leaves the earlier run byte for
byte as it was and no visible half folder; a rerun with the same name goes to
``NAME-2``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zoo import cards, data, models, runs, train, wasserstein
from zoo.__main__ import main
from zoo.errors import ZooError

ROOT = Path(__file__).resolve().parents[2]
#: The files of a run, in the order they are written (the README, rendered from the card,
#: last).
FILES = {
    "classifier": ["model.safetensors", "card.json", "certified.png", "README.md"],
    "critic": ["model.safetensors", "card.json", "contour.png", "README.md"],
}


def write_tiny_run(out: str | Path, name: str, kind: str) -> Path:
    """A run folder from the real writers, with a tiny model and made-up numbers."""
    torch.manual_seed(0)
    if kind == "critic":
        critic = models.build("critic", input_shape=(2,), num_outputs=1, width=8, depth=1)
        x_p, x_q = torch.randn(8, 2), torch.randn(8, 2) + 1
        result = wasserstein.WassersteinResult(0.9, 1.0, 0.1, 0.99, 1.0, 0.0)
        config = wasserstein.CriticConfig(samples=8, steps=1)
        return wasserstein.write_run(
            out, name, critic, x_p, x_q, config, result, options={"width": 8, "depth": 1},
            command="test",
        )  # fmt: skip
    model = models.build("groupsort-mlp", input_shape=(1, 8, 8), num_outputs=10, width=8)
    info = data.DataInfo("digits", (1, 8, 8), 10, "held-out", 0, 0.25, 1347, 450)
    radii = torch.linspace(0, 1, 450, dtype=torch.float64)
    evaluation = train.Evaluation(0.5, {0.25: 0.75}, 1.0, None, radii)
    arch = cards.architecture("groupsort-mlp", {"width": 8}, (1, 8, 8), 10)
    return train.write_run(
        out, name, model, arch, info, evaluation, training={}, lower_bound_search=None,
        command="test",
    )  # fmt: skip


#: The writer in a child process: `zoo.runs.write_run_folder`, the one writer of
#: ``train.write_run`` and ``wasserstein.write_run``, writing the files of a folder
#: (``SOURCE OUT NAME FILE...``). It imports no torch, so it starts in a fraction of a
#: second; `test_cli_interrupted_while_writing_is_one_line_and_leaves_nothing` shows the
#: CLI's writer pausing at the same hook.
CHILD = """
import shutil, sys
from pathlib import Path
from zoo.runs import write_run_folder
source, out, name, *files = sys.argv[1:]
copy = lambda f: lambda path: shutil.copyfile(Path(source) / f, path)
write_run_folder(out, name, [(f, copy(f)) for f in files])
"""


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def visible(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not p.name.startswith("."))


def hidden(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name.startswith("."))


#: (signal, the file after which the writer is paused, the kind of run)
KILLS = {
    "sigint-after-checkpoint": (signal.SIGINT, "model.safetensors", "classifier"),
    "sigkill-after-card": (signal.SIGKILL, "card.json", "critic"),
}


def test_a_writer_killed_between_files_leaves_the_earlier_run_and_no_half_folder(tmp_path):
    """SIGINT after the checkpoint and SIGKILL after the card (two writers, side by side)."""
    children, befores = {}, {}
    try:
        for case, (_, after, kind) in KILLS.items():
            out = tmp_path / case
            write_tiny_run(out, "run", kind)
            befores[case] = snapshot(out)
            source = tmp_path / "sources" / case  # the new run's files: other bytes
            source.mkdir(parents=True)
            for name in FILES[kind]:
                (source / name).write_bytes(b"the new run's " + name.encode())
            env = {
                **os.environ,
                "ZOO_TEST_PAUSE_AFTER": after,
                "ZOO_TEST_PAUSE_MARKER": str(tmp_path / f"{case}.paused"),
                "OMP_NUM_THREADS": "1",
            }
            command = [sys.executable, "-c", CHILD, str(source), str(out), "run", *FILES[kind]]
            children[case] = subprocess.Popen(
                command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
            )
        for case, (sig, after, kind) in KILLS.items():
            child, out = children[case], tmp_path / case
            deadline = time.monotonic() + 120
            while not (tmp_path / f"{case}.paused").exists():
                assert child.poll() is None, child.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "the writer never reached the pause"
                time.sleep(0.05)
            # paused between two files: what is written so far is in one hidden folder
            (partial,) = hidden(out)
            assert partial.name.startswith(runs.TEMP_PREFIX)
            so_far = FILES[kind][: FILES[kind].index(after) + 1]
            assert sorted(os.listdir(partial)) == sorted(so_far)
            assert visible(out) == ["run"]
            child.send_signal(sig)
            child.wait(timeout=60)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stderr.close()
    for case, (sig, _, kind) in KILLS.items():
        out, before = tmp_path / case, befores[case]
        assert children[case].returncode != 0
        assert visible(out) == ["run"]
        assert {k: v for k, v in snapshot(out).items() if not k.startswith(".")} == before
        if sig == signal.SIGINT:
            assert hidden(out) == []  # the interrupted writer removed its temporary folder
        else:
            assert len(hidden(out)) == 1  # a killed writer cannot: hidden, cleaned up next time
        rerun = write_tiny_run(out, "run", kind)  # the real writer, in this process
        assert rerun == out / "run-2" and sorted(os.listdir(rerun)) == sorted(FILES[kind])
        assert hidden(out) == []  # the dead writer's leftover is gone
        assert snapshot(out) == {**before, **{f"run-2/{k}": v for k, v in snapshot(rerun).items()}}


WASSERSTEIN = ["wasserstein", "--samples", "16", "--steps", "1", "-o", "width=8", "-o",
               "depth=1", "--no-progress"]  # fmt: skip


def test_cli_rerun_with_the_same_name_keeps_the_earlier_run(tmp_path, capsys):
    out = tmp_path / "new" / "runs"  # created on the way
    write_tiny_run(out, "w", "critic")
    before = snapshot(out / "w")
    assert main([*WASSERSTEIN, "--out", str(out), "--name", "w"]) == 0
    stdout = capsys.readouterr().out
    assert f"run folder               {out / 'w-2'}  ({out / 'w'} exists and is kept)" in stdout
    assert snapshot(out / "w") == before
    assert visible(out) == ["w", "w-2"] and hidden(out) == []
    card = cards.read_card(out / "w-2" / "card.json")
    assert card["checkpoint_sha256"] == cards.sha256(out / "w-2" / "model.safetensors")
    assert card["torch_version"] == torch.__version__


def test_cli_interrupted_while_writing_is_one_line_and_leaves_nothing(
    tmp_path, capsys, monkeypatch
):
    def interrupt(_seconds):
        raise KeyboardInterrupt

    monkeypatch.setenv("ZOO_TEST_PAUSE_AFTER", "card.json")
    monkeypatch.setattr(runs.time, "sleep", interrupt)
    assert main([*WASSERSTEIN, "--out", str(tmp_path), "--name", "w"]) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "python -m zoo wasserstein: interrupted (no run folder was left half written)"
    ]
    assert list(tmp_path.iterdir()) == []


def test_a_failing_writer_leaves_no_folder(tmp_path):
    def broken(path: Path) -> None:
        raise ValueError("disk on fire")

    def ok(path: Path) -> None:
        path.write_text("x")

    with pytest.raises(ValueError, match="disk on fire"):
        runs.write_run_folder(tmp_path, "run", [("a", ok), ("b", broken)])
    assert list(tmp_path.iterdir()) == []

    def full(path: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(ZooError, match=r"cannot write b into .*No space left"):
        runs.write_run_folder(tmp_path, "run", [("a", ok), ("b", full)])
    assert list(tmp_path.iterdir()) == []


def test_the_writer_refuses_a_name_that_is_not_plain(tmp_path):
    for name in ("../x", "a/b", "..", ".hidden"):
        with pytest.raises(ZooError, match="the run name must be a plain folder name"):
            runs.write_run_folder(tmp_path / "out", name, [])
    assert list(tmp_path.iterdir()) == []


def test_taken_names_get_the_next_free_suffix(tmp_path):
    (tmp_path / "run").write_text("a file, not a run")  # a file blocks the name too
    (tmp_path / "run-2").mkdir()
    (tmp_path / "run-2" / "keep").write_text("earlier")

    def ok(path: Path) -> None:
        path.write_text("new")

    assert runs.write_run_folder(tmp_path, "run", [("a", ok)]) == tmp_path / "run-3"
    assert (tmp_path / "run").read_text() == "a file, not a run"
    assert os.listdir(tmp_path / "run-2") == ["keep"]
    assert (tmp_path / "run-3" / "a").read_text() == "new"


def test_only_leftovers_of_dead_writers_on_this_host_are_removed(tmp_path):
    done = subprocess.Popen(["true"])
    done.wait()  # a pid that no longer runs
    host = runs._host()
    dead = tmp_path / f"{runs.TEMP_PREFIX}{host}-{done.pid}-00000000-run"
    alive = tmp_path / f"{runs.TEMP_PREFIX}{host}-{os.getppid()}-00000000-run"
    elsewhere = tmp_path / f"{runs.TEMP_PREFIX}otherhost-{done.pid}-00000000-run"
    for folder in (dead, alive, elsewhere):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")

    def ok(path: Path) -> None:
        path.write_text("new")

    runs.write_run_folder(tmp_path, "run", [("a", ok)])
    assert not dead.exists() and alive.is_dir() and elsewhere.is_dir()
    assert visible(tmp_path) == ["run"]
