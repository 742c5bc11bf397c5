"""Every value of ``python -m zoo`` checked at the door, by one mechanism: argparse types.

Each option's ``type=`` is one of the callables below. argparse calls it on
the text the user typed, before a command starts, so a bad value fails
before any data is loaded, any model is built or any file is written. A
refusal raises `argparse.ArgumentTypeError` with the allowed range and the
value received; argparse prefixes the option's name, and `Parser.error`
hands the message to ``python -m zoo``, which prints it as one line on stderr
(``python -m zoo train: error: argument --epochs: must be an integer >= 1,
got '0'``) and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import NoReturn

__all__ = [
    "CommandLineError",
    "Parser",
    "count",
    "even_width",
    "nonnegative",
    "positive",
    "radius",
    "run_name",
    "seed",
    "unit",
    "writable_folder",
]

#: Seeds go to `torch.manual_seed` (and ``seed + 1`` for a critic's second sample).
SEED_LIMIT = 2**32


class CommandLineError(Exception):
    """A value argparse refused: ``prog`` (``python -m zoo train``) and the message."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog
        self.message = message


class Parser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors are raised, not printed with the usage.

    ``python -m zoo`` catches `CommandLineError` and prints one line; the
    sub-parsers are made of this class too (argparse builds them with the
    parent's class).
    """

    def error(self, message: str) -> NoReturn:
        raise CommandLineError(self.prog, message)


def _show(text: str) -> str:
    return repr(text if len(text) <= 200 else text[:197] + "...")


def _integer(text: str, allowed: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {_show(text)}") from None


def _finite(text: str, allowed: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {_show(text)}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {_show(text)}")
    return value


def count(text: str) -> int:
    """A count (epochs, steps, batch size, samples, attacked points): an integer >= 1."""
    allowed = "an integer >= 1"
    value = _integer(text, allowed)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {_show(text)}")
    return value


def even_width(text: str) -> int:
    """A width that pairs channels (MaxMin, GroupSort(2)): an even integer >= 2."""
    allowed = "an even integer >= 2"
    value = _integer(text, allowed)
    if value < 2 or value % 2:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {_show(text)}")
    return value


def seed(text: str) -> int:
    """A seed: an integer in ``[0, 2**32)``."""
    allowed = "an integer in [0, 2**32)"
    value = _integer(text, allowed)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {_show(text)}")
    return value


def positive(text: str) -> float:
    """A rate, a margin or a temperature: a finite number > 0 (not nan, not inf)."""
    allowed = "a finite number > 0"
    value = _finite(text, allowed)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {_show(text)}")
    return value


def nonnegative(text: str) -> float:
    """A weight (weight decay, the HKR hinge weight): a finite number >= 0."""
    allowed = "a finite number >= 0"
    value = _finite(text, allowed)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {_show(text)}")
    return value


def unit(text: str) -> float:
    """A weight in [0, 1] (the clean-loss weight kappa of certified training)."""
    allowed = "a number in [0, 1]"
    value = _finite(text, allowed)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {_show(text)}")
    return value + 0.0  # -0.0 -> 0.0


def radius(text: str) -> float:
    """An l2 radius: a finite number >= 0."""
    allowed = "a radius, a finite number >= 0"
    value = _finite(text, allowed)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {_show(text)}")
    return value + 0.0  # -0.0 -> 0.0


def run_name(text: str) -> str:
    """A run folder's name: one plain path component.

    No path separator, not ``.`` or ``..``, not empty, and not starting with
    a dot: hidden names inside ``--out`` are the zoo's temporary folders (see
    `zoo.runs`), and a run is never hidden.
    """
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    why = None
    if not text:
        why = "it is empty"
    elif any(s in text for s in seps):
        why = "it holds a path separator"
    elif text in (".", ".."):
        why = "it is a relative path"
    elif text.startswith("."):
        why = "it starts with a dot (hidden names are the zoo's temporary folders)"
    elif "\0" in text or any(ord(c) < 32 for c in text):
        why = "it holds a control character"
    if why is not None:
        raise argparse.ArgumentTypeError(
            f"must be a plain folder name (no '/', not '.' or '..', not starting with '.'), "
            f"got {_show(text)}: {why}"
        )
    return text


def writable_folder(text: str) -> Path:
    """A folder the zoo may write into: an existing writable folder, or one it can create.

    Nothing is created here: the first existing folder on the way to ``text``
    must be writable, and nothing on the way may be a file.
    """
    allowed = "a writable folder, or one that can be created"
    if not text:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got ''")
    path = Path(text)
    probe = path
    while not probe.exists() and not probe.is_symlink():
        if probe.parent == probe:
            break
        probe = probe.parent
    why = None
    if probe.is_symlink() and not probe.exists():
        why = f"{str(probe)!r} is a broken symbolic link"
    elif not probe.is_dir():
        why = f"{str(probe)!r} is a file, not a folder"
    elif not os.access(probe, os.W_OK | os.X_OK):
        why = f"{str(probe)!r} is not writable"
    if why is not None:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {_show(text)}: {why}")
    return path
