"""The zoo's certified-training recipe: ``python -m zoo train mlp --loss crown-ibp --eps 0.1``.

A short run writes a card with the CROWN-verified accuracy and its plot, which ``eval``
reproduces exactly; the verified numbers are those of `certify_crown` on a float64 copy;
the new options are checked at the door (one line, status 2, before any data are loaded).
"""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch

from lipnets.certify import certify_crown
from zoo import arguments, cards, certified, data, models, train
from zoo.__main__ import main
from zoo.errors import ZooError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_certified_training_writes_and_reproduces_its_card(tmp_path, capsys):
    rc = main(
        ["train", "mlp", "--loss", "crown-ibp", "--eps", "0.1", "0.05", "--epochs", "2",
         "--max-steps", "30", "--warmup", "0", "--ramp", "1", "-o", "width=16",
         "--out", str(tmp_path), "--name", "run", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    folder = tmp_path / "run"
    assert {p.name for p in folder.iterdir()} == {
        "card.json", "model.safetensors", "certified.png", "verified.png", "README.md",
    }  # fmt: skip
    card = json.loads((folder / "card.json").read_text())
    field = card["crown_verified_accuracy"]
    assert field["norm"] == "inf" and field["method"] == "crown" and field["dtype"] == "float64"
    assert set(field["accuracy"]) == {"0.1", "0.05"}
    assert card["training"]["loss"] == "crown-ibp"
    assert card["training"]["certified"] == {
        "norm": "inf", "eps": [0.1, 0.05], "warmup": 0.0, "ramp": 1.0, "kappa_end": 0.0,
    }  # fmt: skip
    assert set(card["certified_accuracy"]) == {"0.1", "0.25", "0.5", "0.75", "1"}  # l2 defaults
    assert (folder / "verified.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "CROWN-verified (l-inf)" in capsys.readouterr().out
    # the card's numbers are certify_crown's on a float64 copy of the checkpoint
    model, _ = cards.load_model(folder / "model.safetensors")
    split = data.load("digits", seed=0)
    x, y = train.tensors_of(split.test)
    verified = certify_crown(copy.deepcopy(model).double(), x.double(), y, 0.1, norm="inf")
    assert field["accuracy"]["0.1"] == int(verified.sum()) / len(y)
    with torch.no_grad():
        correct = model.double()(x.double()).argmax(1) == y
    assert not bool((verified & ~correct).any())
    assert main(["eval", str(folder), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "crown_verified_accuracy[0.1]" in out and "reproduced: yes" in out
    # eval's rows: the card's number next to the recomputed one, compared exactly
    field["accuracy"]["0.1"] = min(1.0, field["accuracy"]["0.1"] + 0.5)
    rows = certified.eval_rows(card, model.float(), split.test)
    assert [r[0] for r in rows] == ["crown_verified_accuracy[0.1]", "crown_verified_accuracy[0.05]"]
    assert rows[0][1] != rows[0][2] and rows[0][2] == int(verified.sum()) / len(y)
    assert rows[0][3] == 0.0 and certified.eval_rows({}, model, split.test) == []


def test_fit_with_a_certified_loss_lowers_it():
    split = data.load("digits", seed=0)
    torch.manual_seed(0)
    model = models.build("mlp", input_shape=(1, 8, 8), num_outputs=10, width=16,
                         activation="maxmin")  # fmt: skip
    options = certified.CertifiedOptions(eps=(0.05,), warmup=0.0, ramp=0.0)
    config = train.default_config("mlp", epochs=3, loss="ibp")
    history = train.fit(model, split.train, config, certified=options, max_steps=60)
    assert history.steps == 60 and history.losses[-1] < history.losses[0]
    with pytest.raises(ZooError, match="go together"):
        train.fit(model, split.train, train.default_config("mlp", loss="hinge"), certified=options)
    with pytest.raises(ZooError, match="go together"):
        train.fit(model, split.train, train.default_config("mlp", loss="crown-ibp"))
    with pytest.raises(ZooError, match="is certified training: it reads the model"):
        train.make_loss(train.default_config("mlp", loss="crown-ibp"))


def _args(**given) -> argparse.Namespace:
    base = {"eps": None, "warmup": None, "ramp": None, "kappa_end": None}
    return argparse.Namespace(**{**base, **given})


def test_options_are_checked_before_any_work():
    with pytest.raises(ZooError, match="give their radius with --eps"):
        certified.options_from(_args(), "crown-ibp")
    with pytest.raises(ZooError, match=r"needs a radius --eps > 0, got 0"):
        certified.options_from(_args(eps=[0.0]), "ibp")
    with pytest.raises(ZooError, match=r"--ramp is an option of certified training.*--loss hinge"):
        certified.options_from(_args(ramp=3.0), "hinge")
    with pytest.raises(ZooError, match="runs on one process, got 2"):
        certified.options_from(_args(eps=[0.1]), "crown-ibp", world_size=2)
    assert certified.options_from(_args(eps=[0.1, 0.2], kappa_end=0.5), "ibp") == (
        certified.CertifiedOptions(eps=(0.1, 0.2), kappa_end=0.5)
    )
    assert certified.options_from(_args(eps=[0.1]), "ce") is None
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be a number in \[0, 1\], got '2'"):
        arguments.unit("2")
    assert arguments.unit("-0") == 0.0 and arguments.unit("0.25") == 0.25


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--loss", "crown-ibp"], ["give their radius with --eps"]),
        (["--loss", "hinge", "--warmup", "2"], ["--warmup is an option of certified training"]),
        (["--loss", "ibp", "--eps", "0.1", "--kappa-end", "1.5"],
         ["--kappa-end", "must be a number in [0, 1]", "'1.5'"]),
        (["--loss", "ibp", "--eps", "0.1", "--ramp", "-1"],
         ["--ramp", "must be a finite number >= 0", "'-1'"]),
        (["--loss", "l1"], ["--loss", "invalid choice", "'l1'"]),
        (["-o", "activation=tanh"], ["mlp option activation must be one of relu, maxmin"]),
        (["-o", "activation=maxmin", "-o", "width=15"], ["needs an even width", "15"]),
    ],
)  # fmt: skip
def test_cli_refuses_bad_certified_options_at_the_door(monkeypatch, capsys, argv, fragments):
    def forbidden(*_args, **_kwargs):
        raise AssertionError("work started before the command line was checked")

    monkeypatch.setattr(data, "load", forbidden)
    monkeypatch.setattr(train, "fit", forbidden)
    assert main(["train", "mlp", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_a_malformed_verified_field_is_refused(tmp_path):
    card = {
        "model": "mlp", "options": {}, "lipschitz_bound": 2.0, "lipnets_version": "0",
        "command": "c", "checkpoint": "model.safetensors", "checkpoint_sha256": "0" * 64,
        "data": {"name": "digits", "input_shape": [1, 8, 8], "num_classes": 10},
        "clean_accuracy": 0.9, "certified_accuracy": {"0.1": 0.1}, "lower_bound": None,
    }  # fmt: skip
    assert cards.check_card(dict(card), tmp_path / "card.json")
    bad = {"norm": "inf", "method": "crown", "dtype": "float64", "accuracy": {"0.1": 1.5}}
    with pytest.raises(ZooError, match="field 'crown_verified_accuracy' must be an object"):
        cards.check_card({**card, "crown_verified_accuracy": bad}, tmp_path / "card.json")
