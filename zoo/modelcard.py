"""The human-readable model card: ``README.md`` rendered from ``card.json``.

Every run folder and shipped checkpoint holds a ``README.md`` next to its ``card.json``, in
the shape of a Hugging Face model card: YAML front matter (``license``, ``library_name``,
``tags``, ``datasets``, ``metrics``, ``model-index``), then the model description, intended
use, limitations, training data, training procedure, evaluation, software, licence and
citation. `render_readme` makes it from the card alone, so the text cannot disagree with
the numbers: every number is the card's, every share is shown with the count it is made
of, and a number the card does not hold (a card written before CROWN and attack numbers
were recorded) is said to be not computed, never filled in. `zoo.runs.write_run_folder`
writes it with the rest of the run folder, whole or not at all.

The sound Lipschitz bound is printed with every digit of its float64 value
(``repr``): 1.0000007602333363 is not 1, and the card says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["README", "render_readme", "write_readme"]

README = "README.md"

_BIBTEX = {
    "lipnets": """@software{{lipnets,
  title = {{lipnets: Lipschitz-by-construction {{PyTorch}} layers with sound,
           graph-composed {{Lipschitz}} bounds}},
  author = {{{{The lipnets developers}}}},
  version = {{{version}}},
  license = {{MIT}},
}}""",
    "anil2019": """@inproceedings{anil2019sorting,
  title = {Sorting Out {Lipschitz} Function Approximation},
  author = {Anil, Cem and Lucas, James and Grosse, Roger},
  booktitle = {Proceedings of the 36th International Conference on Machine Learning},
  series = {Proceedings of Machine Learning Research},
  volume = {97},
  pages = {291--301},
  year = {2019},
}""",
    "li2019": """@inproceedings{li2019preventing,
  title = {Preventing Gradient Attenuation in {Lipschitz} Constrained Convolutional Networks},
  author = {Li, Qiyang and Haque, Saminul and Anil, Cem and Lucas, James and Grosse, Roger
            and Jacobsen, J{\\"o}rn-Henrik},
  booktitle = {Advances in Neural Information Processing Systems},
  volume = {32},
  year = {2019},
}""",
    "trockman2021": """@inproceedings{trockman2021orthogonalizing,
  title = {Orthogonalizing Convolutional Layers with the {Cayley} Transform},
  author = {Trockman, Asher and Kolter, J. Zico},
  booktitle = {International Conference on Learning Representations},
  year = {2021},
}""",
    "zhang2020": """@inproceedings{zhang2020towards,
  title = {Towards Stable and Efficient Training of Verifiably Robust Neural Networks},
  author = {Zhang, Huan and Chen, Hongge and Xiao, Chaowei and Gowal, Sven and Stanforth,
            Robert and Li, Bo and Boning, Duane and Hsieh, Cho-Jui},
  booktitle = {International Conference on Learning Representations},
  year = {2020},
}""",
    "gowal2018": """@article{gowal2018effectiveness,
  title = {On the Effectiveness of Interval Bound Propagation for Training Verifiably
           Robust Models},
  author = {Gowal, Sven and Dvijotham, Krishnamurthy and Stanforth, Robert and Bunel, Rudy
            and Qin, Chongli and Uesato, Jonathan and Arandjelovic, Relja and Mann,
            Timothy and Kohli, Pushmeet},
  journal = {arXiv preprint arXiv:1810.12715},
  year = {2018},
}""",
    "chen2022": """@inproceedings{chen2022linearity,
  title = {Linearity Grafting: Relaxed Neuron Pruning Helps Certifiable Robustness},
  author = {Chen, Tianlong and Zhang, Huan and Zhang, Zhenyu and Chang, Shiyu and Liu,
            Sijia and Chen, Pin-Yu and Wang, Zhangyang},
  booktitle = {Proceedings of the 39th International Conference on Machine Learning},
  series = {Proceedings of Machine Learning Research},
  volume = {162},
  pages = {3760--3772},
  year = {2022},
}""",
    "zhang2018": """@inproceedings{zhang2018efficient,
  title = {Efficient Neural Network Robustness Certification with General Activation
           Functions},
  author = {Zhang, Huan and Weng, Tsui-Wei and Chen, Pin-Yu and Hsieh, Cho-Jui and
            Daniel, Luca},
  booktitle = {Advances in Neural Information Processing Systems},
  volume = {31},
  year = {2018},
}""",
}

_PAPERS = {
    "anil2019": "Anil, Lucas & Grosse (2019), *Sorting out Lipschitz function approximation*",
    "li2019": "Li et al. (2019), *Preventing gradient attenuation in Lipschitz constrained "
    "convolutional networks* (BCOP)",
    "trockman2021": "Trockman & Kolter (2021), *Orthogonalizing convolutional layers with "
    "the Cayley transform*",
    "zhang2020": "Zhang et al. (2020), *Towards stable and efficient training of verifiably "
    "robust neural networks* (CROWN-IBP)",
    "gowal2018": "Gowal et al. (2018), *On the effectiveness of interval bound propagation "
    "for training verifiably robust models* (IBP)",
    "chen2022": "Chen et al. (2022), *Linearity grafting: relaxed neuron pruning helps "
    "certifiable robustness*",
    "zhang2018": "Zhang et al. (2018), *Efficient neural network robustness certification "
    "with general activation functions* (CROWN)",
}


# ---------------------------------------------------------------- formatting


def _exact(value: float) -> str:
    """Every digit of a float64 (``repr``): a bound of 1.0000007602333363 is not 1."""
    return repr(float(value))


def _count(share: float, total: int | None) -> str:
    if total is None:
        return f"{100 * share:.1f} %"
    return f"{100 * share:.1f} % ({round(share * total)}/{total})"


def _value(value: Any) -> str:
    if isinstance(value, str):
        return f"`{value}`" if value else "(empty)"
    return f"`{json.dumps(value)}`"


def _yaml(value: Any, indent: int = 0) -> list[str]:
    """A small YAML emitter for the front matter: strings are JSON-quoted (valid YAML)."""
    pad = " " * indent
    if isinstance(value, Mapping):
        lines = []
        for key, item in value.items():
            if isinstance(item, (Mapping, list)):
                lines.append(f"{pad}{key}:")
                lines.extend(_yaml(item, indent + 2))
            else:
                lines.append(f"{pad}{key}: {json.dumps(item)}")
        return lines
    lines = []
    for item in value:
        if isinstance(item, (Mapping, list)):
            inner = _yaml(item, indent + 2)
            lines.append(f"{pad}- {inner[0].lstrip()}")
            lines.extend(inner[1:])
        else:
            lines.append(f"{pad}- {json.dumps(item)}")
    return lines


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


# ---------------------------------------------------------------- what the card is of


def _kind(card: Mapping[str, Any]) -> str:
    if card["model"] == "critic":
        return "critic"
    return "graft" if "graft" in card else "classifier"


def _papers(card: Mapping[str, Any]) -> list[str]:
    """The papers the model (and its numbers) come from, as keys of `_BIBTEX`."""
    model, options = card["model"], card.get("options", {})
    loss = card.get("training", {}).get("loss")
    keys = {
        "groupsort-mlp": ["anil2019"],
        "critic": ["anil2019"],
        "lipconvnet": ["trockman2021" if options.get("conv") == "cayley" else "li2019"],
        "mlp": {"crown-ibp": ["zhang2020"], "ibp": ["gowal2018"]}.get(loss, []),
    }.get(model, [])
    if "graft" in card:
        keys = [*keys, "chen2022"]
    if "crown_certified_accuracy" in card or "crown_verified_accuracy" in card:
        keys = [*keys, "zhang2018"]
    return list(dict.fromkeys(keys))


def _title(card: Mapping[str, Any]) -> str:
    data = card["data"]
    if _kind(card) == "critic":
        return f"critic between {data['p']} and {data['q']}"
    return f"{card['model']} on {data['name']}"


def _front_matter(card: Mapping[str, Any]) -> list[str]:
    kind, data = _kind(card), card["data"]
    tags = ["lipnets", "pytorch", "lipschitz"]
    if card["model"] in ("groupsort-mlp", "critic"):
        tags += ["1-lipschitz", "orthogonal", "groupsort"]
    elif card["model"] == "lipconvnet":
        tags += ["1-lipschitz", "orthogonal-convolution", str(card["options"].get("conv"))]
    else:
        tags += ["certified-training"]
    if kind == "critic":
        tags += ["wasserstein", "optimal-transport"]
        meta: dict[str, Any] = {"datasets": [f"{data['p']}-vs-{data['q']}"]}
        meta["metrics"] = ["wasserstein-estimate"]
    else:
        tags += ["certified-robustness", "image-classification"]
        if kind == "graft":
            tags.append("linearity-grafting")
        meta = {"datasets": [data["name"]], "metrics": ["accuracy", "certified-accuracy"]}
        if "attack_robust_accuracy" in card:
            meta["metrics"].append("attack-robust-accuracy")
    lines = ["---", "license: mit", "library_name: lipnets"]
    if kind != "critic":
        lines.append("pipeline_tag: image-classification")
    lines += _yaml({"tags": list(dict.fromkeys(tags)), **meta})
    if kind != "critic":
        lines += _yaml({"model-index": [_model_index(card)]})
    lines.append("---")
    return lines


def _model_index(card: Mapping[str, Any]) -> dict[str, Any]:
    data = card["data"]
    metrics = [{"type": "accuracy", "name": "clean accuracy", "value": card["clean_accuracy"]}]
    for key, share in card["certified_accuracy"].items():
        metrics.append(
            {
                "type": "accuracy",
                "name": f"Lipschitz-certified accuracy (l2, eps={key})",
                "value": share,
            }
        )
    for field, label in (
        ("crown_certified_accuracy", "CROWN-certified accuracy"),
        ("attack_robust_accuracy", "attack-robust accuracy"),
    ):
        if field in card:
            what = card[field]
            for key, share in what["accuracy"].items():
                metrics.append(
                    {
                        "type": "accuracy",
                        "value": share,
                        "name": f"{label} (l2, eps={key}, first {what['points']} test samples)",
                    }
                )
    return {
        "name": f"{card['model']}-{data['name']}",
        "results": [
            {
                "task": {"type": "image-classification"},
                "dataset": {"name": data["name"], "type": data["name"]},
                "metrics": metrics,
            }
        ],
    }


# ---------------------------------------------------------------- sections


def _description(card: Mapping[str, Any]) -> list[str]:
    from zoo import models

    data, kind = card["data"], _kind(card)
    spec = models.MODELS.get(card["model"])
    options = ", ".join(f"`{k}={v}`" for k, v in card.get("options", {}).items())
    lines = ["## Model description", ""]
    summary = spec.summary if spec is not None else card["model"]
    lines.append(f"`{card['model']}` ({summary}), options {options or '(none)'}.")
    if kind == "critic":
        lines.append("It maps a 2-D point to one score.")
    else:
        shape = " × ".join(str(s) for s in data["input_shape"])
        lines.append(f"It takes inputs of shape {shape} and returns {data['num_classes']} logits.")
    if kind == "graft":
        graft = card["graft"]
        lines.append(
            f"It is a linearity-grafted copy of `{graft.get('source')}`: "
            f"{graft.get('grafted_neurons')} of {graft.get('neurons')} ReLU neurons replaced "
            f"by trained linear functions ({graft.get('score')} score, ratio "
            f"{graft.get('ratio')}), then fine-tuned."
        )
    papers = [_PAPERS[k] for k in _papers(card) if k not in ("zhang2018", "chen2022")]
    if papers:
        lines.append(f"The model follows {'; '.join(papers)}.")
    lines += [
        "",
        f"- **Sound Lipschitz bound** (l2 → l2): L ≤ {_exact(card['lipschitz_bound'])}, "
        "computed by `lipnets.lipschitz_bound` from the weights the checkpoint realises "
        "(exact float64 value, not rounded: orthogonal layers are orthogonal to float32 "
        "rounding, and the bound says by how much).",
    ]
    lower = card.get("lower_bound")
    if lower is not None:
        search = card.get("lower_bound_search") or {}
        how = ", ".join(f"{k} {v}" for k, v in search.items())
        lines.append(
            f"- **Lower bound** (an estimate, it certifies nothing): {_exact(lower)}, found "
            f"by `lipnets.estimators.lower_bound` near test points ({how}); the model's "
            "true Lipschitz constant lies between the two."
        )
    lines.append(
        f"- **Checkpoint**: `{card['checkpoint']}` (safetensors), sha256 "
        f"`{card['checkpoint_sha256']}`."
    )
    lines += [
        "",
        "Load it (the card is checked and the checkpoint's sha256 verified before loading):",
        "",
        "```python",
        "import zoo",
        "",
        'model, card = zoo.load_run("path/to/this/folder")  # in eval mode',
        "```",
        "",
        "A checkpoint shipped with the zoo (`zoo.list_models(pretrained=True)`) loads by "
        'name: `zoo.load_pretrained("NAME")`. `python -m zoo eval FOLDER` recomputes '
        "every number below from the checkpoint.",
    ]
    return lines


def _intended_use(card: Mapping[str, Any]) -> list[str]:
    if _kind(card) == "critic":
        use = (
            "estimating the Wasserstein-1 distance between the two 2-D samples it was "
            "trained on, as a lower bound checked against the exact value; a worked "
            "example of a 1-Lipschitz critic."
        )
    else:
        use = (
            f"research and teaching on certified robustness: a small classifier of "
            f"`{card['data']['name']}` whose certificates can be recomputed and checked "
            "(Lipschitz bounds, bound propagation, attacks), and a baseline for other "
            "methods on the same split."
        )
    return [
        "## Intended use",
        "",
        f"For {use} It is not meant for decisions about people, for security-critical "
        "systems, or for data other than the data it was trained on.",
    ]


def _limitations(card: Mapping[str, Any]) -> list[str]:
    lines = ["## Limitations", ""]
    sha = card["checkpoint_sha256"][:12]
    if _kind(card) == "critic":
        lines += [
            "- The W1 estimate is a lower bound on the Wasserstein-1 distance of the two "
            "*samples* (the KR objective divided by the sound bound), not of the "
            "distributions they are drawn from, and only for this checkpoint "
            f"(sha256 {sha}…).",
            "- The bound is computed in float64 from the realised float32 weights; "
            "evaluating the critic in float32 rounds its scores (about 1e-6 relative).",
        ]
        return lines
    pixels = card["data"].get("pixels", "the range the model was trained on")
    lines += [
        "- **Certificates hold for the l2 radius stated, for inputs in the stated range "
        f"(pixels {pixels}, preprocessed as in training), for this checkpoint** "
        f"(sha256 {sha}…). A certified sample keeps its predicted class under every "
        "perturbation of l2 norm at most that radius that keeps it in the range; nothing "
        "is claimed for larger perturbations, other norms, other preprocessing, or a "
        "fine-tuned, pruned, quantised or re-exported copy (certify that copy again).",
        "- **Float32 rounding.** The bound is computed in float64 from the realised float32 "
        "weights and the Lipschitz-certified radii from float32 logits; running the model "
        "in float32 rounds its logits by about 1e-6, so a sample whose margin lies that "
        "close to a certificate's threshold may not keep its certificate."
        + (
            " The CROWN and attack numbers are computed in float64 on the realised weights "
            "(Note [Robustness on the realised weights] in `zoo.robustness`)."
            if "crown_certified_accuracy" in card or "attack_robust_accuracy" in card
            else ""
        ),
        "- The attack-robust accuracy is an *upper* bound on the robust accuracy from one "
        "attack (`pgd_l2`); a stronger attack may break more samples. The lower bound on "
        "the Lipschitz constant is an estimate too."
        if "attack_robust_accuracy" in card
        else "- This card has no attack-robust accuracy: nothing here bounds the robust "
        "accuracy from above. The lower bound on the Lipschitz constant is an estimate.",
        f"- The test set is small ({card['data'].get('test_size', '?')} samples): one "
        "sample moves an accuracy by "
        + (
            f"{100 / card['data']['test_size']:.2f} percentage points."
            if isinstance(card["data"].get("test_size"), int)
            else "an amount the card does not record."
        ),
    ]
    if "crown_certified_accuracy" in card:
        crown = card["crown_certified_accuracy"]
        lines.append(
            f"- CROWN certified the first {crown['points']} test samples only (its cost, "
            "Note [Robustness budget] in `zoo.robustness`); compare it with the "
            "Lipschitz-certified share of the same samples, shown beside it."
        )
    return lines


def _training_data(card: Mapping[str, Any]) -> list[str]:
    from zoo import data as datasets

    data = card["data"]
    lines = ["## Training data", ""]
    if _kind(card) == "critic":
        lines.append(
            f"{data['samples']} samples of each of two 2-D distributions, `{data['p']}` (P, "
            f"scored high) and `{data['q']}` (Q, scored low), drawn with seed {data['seed']}."
        )
    else:
        spec = datasets.DATASETS.get(data["name"])
        source = spec.summary if spec is not None else data["name"]
        lines.append(f"`{data['name']}`: {source}.")
    lines += ["", *_table(["field", "value"], [[f"`{k}`", _value(v)] for k, v in data.items()])]
    return lines


def _training(card: Mapping[str, Any]) -> list[str]:
    training = card.get("training") or {}
    lines = ["## Training procedure", "", f"Written by `{card['command']}`.", ""]
    if training:
        lines += _table(["option", "value"], [[f"`{k}`", _value(v)] for k, v in training.items()])
    else:
        lines.append("The card records no training options.")
    return lines


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _classifier_evaluation(card: Mapping[str, Any]) -> list[str]:
    data = card["data"]
    n = data.get("test_size") if isinstance(data.get("test_size"), int) else None
    crown, attack = card.get("crown_certified_accuracy"), card.get("attack_robust_accuracy")
    lines = [
        "## Evaluation",
        "",
        f"On the held-out test set ({n if n is not None else 'size not recorded'} samples): "
        f"clean accuracy {_count(card['clean_accuracy'], n)} (a tie counts as an error).",
        "",
        "Per l2 radius eps: **Lipschitz-certified** (sound: certified radius "
        "margin / (√2 L) > eps), **CROWN-certified** (sound: "
        "`lipnets.certify.certify_crown`) and **attack-robust** (an estimate, an upper bound: "
        "correct samples that "
        + (
            f"`pgd_l2`, {attack['steps']} steps × {_plural(attack['restarts'], 'restart')}, "
            f"seed {attack['seed']}, does not break)."
            if attack
            else "an attack does not break)."
        )
        + " Each column says which test samples it is of; a certified share is compared with "
        "an attack-robust one on the same samples only.",
        "",
    ]

    def of(points: int) -> str:
        return f"all {points}" if points == n else f"first {points}"

    header = ["eps", f"Lipschitz-certified ({'all ' + str(n) if n else 'test set'})"]
    if crown:
        header += [f"CROWN-certified ({of(crown['points'])})",
                   f"Lipschitz-certified ({of(crown['points'])})"]  # fmt: skip
    else:
        header.append("CROWN-certified")
    if attack:
        header.append(f"attack-robust ({of(attack['points'])})")
        if attack["points"] != n:
            header.append(f"Lipschitz-certified ({of(attack['points'])})")
    else:
        header.append("attack-robust")
    missing = "not computed"
    rows = []
    for key, share in card["certified_accuracy"].items():
        row = [key, _count(share, n)]
        if crown:
            row += [
                _count(crown["accuracy"][key], crown["points"]) if key in crown["accuracy"]
                else missing,
                _count(crown["lipschitz_accuracy"][key], crown["points"])
                if key in crown["lipschitz_accuracy"] else missing,
            ]  # fmt: skip
        else:
            row.append(missing)
        if attack:
            row.append(
                _count(attack["accuracy"][key], attack["points"]) if key in attack["accuracy"]
                else missing
            )  # fmt: skip
            if attack["points"] != n:
                row.append(
                    _count(attack["lipschitz_accuracy"][key], attack["points"])
                    if key in attack["lipschitz_accuracy"] else missing
                )  # fmt: skip
        else:
            row.append(missing)
        rows.append(row)
    lines += _table(header, rows)
    if not crown or not attack:
        lines += [
            "",
            "This card was written before the zoo recorded CROWN and attack numbers, or "
            "without them (`--crown-points 0`, `--attack-points 0`): the cells that say "
            "*not computed* were not computed. `python -m zoo certify FOLDER --attack N` "
            "attacks the first N test samples; retraining with the command of the training "
            "procedure above writes a card with every column.",
        ]
    if attack:
        lines += [
            "",
            f"Certified samples that the attack broke: {attack['broken_certified']} (0 unless "
            "a certificate is wrong).",
        ]
    lines += [
        "",
        f"Sound Lipschitz bound: L ≤ {_exact(card['lipschitz_bound'])}"
        + (
            f"; lower bound (estimate): {_exact(card['lower_bound'])}."
            if card.get("lower_bound") is not None
            else "; no lower bound was searched."
        ),
    ]
    verified = card.get("crown_verified_accuracy")
    if verified:
        lines += [
            "",
            f"CROWN-verified accuracy over l-{verified['norm']} balls ({verified['method']}, "
            f"{verified['dtype']}), all test samples:",
            "",
            *_table(
                ["eps (l-" + verified["norm"] + ")", "verified"],
                [[k, _count(v, n)] for k, v in verified["accuracy"].items()],
            ),
        ]
    if "graft" in card:
        lines += _graft(card["graft"])
    return lines


def _graft(graft: Mapping[str, Any]) -> list[str]:
    before, after = graft.get("before") or {}, graft.get("after") or {}
    keys = [k for k in after if isinstance(after.get(k), (int, float)) and k in before]
    if not keys:
        return []
    return [
        "",
        f"Grafting at l-{graft.get('norm')} eps {graft.get('eps')}, before → after:",
        "",
        *_table(
            ["number", "before", "after"],
            [[f"`{k}`", f"{before[k]:.6g}", f"{after[k]:.6g}"] for k in keys],
        ),
    ]


def _critic_evaluation(card: Mapping[str, Any]) -> list[str]:
    rows = [
        ["W1 estimate (`wasserstein_estimate`)", _exact(card["wasserstein_estimate"])],
        ["exact W1 of the samples (POT `ot.emd2`)", _exact(card["exact_w1"])],
    ]
    for key, label in (
        ("relative_gap", "relative gap"),
        ("median_gradient_norm", "median gradient norm on the data"),
    ):
        if key in card:
            rows.append([label, _exact(card[key])])
    rows.append(["sound Lipschitz bound L ≤", _exact(card["lipschitz_bound"])])
    return ["## Evaluation", "", *_table(["number", "value"], rows)]


def _software(card: Mapping[str, Any]) -> list[str]:
    torch_version = card.get("torch_version") or "not recorded in this card"
    return [
        "## Software",
        "",
        f"- lipnets {card['lipnets_version']}",
        f"- torch {torch_version}",
        f"- command: `{card['command']}`",
    ]


def _citation(card: Mapping[str, Any]) -> list[str]:
    entries = [_BIBTEX["lipnets"].format(version=card["lipnets_version"])]
    entries += [_BIBTEX[k] for k in _papers(card)]
    return ["## Citation", "", "```bibtex", "\n\n".join(entries), "```"]


def render_readme(card: Mapping[str, Any]) -> str:
    """The ``README.md`` of a run: a Hugging Face-style model card made from ``card``.

    Args:
        card: a checked model card (`zoo.cards.read_card`), old or new.

    Returns:
        The Markdown text: YAML front matter, then the sections model description,
        intended use, limitations, training data, training procedure, evaluation,
        software, licence and citation.

    Examples:
        >>> from zoo import cards, modelcard
        >>> card = cards.read_card(cards.PRETRAINED / "groupsort-mlp-digits" / "card.json")
        >>> text = modelcard.render_readme(card)
        >>> text.startswith("---\\nlicense: mit\\nlibrary_name: lipnets\\n")
        True
        >>> repr(card["lipschitz_bound"]) in text
        True
    """
    evaluation = _critic_evaluation if _kind(card) == "critic" else _classifier_evaluation
    sections = [
        _front_matter(card),
        [
            f"# {_title(card)}",
            "",
            "A model of the lipnets zoo. This card is generated from `card.json` by "
            "`zoo.modelcard.render_readme`; every number is the card's.",
        ],
        _description(card),
        _intended_use(card),
        _limitations(card),
        _training_data(card),
        _training(card),
        evaluation(card),
        _software(card),
        [
            "## Licence",
            "",
            "MIT, the licence of lipnets, for the code and these weights. The training data "
            "keep their own terms (see their source above).",
        ],
        _citation(card),
    ]
    return "\n\n".join("\n".join(section) for section in sections) + "\n"


def write_readme(folder: str | Path) -> Path:
    """Render ``folder/card.json`` (checked) into ``folder/README.md`` and return its path."""
    from zoo import cards

    folder = Path(folder)
    card = cards.read_card(folder / cards.CARD)
    path = folder / README
    path.write_text(render_readme(card), encoding="utf-8")
    return path
