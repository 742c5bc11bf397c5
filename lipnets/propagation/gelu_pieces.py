r"""GELU's second relaxation: lines chosen by convexity pieces, each checked exactly.

# Note [GELU by convexity pieces]

$f(x) = x \Phi(x)$ has $f''(x) = \varphi(x) (2 - x^2)$: it is convex on $C = [-\sqrt2,
\sqrt2]$ and concave on each of $(-\infty, -\sqrt2]$ and $[\sqrt2, \infty)$. This is the
second relaxation variant of exact GELU (Note [Relaxation variants] in
`lipnets.propagation.propagator`): the lines auto_LiRPA's CROWN chooses (chords, tangents
at the midpoint, and tangents through an endpoint rounded outward to a 0.01 grid, found by
bisection), so that lipnets' CROWN is never looser than auto_LiRPA's. Every candidate
line is kept only where one of these exact conditions proves it on $[l, u]$, and the
entry gets the first variant's lines (Note [Relaxations of smooth activations] in
`lipnets.propagation.ops_elementwise`) where none does. With $k$ the chord's slope:

* *Lower tangent at $d \in C$*: valid iff $t_d(l) \le f(l)$ and $t_d(u) \le f(u)$. On
  $C$, $f$ is convex and lies above its tangent; on a concave piece met by $[l, u]$,
  $f - t_d$ is concave, and it is $\ge 0$ at both ends of that part (the end in $C$,
  $\pm\sqrt2$, and $l$ or $u$), so it is $\ge 0$ on it.
* *Upper tangent at $d \ge \sqrt2$* with $l \ge 0$: valid iff $t_d(l) \ge f(l)$. On
  $[\sqrt2, \infty)$, $f$ is concave and below its tangent; on $[l, \sqrt2] \subset C$,
  $t_d - f$ is concave, $\ge 0$ at $\sqrt2$ and at $l$. The mirror for $d \le -\sqrt2$
  with $u \le 0$: valid iff $t_d(u) \ge f(u)$.
* *Upper chord*: valid iff ($u \le \sqrt2$ or $k \le f'(u)$) and ($l \ge -\sqrt2$ or $k
  \ge f'(l)$). $g = $ chord $- f$ vanishes at $l$ and $u$. On $[\sqrt2, u]$ it is convex,
  so $g(x) \ge g(u) + g'(u)(x - u) = (k - f'(u))(x - u) \ge 0$ for $x \le u$; the mirror
  on $[l, -\sqrt2]$; on the part in $C$, $g$ is concave and $\ge 0$ at its ends.
* *Lower chord*: on an interval inside one concave piece, always (a chord of a concave
  function); with $0 \le l < \sqrt2 < u$, iff $k \le f'(l)$ ($h = f - $ chord is convex on
  $[l, \sqrt2]$ with $h(l) = 0$, $h'(l) \ge 0$, so $h \ge 0$ there, and concave on
  $[\sqrt2, u]$, $\ge 0$ at both ends); the mirror with $l < -\sqrt2 < u \le 0$, iff $k \ge
  f'(u)$.
* Inside $C$, the upper chord and the tangent at the midpoint below; inside a concave
  piece, the lower chord and the tangent at the midpoint above: always.

The comparisons are evaluated in the input's dtype (Note [Floating-point rounding] in
`lipnets.propagation.lirpa`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["convex_concave_lines"]

_ROOT2 = math.sqrt(2.0)
_STEP = 0.01
"""The endpoint grid of the tangents through an endpoint."""
_HALVINGS = 100
_MINIMUM = -0.7517916
"""Near GELU's minimiser: the start of the left lower tangent's search."""


def _f(x: Tensor) -> Tensor:
    return x * 0.5 * (1 + torch.erf(x / _ROOT2))


def _df(x: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(x / _ROOT2)) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _below(point: Tensor, d: Tensor) -> Tensor:
    """The tangent at ``d`` is at most f at ``point``."""
    return _df(d) * (point - d) + _f(d) <= _f(point)


def _above(point: Tensor, d: Tensor) -> Tensor:
    """The tangent at ``d`` is at least f at ``point``."""
    return _df(d) * (point - d) + _f(d) >= _f(point)


def _widen(start: Tensor, ok) -> Tensor:  # type: ignore[no-untyped-def]
    """Double ``start`` (away from 0) until ``ok`` holds everywhere (at most 60 times)."""
    for _ in range(60):
        good = ok(start)
        if bool(good.all()):
            break
        start = torch.where(good, start, 2 * start)
    return start


def _bisect(valid_end: Tensor, other_end: Tensor, ok):  # type: ignore[no-untyped-def]
    """Halve ``[valid_end, other_end]`` keeping ``ok`` at the first end: (that end, the
    other end), both within $2^{-100}$ of the interval's length of the boundary."""
    a, b = valid_end, other_end
    for _ in range(_HALVINGS):
        mid = (a + b) / 2
        good = ok(mid)
        a, b = torch.where(good, mid, a), torch.where(good, b, mid)
    return a, b


def _grid(value: Tensor) -> Tensor:
    """The grid index past ``value >= 0`` (floor + 1)."""
    return torch.floor(value.clamp_min(0) / _STEP) + 1


