"""Module-mode helpers: kept for imports of ``lipnets._modes``; see `lipnets._state`."""

from lipnets._state import eval_mode

__all__ = ["eval_mode"]
