"""Checkpoints (safetensors) and model cards (JSON).

A run folder holds ``model.safetensors`` (the model's ``state_dict``: lipnets'
raw parameters, from which every orthogonal weight is recomputed on load, so
nothing stale is stored) and ``card.json``. The checkpoint's own metadata
names the architecture (``zoo.model``, ``zoo.options``, ``zoo.input_shape``,
``zoo.num_outputs``), so a checkpoint is rebuilt without its card, and loading
it as another architecture is refused with a message that says what it holds.

A card is checked when it is read (`read_card`): its fields and their types
(`CARD_FIELDS`, and `CLASSIFIER_FIELDS` or `CRITIC_FIELDS`), one `ZooError`
naming the first bad field otherwise. Its ``checkpoint`` must be a relative
path inside the card's folder (`checkpoint_of`), and the file's SHA-256 must
be the card's ``checkpoint_sha256`` before anything is loaded
(`verify_checkpoint`): a checkpoint changed or swapped after its card was
written is refused, with both digests.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
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
    "check_card",
    "checkpoint_of",
    "find_run",
    "load_model",
    "pretrained",
    "read_architecture",
    "read_card",
    "save_checkpoint",
    "sha256",
    "verify_checkpoint",
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


def provenance(folder: Path, command: str) -> dict[str, Any]:
    """The fields every card records about how it was made: the versions, the command, and
    the checkpoint (already written into ``folder``) with its SHA-256."""
    return {
        "lipnets_version": lipnets.__version__,
        "torch_version": torch.__version__,
        "command": command,
        "checkpoint": WEIGHTS,
        "checkpoint_sha256": sha256(folder / WEIGHTS),
    }


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
    try:
        arch = Architecture(
            model=meta["zoo.model"],
            options=json.loads(meta.get("zoo.options", "{}")),
            input_shape=json.loads(meta["zoo.input_shape"]),
            num_outputs=int(meta["zoo.num_outputs"]),
        )
    except (KeyError, ValueError) as error:
        raise ZooError(f"{str(path)!r} has malformed zoo metadata ({error!r})") from None
    if not isinstance(arch["options"], dict) or not _shape(arch["input_shape"]):
        raise ZooError(
            f"{str(path)!r} has malformed zoo metadata: zoo.options must be a JSON object and "
            "zoo.input_shape a list of integers >= 1"
        )
    return arch


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
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        grafted = "zoo.grafted" in (f.metadata() or {})
    if grafted:  # written by `python -m zoo graft` (zoo.graft.GRAFTED_KEY)
        from zoo.graft import load_grafted

        return load_grafted(path, device=device), found
    model = models.build(
        found["model"],
        input_shape=found["input_shape"],
        num_outputs=found["num_outputs"],
        **found["options"],
    )
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types
        raise ZooError(f"cannot read the tensors of {str(path)!r} ({error})") from None
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


# ---------------------------------------------------------------- the card's schema


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(minimum: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _text(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _share(value: Any) -> bool:
    return _number(value) and 0.0 <= value <= 1.0


def _shape(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(map(_integer(1), value))


def _radius_key(key: str) -> bool:
    try:
        radius = float(key)
    except ValueError:
        return False
    return math.isfinite(radius) and radius >= 0


def _radii(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and len(value) > 0
        and all(_radius_key(k) and _share(v) for k, v in value.items())
    )


def _verified(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and value.get("norm") in ("inf", "2")
        and value.get("method") in ("crown", "ibp")
        and value.get("dtype") in ("float64", "float32")
        and _radii(value.get("accuracy"))
    )


def _search(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and all(_integer(1)(value.get(k)) for k in ("points", "steps", "restarts"))
        and _integer(0)(value.get("seed"))
    )


def _crown_certified(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and value.get("method") == "crown"
        and value.get("norm") == "2"
        and value.get("dtype") == "float64"
        and _integer(1)(value.get("points"))
        and _radii(value.get("accuracy"))
        and _radii(value.get("lipschitz_accuracy"))
    )


def _attack_robust(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and value.get("attack") == "pgd_l2"
        and value.get("norm") == "2"
        and value.get("dtype") == "float64"
        and all(_integer(1)(value.get(k)) for k in ("points", "steps", "restarts"))
        and _integer(0)(value.get("seed"))
        and _integer(0)(value.get("broken_certified"))
        and _radii(value.get("accuracy"))
        and _radii(value.get("lipschitz_accuracy"))
    )


def _nullable(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _sha(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


#: ``(field, check, what it must be, required)``; a dotted field is inside an object.
Field = tuple[str, Callable[[Any], bool], str, bool]

#: What every card has.
CARD_FIELDS: tuple[Field, ...] = (
    ("model", _text, "a model name (a non-empty string)", True),
    ("options", lambda v: isinstance(v, dict), "an object of model options", True),
    ("data", lambda v: isinstance(v, dict), "an object describing the data", True),
    ("lipschitz_bound", lambda v: _number(v) and v > 0, "a finite number > 0", True),
    ("lipnets_version", _text, "a version string", True),
    ("command", _text, "the command that wrote the run (a string)", True),
    ("checkpoint", _text, "a path relative to the card's folder (a string)", True),
    ("checkpoint_sha256", _sha, "a SHA-256 digest (64 lowercase hex digits)", True),
    ("training", lambda v: isinstance(v, dict), "an object of training options", False),
    ("torch_version", _text, "a version string", False),
)
#: What a classifier's card has too: what ``python -m zoo eval`` recomputes.
CLASSIFIER_FIELDS: tuple[Field, ...] = (
    ("data.name", _text, "a dataset name (a string)", True),
    ("data.input_shape", _shape, "a non-empty list of integers >= 1", True),
    ("data.num_classes", _integer(1), "an integer >= 1", True),
    ("data.seed", _nullable(_integer(0)), "an integer >= 0 or null", False),
    (
        "data.test_fraction",
        _nullable(lambda v: _number(v) and 0 < v < 1),
        "a number in (0, 1) or null",
        False,
    ),
    ("clean_accuracy", _share, "a number in [0, 1]", True),
    (
        "certified_accuracy",
        _radii,
        "a non-empty object from radii (strings of numbers >= 0) to numbers in [0, 1]",
        True,
    ),
    ("lower_bound", _nullable(lambda v: _number(v) and v >= 0), "a number >= 0 or null", True),
    (
        "lower_bound_search",
        _nullable(_search),
        "null or an object of integers points, steps, restarts (>= 1) and seed (>= 0)",
        False,
    ),
    (
        "crown_verified_accuracy",
        _verified,
        "an object of norm ('inf' or '2'), method ('crown' or 'ibp'), dtype and accuracy "
        "(a non-empty object from radii to numbers in [0, 1]), from certified training",
        False,
    ),
    (
        "crown_certified_accuracy",
        _crown_certified,
        "an object of method 'crown', norm '2', dtype 'float64', points (an integer >= 1), "
        "accuracy and lipschitz_accuracy (objects from radii to numbers in [0, 1])",
        False,
    ),
    (
        "attack_robust_accuracy",
        _attack_robust,
        "an object of attack 'pgd_l2', norm '2', dtype 'float64', points, steps, restarts "
        "(integers >= 1), seed and broken_certified (integers >= 0), accuracy and "
        "lipschitz_accuracy (objects from radii to numbers in [0, 1])",
        False,
    ),
)
#: What a Wasserstein critic's card has too.
CRITIC_FIELDS: tuple[Field, ...] = (
    ("data.p", _text, "a distribution name (a string)", True),
    ("data.q", _text, "a distribution name (a string)", True),
    ("data.samples", _integer(1), "an integer >= 1", True),
    ("data.seed", _integer(0), "an integer >= 0", True),
    ("wasserstein_estimate", _number, "a finite number", True),
    ("exact_w1", lambda v: _number(v) and v >= 0, "a finite number >= 0", True),
)

_MISSING = object()


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _get(card: Mapping[str, Any], dotted: str) -> Any:
    value: Any = card
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def check_card(card: Any, path: str | Path) -> dict[str, Any]:
    """``card`` if it is a well-formed zoo model card, else one `ZooError` naming the field.

    The fields and their types are `CARD_FIELDS`, plus `CLASSIFIER_FIELDS` or
    `CRITIC_FIELDS` by the kind of the card's model.
    """
    where = f"{str(path)!r} is not a valid zoo model card"
    if not isinstance(card, dict):
        raise ZooError(f"{where}: it holds a JSON {type(card).__name__}, not an object")

    def check(fields: tuple[Field, ...]) -> None:
        for name, ok, what, required in fields:
            value = _get(card, name)
            if value is _MISSING:
                if required:
                    raise ZooError(f"{where}: field {name!r} is missing (it must be {what})")
                continue
            if not ok(value):
                raise ZooError(f"{where}: field {name!r} must be {what}, got {_show(value)}")

    check(CARD_FIELDS)
    if card["model"] not in models.MODELS:
        valid = ", ".join(models.MODELS)
        raise ZooError(
            f"{where}: field 'model' must be a zoo model ({valid}), got {_show(card['model'])}"
        )
    if models.get(card["model"]).kind == "critic":
        check(CRITIC_FIELDS)
    else:
        check(CLASSIFIER_FIELDS)
        if card["lower_bound"] is not None and card.get("lower_bound_search") is None:
            got = "it is missing" if "lower_bound_search" not in card else "got null"
            raise ZooError(
                f"{where}: field 'lower_bound_search' must say how the lower_bound was searched "
                f"(an object of points, steps, restarts, seed), {got}"
            )
    return card


def read_card(path: str | Path) -> dict[str, Any]:
    """The card at ``path``, checked (`check_card`); a `ZooError` if unreadable or malformed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, ValueError) as error:
        raise ZooError(f"cannot read the model card {str(path)!r}: {error}") from None
    try:
        card = json.loads(text)
    except ValueError as error:
        raise ZooError(f"{str(path)!r} is not a valid zoo model card: not JSON ({error})") from None
    return check_card(card, path)


