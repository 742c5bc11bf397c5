r"""The constant of ``F.normalize`` in the op table (Note [Normalisation]).

# Note [Normalisation]

``F.normalize(x, p=2, dim, eps)`` maps each fibre $v$ along ``dim`` to $v / \max(\|v\|_2,
\varepsilon)$, which is $P(v / \varepsilon)$ with $P$ the Euclidean projection onto the unit
ball ($\|v\| \le \varepsilon$: $v / \varepsilon$ is in the ball; otherwise its projection is
$v / \|v\|$). A projection onto a convex set is 1-Lipschitz, so each fibre's map, and the
whole map (the fibres are disjoint blocks), is $1/\varepsilon$-Lipschitz, which is exact
($v \mapsto v / \varepsilon$ near 0). With torch's default $\varepsilon = 10^{-12}$ that
constant is $10^{12}$: sound, and useless, so lipnets refuses a global bound for that
``eps`` (fx records the defaults as if passed, so the value is what is checked) and asks
for the floor the user means. Locally, on a box of a fibre whose points are at
distance at least $r$ from 0, the Jacobian of $P(v/\varepsilon)$ has norm $1 / \max(\|v\|,
\varepsilon) \le 1 / \max(r, \varepsilon)$ (it is $(I - \hat v \hat v^\top)/\|v\|$
outside the ball), and the box is convex, so $1 / \max(r, \varepsilon)$ (the largest over
the fibres) is a Lipschitz constant there (`local_lipschitz`; the op of
`lipnets.propagation.ops_softmax`). Other $p$ are refused: the projection argument is
Euclidean.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from lipnets.graph.linear_maps import _bind, _refuse, map_dim

__all__ = ["normalize_args", "normalize_bound"]

_TORCH_DEFAULT_EPS = 1e-12

Resolve = Callable[[Any], Any]


def normalize_args(
    node: fx.Node, resolve: Resolve, shape: torch.Size | None
) -> tuple[tuple[int, ...], float, bool]:
    """(dims, eps, whether eps is not torch's default) of an ``F.normalize`` node with p = 2."""
    args = _bind(node, F.normalize, resolve)
    p, dim, eps = args["p"], args["dim"], args["eps"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or float(p) != 2.0:
        raise _refuse(node, f"it normalises with p={p!r}; lipnets bounds p=2 only")
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
    mapped = tuple(map_dim(node, d, shape) for d in dims)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise _refuse(node, f"its eps {eps!r} is not a positive number")
    given = float(eps) != _TORCH_DEFAULT_EPS
    return tuple(d for d in mapped if d is not None), float(eps), given


def normalize_bound(node: fx.Node, resolve: Resolve, shape: torch.Size | None) -> float:
    """$1/\\varepsilon$, refused for torch's default ``eps`` (Note [Normalisation])."""
    _, eps, given = normalize_args(node, resolve, shape)
    if not given:
        raise _refuse(
            node,
            "F.normalize is 1/eps-Lipschitz (Note [Normalisation]), 1e12 with torch's "
            "default eps: pass eps= as the floor you mean, or bound it on a ball with "
            "lipnets.propagation.local_lipschitz",
        )
    return math.nextafter(1.0 / eps, math.inf)  # above the correctly rounded quotient
