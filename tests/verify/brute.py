"""Exact minima of piecewise-linear networks by brute force, independent of lipnets' code.

This module holds no tests; ``test_milp.py`` (and the branch-and-bound tests) import it.

* `region_minima`: a network of two free inputs is cut into its linear regions, convex
  polygons of the input box (each ReLU, LeakyReLU, MaxMin pair or max-pool candidate splits
  the current polygons along a line on which the network is affine), and each margin's
  minimum is its smallest value at the polygons' vertices (a linear function on a polygon is
  smallest at a vertex). Exact up to float64 rounding.
* `pattern_minima`: a ReLU MLP of any input size: one linear program per activation pattern
  of the neurons that interval arithmetic leaves unstable (scipy.optimize.linprog); the
  smallest optimum over the feasible patterns is the exact minimum.

Networks are lists of steps applied to an affine expression ``E t + e`` of the free
inputs: ``("affine", W, b)``, ``("relu",)``, ``("leaky", a)`` (``("leaky", a, rows)`` acts on
those rows only: with ``a = 0`` it writes the ReLU of a residual block), ``("maxmin",)`` (pairs
``(2i, 2i + 1)`` become ``(max, min)``, as `lipnets.MaxMin` writes them) and
``("max", groups)`` (one output per group of indices: their maximum, for max pooling).
`steps_of` reads them from an ``nn.Sequential`` of Linear, Conv2d, ReLU, LeakyReLU,
MaxMin, MaxPool2d and Flatten layers by applying each linear layer to basis vectors.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.optimize import linprog
from torch import nn

import lipnets

Region = tuple[list[np.ndarray], np.ndarray, np.ndarray]
"""A convex polygon (its vertices in order) and the expression (E, e) of the current layer."""


def steps_of(model: nn.Sequential, in_shape: tuple[int, ...]) -> list[tuple]:
    """The steps of an ``nn.Sequential`` (float64), linear layers as dense matrices."""
    steps: list[tuple] = []
    shape = in_shape
    for layer in model:
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            n = int(np.prod(shape))
            with torch.no_grad():
                zero = layer(torch.zeros((1, *shape), dtype=torch.float64))
                basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
                w = (layer(basis) - zero).reshape(n, -1).T
            steps.append(("affine", w.numpy(), zero.reshape(-1).numpy()))
            shape = tuple(zero.shape[1:])
        elif isinstance(layer, nn.ReLU):
            steps.append(("relu",))
        elif isinstance(layer, nn.LeakyReLU):
            steps.append(("leaky", layer.negative_slope))
        elif isinstance(layer, lipnets.MaxMin):
            steps.append(("maxmin",))
        elif isinstance(layer, nn.MaxPool2d):
            k = layer.kernel_size
            c, h, w_ = shape
            index = np.arange(c * h * w_).reshape(c, h, w_)
            groups = [
                index[ch, i : i + k, j : j + k].reshape(-1)
                for ch in range(c)
                for i in range(0, h - k + 1, k)
                for j in range(0, w_ - k + 1, k)
            ]
            steps.append(("max", groups))
            shape = (c, h // k, w_ // k)
        elif isinstance(layer, nn.Flatten):
            shape = (int(np.prod(shape)),)
        else:
            raise TypeError(f"no brute-force step for {type(layer).__name__}")
    return steps


def _clip(poly: list[np.ndarray], a: np.ndarray, b: float) -> list[np.ndarray]:
    """The part of a convex polygon where a . t + b >= 0 (Sutherland-Hodgman, one edge)."""
    out = []
    values = [float(a @ p + b) for p in poly]
    for i, p in enumerate(poly):
        q, vp, vq = poly[(i + 1) % len(poly)], values[i], values[(i + 1) % len(poly)]
        if vp >= 0:
            out.append(p)
        if (vp > 0 > vq) or (vp < 0 < vq):
            out.append(p + (q - p) * (vp / (vp - vq)))
    return out if len(out) >= 3 else []


def _split(regions: list[Region], row, on_pos, on_neg) -> list[Region]:
    """Cut each region along row(E, e) = 0; ``on_pos``/``on_neg`` rewrite its expression."""
    out = []
    for poly, e_mat, e_vec in regions:
        a, b = row(e_mat, e_vec)
        values = np.array(poly) @ a + b
        if values.min() >= 0 or values.max() <= 0:  # not cut: one side only
            rewrite = on_pos if values.min() >= 0 else on_neg
            out.append((poly, *rewrite(e_mat.copy(), e_vec.copy())))
            continue
        for side, rewrite in ((1.0, on_pos), (-1.0, on_neg)):
            piece = _clip(poly, side * a, side * b)
            if piece:
                out.append((piece, *rewrite(e_mat.copy(), e_vec.copy())))
    return out


def _apply(regions: list[Region], step: tuple) -> list[Region]:
    kind = step[0]
    if kind == "affine":
        w, b = step[1], step[2]
        return [(p, w @ e_mat, w @ e_vec + b) for p, e_mat, e_vec in regions]
    m = regions[0][1].shape[0]
    if kind in ("relu", "leaky"):
        slope = 0.0 if kind == "relu" else step[1]
        rows = step[2] if len(step) > 2 else range(m)
        for k in rows:

            def scale(e_mat, e_vec, k=k):
                e_mat[k] *= slope
                e_vec[k] *= slope
                return e_mat, e_vec

            regions = _split(regions, lambda e_mat, e_vec, k=k: (e_mat[k], e_vec[k]),
                             lambda em, ev: (em, ev), scale)  # fmt: skip
        return regions
    if kind == "maxmin":
        for k in range(0, m, 2):

            def swap(e_mat, e_vec, k=k):
                e_mat[[k, k + 1]] = e_mat[[k + 1, k]]
                e_vec[[k, k + 1]] = e_vec[[k + 1, k]]
                return e_mat, e_vec

            regions = _split(
                regions, lambda em, ev, k=k: (em[k] - em[k + 1], ev[k] - ev[k + 1]),
                lambda em, ev: (em, ev), swap,
            )  # fmt: skip
        return regions
    if kind == "max":
        groups = step[1]
        # Append one running-maximum row per group, then keep only those rows.
        firsts = [g[0] for g in groups]
        regions = [
            (p, np.vstack([em, em[firsts]]), np.concatenate([ev, ev[firsts]]))
            for p, em, ev in regions
        ]
        for gi, g in enumerate(groups):
            top = m + gi
            for k in g[1:]:

                def take(e_mat, e_vec, k=k, top=top):
                    e_mat[top], e_vec[top] = e_mat[k], e_vec[k]
                    return e_mat, e_vec

                regions = _split(
                    regions, lambda em, ev, k=k, top=top: (em[top] - em[k], ev[top] - ev[k]),
                    lambda em, ev: (em, ev), take,
                )  # fmt: skip
        return [(p, em[m:], ev[m:]) for p, em, ev in regions]
    raise ValueError(f"unknown step {kind}")


def region_minima(steps, base, directions, lo, hi, label: int) -> np.ndarray:
    """Exact minimum over t in [lo, hi]^2 of f_label - f_j for each j (NaN at the label),
    where the network's input is ``base + directions @ t`` (``directions``: (n, 2))."""
    ends = [(lo[0], lo[1]), (hi[0], lo[1]), (hi[0], hi[1]), (lo[0], hi[1])]
    corners = [np.array(c, dtype=np.float64) for c in ends]
    start = (np.asarray(directions, np.float64), np.asarray(base, np.float64))
    regions: list[Region] = [(corners, *start)]
    for step in steps:
        regions = _apply(regions, step)
    classes = regions[0][1].shape[0]
    best = np.full(classes, np.inf)
    for poly, e_mat, e_vec in regions:
        margins = e_mat[label] - e_mat  # (C, 2)
        offsets = e_vec[label] - e_vec
        for p in poly:
            best = np.minimum(best, margins @ p + offsets)
    best[label] = np.nan
    return best


