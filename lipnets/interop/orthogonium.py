"""Traced forms for orthogonium's activations (Note [Traced forms] in `lipnets.graph.forms`).

orthogonium's ``MaxMin(axis)`` splits dimension ``axis`` into its two halves ``a`` and
``b`` and returns ``cat([max(a, b), min(a, b)], axis)``: it pairs channel $i$ with channel
$i + C/2$, where `lipnets.functional.max_min` pairs channels $2i$ and $2i + 1$. The form
interleaves the halves (a permutation), applies `lipnets.functional.max_min` and undoes
the interleaving, so the graph holds one MaxMin (1-Lipschitz, and propagated as one)
between two permutations, instead of a maximum and a minimum of two slices of the same
tensor, which the fold could only bound by $\\sqrt 2$. It computes the same function
(the same maxima and minima, moved), checked bit for bit against orthogonium's module in
tests/interop (registered only while orthogonium's code is that of the version it was
checked against, 0.0.4: `lipnets.graph.forms.register_checked_form`).
"""

from __future__ import annotations

from orthogonium.layers.custom_activations import MaxMin
from torch import Tensor

import lipnets.functional as LF
from lipnets.graph.forms import register_checked_form

__all__: list[str] = []


def _max_min(module: MaxMin, z: Tensor) -> Tensor:
    axis = module.axis
    # (..., C) -> (..., 2, C/2) -> (..., C/2, 2) -> (..., C): channel 2j is a_j, 2j + 1 is b_j
    x = z.movedim(axis, -1).unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)
    y = LF.max_min(x, dim=-1)  # 2j: max(a_j, b_j), 2j + 1: min(a_j, b_j)
    return y.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2).movedim(-1, axis)


# The digest of the code the form replicates, in orthogonium 0.0.4 (`source_digest`).
_MAX_MIN = "c1804bc15e74d3dc1992fea778472a2e9833639632b445f8114fccf426e7411b"
register_checked_form(MaxMin, _max_min, (MaxMin.forward,), _MAX_MIN)
