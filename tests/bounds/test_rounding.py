"""Note [Rounding up]: every composed constant is at least the exact composition."""

from __future__ import annotations

import random
from fractions import Fraction

import torch
from torch import nn

from lipnets.bounds.rounding import (
    add_up,
    div_up,
    mul_up,
    root_sum_squares,
    sqrt_up,
    weighted_sum,
)
from lipnets.propagation import local_lipschitz


def _floats(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0.0, 10.0) * 10.0 ** rng.randint(-5, 5) for _ in range(n)]


def test_float_operations_round_up_and_keep_exact_results() -> None:
    xs, ys = _floats(500, 0), _floats(500, 1)
    for a, b in zip(xs, ys, strict=True):
        assert Fraction(mul_up(a, b)) >= Fraction(a) * Fraction(b)
        assert Fraction(add_up(a, b)) >= Fraction(a) + Fraction(b)
        assert Fraction(div_up(a, b)) * Fraction(b) >= Fraction(a)
        assert Fraction(sqrt_up(a)) ** 2 >= Fraction(a)
    assert (mul_up(2.0, 3.0), add_up(0.5, 0.25), sqrt_up(4.0), div_up(1.0, 4.0)) == (
        6.0,
        0.75,
        2.0,
        0.25,
    )
    assert Fraction(root_sum_squares([1.0, 1.0, 1.0])) ** 2 >= 3
    assert root_sum_squares([1.0, 1.0, 1.0]) == 1.7320508075688774  # the float above sqrt 3
    assert Fraction(weighted_sum([-0.1, 0.2], [3.0, 0.7])) >= Fraction(0.1) * 3 + Fraction(
        0.2
    ) * Fraction(0.7)


def test_tensor_operations_round_up_per_entry_in_float64() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(400, generator=g, dtype=torch.float32) * 7  # a float32 batch
    b = 1.0 / 3.0
    for got, exact in (
        (mul_up(a, b), lambda x: Fraction(x) * Fraction(b)),
        (add_up(a, b), lambda x: Fraction(x) + Fraction(b)),
        (div_up(a, 3.0), lambda x: Fraction(x) / 3),
    ):
        assert got.dtype == torch.float64
        for x, y in zip(a.tolist(), got.tolist(), strict=True):
            assert Fraction(y) >= exact(x)
    root = sqrt_up(torch.full((5,), 3.0, dtype=torch.float64))
    assert all(Fraction(r) ** 2 >= 3 for r in root.tolist())
    total = root_sum_squares([torch.ones(4, dtype=torch.float64)] * 2, [1, 2])
    assert all(Fraction(r) ** 2 >= 3 for r in total.tolist())


class _Triple(nn.Module):
    def forward(self, x):
        return torch.cat([x, x, x], dim=1)


def test_local_lipschitz_rounds_its_constants_up() -> None:
    """A local constant is the fold's rules on masked norms, rounded the same way:
    ``cat([x, x, x])`` is at least sqrt 3 (to nearest it would be 1 ulp below)."""
    x = torch.randn(3, 4, dtype=torch.float64)
    local = local_lipschitz(_Triple(), x, 0.1)
    assert all(Fraction(v) ** 2 >= 3 for v in local.tolist())
