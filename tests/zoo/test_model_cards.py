"""Model cards: the README.md of every run, its CROWN and attack numbers, the plot.

A run folder of ``python -m zoo train`` holds ``README.md``, rendered from ``card.json`` by
`zoo.modelcard.render_readme` in the Hugging Face model-card shape, with the card's numbers
exactly. The card's ``crown_certified_accuracy`` and ``attack_robust_accuracy`` are what
CROWN and the attack compute on the realised weights in float64 (recomputed here
independently); a card written before they existed still renders and evaluates.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import lipnets
from lipnets.certify import certified_radius, certify_crown
from lipnets.export import to_vanilla
from zoo import cards, data, hub, modelcard, plots, robustness, runs, train
from zoo.__main__ import main
from zoo.errors import ZooError

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = ("0.1", "0.25", "0.5")
CROWN_POINTS, ATTACK_POINTS = 20, 60
SECTIONS = [
    "## Model description",
    "## Intended use",
    "## Limitations",
    "## Training data",
    "## Training procedure",
    "## Evaluation",
    "## Software",
    "## Licence",
    "## Citation",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real (short) training run of the CLI, with small CROWN and attack budgets."""
    out = tmp_path_factory.mktemp("runs")
    rc = main(
        ["train", "groupsort-mlp", "--epochs", "2", "--max-steps", "20", "-o", "width=16",
         "--eps", *EPS, "--crown-points", str(CROWN_POINTS),
         "--attack-points", str(ATTACK_POINTS), "--out", str(out), "--name", "run",
         "--no-progress", "--device", "cpu"]
    )  # fmt: skip
    assert rc == 0
    return out / "run"


