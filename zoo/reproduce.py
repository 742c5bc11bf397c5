"""What ``python -m zoo eval`` compares: the tolerance of each number, and what changed.

`TOLERANCE` says how close a recomputed number must be to the card's, `close` applies it,
and `changes` names what differs between the card's making and this evaluation (the
lipnets and torch versions, the test set's size), which ``eval`` prints next to its verdict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import lipnets

__all__ = ["TOLERANCE", "changes", "close"]

#: Relative tolerances (0: exact). Accuracies are counts over the same test set and must
#: be equal, CROWN-certified ones included (a deterministic float64 computation); the
#: bound is recomputed in float64 from float32 weights (other hardware may round the last
#: bits differently); the lower bound and the attack-robust accuracy come from seeded
#: searches, estimates whose path may drift with rounding.
TOLERANCE = {
    "accuracy": 0.0,
    "lipschitz_bound": 1e-6,
    "lower_bound": 1e-2,
    "crown_certified": 0.0,
    "attack_robust": 1e-2,
}


def close(card_value: float | None, value: float | None, rel: float) -> bool:
    """Whether ``value`` reproduces ``card_value`` within the relative tolerance ``rel``."""
    if card_value is None or value is None:
        return card_value is None and value is None
    if rel == 0.0:
        return card_value == value
    return abs(card_value - value) <= rel * max(abs(card_value), 1e-12)


def changes(card: Mapping[str, Any], info: Any) -> list[str]:
    """What differs between the card's making and this evaluation: versions, test set size."""
    found = []
    if card["lipnets_version"] != lipnets.__version__:
        found.append(
            f"the card was written by lipnets {card['lipnets_version']}, this is "
            f"lipnets {lipnets.__version__}"
        )
    written_with = card.get("torch_version")
    if written_with is not None and written_with != torch.__version__:
        found.append(
            f"the card was written with torch {written_with}, this is torch {torch.__version__}"
        )
    size = card["data"].get("test_size")
    if isinstance(size, int) and size != info.test_size:
        found.append(f"the card's test set had {size} samples, this one has {info.test_size}")
    return found
