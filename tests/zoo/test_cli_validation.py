"""Every value of ``python -m zoo`` is checked at the door (`zoo.arguments`).

A refused value gives one line on stderr naming the option, the allowed range
and the value received, exit status 2 and no traceback, before any data are
loaded, any model is trained or any card is read: the tests replace the
loaders and the training loops by functions that fail the test if called.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from zoo import arguments, cards, data, train, wasserstein
from zoo.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_work(monkeypatch):
    """Loading data, training, or reading a run fails the test: a refusal comes first."""

    def forbidden(*_args, **_kwargs):
        raise AssertionError("work started before the command line was checked")

    monkeypatch.setattr(data, "load", forbidden)
    monkeypatch.setattr(train, "fit", forbidden)
    monkeypatch.setattr(wasserstein, "train_critic", forbidden)
    monkeypatch.setattr(cards, "find_run", forbidden)


def refused(capsys, argv: list[str], *fragments: str) -> str:
    """Run the CLI on ``argv``: status 2, one line on stderr holding every fragment."""
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert captured.out == ""
    return lines[0]


COUNT = "must be an integer >= 1"
RATE = "must be a finite number > 0"
WEIGHT = "must be a finite number >= 0"
RADIUS = "a finite number >= 0"
SEED = "must be an integer in [0, 2**32)"

CASES = [
    # (command line, option, allowed range, value as received)
    (["train", "groupsort-mlp", "--epochs", "0"], "--epochs", COUNT, "'0'"),
    (["train", "groupsort-mlp", "--epochs", "-3"], "--epochs", COUNT, "'-3'"),
    (["train", "groupsort-mlp", "--epochs", "1.5"], "--epochs", COUNT, "'1.5'"),
    (["train", "groupsort-mlp", "--max-steps", "0"], "--max-steps", COUNT, "'0'"),
    (["train", "groupsort-mlp", "--threads", "0"], "--threads", COUNT, "'0'"),
    (["wasserstein", "--threads", "-2"], "--threads", COUNT, "'-2'"),
    (["train", "groupsort-mlp", "--batch-size", "0"], "--batch-size", COUNT, "'0'"),
    (["train", "groupsort-mlp", "--lr", "nan"], "--lr", RATE, "'nan'"),
    (["train", "groupsort-mlp", "--lr", "-1"], "--lr", RATE, "'-1'"),
    (["train", "groupsort-mlp", "--lr", "inf"], "--lr", RATE, "'inf'"),
    (["train", "groupsort-mlp", "--lr", "fast"], "--lr", RATE, "'fast'"),
    (["train", "groupsort-mlp", "--margin", "0"], "--margin", RATE, "'0'"),
    (["train", "groupsort-mlp", "--temperature", "0"], "--temperature", RATE, "'0'"),
    (["train", "groupsort-mlp", "--alpha", "-1"], "--alpha", WEIGHT, "'-1'"),
    (["train", "groupsort-mlp", "--weight-decay", "nan"], "--weight-decay", WEIGHT, "'nan'"),
    (["train", "groupsort-mlp", "--seed", "-1"], "--seed", SEED, "'-1'"),
    (["train", "groupsort-mlp", "--eps", "0.25", "-1"], "--eps", RADIUS, "'-1'"),
    (["train", "groupsort-mlp", "--eps", "nan"], "--eps", RADIUS, "'nan'"),
    (["train", "groupsort-mlp", "--name", "../x"], "--name", "plain folder name", "'../x'"),
    (["train", "groupsort-mlp", "--name", "a/b"], "--name", "plain folder name", "'a/b'"),
    (["train", "groupsort-mlp", "--name", ".."], "--name", "plain folder name", "'..'"),
    (["train", "groupsort-mlp", "--name", "."], "--name", "plain folder name", "'.'"),
    (["train", "groupsort-mlp", "--name", ".hidden"], "--name", "starts with a dot", "'.hidden'"),
    (["train", "groupsort-mlp", "--name", ""], "--name", "plain folder name", "''"),
    (["certify", "groupsort-mlp-digits", "--attack", "-5"], "--attack", COUNT, "'-5'"),
    (["certify", "groupsort-mlp-digits", "--attack", "0"], "--attack", COUNT, "'0'"),
    (["certify", "groupsort-mlp-digits", "--eps", "-0.5"], "--eps", RADIUS, "'-0.5'"),
    (["wasserstein", "--steps", "0"], "--steps", COUNT, "'0'"),
    (["wasserstein", "--samples", "0"], "--samples", COUNT, "'0'"),
    (["wasserstein", "--lr", "nan"], "--lr", RATE, "'nan'"),
    (["wasserstein", "--seed", "4294967296"], "--seed", SEED, "'4294967296'"),
    (["wasserstein", "--name", "../../x"], "--name", "plain folder name", "'../../x'"),
    (["demo", "--width", "3"], "--width", "must be an even integer >= 2", "'3'"),
]


@pytest.mark.parametrize(("argv", "option", "allowed", "value"), CASES, ids=lambda v: str(v))
def test_a_bad_value_is_one_line_naming_option_range_and_value(
    capsys, no_work, argv, option, allowed, value
):
    line = refused(capsys, argv, f"argument {option}", allowed, value)
    assert line.startswith(f"python -m zoo {argv[0]}: error: ")


@pytest.mark.parametrize("command", ["train groupsort-mlp", "wasserstein"])
def test_out_must_be_a_writable_folder(tmp_path, capsys, no_work, command):
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "below"):
        argv = [*command.split(), "--out", str(out)]
        refused(capsys, argv, "argument --out", "writable folder", repr(str(out)), "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing created


def test_the_default_out_is_checked_too(tmp_path, capsys, no_work, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("a file where the default --out would go")
    refused(capsys, ["wasserstein"], "argument --out", "got 'runs'", "is a file")
    refused(capsys, ["train", "groupsort-mlp"], "argument --out", "got 'runs'", "is a file")


def test_out_in_a_read_only_folder_is_refused(tmp_path, capsys, no_work, monkeypatch):
    """The permission check itself (as root every folder is writable, so the answer of
    os.access is replaced for the locked folder only)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if Path(path) == locked else real(path, mode)
    )
    refused(capsys, ["wasserstein", "--out", str(locked / "runs")], "--out", "not writable")
    assert not (locked / "runs").exists()