def pattern_minima(layers, lo, hi, label: int) -> np.ndarray:
    """Exact minima of f_label - f_j over the box [lo, hi] for a ReLU MLP given as
    ``[(W, b), ...]`` (ReLU between consecutive pairs), by one LP per activation pattern."""
    # Interval arithmetic decides the stable neurons; patterns range over the others.
    low, up = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    free: list[tuple[int, int]] = []
    fixed: dict[tuple[int, int], bool] = {}
    for depth, (w, b) in enumerate(layers[:-1]):
        pos, neg = np.clip(w, 0, None), np.clip(w, None, 0)
        zl, zu = pos @ low + neg @ up + b, pos @ up + neg @ low + b
        for k in range(w.shape[0]):
            if zl[k] >= 0 or zu[k] <= 0:
                fixed[(depth, k)] = zl[k] >= 0
            else:
                free.append((depth, k))
        low, up = np.maximum(zl, 0), np.maximum(zu, 0)
    classes = layers[-1][0].shape[0]
    best = np.full(classes, np.inf)
    for bits in itertools.product([False, True], repeat=len(free)):
        on = {**fixed, **dict(zip(free, bits, strict=True))}
        a_mat, c_vec = np.eye(len(lo)), np.zeros(len(lo))
        rows, rhs = [], []
        for depth, (w, b) in enumerate(layers[:-1]):
            a_mat, c_vec = w @ a_mat, w @ c_vec + b
            mask = np.array([on[(depth, k)] for k in range(w.shape[0])])
            sign = np.where(mask, -1.0, 1.0)  # active: -z <= 0; inactive: z <= 0
            rows.append(sign[:, None] * a_mat)
            rhs.append(-sign * c_vec)
            a_mat, c_vec = a_mat * mask[:, None], c_vec * mask
        w, b = layers[-1]
        out_a, out_c = w @ a_mat, w @ c_vec + b
        for j in range(classes):
            if j == label:
                continue
            res = linprog(out_a[label] - out_a[j], A_ub=np.vstack(rows), b_ub=np.concatenate(rhs),
                          bounds=list(zip(lo, hi, strict=True)), method="highs")  # fmt: skip
            if res.status == 0:
                best[j] = min(best[j], res.fun + out_c[label] - out_c[j])
    best[label] = np.nan
    return best
