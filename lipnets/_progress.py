"""The one progress-bar helper (tqdm is optional: asked for and missing, it is an ImportError)."""

from __future__ import annotations

from typing import Any

__all__ = ["progress_bar"]


def progress_bar(enabled: bool, total: int | None, desc: str) -> Any:
    """A ``tqdm`` bar of ``total`` steps named ``desc``, or ``None`` when not ``enabled``.

    Raises:
        ImportError: if ``enabled`` and tqdm is not installed.
    """
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("progress=True needs tqdm: pip install tqdm") from exc
    return tqdm(total=total, desc=desc)