def test_model_options_and_batch_split_are_checked_before_data_are_loaded(
    capsys, no_work, monkeypatch
):
    refused(capsys, ["train", "groupsort-mlp", "-o", "width=0"], "width must be >= 1, got 0")
    refused(capsys, ["train", "lipconvnet", "-o", "width=5"], "width must be even")
    refused(capsys, ["wasserstein", "-o", "depth=0"], "depth must be >= 1, got 0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    refused(
        capsys,
        ["train", "groupsort-mlp", "--batch-size", "3"],
        "--batch-size must be divisible by the number of processes (2), got 3",
    )


def test_argparse_own_errors_are_one_line_too(capsys):
    refused(capsys, ["train"], "the following arguments are required: model")
    refused(capsys, ["train", "groupsort-mlp", "--loss", "mse"], "argument --loss", "'mse'")
    refused(capsys, ["certify"], "RUN_OR_CHECKPOINT")


def test_the_checks_accept_the_edges_of_their_ranges(tmp_path):
    assert arguments.count("1") == 1
    assert arguments.positive("1e-12") == 1e-12
    assert arguments.nonnegative("0") == 0.0
    radius = arguments.radius("-0")
    assert radius == 0.0 and str(radius) == "0.0"  # -0.0 is written as 0.0
    assert arguments.seed("0") == 0 and arguments.seed(str(2**32 - 1)) == 2**32 - 1
    assert arguments.even_width("2") == 2
    assert arguments.run_name("run-1.final") == "run-1.final"
    deep = tmp_path / "a" / "b"
    assert arguments.writable_folder(str(deep)) == deep and not deep.exists()  # created later


def test_python_m_zoo_refuses_with_one_line_and_no_traceback():
    """The real process: exit status 2, one line, nothing on stdout, no run folder."""
    done = subprocess.run(
        [sys.executable, "-m", "zoo", "certify", "groupsort-mlp-digits", "--attack", "-5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr.splitlines() == [
        "python -m zoo certify: error: argument --attack: must be an integer >= 1, got '-5'"
    ]
