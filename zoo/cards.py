"""Checkpoints (safetensors) and model cards (JSON).

A run folder holds ``model.safetensors`` (the model's ``state_dict``: lipnets'
raw parameters, from which every orthogonal weight is recomputed on load, so
nothing stale is stored) and ``card.json``. The checkpoint's own metadata
names the architecture (``zoo.model``, ``zoo.options``, ``zoo.input_shape``,
``zoo.num_outputs``), so a checkpoint is rebuilt without its card, and loading
it as another architecture is refused with a message that says what it holds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lipnets
from zoo import models
from zoo.errors import ZooError

__all__ = [
    "CARD",
    "PRETRAINED",
    "WEIGHTS",
    "Architecture",
    "architecture",
    "find_run",
    "load_model",
    "pretrained",
    "read_architecture",
    "read_card",
    "save_checkpoint",
    "sha256",
    "write_card",
]

CARD = "card.json"
WEIGHTS = "model.safetensors"
#: Shipped digits checkpoints: ``zoo/pretrained/<name>/{model.safetensors,card.json}``.
PRETRAINED = Path(__file__).resolve().parent / "pretrained"


class Architecture(dict):
    """``{"model", "options", "input_shape", "num_outputs"}``: what rebuilds a model."""

    def describe(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self["options"].items())
        return f"{self['model']} ({options}; input {tuple(self['input_shape'])})"


def architecture(
    model: str, options: Mapping[str, Any], input_shape: tuple[int, ...], num_outputs: int
) -> Architecture:
    """The full description of a model (defaults filled in), as stored with its weights."""
    return Architecture(
        model=model,
        options=models.get(model).options(options),
        input_shape=list(input_shape),
        num_outputs=int(num_outputs),
    )


def save_checkpoint(path: str | Path, model: nn.Module, arch: Architecture) -> Path:
    """Write ``model.state_dict()`` to ``path`` (safetensors) with its architecture as metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "zoo.model": arch["model"],
        "zoo.options": json.dumps(arch["options"], sort_keys=True),
        "zoo.input_shape": json.dumps(arch["input_shape"]),
        "zoo.num_outputs": str(arch["num_outputs"]),
        "lipnets_version": lipnets.__version__,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    path.chmod(0o644)  # safetensors creates the file readable by its owner only
    return path


def read_architecture(path: str | Path) -> Architecture:
    """The architecture stored in a zoo checkpoint's metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ZooError(f"no checkpoint at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as error:  # safetensors raises its own error types
        raise ZooError(f"{str(path)!r} is not a safetensors checkpoint ({error})") from None
    if "zoo.model" not in meta:
        raise ZooError(
            f"{str(path)!r} was not written by the zoo: its metadata has no 'zoo.model', so the "
            "architecture is unknown (save with zoo.cards.save_checkpoint)"
        )
    return Architecture(
        model=meta["zoo.model"],
        options=json.loads(meta.get("zoo.options", "{}")),
        input_shape=json.loads(meta["zoo.input_shape"]),
        num_outputs=int(meta["zoo.num_outputs"]),
    )


def load_model(
    path: str | Path, expected: Architecture | None = None, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Architecture]:
    """Rebuild the model a checkpoint holds and load its weights (in eval mode).

    Args:
        path: a ``.safetensors`` file written by `save_checkpoint`.
        expected: if given, the architecture the caller wants (from a card, or
            from ``build``); a checkpoint of another architecture is refused.
        device: where to put the model.

    Raises:
        ZooError: if the file is not a zoo checkpoint, holds another
            architecture than ``expected``, or its tensors do not fit the model.
    """
    from safetensors.torch import load_file

    found = read_architecture(path)
    if expected is not None:
        wanted = architecture(
            expected["model"],
            expected.get("options", {}),
            tuple(expected["input_shape"]),
            expected["num_outputs"],
        )
        if dict(found) != dict(wanted):
            raise ZooError(
                f"checkpoint {str(path)!r} holds a {found.describe()} with "
                f"{found['num_outputs']} outputs, not the expected {wanted.describe()} with "
                f"{wanted['num_outputs']} outputs: it is a checkpoint of another architecture"
            )
    model = models.build(
        found["model"],
        input_shape=found["input_shape"],
        num_outputs=found["num_outputs"],
        **found["options"],
    )
    state = load_file(str(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ZooError(
            f"checkpoint {str(path)!r} does not fit a {found.describe()}: {error}"
        ) from None
    return model.to(device).eval(), found


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_card(folder: str | Path, card: Mapping[str, Any]) -> Path:
    path = Path(folder) / CARD
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


#: What every card has; a classifier's card has `CLASSIFIER_KEYS` too.
CARD_KEYS = ("model", "data", "lipschitz_bound", "lipnets_version", "command")
CLASSIFIER_KEYS = ("clean_accuracy", "certified_accuracy", "lower_bound")


def read_card(path: str | Path, required: tuple[str, ...] = CARD_KEYS) -> dict[str, Any]:
    """The card at ``path``; a `ZooError` if it is unreadable or lacks a ``required`` key."""
    try:
        card = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ZooError(f"cannot read the model card {str(path)!r}: {error}") from None
    if not isinstance(card, dict):
        raise ZooError(f"{str(path)!r} is not a zoo model card: it holds no JSON object")
    for key in required:
        if key not in card:
            raise ZooError(f"{str(path)!r} is not a zoo model card: it has no {key!r}")
    return card


def pretrained() -> list[str]:
    """Names of the shipped checkpoints (folders under ``zoo/pretrained``)."""
    if not PRETRAINED.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED.iterdir() if (p / CARD).is_file())


def find_run(target: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """Resolve a run folder, a card, a checkpoint or a shipped name to (checkpoint, card or None).

    ``target`` may be a run folder (``card.json`` + ``model.safetensors``), a
    ``card.json``, a ``.safetensors`` file (its card is read when it lies next
    to it) or the name of a shipped checkpoint (``python -m zoo list``).
    """
    path = Path(target)
    if not path.exists() and str(target) in pretrained():
        path = PRETRAINED / str(target)
    if path.is_dir():
        card_path = path / CARD
        if not card_path.is_file():
            raise ZooError(f"{str(path)!r} is not a run folder: it has no {CARD}")
        card = read_card(card_path)
        return path / card.get("checkpoint", WEIGHTS), card
    if path.is_file() and path.suffix == ".json":
        card = read_card(path)
        return path.parent / card.get("checkpoint", WEIGHTS), card
    if path.is_file():
        card_path = path.parent / CARD
        card = read_card(card_path) if card_path.is_file() else None
        if card is not None and card.get("checkpoint", WEIGHTS) != path.name:
            card = None
        return path, card
    shipped = ", ".join(pretrained()) or "none"
    raise ZooError(
        f"{str(target)!r} is neither a run folder, a card, a checkpoint nor a shipped model "
        f"(shipped: {shipped})"
    )
