"""The zoo: models, checkpoints and cards, the CLI and its messages, shipped checkpoints.

The torchvision loaders are tested in test_zoo_data.py, DDP in test_zoo_ddp.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lipnets
from zoo import cards, data, models, train
from zoo.__main__ import main
from zoo.errors import ZooError

ROOT = Path(__file__).resolve().parents[2]

SMALL = {
    "groupsort-mlp": {"width": 32},
    "lipconvnet": {"width": 4, "depth": 1, "stages": 1},
    "lipconvnet-cayley": {"width": 4, "depth": 1, "stages": 1, "conv": "cayley"},
}


def _small(key: str, input_shape=(1, 8, 8), classes=10) -> tuple[str, dict, torch.nn.Module]:
    name = key.removesuffix("-cayley")
    options = SMALL[key]
    torch.manual_seed(0)
    return (
        name,
        options,
        models.build(name, input_shape=input_shape, num_outputs=classes, **options),
    )


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("key", list(SMALL))
def test_models_are_lipschitz_by_their_measured_bound(key):
    _, _, model = _small(key)
    model.eval()
    bound = float(lipnets.lipschitz_bound(model, input_shape=(1, 1, 8, 8)))
    assert abs(bound - 1.0) < 1e-4  # orthogonal layers: measured, not assumed
    x = torch.rand(64, 1, 8, 8)
    d = 1e-2 * torch.randn_like(x)
    with torch.no_grad():
        slope = (model(x + d) - model(x)).norm(dim=1) / d.flatten(1).norm(dim=1)
    assert float(slope.max()) <= bound * (1 + 1e-5)


def test_lipconvnet_default_shapes_for_every_dataset():
    for shape in [(1, 8, 8), (1, 28, 28), (3, 32, 32)]:
        model = models.build("lipconvnet", input_shape=shape, num_outputs=10).eval()
        with torch.no_grad():
            assert model(torch.rand(2, *shape)).shape == (2, 10)


def test_critic_is_a_one_output_model():
    critic = models.build("critic", input_shape=(2,), num_outputs=1, width=16, depth=2)
    assert critic(torch.randn(5, 2)).shape == (5, 1)
    with pytest.raises(ZooError, match="one output"):
        models.build("critic", input_shape=(2,), num_outputs=3)


def test_unknown_model_option_and_value_are_explained():
    with pytest.raises(ZooError, match="valid models: groupsort-mlp, lipconvnet, critic"):
        models.build("resnet", input_shape=(1, 8, 8), num_outputs=10)
    with pytest.raises(ZooError, match=r"no option 'wdith'.*width"):
        models.build("groupsort-mlp", input_shape=(1, 8, 8), num_outputs=10, wdith=3)
    with pytest.raises(ZooError, match="conv must be one of bcop, cayley"):
        models.build("lipconvnet", input_shape=(1, 8, 8), num_outputs=10, conv="fft")
    with pytest.raises(ZooError, match="takes a int"):
        models.build("groupsort-mlp", input_shape=(1, 8, 8), num_outputs=10, width="wide")
    with pytest.raises(ZooError, match="divisible by 8"):
        models.build("lipconvnet", input_shape=(1, 28, 28), num_outputs=10, stages=3)
    with pytest.raises(ZooError, match="KEY=VALUE"):
        models.parse_options(["width"])


# ---------------------------------------------------------------- data


def test_digits_split_is_seeded_stratified_and_scaled():
    split = data.load("digits")
    x, y = split.train.tensors
    xt, yt = split.test.tensors
    assert x.shape[1:] == (1, 8, 8) and split.info.input_shape == (1, 8, 8)
    assert len(y) + len(yt) == 1797 and len(yt) == split.info.test_size == 450
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # pixels / 16
    assert torch.equal(data.load("digits").test.tensors[0], xt)  # seeded
    counts = torch.bincount(yt, minlength=10)
    assert int(counts.max() - counts.min()) <= 3  # stratified: 25% of 174..183 per class
    # no test image is a training image
    train_rows = {tuple(r.tolist()) for r in x.flatten(1)}
    assert sum(tuple(r.tolist()) in train_rows for r in xt.flatten(1)) < 5  # digits has duplicates


def test_unknown_dataset_and_distribution_list_the_valid_names():
    with pytest.raises(ZooError, match="valid datasets: digits, mnist, fashion-mnist, cifar10"):
        data.load("svhn")
    with pytest.raises(ZooError, match="valid distributions: 8gaussians"):
        data.sample("banana", 10)


def test_distributions_are_seeded():
    for name in data.DISTRIBUTIONS:
        a = data.sample(name, 100, seed=3)
        assert a.shape == (100, 2) and a.dtype == torch.float32
        assert torch.equal(a, data.sample(name, 100, seed=3))


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("key", list(SMALL))
def test_checkpoint_load_gives_identical_outputs(tmp_path, key):
    name, options, model = _small(key)
    digits = data.load("digits")
    cfg = train.TrainConfig(epochs=1, batch_size=64, seed=0)
    train.fit(model, digits.train, cfg, max_steps=2)  # trained weights, off the initial manifold
    arch = cards.architecture(name, options, (1, 8, 8), 10)
    path = cards.save_checkpoint(tmp_path / "m.safetensors", model, arch)
    loaded, found = cards.load_model(path, arch)
    assert found["model"] == name and found["options"] == arch["options"]
    x = digits.test.tensors[0][:64]
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # the export of the loaded model needs no forward pass first (PITFALLS #11)
    with torch.no_grad():
        assert torch.allclose(lipnets.to_vanilla(loaded)(x), model(x), atol=1e-6)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    name, options, model = _small("groupsort-mlp")
    arch = cards.architecture(name, options, (1, 8, 8), 10)
    path = cards.save_checkpoint(tmp_path / "m.safetensors", model, arch)
    other = cards.architecture("lipconvnet", {}, (1, 8, 8), 10)
    with pytest.raises(ZooError, match=r"holds a groupsort-mlp .* not the expected lipconvnet"):
        cards.load_model(path, other)
    wider = cards.architecture(name, {"width": 64}, (1, 8, 8), 10)
    with pytest.raises(ZooError, match="another architecture"):
        cards.load_model(path, wider)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ZooError, match="not written by the zoo"):
        cards.load_model(tmp_path / "foreign.safetensors")


# ---------------------------------------------------------------- training and evaluation


def test_evaluate_certifies_from_the_sound_bound_not_an_assumed_one():
    _, _, model = _small("groupsort-mlp")
    digits = data.load("digits")
    train.fit(model, digits.train, train.TrainConfig(epochs=3, batch_size=128), max_steps=20)
    search = train.LOWER_BOUND["groupsort-mlp"]
    ev = train.evaluate(model, digits.test, [0.0, 0.25, 0.5], lower=search)
    assert ev.lipschitz_bound == float(lipnets.lipschitz_bound(model, input_shape=(1, 1, 8, 8)))
    assert ev.lipschitz_bound != 1.0  # Björck weights are measured, never a nominal 1
    assert ev.lower_bound <= ev.lipschitz_bound
    x, y = digits.test.tensors
    expected = lipnets.certify.certified_accuracy(model, x, y, [0.0, 0.25, 0.5])
    assert ev.certified_accuracy == expected
    assert ev.clean_accuracy == expected[0.0]
    # logits scaled by 2: the measured bound doubles and every radius stays
    doubled = torch.nn.Sequential(model, torch.nn.Identity())
    doubled[1] = torch.nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        doubled[1].weight.copy_(2 * torch.eye(10))
    ev2 = train.evaluate(doubled, digits.test, [0.25], lower=None)
    assert math.isclose(ev2.lipschitz_bound, 2 * ev.lipschitz_bound, rel_tol=1e-6)
    assert ev2.certified_accuracy[0.25] == ev.certified_accuracy[0.25]


def test_cli_train_writes_the_run_folder(tmp_path, capsys):
    rc = main(
        ["train", "groupsort-mlp", "--epochs", "1", "--max-steps", "3", "-o", "width=32",
         "--out", str(tmp_path), "--name", "run", "--no-progress", "--eps", "0.25", "0.5",
         "--crown-points", "10", "--attack-points", "50"]
    )  # fmt: skip
    assert rc == 0
    folder = tmp_path / "run"
    assert {p.name for p in folder.iterdir()} == {
        "card.json", "model.safetensors", "certified.png", "README.md",
    }  # fmt: skip
    card = json.loads((folder / "card.json").read_text())
    for key in ("model", "data", "clean_accuracy", "certified_accuracy", "lipschitz_bound",
                "lower_bound", "lipnets_version", "command"):  # fmt: skip
        assert key in card
    assert card["model"] == "groupsort-mlp" and card["data"]["name"] == "digits"
    assert set(card["certified_accuracy"]) == {"0.25", "0.5"}
    assert card["lipnets_version"] == lipnets.__version__
    assert card["command"].startswith("python -m zoo train groupsort-mlp")
    assert card["training"]["steps"] == 3
    assert (folder / "certified.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "clean accuracy" in out and "sound Lipschitz bound" in out and "lower bound" in out
    # eval reproduces it
    assert main(["eval", str(folder), "--no-progress"]) == 0
    assert "reproduced: yes" in capsys.readouterr().out
    # a card whose model is not the checkpoint's is refused with a clear message
    card["model"], card["options"] = "lipconvnet", {}
    (folder / "card.json").write_text(json.dumps(card))
    assert main(["eval", str(folder), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds a groupsort-mlp" in err and "another architecture" in err


def test_cli_bad_input_messages(tmp_path, capsys):
    assert main(["train", "resnet50"]) == 2
    assert "valid models: groupsort-mlp, lipconvnet, critic" in capsys.readouterr().err
    assert main(["train", "groupsort-mlp", "--data", "imagenet"]) == 2
    assert "valid datasets: digits, mnist, fashion-mnist, cifar10" in capsys.readouterr().err
    rc = main(["train", "groupsort-mlp", "--data", "mnist", "--data-root", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "mnist not found" in err and "--download" in err and str(tmp_path) in err
    assert main(["train", "critic"]) == 2
    assert "python -m zoo wasserstein" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    assert main(["wasserstein", "--p", "banana"]) == 2
    assert "valid distributions" in capsys.readouterr().err


def test_python_m_zoo_list_runs():
    out = subprocess.run(
        [sys.executable, "-m", "zoo", "list"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    for name in ("groupsort-mlp", "lipconvnet", "critic", "digits", "cifar10", "8gaussians"):
        assert name in out
    for name in cards.pretrained():
        assert name in out


# ---------------------------------------------------------------- shipped checkpoints


def test_shipped_checkpoints_are_small_and_named():
    names = cards.pretrained()
    assert {"groupsort-mlp-digits", "lipconvnet-digits"} <= set(names)
    total = sum(p.stat().st_size for p in cards.PRETRAINED.rglob("*") if p.is_file())
    assert total < 1_000_000
    for name in names:
        card = cards.read_card(cards.PRETRAINED / name / "card.json")
        assert card["data"]["name"] == "digits"
        weights = cards.PRETRAINED / name / card["checkpoint"]
        assert cards.sha256(weights) == card["checkpoint_sha256"]


@pytest.mark.parametrize("name", cards.pretrained())
def test_eval_reproduces_every_shipped_card(name, capsys):
    assert main(["eval", name, "--no-progress"]) == 0
    assert "reproduced: yes" in capsys.readouterr().out


def test_shipped_groupsort_mlp_meets_the_digits_targets():
    card = cards.read_card(cards.PRETRAINED / "groupsort-mlp-digits" / "card.json")
    # the reference: deel-torchlip, same shape, 97.7% clean, 69.3% / 91.7% at 0.5 / 0.25
    assert card["clean_accuracy"] >= 0.977
    assert card["certified_accuracy"]["0.5"] >= 0.70
    assert card["certified_accuracy"]["0.25"] >= 0.917
    assert 1.0 - 1e-4 < card["lipschitz_bound"] < 1.0 + 1e-4
    assert card["lower_bound"] <= card["lipschitz_bound"]


# ---------------------------------------------------------------- Wasserstein


def test_wasserstein_critic_is_a_lower_bound_and_writes_its_run(tmp_path, capsys):
    rc = main(
        ["wasserstein", "--samples", "300", "--steps", "60", "-o", "width=32",
         "--out", str(tmp_path), "--name", "w", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    card = json.loads((tmp_path / "w" / "card.json").read_text())
    assert card["wasserstein_estimate"] <= card["exact_w1"] * (1 + 1e-9)
    assert card["wasserstein_estimate"] > 0.8 * card["exact_w1"]
    assert (tmp_path / "w" / "contour.png").is_file()
    assert "exact W1 (POT ot.emd2)" in capsys.readouterr().out
    critic, arch = cards.load_model(tmp_path / "w" / "model.safetensors")
    assert arch["model"] == "critic" and arch["options"]["width"] == 32
    x_p, x_q = data.sample("8gaussians", 300, seed=0), data.sample("gaussian", 300, seed=1)
    estimate = lipnets.losses.wasserstein_estimate(critic, x_p, x_q)
    assert estimate == card["wasserstein_estimate"]  # the checkpoint is the critic of the card
    assert main(["eval", str(tmp_path / "w")]) == 2  # a critic has no test set to reproduce
    assert "python -m zoo wasserstein" in capsys.readouterr().err


def test_wasserstein_critic_matches_exact_w1_on_gaussian_mixtures():
    from zoo import wasserstein

    config = wasserstein.CriticConfig(p="8gaussians", q="gaussian", samples=2000, steps=300)
    critic, x_p, x_q, result = wasserstein.train_critic(config)
    assert result.estimate <= result.exact * (1 + 1e-9)  # a lower bound: the sound L divides
    assert result.relative_gap < 0.02
    assert result.median_gradient_norm >= 0.95
    assert 1.0 <= result.lipschitz_bound < 1.0 + 1e-4
    norms = wasserstein.gradient_norms(critic, torch.cat([x_p, x_q]))
    assert float(norms.max()) <= result.lipschitz_bound * (1 + 1e-5)


def test_cli_certify_with_an_attack_that_breaks_no_certificate(capsys):
    rc = main(["certify", "groupsort-mlp-digits", "--eps", "0.25", "0.5", "--attack", "40",
               "--no-progress"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("certified points broken: 0") == 2
    assert "sound Lipschitz bound" in out
