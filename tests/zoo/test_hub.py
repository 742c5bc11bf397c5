"""The zoo's registry (`zoo.hub`): names, shipped checkpoints, loading from an installed copy.

``zoo.list_models()`` names the architectures and ``zoo.list_models(pretrained=True)`` the
shipped checkpoints; ``zoo.load_pretrained(name)`` returns the model in eval mode and its
card, only after the checkpoint's SHA-256 matched the card's. The shipped runs are found as
package data, so a copy of the package outside the checkout loads them too.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lipnets
import zoo
from zoo import cards, data, models, train
from zoo.errors import ZooError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ["groupsort-mlp-digits", "lipconvnet-digits"]


def test_list_models_names_the_architectures_and_the_shipped_checkpoints():
    assert zoo.list_models() == sorted(models.MODELS) == ["critic", "groupsort-mlp",
                                                          "lipconvnet", "mlp"]  # fmt: skip
    assert zoo.list_models(pretrained=True) == SHIPPED == cards.pretrained()
    with pytest.raises(TypeError, match="pretrained must be True or False, got 'yes'"):
        zoo.list_models(pretrained="yes")


@pytest.mark.parametrize("name", SHIPPED)
def test_load_pretrained_gives_the_checkpoint_in_eval_mode_with_its_card(name):
    model, card = zoo.load_pretrained(name)
    assert not model.training and all(not m.training for m in model.modules())
    assert card == cards.read_card(cards.PRETRAINED / name / "card.json")
    reference, _ = cards.load_model(cards.PRETRAINED / name / "model.safetensors")
    x, y = train.tensors_of(data.load("digits", seed=0).test)
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(logits, reference(x))
    correct = (logits.argmax(dim=1) == y).double().mean()
    assert float(correct) == pytest.approx(card["clean_accuracy"], abs=1 / len(y))
    bound = lipnets.lipschitz_bound(model, input_shape=(1, *card["data"]["input_shape"]))
    assert float(bound) == pytest.approx(card["lipschitz_bound"], rel=1e-6)


def test_unknown_names_are_refused_with_the_allowed_ones():
    with pytest.raises(ZooError) as caught:
        zoo.load_pretrained("resnet50")
    message = str(caught.value)
    assert message.startswith("unknown pretrained model 'resnet50'; shipped checkpoints: ")
    assert "groupsort-mlp-digits, lipconvnet-digits" in message
    with pytest.raises(ZooError, match="'groupsort-mlp' is an architecture without shipped"):
        zoo.load_pretrained("groupsort-mlp")
    with pytest.raises(ZooError, match="unknown pretrained model 3;"):
        zoo.load_pretrained(3)
    with pytest.raises(ZooError, match=r"unknown pretrained model '\.\./groupsort-mlp-digits'"):
        zoo.load_pretrained("../groupsort-mlp-digits")


def test_load_run_refuses_a_folder_without_a_card(tmp_path):
    with pytest.raises(ZooError, match=r"is not a run folder: it has no card\.json"):
        zoo.load_run(tmp_path)


#: Run in a copy of the package outside the checkout: the shipped runs are found as package
#: data, then a tampered checkpoint is refused.
INSTALLED = """
import sys
from pathlib import Path
import zoo
site = Path(sys.argv[1]).resolve()
assert Path(zoo.__file__).resolve().is_relative_to(site), zoo.__file__
print(zoo.list_models(pretrained=True))
model, card = zoo.load_pretrained("groupsort-mlp-digits")
print(type(model).__name__, model.training, card["checkpoint_sha256"][:12])
weights = site / "zoo" / "pretrained" / "groupsort-mlp-digits" / "model.safetensors"
raw = bytearray(weights.read_bytes())
raw[-1] ^= 1
weights.write_bytes(bytes(raw))
try:
    zoo.load_pretrained("groupsort-mlp-digits")
except zoo.errors.ZooError as error:
    print("refused:", error)
"""


def test_an_installed_copy_loads_its_own_checkpoints_and_refuses_a_tampered_one(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(ROOT / "zoo", site / "zoo", ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "elsewhere"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", INSTALLED, str(site)],
        cwd=work,
        env={"PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == str(SHIPPED)
    sha = cards.read_card(cards.PRETRAINED / "groupsort-mlp-digits" / "card.json")[
        "checkpoint_sha256"
    ]
    assert lines[1] == f"Sequential False {sha[:12]}"
    assert lines[2].startswith("refused: checkpoint ")
    assert "does not match its card" in lines[2] and sha in lines[2]
    # the checkout's own checkpoint is untouched
    assert cards.sha256(cards.PRETRAINED / "groupsort-mlp-digits" / "model.safetensors") == sha