@pytest.fixture
def run(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def _share(share: float, total: int) -> str:
    return f"{100 * share:.1f} % ({round(share * total)}/{total})"


def test_the_readme_is_the_card_rendered_in_the_model_card_shape(trained):
    card = cards.read_card(trained / "card.json")
    text = (trained / "README.md").read_text(encoding="utf-8")
    assert text == modelcard.render_readme(card)
    meta, body = _front_matter(text)
    assert meta["license"] == "mit" and meta["library_name"] == "lipnets"
    assert {"lipnets", "certified-robustness", "groupsort"} <= set(meta["tags"])
    assert meta["datasets"] == ["digits"]
    assert {"accuracy", "certified-accuracy", "attack-robust-accuracy"} <= set(meta["metrics"])
    (index,) = meta["model-index"]
    values = {m["name"]: m["value"] for m in index["results"][0]["metrics"]}
    assert values["clean accuracy"] == card["clean_accuracy"]
    for key in EPS:
        assert (
            values[f"Lipschitz-certified accuracy (l2, eps={key})"]
            == (card["certified_accuracy"][key])
        )
        crown = f"CROWN-certified accuracy (l2, eps={key}, first {CROWN_POINTS} test samples)"
        assert values[crown] == card["crown_certified_accuracy"]["accuracy"][key]
        attack = f"attack-robust accuracy (l2, eps={key}, first {ATTACK_POINTS} test samples)"
        assert values[attack] == card["attack_robust_accuracy"]["accuracy"][key]
    positions = [body.index(f"\n{title}\n") for title in SECTIONS]
    assert positions == sorted(positions)


def test_the_readme_states_the_card_numbers_exactly(trained):
    card = cards.read_card(trained / "card.json")
    text = (trained / "README.md").read_text(encoding="utf-8")
    n = card["data"]["test_size"]
    crown, attack = card["crown_certified_accuracy"], card["attack_robust_accuracy"]
    assert f"clean accuracy {_share(card['clean_accuracy'], n)}" in text
    header = (
        f"| eps | Lipschitz-certified (all {n}) | CROWN-certified (first {CROWN_POINTS}) | "
        f"Lipschitz-certified (first {CROWN_POINTS}) | attack-robust (first {ATTACK_POINTS}) | "
        f"Lipschitz-certified (first {ATTACK_POINTS}) |"
    )
    assert header in text
    for key in EPS:
        row = (
            f"| {key} | {_share(card['certified_accuracy'][key], n)} | "
            f"{_share(crown['accuracy'][key], CROWN_POINTS)} | "
            f"{_share(crown['lipschitz_accuracy'][key], CROWN_POINTS)} | "
            f"{_share(attack['accuracy'][key], ATTACK_POINTS)} | "
            f"{_share(attack['lipschitz_accuracy'][key], ATTACK_POINTS)} |"
        )
        assert row in text, row
    # the bound with every digit of its float64 value, not rounded to 1.000000
    assert f"L ≤ {card['lipschitz_bound']!r}" in text
    assert repr(card["lower_bound"]) in text
    assert f"- torch {torch.__version__}" in text and card["torch_version"] == torch.__version__
    assert f"- lipnets {lipnets.__version__}" in text
    assert f"`{card['command']}`" in text
    assert card["checkpoint_sha256"] in text
    for key, value in card["training"].items():
        assert f"| `{key}` | `{json.dumps(value)}` |" in text or f"| `{key}` | `{value}` |" in text
    for entry in ("@software{lipnets", "@inproceedings{anil2019sorting",
                  "@inproceedings{zhang2018efficient"):  # fmt: skip
        assert entry in text
    assert f"version = {{{lipnets.__version__}}}" in text


def test_the_limitations_say_where_the_certificates_hold(trained):
    text = (trained / "README.md").read_text(encoding="utf-8")
    limitations = text.split("## Limitations\n", 1)[1].split("\n## ", 1)[0]
    assert (
        "Certificates hold for the l2 radius stated, for inputs in the stated range "
        "(pixels [0, 1], no normalisation, preprocessed as in training), for this checkpoint"
    ) in limitations
    assert "Float32 rounding" in limitations and "float64" in limitations
    assert f"first {CROWN_POINTS} test samples only" in limitations
    assert "upper* bound" in limitations  # the attack certifies nothing


def test_the_crown_and_attack_numbers_are_what_they_say(trained):
    """Recomputed independently: certify_crown and the Lipschitz radius on a float64 copy of
    the realised weights; the attack's share lies between the certified and clean ones."""
    card = cards.read_card(trained / "card.json")
    model, _ = hub.load_run(trained)
    frozen = to_vanilla(model).double()
    x, y = train.tensors_of(data.load("digits", seed=0).test)
    x = x.double()
    bound = lipnets.lipschitz_bound(frozen, input_shape=(1, 1, 8, 8))
    assert float(bound) == pytest.approx(card["lipschitz_bound"], rel=1e-9)
    crown, attack = card["crown_certified_accuracy"], card["attack_robust_accuracy"]
    assert crown["points"] == CROWN_POINTS and attack["points"] == ATTACK_POINTS
    assert (attack["steps"], attack["restarts"], attack["seed"]) == (50, 2, 0)
    with torch.no_grad():
        logits = frozen(x[:ATTACK_POINTS])
    radii = certified_radius(logits, y[:ATTACK_POINTS], bound)
    clean = float((radii > 0).double().mean())
    for key in EPS:
        eps = float(key)
        by_crown = certify_crown(frozen, x[:CROWN_POINTS], y[:CROWN_POINTS], eps, norm=2)
        assert crown["accuracy"][key] == int(by_crown.sum()) / CROWN_POINTS
        assert crown["lipschitz_accuracy"][key] == (
            int((radii[:CROWN_POINTS] > eps).sum()) / CROWN_POINTS
        )
        lipschitz = float((radii > eps).double().mean())
        assert attack["lipschitz_accuracy"][key] == lipschitz
        assert lipschitz <= attack["accuracy"][key] <= clean
    assert attack["broken_certified"] == 0


def test_eval_recomputes_the_new_numbers_and_old_cards_still_evaluate(run, capsys):
    assert main(["eval", str(run), "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for key in EPS:
        assert f"crown_certified[{key}]" in out and f"attack_robust[{key}]" in out
    assert "reproduced: yes" in out
    # an edited CROWN number is found out
    card = json.loads((run / "card.json").read_text())
    edited = dict(card)
    edited["crown_certified_accuracy"] = {
        **card["crown_certified_accuracy"],
        "accuracy": {**card["crown_certified_accuracy"]["accuracy"], "0.1": 1.0},
    }
    (run / "card.json").write_text(json.dumps(edited))
    assert main(["eval", str(run), "--no-progress", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "crown_certified[0.1]" in out and "reproduced: NO" in out
    # a card written before the fields existed: checked, rendered, evaluated without them
    old = {k: v for k, v in card.items() if k not in (
        "crown_certified_accuracy", "attack_robust_accuracy", "torch_version")}  # fmt: skip
    (run / "card.json").write_text(json.dumps(old))
    cards.read_card(run / "card.json")
    text = modelcard.render_readme(old)
    assert "not computed" in text and "torch not recorded in this card" in text
    assert "CROWN-certified accuracy (l2" not in text and "pgd_l2`, 50 steps" not in text
    assert main(["eval", str(run), "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "reproduced: yes" in out and "crown_certified" not in out


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("crown_certified_accuracy", lambda f: f.update(points=0)),
        ("crown_certified_accuracy", lambda f: f.pop("lipschitz_accuracy")),
        ("attack_robust_accuracy", lambda f: f.update(attack="fgsm")),
        ("attack_robust_accuracy", lambda f: f["accuracy"].update({"0.1": 1.5})),
    ],
)
def test_malformed_robustness_fields_are_refused_naming_the_field(trained, field, change):
    card = json.loads((trained / "card.json").read_text())
    change(card[field])
    with pytest.raises(ZooError, match=f"field '{field}' must be an object of"):
        cards.check_card(card, "card.json")


def test_crown_and_attack_can_be_left_out_and_nothing_is_made_up(tmp_path, capsys):
    rc = main(
        ["train", "groupsort-mlp", "--max-steps", "2", "-o", "width=8", "--eps", "0.25",
         "--crown-points", "0", "--attack-points", "0", "--out", str(tmp_path), "--name", "r",
         "--no-progress", "--device", "cpu"]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "CROWN-certified" not in out and "attack-robust" not in out
    card = cards.read_card(tmp_path / "r" / "card.json")
    assert "crown_certified_accuracy" not in card and "attack_robust_accuracy" not in card
    text = (tmp_path / "r" / "README.md").read_text(encoding="utf-8")
    share = _share(card["certified_accuracy"]["0.25"], 450)
    assert f"| 0.25 | {share} | not computed | not computed |" in text
    assert "| eps | Lipschitz-certified (all 450) | CROWN-certified | attack-robust |" in text


def test_a_bad_points_value_is_refused_at_the_door(capsys):
    assert main(["train", "groupsort-mlp", "--crown-points", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "python -m zoo train: error: argument --crown-points: must be an integer >= 0, got '-1'"
    )


def test_a_critic_run_gets_its_readme_too(tmp_path):
    rc = main(
        ["wasserstein", "--samples", "16", "--steps", "2", "-o", "width=8", "-o", "depth=1",
         "--no-progress", "--out", str(tmp_path), "--name", "w"]
    )  # fmt: skip
    assert rc == 0
    card = cards.read_card(tmp_path / "w" / "card.json")
    text = (tmp_path / "w" / "README.md").read_text(encoding="utf-8")
    assert text == modelcard.render_readme(card)
    meta, body = _front_matter(text)
    assert meta["license"] == "mit" and "wasserstein" in meta["tags"]
    for title in SECTIONS:
        assert f"\n{title}\n" in body
    assert repr(card["exact_w1"]) in text and repr(card["wasserstein_estimate"]) in text


def test_a_card_that_fails_its_check_leaves_no_run_folder(tmp_path):
    """The README is rendered from the written card inside the temporary folder: a card
    that does not pass `check_card` stops the whole run folder."""

    def bad_card(path: Path) -> None:
        path.write_text(json.dumps({"model": "groupsort-mlp"}))

    with pytest.raises(ZooError, match="field 'options' is missing"):
        runs.write_run_folder(tmp_path, "run", [("card.json", bad_card)])
    assert list(tmp_path.iterdir()) == []


def test_the_certified_plot_is_written(trained, tmp_path):
    assert (trained / "certified.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    radii = torch.linspace(0, 1, 50, dtype=torch.float64)
    path = plots.certified_curve(
        tmp_path / "curve.png", radii, {0.25: 0.7}, title="t", bound=1.0000007602333363,
        attack={0.25: 0.8, 0.5: 0.4}, crown={0.25: 0.1}, attack_label="a", crown_label="c",
    )  # fmt: skip
    content = path.read_bytes()
    assert content[:8] == b"\x89PNG\r\n\x1a\n" and len(content) > 1000
    card = cards.read_card(trained / "card.json")
    curves = plots.robustness_curves(card, card["data"]["test_size"])
    assert curves["attack"] == {float(k): v for k, v in card["attack_robust_accuracy"][
        "accuracy"].items()}  # fmt: skip
    assert f"first {CROWN_POINTS} test samples" in curves["crown_label"]
    assert f"first {ATTACK_POINTS} test samples" in curves["attack_label"]


def test_the_budget_table_covers_every_classifier():
    from zoo import models

    classifiers = {name for name, spec in models.MODELS.items() if spec.kind == "classifier"}
    assert set(robustness.ROBUSTNESS) == classifiers