def checkpoint_of(card: Mapping[str, Any], card_path: str | Path) -> Path:
    """The checkpoint a (checked) card names: a file inside the card's folder, or a `ZooError`.

    The card's ``checkpoint`` must be relative, without ``..``, and must not
    lead out of the folder through a symbolic link either.
    """
    value = card["checkpoint"]
    folder = Path(card_path).parent
    where = f"field 'checkpoint' of {str(card_path)!r}"
    posix, windows = PurePosixPath(value), PureWindowsPath(value)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or value.startswith("~"):
        raise ZooError(f"{where} must be a path relative to the card's folder, got {value!r}")
    if ".." in posix.parts or ".." in windows.parts:
        raise ZooError(f"{where} must stay inside the card's folder (no '..'), got {value!r}")
    path = folder / value
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        raise ZooError(
            f"{where} leads outside the card's folder (through a symbolic link): {value!r} is "
            f"{str(path.resolve())!r}"
        ) from None
    if not path.is_file():
        raise ZooError(f"no checkpoint at {str(path)!r} ({where} is {value!r})")
    return path


def verify_checkpoint(path: str | Path, card: Mapping[str, Any], card_path: str | Path) -> None:
    """Refuse a checkpoint whose SHA-256 is not the card's ``checkpoint_sha256``."""
    actual, expected = sha256(path), card["checkpoint_sha256"]
    if actual != expected:
        raise ZooError(
            f"checkpoint {str(path)!r} does not match its card {str(card_path)!r}: its sha256 "
            f"is {actual}, the card's checkpoint_sha256 is {expected}; the file was changed or "
            "swapped after the card was written, so it is not loaded"
        )


