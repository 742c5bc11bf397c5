r"""Arithmetic rounded up, for the constants of the fold.

# Note [Rounding up]

Every constant of the fold is a float computed with round-to-nearest; each
product, sum, quotient and square root whose float result is below the exact
one is moved to the next float above it (`mul_up`, `add_up`, `div_up`,
`sqrt_up`; exactness is decided with ``fractions.Fraction``), so the composed
bound is at least the exact composition of the leaf bounds (``cat([x, x, x])``
gives the float just above $\sqrt 3$, whose square is at least 3). Leaf bounds
carry their own slack (Note [Sound spectral norm in float64]).
"""

from __future__ import annotations

import math
from fractions import Fraction

__all__ = ["add_up", "div_up", "mul_up", "sqrt_up", "up"]


def up(value: float) -> float:
    """The float just above ``value`` (for a positive result known to be rounded)."""
    if value <= 0 or not math.isfinite(value):
        return value
    return math.nextafter(value, math.inf)


def mul_up(a: float, b: float) -> float:
    """``a * b`` rounded up: exact when the float product is, else the next float
    (Note [Rounding up])."""
    p = a * b
    if not math.isfinite(p) or Fraction(p) >= Fraction(a) * Fraction(b):
        return p
    return math.nextafter(p, math.inf)


def add_up(a: float, b: float) -> float:
    """``a + b`` rounded up."""
    s = a + b
    if not math.isfinite(s) or Fraction(s) >= Fraction(a) + Fraction(b):
        return s
    return math.nextafter(s, math.inf)


def sqrt_up(v: float) -> float:
    """``sqrt(v)`` rounded up (``v >= 0``)."""
    r = math.sqrt(v)
    if not math.isfinite(r) or Fraction(r) ** 2 >= Fraction(v):
        return r
    return math.nextafter(r, math.inf)


def div_up(a: float, b: float) -> float:
    """``a / b`` rounded up (``b > 0``)."""
    q = a / b
    if not math.isfinite(q) or Fraction(q) * Fraction(b) >= Fraction(a):
        return q
    return math.nextafter(q, math.inf)
