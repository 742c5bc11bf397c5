"""The zoo's registry, in the manner of timm's: model names, shipped checkpoints, loading.

- `list_models()`: the registered architectures (`zoo.models.MODELS`), which
  ``python -m zoo train NAME`` trains and `zoo.models.build` builds;
- `list_models(pretrained=True)`: the checkpoints shipped with the package;
- `load_pretrained(name)`: a shipped checkpoint as ``(model, card)``, the model in eval
  mode;
- `load_run(folder)`: the same for a run folder written by ``python -m zoo train``.

Loading checks the card (`zoo.cards.read_card`), keeps the checkpoint inside the card's
folder (`zoo.cards.checkpoint_of`) and compares its SHA-256 with the card's
``checkpoint_sha256`` before anything is read from it (`zoo.cards.verify_checkpoint`); the
architecture comes from the checkpoint and must be the card's (`zoo.cards.load_model`).

# Note [Shipped checkpoints as package data]

The shipped runs are package data of ``zoo`` (``zoo/pretrained/NAME/`` in the wheel, see
``[tool.setuptools.package-data]``), found through ``importlib.resources.files("zoo")``:
the installed package's own folder, wherever it is installed, never the working directory
or a checkout. When the package is not a folder on disk (a zip import), each file is
extracted to a temporary file for the time of the load (``importlib.resources.as_file``).
"""

from __future__ import annotations

import contextlib
import importlib.resources
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.errors import ZooError

__all__ = ["list_models", "load_pretrained", "load_run"]

#: The folder of the shipped runs inside the package (Note [Shipped checkpoints as
#: package data]).
PACKAGE_FOLDER = "pretrained"


def _shipped_root() -> Any:
    """The package-data folder of the shipped runs (a `Traversable`)."""
    return importlib.resources.files("zoo").joinpath(PACKAGE_FOLDER)


def _shipped() -> list[str]:
    from zoo.cards import CARD

    root = _shipped_root()
    if not root.is_dir():
        return []
    return sorted(
        entry.name
        for entry in root.iterdir()
        if not entry.name.startswith(".") and entry.joinpath(CARD).is_file()
    )


def list_models(pretrained: bool = False) -> list[str]:
    """The names the zoo knows.

    Args:
        pretrained: ``False``: the registered architectures (`zoo.models.MODELS`), to
            train or build; ``True``: the checkpoints shipped with the package, to load
            with `load_pretrained`.

    Returns:
        The names, sorted.

    Examples:
        >>> import zoo
        >>> zoo.list_models()
        ['critic', 'groupsort-mlp', 'lipconvnet', 'mlp']
        >>> zoo.list_models(pretrained=True)
        ['groupsort-mlp-digits', 'lipconvnet-digits']
    """
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be True or False, got {pretrained!r}")
    if pretrained:
        return _shipped()
    from zoo.models import MODELS

    return sorted(MODELS)


def _architecture(card: dict[str, Any]) -> Any:
    from zoo.cards import Architecture

    if "input_shape" not in card["data"]:  # a critic's card: 2-D points, one score
        return Architecture(model=card["model"], options=card["options"], input_shape=[2],
                            num_outputs=1)  # fmt: skip
    return Architecture(
        model=card["model"],
        options=card["options"],
        input_shape=card["data"]["input_shape"],
        num_outputs=card["data"]["num_classes"],
    )


def _load(folder: Path, device: str | torch.device) -> tuple[nn.Module, dict[str, Any]]:
    from zoo import cards

    card_path = folder / cards.CARD
    if not card_path.is_file():
        raise ZooError(f"{str(folder)!r} is not a run folder: it has no {cards.CARD}")
    card = cards.read_card(card_path)
    checkpoint = cards.checkpoint_of(card, card_path)
    cards.verify_checkpoint(checkpoint, card, card_path)
    model, _ = cards.load_model(checkpoint, _architecture(card), device=device)
    return model.eval(), card


def load_run(folder: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The model and card of a run folder (``card.json`` + checkpoint), checked and verified.

    Args:
        folder: a run folder written by ``python -m zoo train`` (or ``wasserstein``,
            ``graft``).
        device: where to put the model.

    Returns:
        ``(model, card)``: the model in eval mode, the checked card (a dict).

    Raises:
        ZooError: if the folder has no card, the card is malformed, its checkpoint lies
            outside the folder, is not the card's (SHA-256) or holds another architecture.
    """
    return _load(Path(folder), device)


@contextlib.contextmanager
def _on_disk(name: str) -> Iterator[Path]:
    """The shipped run ``name`` as a folder on disk (Note [Shipped checkpoints as package
    data])."""
    entry = _shipped_root().joinpath(name)
    if isinstance(entry, Path):
        yield entry
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="zoo-pretrained-") as tmp:
        for item in entry.iterdir():
            if item.is_file():
                Path(tmp, item.name).write_bytes(item.read_bytes())
        yield Path(tmp)


def load_pretrained(
    name: str, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """A checkpoint shipped with the zoo, as ``(model, card)``.

    The card is checked, and the checkpoint's SHA-256 must be the card's
    ``checkpoint_sha256`` before it is loaded: a changed or swapped file is refused.

    Args:
        name: a name of ``list_models(pretrained=True)``.
        device: where to put the model.

    Returns:
        ``(model, card)``: the model in eval mode; the card (a dict) with its numbers
        (``clean_accuracy``, ``certified_accuracy``, ``lipschitz_bound``, ...). The run's
        ``README.md`` says what they mean.

    Raises:
        ZooError: for an unknown name (the message lists the shipped ones), a malformed
            card, or a checkpoint that is not the card's.

    Examples:
        >>> import zoo
        >>> model, card = zoo.load_pretrained("groupsort-mlp-digits")
        >>> model.training, card["model"], card["data"]["name"]
        (False, 'groupsort-mlp', 'digits')
    """
    shipped = _shipped()
    if not isinstance(name, str) or name not in shipped:
        from zoo.models import MODELS

        hint = ""
        if isinstance(name, str) and name in MODELS:
            hint = (
                f" ({name!r} is an architecture without shipped weights: build it with "
                f"zoo.models.build or train it with `python -m zoo train {name}`)"
            )
        raise ZooError(
            f"unknown pretrained model {name!r}{hint}; shipped checkpoints: "
            f"{', '.join(shipped) or 'none'} (zoo.list_models(pretrained=True))"
        )
    with _on_disk(name) as folder:
        return _load(folder, device)