def _tangent(d: Tensor) -> tuple[Tensor, Tensor]:
    slope = _df(d)
    return slope, _f(d) - slope * d


def convex_concave_lines(
    lo: Tensor, up: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(lower slope, lower intercept, proven, upper slope, upper intercept, proven) per entry
    of the lines of Note [GELU by convexity pieces]; lines not proven must not be used."""
    f_lo, f_up = _f(lo), _f(up)
    k = (f_up - f_lo) / (up - lo).clamp_min(1e-8)
    chord_b = f_lo - k * lo
    mid = (lo + up) / 2
    mid_slope, mid_b = _tangent(mid)
    in_c = (lo >= -_ROOT2) & (up <= _ROOT2)
    left_piece, right_piece = up <= -_ROOT2, lo >= _ROOT2
    right = (lo >= 0) & (lo < _ROOT2) & (up > _ROOT2)  # 0 <= l < sqrt2 < u
    left = (up <= 0) & (up > -_ROOT2) & (lo < -_ROOT2)  # l < -sqrt2 < u <= 0
    wide_right = (lo < 0) & (up > _ROOT2)  # l < 0, u > sqrt2 (l below -sqrt2 or not)
    wide_left = (lo < -_ROOT2) & (up > 0) & (up <= _ROOT2)

    # Tangent points through endpoints rounded outward to the grid.
    u_grid = _ROOT2 + _STEP * _grid(up - _ROOT2)
    start = _widen(-torch.ones_like(up), lambda d: _below(u_grid, d))
    d_lower_right, _ = _bisect(start, torch.ones_like(up), lambda d: _below(u_grid, d))
    l_grid = (_ROOT2 - _STEP * _grid(_ROOT2 - lo)).clamp_min(_STEP)
    far = _widen(torch.full_like(lo, 1000.0), lambda d: _above(l_grid, d))
    d_upper_right, _ = _bisect(far, torch.full_like(lo, _ROOT2), lambda d: _above(l_grid, d))
    l_left = -_ROOT2 - _STEP * _grid(-lo - _ROOT2)
    near = _widen(torch.full_like(lo, _MINIMUM), lambda d: _below(l_left, d))
    d_lower_left, _ = _bisect(near, torch.full_like(lo, -_ROOT2), lambda d: _below(l_left, d))
    p_left = (_STEP * _grid(-lo - _ROOT2) - _ROOT2).clamp_max(0.0)
    low = _widen(torch.full_like(lo, -1000.0), lambda d: _above(p_left, d))
    _, d_upper_left = _bisect(low, torch.full_like(lo, -_ROOT2), lambda d: _above(p_left, d))

    # Lower lines.
    lr_slope, lr_b = _tangent(d_lower_right)
    ll_slope, ll_b = _tangent(d_lower_left)
    chord_lower_right = right & (k < _df(lo))
    chord_lower_left = left & (k > _df(up))
    slope_lo = torch.where(in_c, mid_slope, k)
    b_lo = torch.where(in_c, mid_b, chord_b)
    use_lr = (right & ~chord_lower_right) | wide_right
    use_ll = (left & ~chord_lower_left) | wide_left
    slope_lo = torch.where(use_lr, lr_slope, torch.where(use_ll, ll_slope, slope_lo))
    b_lo = torch.where(use_lr, lr_b, torch.where(use_ll, ll_b, b_lo))
    d_lo = torch.where(use_lr, d_lower_right, d_lower_left)
    tangent_lo = use_lr | use_ll
    proven_lo = in_c | left_piece | right_piece | chord_lower_right | chord_lower_left
    tangent_ok = (d_lo >= -_ROOT2) & (d_lo <= _ROOT2)
    tangent_ok &= (slope_lo * lo + b_lo <= f_lo) & (slope_lo * up + b_lo <= f_up)
    proven_lo = proven_lo | (tangent_lo & tangent_ok)

    # Upper lines.
    ur_slope, ur_b = _tangent(d_upper_right)
    ul_slope, ul_b = _tangent(d_upper_left)
    concave = left_piece | right_piece
    slope_up = torch.where(concave, mid_slope, k)
    b_up = torch.where(concave, mid_b, chord_b)
    use_ur = right & ~(k < _df(up))
    use_ul = left & ~(k > _df(lo))
    slope_up = torch.where(use_ur, ur_slope, torch.where(use_ul, ul_slope, slope_up))
    b_up = torch.where(use_ur, ur_b, torch.where(use_ul, ul_b, b_up))
    chord_up = ~(concave | use_ur | use_ul)
    chord_ok = ((up <= _ROOT2) | (k <= _df(up))) & ((lo >= -_ROOT2) | (k >= _df(lo)))
    proven_up = concave | (chord_up & chord_ok)
    proven_up |= use_ur & (d_upper_right >= _ROOT2) & (slope_up * lo + b_up >= f_lo)
    proven_up |= use_ul & (d_upper_left <= -_ROOT2) & (slope_up * up + b_up >= f_up)
    usable = lo < up
    return slope_lo, b_lo, proven_lo & usable, slope_up, b_up, proven_up & usable
