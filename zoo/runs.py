"""Run folders, written whole or not at all, never over an earlier run.

`write_run_folder` writes every file of a run (checkpoint, card, plot) into a
hidden temporary folder inside ``--out``, ``.zoo-partial-HOST-PID-TOKEN-NAME``,
flushes each to disk, and only then renames the folder into place with one
``rename``: a reader sees either no run or the whole run. If ``NAME`` is
taken, the run goes to ``NAME-2`` (then ``-3``, ...): an existing run is never
overwritten, and the CLI says which folder it wrote. A rename onto an existing
non-empty folder fails, so two writers racing for one name cannot both win.

When the files include the card (``card.json``) and no ``README.md``, the human-readable
model card ``README.md`` is rendered from the written card (`zoo.modelcard.write_readme`)
and written last, into the same temporary folder: it is part of the run like every other
file, and a run folder never holds a card without its README.

An exception or a SIGINT (``KeyboardInterrupt``) while writing removes the
temporary folder. A SIGKILL or a power loss leaves it behind, hidden; the next
run written into the same ``--out`` removes the temporary folders of writers
that no longer run on this host and ignores the others.

Note [Run folder test hook]: for tests only, with ``ZOO_TEST_PAUSE_AFTER`` set
to a file name (``model.safetensors``, ``card.json``, ...), the writer creates
the file named by ``ZOO_TEST_PAUSE_MARKER`` (when set) once that file is
written and then sleeps ``ZOO_TEST_PAUSE_SECONDS`` (default 60), so that a
test can signal it between two files. Nothing else reads these variables.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from zoo.errors import ZooError

__all__ = ["TEMP_PREFIX", "is_temporary", "write_run_folder"]

#: Every temporary folder's name starts with this (a dot: hidden, and refused as ``--name``).
TEMP_PREFIX = ".zoo-partial-"
#: How many suffixes (``NAME-2`` ... ) are tried before giving up.
MAX_SUFFIX = 1000


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary run folder of `write_run_folder`."""
    return name.startswith(TEMP_PREFIX)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Remove the temporary folders left in ``out`` by writers of this host that are gone."""
    host = _host()
    for entry in out.iterdir():
        if not is_temporary(entry.name) or not entry.is_dir() or entry.is_symlink():
            continue
        parts = entry.name[len(TEMP_PREFIX) :].split("-", 3)
        if len(parts) != 4 or parts[0] != host or not parts[1].isdigit():
            continue  # another host's, or not ours: ignored
        if not _alive(int(parts[1])):
            shutil.rmtree(entry, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder) to disk; a file system that cannot is let be."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _test_pause(written: str) -> None:
    """Note [Run folder test hook]."""
    if os.environ.get("ZOO_TEST_PAUSE_AFTER") != written:
        return
    marker = os.environ.get("ZOO_TEST_PAUSE_MARKER")
    if marker:
        Path(marker).write_text(f"{os.getpid()}\n")
    time.sleep(float(os.environ.get("ZOO_TEST_PAUSE_SECONDS", "60")))


def _candidates(name: str) -> list[str]:
    return [name] + [f"{name}-{i}" for i in range(2, MAX_SUFFIX + 1)]


def write_run_folder(
    out: str | Path, name: str, files: Sequence[tuple[str, Callable[[Path], object]]]
) -> Path:
    """Write a run folder ``out/name`` (or ``out/name-2``, ...) atomically and return it.

    Args:
        out: the parent folder (``--out``); created if missing.
        name: the run's name, a plain folder name (`zoo.arguments.run_name`).
        files: ``(file name, writer)`` pairs, written in this order:
            ``writer(path)`` writes ``path`` inside the temporary folder, and
            may read the files written before it (the card reads the
            checkpoint's digest). With a ``card.json`` among them and no
            ``README.md``, the README is rendered from the card and written last.

    Returns:
        The run folder, ``out/name`` when that name was free, else the first
        free ``out/name-K``.

    Raises:
        ZooError: if ``name`` is not a plain folder name, ``out`` cannot be
            written, or every suffix is taken.
    """
    from zoo.arguments import run_name
    from zoo.cards import CARD
    from zoo.modelcard import README, write_readme

    try:
        run_name(name)
    except argparse.ArgumentTypeError as error:
        raise ZooError(f"the run name {error}") from None
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        temp = out / f"{TEMP_PREFIX}{_host()}-{os.getpid()}-{secrets.token_hex(4)}-{name}"
        temp.mkdir()
    except OSError as error:
        raise ZooError(f"cannot write a run folder into --out {str(out)!r}: {error}") from None
    try:
        for file_name, writer in files:
            path = temp / file_name
            try:
                writer(path)
            except OSError as error:
                raise ZooError(f"cannot write {file_name} into {str(out)!r}: {error}") from None
            _fsync(path)
            _test_pause(file_name)
        names = [file_name for file_name, _ in files]
        if CARD in names and README not in names:
            try:
                write_readme(temp)
            except OSError as error:
                raise ZooError(f"cannot write {README} into {str(out)!r}: {error}") from None
            _fsync(temp / README)
            _test_pause(README)
        _fsync(temp)
        for candidate in _candidates(name):
            target = out / candidate
            if target.exists() or target.is_symlink():
                continue
            try:
                os.rename(temp, target)  # atomic; fails onto a non-empty folder or a file
            except OSError:
                if target.exists():
                    continue  # taken meanwhile: try the next name
                raise
            _fsync(out)
            return target
        raise ZooError(
            f"--out {str(out)!r} already holds runs {name!r} to {name}-{MAX_SUFFIX}: "
            "pass another --name"
        )
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
