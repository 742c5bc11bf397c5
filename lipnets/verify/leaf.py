r"""The leaves of branch and bound, decided by linear programming with a checked dual.

See Note [Leaves by linear programming] in `lipnets.verify.bab`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from lipnets.propagation.ops_base import Elementwise
from lipnets.propagation.propagator import Propagator

__all__ = ["solve_leaf"]


def solve_leaf(
    prop: Propagator, out: int, spec: Tensor, splits: list[tuple[int, int, int]]
) -> tuple[str, object]:
    """``("verified", bound)``, ``("candidate", point)`` (a point to try) or
    ``("unresolved", None)`` for a leaf: a run Propagator over one l-infinity ball whose
    intervals include the leaf's splits, with no inexact relaxation left."""
    try:
        from scipy.optimize import linprog
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "branch and bound solves its leaves with scipy: pip install 'lipnets[verify]'"
        ) from exc
    for node in prop.nodes:
        if isinstance(node.op, Elementwise):
            i = node.inputs[0]
            if bool(node.op.inexact(prop.lows[i], prop.ups[i]).any()):
                return "unresolved", None  # not affine on the leaf
    x0 = prop.x.reshape(-1).double()
    r = spec.shape[1]
    shape = prop.nodes[out].shape
    low = prop.backward(out, spec.reshape(1, r, *shape), keep=True)[0].double()
    a, c = _affine(prop, r, x0.numel())
    rows_g, rows_h, signs = [], [], []
    by_node: dict[int, list[tuple[int, int]]] = {}
    for node, entry, sign in splits:
        by_node.setdefault(node, []).append((entry, sign))
    for node, items in by_node.items():
        size = prop.nodes[node].shape.numel()
        onehot = torch.zeros((1, len(items), size), dtype=prop.x.dtype)
        for k, (entry, _) in enumerate(items):
            onehot[0, k, entry] = 1.0
        prop.kept.clear()
        prop.backward(node, onehot.reshape(1, len(items), *prop.nodes[node].shape), keep=True)
        g, h = _affine(prop, len(items), x0.numel())
        rows_g.append(g)
        rows_h.append(h)
        signs.extend(float(s) for _, s in items)
    s = torch.tensor(signs, dtype=torch.float64)
    d = (torch.cat(rows_g) * s[:, None]).numpy() if rows_g else np.zeros((0, x0.numel()))
    e = (-torch.cat(rows_h) * s).numpy() if rows_h else np.zeros(0)
    lo, hi = prop.lows[0].reshape(-1).double().numpy(), prop.ups[0].reshape(-1).double().numpy()
    box = list(zip(lo, hi, strict=True))
    proven = math.inf
    for row in range(r):
        if float(low[row]) > 0:
            proven = min(proven, float(low[row]))
            continue
        target = a[row].numpy()
        res = linprog(target, A_ub=-d if len(e) else None, b_ub=-e if len(e) else None,
                      bounds=box, method="highs")  # fmt: skip
        if res.status == 2 and _empty(d, e, lo, hi):
            return "verified", math.inf  # no point of the ball satisfies the splits
        if res.status != 0:
            return "unresolved", None
        mu = np.maximum(-np.asarray(res.ineqlin.marginals), 0.0) if len(e) else np.zeros(0)
        # weak duality over the box (Note [Leaves by linear programming])
        w = target - d.T @ mu
        bound = float(c[row]) + float(mu @ e) + float(np.minimum(w * lo, w * hi).sum())
        if bound > 0:
            proven = min(proven, bound)
            continue
        inside = np.minimum(np.maximum(res.x, lo), hi)  # HiGHS meets bounds to 1e-7 only
        point = torch.as_tensor(inside, dtype=prop.x.dtype).reshape(prop.x.shape)
        return "candidate", point
    return "verified", proven


def _empty(d: np.ndarray, e: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> bool:
    r"""Whether no x of the box [lo, hi] has D x >= e, proven by a checked multiplier.

    The LP min t s.t. D x + t >= e (x in the box, t >= 0) has a positive optimum exactly
    when the constraints are infeasible on the box; for its dual multipliers $\mu \ge 0$
    scaled to $\sum \mu \le 1$, every x of the box and t >= 0 feasible have $t \ge
    \mu^\top e + \min_x (-D^\top \mu)^\top x$ (weak duality), computed over the box.
    """
    if not len(e):
        return False
    k, m = d.shape
    cost = np.zeros(m + 1)
    cost[-1] = 1.0
    a_ub = -np.hstack([d, np.ones((k, 1))])
    bounds = [*zip(lo, hi, strict=True), (0.0, None)]
    from scipy.optimize import linprog

    res = linprog(cost, A_ub=a_ub, b_ub=-e, bounds=bounds, method="highs")
    if res.status != 0:
        return False
    mu = np.maximum(-np.asarray(res.ineqlin.marginals), 0.0)
    mu = mu / max(1.0, float(mu.sum()))
    w = -(d.T @ mu)
    return float(mu @ e) + float(np.minimum(w * lo, w * hi).sum()) > 0


def _affine(prop: Propagator, k: int, size: int) -> tuple[Tensor, Tensor]:
    """(A (k, d), c (k,)): the last backward pass's linear functions A x + c of the input."""
    at_input = prop.kept.get(0)
    if at_input is None:
        a = torch.zeros((k, size), dtype=torch.float64)
    else:
        a = at_input.reshape(k, -1).double()
    assert prop.kept_bias is not None
    return a, prop.kept_bias.reshape(k).double()
