"""The zoo's one error type: a message for the user, printed by the CLI without a traceback."""

from __future__ import annotations


class ZooError(ValueError):
    """Bad input to a zoo command: an unknown name, a missing dataset, a wrong checkpoint.

    The message says what was received and what would work (the valid names,
    the flag to pass, the file that was expected). ``python -m zoo`` prints it
    and exits with status 2.
    """


def unknown(what: str, name: object, valid: list[str] | tuple[str, ...]) -> ZooError:
    """``ZooError`` for an unknown ``what`` called ``name``, listing the valid ones."""
    return ZooError(f"unknown {what} {name!r}; valid {what}s: {', '.join(valid)}")
