"""The one progress-bar helper (tqdm is optional: asked for and missing, it is an ImportError)."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(enabled: bool | None, total: int | None, desc: str) -> Any:
    """A ``tqdm`` bar of ``total`` steps named ``desc``, or ``None`` when not ``enabled``.

    ``enabled=None`` (the default of the long calls) shows the bar when stderr is a
    terminal and tqdm is installed, and nothing otherwise (logs, pipes, tests).

    Raises:
        ImportError: if ``enabled`` is True and tqdm is not installed.
    """
    if enabled is None:
        enabled = _terminal() and importlib.util.find_spec("tqdm") is not None
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("progress=True needs tqdm: pip install tqdm") from exc
    return tqdm(total=total, desc=desc)


def _terminal() -> bool:
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False
