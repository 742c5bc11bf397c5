r"""Arithmetic rounded up, for every composition of constants: the fold of
`lipnets.bounds` and the local bounds of `lipnets.propagation.local_lipschitz`.

# Note [Rounding up]

Every constant of a composition is computed with round-to-nearest; each
product, sum, quotient and square root whose result may be below the exact one
is moved to the next float above it (`mul_up`, `add_up`, `div_up`, `sqrt_up`,
and the composition rules `weighted_sum` and `root_sum_squares` built on them),
so a composed bound is at least the exact composition of its factors
(``cat([x, x, x])`` gives the float just above $\sqrt 3$, whose square is at
least 3). On Python floats exactness is decided with ``fractions.Fraction``
(an exact result is kept); on tensors (one constant per sample) every positive
result moves up one ulp, which is enough because one correctly rounded
operation errs by at most half an ulp. Leaf bounds carry their own slack (Note
[Sound spectral norm in float64]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["add_up", "div_up", "mul_up", "root_sum_squares", "sqrt_up", "up", "weighted_sum"]

Value = TypeVar("Value", float, Tensor)


def up(value: float) -> float:
    """The float just above ``value`` (for a positive result known to be rounded)."""
    if value <= 0 or not math.isfinite(value):
        return value
    return math.nextafter(value, math.inf)


def _tensor_up(value: Tensor) -> Tensor:
    """Every positive finite entry of a float64 result moved to the next float above."""
    value = value.to(torch.float64)
    bumped = torch.nextafter(value, torch.full_like(value, math.inf))
    return torch.where((value > 0) & torch.isfinite(value), bumped, value)


def _tensors(*values: object) -> bool:
    return any(isinstance(v, Tensor) for v in values)


def _f64(value: object) -> Tensor:
    """A float64 tensor (both operands: a 0-dim float64 tensor times a float32 batch
    would compute in float32)."""
    return torch.as_tensor(value).to(torch.float64)


def mul_up(a, b):  # type: ignore[no-untyped-def]
    """``a * b`` rounded up: exact when the float product is, else the next float
    (Note [Rounding up]); floats or float64 tensors."""
    if _tensors(a, b):
        return _tensor_up(_f64(a) * _f64(b))
    p = a * b
    if not math.isfinite(p) or Fraction(p) >= Fraction(a) * Fraction(b):
        return p
    return math.nextafter(p, math.inf)


def add_up(a, b):  # type: ignore[no-untyped-def]
    """``a + b`` rounded up (floats or float64 tensors)."""
    if _tensors(a, b):
        return _tensor_up(_f64(a) + _f64(b))
    s = a + b
    if not math.isfinite(s) or Fraction(s) >= Fraction(a) + Fraction(b):
        return s
    return math.nextafter(s, math.inf)


def sqrt_up(v):  # type: ignore[no-untyped-def]
    """``sqrt(v)`` rounded up (``v >= 0``; a float or a float64 tensor)."""
    if isinstance(v, Tensor):
        return _tensor_up(_f64(v).sqrt())
    r = math.sqrt(v)
    if not math.isfinite(r) or Fraction(r) ** 2 >= Fraction(v):
        return r
    return math.nextafter(r, math.inf)


def div_up(a, b):  # type: ignore[no-untyped-def]
    """``a / b`` rounded up (``b > 0``; floats or float64 tensors)."""
    if _tensors(a, b):
        return _tensor_up(_f64(a) / _f64(b))
    q = a / b
    if not math.isfinite(q) or Fraction(q) * Fraction(b) >= Fraction(a):
        return q
    return math.nextafter(q, math.inf)


def weighted_sum(weights: Sequence[float], values: Sequence[Value]) -> Value:
    r"""$\sum_k |w_k| K_k$ rounded up: the constant of a sum $\sum_k w_k f_k$."""
    total: Value = 0.0  # type: ignore[assignment]
    for w, v in zip(weights, values, strict=True):
        total = add_up(total, mul_up(abs(float(w)), v))
    return total


def root_sum_squares(values: Sequence[Value], counts: Sequence[float] | None = None) -> Value:
    r"""$\sqrt{\sum_k m_k K_k^2}$ rounded up: the constant of a map whose output entries
    are entries of disjoint parts $f_k$, each entry of part $k$ copied at most $m_k$ times
    (``cat``, ``stack``, indexing; $m_k = 1$ by default)."""
    counts = [1.0] * len(values) if counts is None else counts
    total: Value = 0.0  # type: ignore[assignment]
    for m, v in zip(counts, values, strict=True):
        total = add_up(total, mul_up(float(m), mul_up(v, v)))
    return sqrt_up(total)