def pretrained() -> list[str]:
    """Names of the shipped checkpoints (folders under ``zoo/pretrained``)."""
    if not PRETRAINED.is_dir():
        return []
    return sorted(
        p.name for p in PRETRAINED.iterdir() if not p.name.startswith(".") and (p / CARD).is_file()
    )


def find_run(target: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """Resolve a run folder, a card, a checkpoint or a shipped name to (checkpoint, card or None).

    ``target`` may be a run folder (``card.json`` + ``model.safetensors``), a
    ``card.json``, a ``.safetensors`` file (its card is read when it lies next
    to it and names it) or the name of a shipped checkpoint (``python -m zoo
    list``). A card is checked (`read_card`), its checkpoint must lie in its
    folder (`checkpoint_of`) and match its digest (`verify_checkpoint`)
    before anything is loaded.
    """
    path = Path(target)
    if not path.exists() and str(target) in pretrained():
        path = PRETRAINED / str(target)
    card_path = None
    if path.is_dir():
        card_path = path / CARD
        if not card_path.is_file():
            raise ZooError(f"{str(path)!r} is not a run folder: it has no {CARD}")
    elif path.is_file() and path.suffix == ".json":
        card_path = path
    elif path.is_file():
        beside = path.parent / CARD
        if beside.is_file():
            card = read_card(beside)
            named = path.parent / card["checkpoint"]
            if named.exists() and named.resolve() == path.resolve():
                verify_checkpoint(checkpoint_of(card, beside), card, beside)
                return path, card
        return path, None
    else:
        shipped = ", ".join(pretrained()) or "none"
        raise ZooError(
            f"{str(target)!r} is neither a run folder, a card, a checkpoint nor a shipped model "
            f"(shipped: {shipped})"
        )
    card = read_card(card_path)
    checkpoint = checkpoint_of(card, card_path)
    verify_checkpoint(checkpoint, card, card_path)
    return checkpoint, card
