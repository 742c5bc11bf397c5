"""``python -m zoo graft``: graft, fine-tune, verify before and after (`zoo.graft`).

Tiny models (the zoo's ``mlp`` at width 16 on digits), one or two epochs: the test checks
what must hold whatever the accuracy is (counts, the card's numbers recomputed from the
checkpoint, refusals at the door), not how good the model is.
"""

from __future__ import annotations

import json

import pytest
import torch

from lipnets.certify import certify_crown
from lipnets.graft import unstable_relus
from lipnets.nn import GraftedReLU
from zoo import cards, data, train
from zoo.__main__ import main
from zoo.graft import load_grafted

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = [
    "--epochs",
    "1",
    "--calib",
    "64",
    "--verify-points",
    "3",
    "--time-limit",
    "0.5",
    "--no-progress",
]


def _run(capsys, argv: list[str]) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def test_recipe_grafts_half_the_neurons_and_the_card_is_reproduced(tmp_path, capsys) -> None:
    out = _run(
        capsys,
        [
            "graft",
            "mlp",
            "-o",
            "width=16",
            "--eps",
            "0.1",
            "--base-epochs",
            "2",
            "--ratio",
            "0.5",
            "--out",
            str(tmp_path),
            "--name",
            "g",
            *FAST,
        ],
    )
    assert "unstable ReLUs per input" in out and "run folder" in out
    card = cards.read_card(tmp_path / "g" / "card.json")  # a valid classifier card
    g = card["graft"]
    assert (g["ratio"], g["score"], g["neurons"], g["grafted_neurons"]) == (0.5, "combined", 32, 16)
    assert sum(g["grafted_per_module"].values()) == 16
    for side in ("before", "after"):
        m = g[side]
        assert m["bab_points"] == 3 and 0 <= m["bab_unknown"] <= 3
        assert m["bab_verified_accuracy"] * 3 + m["bab_falsified"] + m["bab_unknown"] == 3
        assert m["bab_nodes_per_input"] >= 0 and m["bab_seconds_per_input"] > 0
    assert g["before"]["unstable_relus_per_input"] <= 32
    assert g["after"]["unstable_relus_per_input"] <= 16  # grafted neurons are never unstable
    # the checkpoint rebuilds the grafted model, whose numbers are the card's
    model = load_grafted(tmp_path / "g" / "model.safetensors").double()
    grafted = [m for m in model.modules() if isinstance(m, GraftedReLU)]
    assert sum(int(m.mask.sum()) for m in grafted) == 16
    split = data.load("digits", seed=0)
    x, y = train.tensors_of(split.test)
    x = x.double()
    crown = certify_crown(model, x, y, 0.1, norm="inf")
    assert float(crown.double().mean()) == g["after"]["crown_verified_accuracy"]
    assert card["crown_verified_accuracy"]["accuracy"] == {
        "0.1": g["after"]["crown_verified_accuracy"]
    }
    unstable = unstable_relus(model, x, 0.1, norm="inf")
    assert float(unstable.double().mean()) == g["after"]["unstable_relus_per_input"]
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).double().mean()
    assert float(clean) == g["after"]["clean_accuracy"]
    assert card["command"].startswith("python -m zoo graft mlp")


def test_a_trained_run_is_grafted(tmp_path, capsys) -> None:
    _run(
        capsys,
        [
            "train",
            "mlp",
            "-o",
            "width=16",
            "--loss",
            "ce",
            "--epochs",
            "1",
            "--out",
            str(tmp_path),
            "--name",
            "base",
            "--no-progress",
        ],
    )
    _run(
        capsys,
        [
            "graft",
            str(tmp_path / "base"),
            "--eps",
            "0.05",
            "--ratio",
            "0.25",
            "--score",
            "random",
            "--out",
            str(tmp_path),
            "--name",
            "g",
            *FAST,
        ],
    )
    card = json.loads((tmp_path / "g" / "card.json").read_text())
    assert card["graft"]["source_kind"] == "run"
    assert card["graft"]["grafted_neurons"] == 8  # round(0.25 * 32)


def _refused(capsys, argv: list[str], *fragments: str) -> None:
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2 and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    for fragment in fragments:
        assert fragment in captured.err, (fragment, captured.err)


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--ratio", "1.5"], ("argument --ratio", "must be a number in [0, 1]", "'1.5'")),
        (["--ratio", "nan"], ("argument --ratio", "'nan'")),
        (["--score", "magnitude"], ("argument --score", "invalid choice", "combined")),
        (["--epochs", "0"], ("argument --epochs", "must be an integer >= 1")),
        (["--lr", "-1"], ("argument --lr", "must be a finite number > 0")),
        (["--time-limit", "0"], ("argument --time-limit", "must be a finite number > 0")),
        (["--verify-points", "0"], ("argument --verify-points", "must be an integer >= 1")),
        (["--eps", "-0.1"], ("argument --eps", "a finite number >= 0")),
        (["--eps", "0"], ("--eps must be > 0",)),
    ],
)
def test_bad_values_are_refused_at_the_door(tmp_path, capsys, monkeypatch, argv, fragments):
    def forbidden(*_a, **_k):
        raise AssertionError("work started before the command line was checked")

    monkeypatch.setattr(data, "load", forbidden)
    base = ["graft", "mlp", "--out", str(tmp_path / "runs")]
    if "--eps" not in argv:
        base += ["--eps", "0.1"]
    _refused(capsys, base + argv, *fragments)
    assert not (tmp_path / "runs").exists()


def test_sources_are_checked(tmp_path, capsys) -> None:
    _refused(
        capsys,
        ["graft", "no-such-thing", "--eps", "0.1"],
        "neither a run folder",
        "a recipe (a model name",
    )
    _refused(capsys, ["graft", "groupsort-mlp", "--eps", "0.1"], "no nn.ReLU to graft")
    _refused(capsys, ["graft", "mlp", "-o", "activation=maxmin", "--eps", "0.1"], "no nn.ReLU")
    _refused(
        capsys,
        ["graft", "groupsort-mlp-digits", "--eps", "0.1", "--base-epochs", "3"],
        "--base-epochs is for a recipe",
    )
    _refused(capsys, ["graft", "groupsort-mlp-digits", "--eps", "0.1"], "without nn.ReLU")
