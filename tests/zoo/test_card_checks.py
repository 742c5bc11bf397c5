"""Cards are checked when read, checkpoints verified before they are loaded (`zoo.cards`).

A malformed card (bad JSON, a missing field, a wrong type), a checkpoint path
that leaves the card's folder, or a checkpoint whose SHA-256 is not the
card's gives one line on stderr and status 2, never a traceback and never
numbers; ``eval`` says why a card does not reproduce.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import lipnets
from zoo import cards, data, models, train
from zoo.__main__ import main
from zoo.errors import ZooError

ARCH = cards.architecture("groupsort-mlp", {"width": 8}, (1, 8, 8), 10)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build("groupsort-mlp", input_shape=(1, 8, 8), num_outputs=10, width=8)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """A real classifier run (untrained width-8 model, its true numbers, no lower bound)."""
    digits = data.load("digits")
    model = _model(0)
    evaluation = train.evaluate(model, digits.test, [0.25, 0.5], lower=None)
    return train.write_run(
        tmp_path_factory.mktemp("runs"), "run", model, ARCH, digits.info, evaluation,
        training={}, lower_bound_search=None, command="python -m zoo train groupsort-mlp",
    )  # fmt: skip


@pytest.fixture
def run(written, tmp_path) -> Path:
    return Path(shutil.copytree(written, tmp_path / "run"))


def edit(run: Path, change) -> None:
    card = json.loads((run / "card.json").read_text())
    change(card)
    (run / "card.json").write_text(json.dumps(card))


def refused(capsys, argv: list[str], *fragments: str) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, (captured.out, captured.err)
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "accuracy" not in captured.out  # no numbers reported
    return lines[0]


def evaluate(run: Path) -> list[str]:
    return ["eval", str(run), "--no-progress", "--device", "cpu"]


def certify(target: Path) -> list[str]:
    return ["certify", str(target), "--no-progress", "--device", "cpu", "--eps", "0.25"]


# ---------------------------------------------------------------- schema


def _delete(dotted: str):
    def change(card: dict) -> None:
        *parents, last = dotted.split(".")
        for key in parents:
            card = card[key]
        del card[last]

    return change


def _set(dotted: str, value):
    def change(card: dict) -> None:
        *parents, last = dotted.split(".")
        for key in parents:
            card = card[key]
        card[last] = value

    return change


MALFORMED = [
    ("model", _delete("model"), "field 'model' is missing"),
    ("sha256", _delete("checkpoint_sha256"), "field 'checkpoint_sha256' is missing"),
    ("accuracy", _delete("clean_accuracy"), "field 'clean_accuracy' is missing"),
    ("shape", _delete("data.input_shape"), "field 'data.input_shape' is missing"),
    ("bound-str", _set("lipschitz_bound", "1.0"), "field 'lipschitz_bound' must be a finite"),
    ("bound-nan", _set("lipschitz_bound", float("nan")), "field 'lipschitz_bound' must be"),
    ("radii-list", _set("certified_accuracy", [0.5]), "field 'certified_accuracy' must be"),
    ("radii-neg", _set("certified_accuracy", {"-1": 0.5}), "field 'certified_accuracy' must"),
    ("acc-bool", _set("clean_accuracy", True), "field 'clean_accuracy' must be a number in"),
    ("acc-big", _set("clean_accuracy", 1.5), "field 'clean_accuracy' must be a number in"),
    ("data-str", _set("data", "digits"), "field 'data' must be an object"),
    ("options", _set("options", [8]), "field 'options' must be an object"),
    ("shape-str", _set("data.input_shape", "8x8"), "field 'data.input_shape' must be"),
    ("model-unknown", _set("model", "resnet"), "field 'model' must be a zoo model"),
    ("sha-short", _set("checkpoint_sha256", "abc"), "field 'checkpoint_sha256' must be"),
    ("checkpoint-int", _set("checkpoint", 5), "field 'checkpoint' must be"),
    ("version", _set("lipnets_version", None), "field 'lipnets_version' must be"),
    ("search", _set("lower_bound", 0.9), "field 'lower_bound_search' must say how"),
]


@pytest.mark.parametrize(("change", "message"), [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])  # fmt: skip
def test_a_malformed_card_is_one_line_naming_the_field(run, capsys, change, message):
    edit(run, change)
    line = refused(capsys, evaluate(run), message, "is not a valid zoo model card")
    assert str(run / "card.json") in line
    with pytest.raises(ZooError, match="is not a valid zoo model card"):
        cards.read_card(run / "card.json")


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "not JSON (Expecting property name"), ("[1, 2]", "it holds a JSON list"),
     ("", "not JSON"), ("\udcff", "cannot read the model card")],
    ids=["bad-json", "a-list", "empty", "not-utf8"],
)  # fmt: skip
def test_an_unreadable_card_is_one_line(run, capsys, text, message):
    (run / "card.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    refused(capsys, evaluate(run), message, str(run / "card.json"))
    refused(capsys, certify(run), message)


def test_shipped_cards_pass_the_check():
    for name in cards.pretrained():
        card = cards.read_card(cards.PRETRAINED / name / "card.json")
        path = cards.checkpoint_of(card, cards.PRETRAINED / name / "card.json")
        cards.verify_checkpoint(path, card, cards.PRETRAINED / name / "card.json")


# ---------------------------------------------------------------- the checkpoint's path


def test_a_checkpoint_path_outside_the_card_folder_is_refused(run, capsys, tmp_path):
    outside = tmp_path / "model.safetensors"  # a real checkpoint beside the run folder
    shutil.copy(run / "model.safetensors", outside)
    edit(run, _set("checkpoint", str(run / "model.safetensors")))  # absolute, even if inside
    refused(capsys, evaluate(run), "field 'checkpoint'", "must be a path relative")
    edit(run, _set("checkpoint", "../model.safetensors"))
    refused(capsys, evaluate(run), "field 'checkpoint'", "must stay inside", "'../model")
    edit(run, _set("checkpoint", "sub/../../model.safetensors"))
    refused(capsys, certify(run), "field 'checkpoint'", "no '..'")
    (run / "link.safetensors").symlink_to(outside)
    edit(run, _set("checkpoint", "link.safetensors"))
    refused(capsys, evaluate(run), "leads outside the card's folder", str(outside))
    (run / "model.safetensors").unlink()
    edit(run, _set("checkpoint", "model.safetensors"))
    refused(capsys, evaluate(run), "no checkpoint at", str(run / "model.safetensors"))


# ---------------------------------------------------------------- the checkpoint's digest


def test_a_tampered_checkpoint_is_refused_with_both_digests(run, capsys):
    weights = run / "model.safetensors"
    expected = json.loads((run / "card.json").read_text())["checkpoint_sha256"]
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01  # one bit of the last weight: still a loadable checkpoint
    weights.write_bytes(bytes(raw))
    cards.load_model(weights)  # loadable: only the digest tells
    actual = cards.sha256(weights)
    for argv in (evaluate(run), certify(run), certify(weights)):
        refused(capsys, argv, str(weights), f"its sha256 is {actual}", expected, "not loaded")


def test_certify_refuses_a_swapped_checkpoint(run, capsys):
    cards.save_checkpoint(run / "model.safetensors", _model(1), ARCH)  # same architecture
    refused(capsys, certify(run), "does not match its card", "swapped")
    refused(capsys, certify(run / "model.safetensors"), "does not match its card")


# ---------------------------------------------------------------- why a card does not reproduce


def test_eval_reproduces_the_card_and_says_why_not_when_it_does_not(run, capsys):
    assert main(evaluate(run)) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "reproduced: yes"

    edit(run, _set("lipnets_version", "0.0.1"))  # numbers still reproduce: said, not failed
    assert main(evaluate(run)) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"reproduced: yes (the card was written by lipnets 0.0.1, this is lipnets "
        f"{lipnets.__version__})"
    )

    clean = json.loads((run / "card.json").read_text())["clean_accuracy"]
    edit(run, _set("clean_accuracy", clean + 0.0625 if clean <= 0.5 else clean - 0.0625))
    assert main(evaluate(run)) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(
        "reproduced: NO: 1 number(s) differ beyond their tolerance (clean_accuracy); "
        "the checkpoint is the card's (sha256 verified); the card was written by lipnets 0.0.1"
    )

    edit(run, _set("lipnets_version", lipnets.__version__))
    edit(run, lambda card: card["certified_accuracy"].update({"0.25": 1.0}))
    assert main(evaluate(run)) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert "(clean_accuracy, certified_accuracy[0.25])" in last
    assert "same lipnets and torch versions and test set size" in last
