r"""The smooth elementwise operations of a propagation graph: tanh, sigmoid, GELU, SiLU.

Each is an `Elementwise` operation (`lipnets.propagation.ops_base`): a
``function``, an exact ``interval`` and a ``relaxation`` by two lines per entry
(Note [Relaxations of smooth activations]). `LeakyCombination` is the affine
node of LeakyReLU's rewrite (Note [LeakyReLU as a ReLU]).

# Note [Relaxations of smooth activations]

*tanh and sigmoid* are increasing, convex on $x \le 0$, concave on $x \ge 0$,
and $f(-x) = 2c - f(x)$ with $c = f(0)$ (0 for tanh, 1/2 for sigmoid). On
$[l, u]$, with $s$ the slope of the chord through $(l, f(l))$ and $(u, f(u))$:

* $u \le 0$: the chord is above $f$ (convexity) and the tangent at the
  midpoint is below $f$ on all of $x \le 0$ (a tangent of a convex function;
  the midpoint's is the one of least area). $l \ge 0$: the mirror image.
* $l < 0 < u$, upper line. If $f'(u) \ge s$, the chord: $g = \text{chord} - f$
  vanishes at $l$ and $u$ and is convex on $[0, u]$ with $g'(u) = s - f'(u)
  \le 0$, so $g(x) \ge g'(u)(x - u) \ge 0$ there, $g(0) \ge 0$ in particular;
  $g$ is concave on $[l, 0]$ with $g(l) = 0 \le g(0)$, so $g \ge 0$ there too.
  Otherwise the tangent at a point $d \ge 0$ with $t(d) = f(d) + f'(d)(l - d)
  - f(l) \ge 0$ (it passes above $(l, f(l))$): it is above $f$ on $[0, u]$ (a
  tangent of the concave part), and $g = \text{tangent} - f$ is concave on
  $[l, 0]$ with $g(l) = t(d) \ge 0$ and $g(0) \ge 0$, so $g \ge 0$. As $t'(d)
  = f''(d)(l - d) \ge 0$ for $d \ge 0$ and $t(u) = (u - l)(s - f'(u)) > 0$,
  bisection on $[0, u]$ that keeps the end with $t \ge 0$ (64 halvings) ends
  at $d_0$, within $2^{-64} u$ of the tangent through $(l, f(l))$ on the
  sound side, and every $d \ge d_0$ is valid. The area under the tangent at
  $d$ over $[l, u]$, $(u - l)(f(d) + f'(d)(m - d))$ with $m$ the midpoint, has
  derivative $(u - l) f''(d)(m - d)$ in $d$, so the least is at $d = \max(d_0,
  m)$, which lipnets takes.
  The lower line is the upper line on the mirror interval $[-u, -l]$,
  reflected: from $f(y) \le s y + b$ there, $f(x) = 2c - f(-x) \ge s x + 2c -
  b$ on $[l, u]$.
* $l = u$: the tangent at $l$ (the chord's slope is taken as $f'(l)$).

*GELU and SiLU* are neither convex nor concave. Both lines have the chord's
slope $s$ and offsets from $h(x) = f(x) - f(l) - s (x - l)$, evaluated on
$G = 65$ equally spaced points $x_j$ of $[l, u]$ (spacing $\delta = (u -
l) / 64$). On a cell $[x_j, x_{j+1}]$, $h$ exceeds the larger of its two end
values by at most $M \delta^2 / 8$ when $|h''| = |f''| \le M$ (the error of
linear interpolation), and by at most $(L + |s|) \delta / 2$ when $|f'| \le
L$ ($h$ lies below two lines of slopes $\pm (L + |s|)$ through the ends,
which meet at most $(L + |s|)\delta/2$ above the higher end). So $f(x) \le s
x + f(l) - s l + \max_j h(x_j) + \text{slack}$ and $f(x) \ge s x + f(l) - s l
+ \min_j h(x_j) - \text{slack}$ on $[l, u]$, with the smaller slack. $L$ is
the slope of Note [Maximal slopes of activations] in
`lipnets.functional.activation_slopes`; $M$, rounded up:

* GELU, $f'' = \varphi(x)(2 - x^2)$: at most $2 \varphi(0) = \sqrt{2/\pi} <
  0.8$ for $|x| \le 2$, and $\varphi(x)(x^2 - 2)$ decreases beyond
  ($\frac{d}{dx}$ is $\varphi(x) x (4 - x^2)$), below $2 \varphi(2) < 0.11$.
  $M = 0.8$.
* GELU (tanh), $f = \frac x2 (1 + \tanh h)$, $h = k (x + c x^3)$, $k =
  \sqrt{2/\pi}$, $c = 0.044715$: $f''$ is even and for $x \ge 0$ equals
  $\operatorname{sech}^2 h \, (h' + 3 k c x^2 - x h'^2 \tanh h)$. The
  positive part is at most $k (1 + 6 c x^2) \operatorname{sech}^2(k x) \le k$
  ($h \ge k x$, $\cosh^2 y \ge 1 + y^2$, $6 c < k^2$). The negative part is at
  most $\operatorname{sech}^2 h \tanh h \cdot x h'^2$ with $x h' \le 3 h$ and
  $h' \le k (1 + 3 c h^2 / k^2)$ ($x \le h / k$), so at most $3 k \cdot 4 h (1 +
  0.211 h^2) e^{-2 h}$ ($\operatorname{sech}^2 \le 4 e^{-2h}$, $\tanh \le 1$),
  whose maximum over $h \ge 0$ is below $3 k \cdot 0.8 < 1.92$. $M = 2$.
* SiLU, $f'' = \sigma'(x)(2 - x \tanh(x/2))$: at most $2 \sigma'(0) = 1/2$
  where positive; where negative, $|x| > 2$ and $|f''| \le e^{-|x|}(|x| - 2)
  \le e^{-3}$. $M = 0.5$.

The interval of GELU and SiLU: each decreases on $(-\infty, x^*]$ and
increases on $[x^*, \infty)$. Write $f = x p(x)$ with $p = \Phi$, $\sigma(2h)$
or $\sigma$, positive and increasing: $f' = p + x p' > 0$ for $x \ge 0$, and
for $x = -t < 0$, $f' = p (1 - t p'(-t) / p(-t))$ where $t p'(-t)/p(-t)$
increases from 0 to $\infty$ ($t \varphi(t) / \Phi(-t)$, with the inverse
Mills ratio increasing; $t \cdot 2h'(t) \sigma(2h(t))$ and $t \sigma(t)$,
products of positive increasing functions), so $f'$ changes sign once. The
image of $[l, u]$ is therefore $[\min(f(l), f(u)), \max(f(l), f(u))]$ unless
$x^* \in [l, u]$, where the lower end is $f(x^*)$. lipnets brackets $x^*$ in
$[a, b]$ once, by bisection on the sign of $f'$ (autograd, float64), and
uses $\min(f(a), f(b)) - L (b - a + 10^{-12}) \le f(x^*)$ whenever $[l, u]$
meets $[a, b]$ (the $10^{-12}$ covers a wrong sign of a rounded $f'$ within
$10^{-15}$ of the root).

Entries with an infinite or NaN bound get NaN lines (Note [Floating-point
rounding] in `lipnets.propagation.lirpa`: the bounds they reach become
trivial); an upper bound below the lower one (rounding) is raised to it.

# Note [LeakyReLU as a ReLU]

For every real $a$, $\mathrm{leaky}_a(x) = a x + (1 - a) \mathrm{relu}(x)$
($x \ge 0$: $a x + (1 - a) x = x$; $x < 0$: $a x$). The builder writes it as
a ReLU node and a `LeakyCombination` of $x$ and the ReLU, so CROWN relaxes
the ReLU (with the coefficient $1 - a$ of either sign picking the right line)
and nothing else is needed; $a = 0$ is the ReLU, $a = 1$ the identity.
Interval arithmetic on the combination would forget that both terms read the
same $x$ (exact only for $0 \le a \le 1$), so the node's interval is the
exact image instead: $[f(l), f(u)]$ for $a \ge 0$ ($f$ nondecreasing), and
$[f(\operatorname{clamp}(0, l, u)), \max(f(l), f(u))]$ for $a < 0$ ($f$
convex with its minimum 0 at 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lipnets.functional import activation_slopes as AS
from lipnets.propagation.gelu_pieces import convex_concave_lines
from lipnets.propagation.ops_base import Elementwise, Relaxation
from lipnets.propagation.ops_structural import LinearCombination

__all__: list[str] = []

_TANGENT_STEPS = 64
"""Bisection halvings for the tangent through an endpoint (Note [Relaxations of smooth
activations])."""
_GRID_STEP = 0.01
"""Spacing of the endpoint grid of the second relaxation of tanh and sigmoid (Note [Relaxation
variants] in `lipnets.propagation.propagator`)."""
_GRID = 65
"""Grid points per entry for the offsets of GELU and SiLU's lines."""
_GRID_ENTRIES = 2**22
"""Largest number of grid values formed at once (entries are processed in chunks)."""


def _nan_unknown(lower: Tensor, upper: Tensor, lines: list[Tensor]) -> Relaxation:
    """NaN lines where a bound is infinite or NaN (Note [Relaxations of smooth activations])."""
    unknown = ~(torch.isfinite(lower) & torch.isfinite(upper))
    if bool(unknown.any()):
        nan = torch.full_like(lower, math.nan)
        lines = [torch.where(unknown, nan, t) for t in lines]
    slope_lo, intercept_lo, slope_up, intercept_up = lines
    return slope_lo, intercept_lo, slope_up, intercept_up


class SShaped(Elementwise):
    """An increasing function, convex for $x < 0$ and concave for $x > 0$, with
    $f(-x) = 2c - f(x)$: tanh and sigmoid (Note [Relaxations of smooth activations])."""

    center = 0.0
    variants = 2

    def derivative(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def relaxation(self, lower: Tensor, upper: Tensor, variant: int = 0) -> Relaxation:
        f, df = self.function, self.derivative
        lo, up = lower, torch.maximum(upper, lower)
        f_lo, f_up = f(lo), f(up)
        width = up - lo
        wide = width > 0
        chord = torch.where(wide, (f_up - f_lo) / torch.where(wide, width, 1.0), df(lo))
        chord_b = f_lo - chord * lo
        mid = lo + width / 2
        d_mid = df(mid)
        tangent_b = f(mid) - d_mid * mid
        convex, concave = up <= 0, lo >= 0
        slope_up = torch.where(convex, chord, d_mid)
        b_up = torch.where(convex, chord_b, tangent_b)
        slope_lo = torch.where(concave, chord, d_mid)
        b_lo = torch.where(concave, chord_b, tangent_b)
        straddle = ~(convex | concave) & torch.isfinite(lo) & torch.isfinite(up)
        if bool(straddle.any()):
            l_s, u_s, s = lo[straddle], up[straddle], chord[straddle]
            grid = variant == 1
            slope_up[straddle], b_up[straddle] = self._upper_straddling(l_s, u_s, s, grid)
            slope, b = self._upper_straddling(-u_s, -l_s, s, grid)  # the mirror interval
            slope_lo[straddle], b_lo[straddle] = slope, 2 * self.center - b
        return _nan_unknown(lower, upper, [slope_lo, b_lo, slope_up, b_up])

    def alpha_lines(self, lower: Tensor, upper: Tensor) -> list[Relaxation]:
        r"""Two more relaxations for α-CROWN (Note [α-CROWN] in `lipnets.propagation.alpha`):
        the tangent side's line is the tangent at the near end of its valid range in the
        first, at the far end in the second (Note [Relaxations of smooth activations]: on
        $x \le 0$ a tangent at any point of $[l, u]$ is below $f$; straddling, the upper
        tangent at any $d \ge d_0$ is above it, $d_0$ where it passes through $(l, f(l))$;
        the rest by symmetry); the chord sides are the chords."""
        f, df = self.function, self.derivative
        lo, up = lower, torch.maximum(upper, lower)
        width = up - lo
        wide = width > 0
        f_lo, f_up = f(lo), f(up)
        chord = torch.where(wide, (f_up - f_lo) / torch.where(wide, width, 1.0), df(lo))
        chord_b = f_lo - chord * lo
        convex, concave = up <= 0, lo >= 0
        straddle = ~(convex | concave) & torch.isfinite(lo) & torch.isfinite(up)
        result = []
        for point, at in ((lo, "steep"), (up, "far")):
            d_t = df(point)
            b_t = f(point) - d_t * point
            slope_up = torch.where(convex, chord, d_t)
            b_up = torch.where(convex, chord_b, b_t)
            slope_lo = torch.where(concave, chord, d_t)
            b_lo = torch.where(concave, chord_b, b_t)
            if bool(straddle.any()):
                l_s, u_s, s = lo[straddle], up[straddle], chord[straddle]
                slope_up[straddle], b_up[straddle] = self._upper_straddling(l_s, u_s, s, False, at)
                slope, b = self._upper_straddling(-u_s, -l_s, s, False, at)  # the mirror
                slope_lo[straddle], b_lo[straddle] = slope, 2 * self.center - b
            result.append(_nan_unknown(lower, upper, [slope_lo, b_lo, slope_up, b_up]))
        return result

    def _upper_straddling(
        self, lo: Tensor, up: Tensor, chord: Tensor, grid: bool, at: str = "least"
    ) -> tuple[Tensor, Tensor]:
        """The upper line on $[l, u]$, $l < 0 < u$: the chord or the tangent through $(l,
        f(l))$, or with ``grid`` through $(l', f(l'))$, $l'$ the grid point below $l$;
        ``at`` "steep" gives the tangent at $d_0$ itself and "far" the tangent at $u$
        instead of the one of least area."""
        f, df = self.function, self.derivative
        use_chord = df(up) >= chord
        f_lo = f(lo)
        # Note [Relaxation variants] in lipnets.propagation.propagator: l' <= l
        end = -(torch.floor(-lo / _GRID_STEP) + 1) * _GRID_STEP if grid else lo
        f_end = f(end) if grid else f_lo
        # t(d) >= 0 at d = u (not the chord) and at d = |l'| (sinh(2d) >= 2d), t increases
        a, b = torch.zeros_like(up), torch.maximum(up, -end) if grid else up.clone()
        for _ in range(_TANGENT_STEPS):
            mid = a + (b - a) / 2
            above = f(mid) + df(mid) * (end - mid) >= f_end  # t(mid) >= 0: keep it as the end
            b, a = torch.where(above, mid, b), torch.where(above, a, mid)
        d = torch.maximum(b, lo + (up - lo) / 2)  # the tangent of least area among the valid
        if at != "least":
            d = b if at == "steep" else torch.maximum(b, up)
        slope = df(d)
        return (
            torch.where(use_chord, chord, slope),
            torch.where(use_chord, f_lo - chord * lo, f(d) - slope * d),
        )


class Tanh(SShaped):
    """$y = \\tanh(x)$."""

    kind = "tanh"
    slope = 1.0

    def function(self, x: Tensor) -> Tensor:
        return torch.tanh(x)

    def derivative(self, x: Tensor) -> Tensor:
        return torch.cosh(x).square().reciprocal()  # sech^2, 0 where cosh overflows


class Sigmoid(SShaped):
    """$y = \\sigma(x) = 1 / (1 + e^{-x})$."""

    kind = "sigmoid"
    center = 0.5
    slope = 0.25

    def function(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x)

    def derivative(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x) * torch.sigmoid(-x)


class Unimodal(Elementwise):
    """A smooth function that decreases, then increases, with $|f''| \\le$ ``curvature``:
    GELU and SiLU (Note [Relaxations of smooth activations])."""

    curvature = 1.0

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        lo, up = lows[0], ups[0]
        f_lo, f_up = self.function(lo), self.function(up)
        a, b, least = _minimum(self)
        near = (lo <= b) & (up >= a)  # x* may lie in [l, u]
        low = torch.minimum(f_lo, f_up)
        low = torch.where(near, torch.minimum(low, low.new_tensor(least)), low)
        return low, torch.maximum(f_lo, f_up)

    def relaxation(self, lower: Tensor, upper: Tensor, variant: int = 0) -> Relaxation:
        lo, up = lower, torch.maximum(upper, lower)
        f_lo, f_up = self.function(lo), self.function(up)
        width = up - lo
        wide = width > 0
        slope = torch.where(wide, (f_up - f_lo) / torch.where(wide, width, 1.0), 0.0)
        flat = [t.reshape(-1) for t in (lo, up, width, f_lo, slope)]
        highest, lowest = [], []
        step = max(1, _GRID_ENTRIES // _GRID)
        t = torch.linspace(0, 1, _GRID, dtype=lo.dtype, device=lo.device)
        for start in range(0, flat[0].numel(), step):
            l_c, u_c, w_c, f_c, s_c = (v[start : start + step].unsqueeze(1) for v in flat)
            xs = l_c + w_c * t
            xs[:, -1:] = u_c
            h = self.function(xs) - f_c - s_c * (xs - l_c)
            highest.append(h.amax(1))
            lowest.append(h.amin(1))
        h_max = torch.cat(highest).reshape(lo.shape)
        h_min = torch.cat(lowest).reshape(lo.shape)
        delta = width / (_GRID - 1)
        slack = torch.minimum(
            self.curvature * delta.square() / 8, (self.slope + slope.abs()) * delta / 2
        )
        base = f_lo - slope * lo
        lines = [slope, base + h_min - slack, slope, base + h_max + slack]
        return _nan_unknown(lower, upper, lines)


class GELU(Unimodal):
    """$y = x \\Phi(x)$, or its tanh approximation (``approximate="tanh"``)."""

    kind = "gelu"

    def __init__(self, in_shapes, out_shape, approximate: str = "none") -> None:
        super().__init__(in_shapes, out_shape)
        self.approximate = approximate
        self.slope = AS.GELU_TANH_SLOPE if approximate == "tanh" else AS.GELU_SLOPE
        self.curvature = 2.0 if approximate == "tanh" else 0.8
        self.variants = 1 if approximate == "tanh" else 2  # Note [GELU by convexity pieces]

    def function(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate=self.approximate)

    def relaxation(self, lower: Tensor, upper: Tensor, variant: int = 0) -> Relaxation:
        lines = super().relaxation(lower, upper)
        if variant != 1 or self.variants != 2:
            return lines
        slope_lo, b_lo, slope_up, b_up = lines
        assert b_lo is not None
        lo, up = lower, torch.maximum(upper, lower)
        s_lo, i_lo, ok_lo, s_up, i_up, ok_up = convex_concave_lines(lo, up)
        ok_lo = ok_lo & torch.isfinite(slope_lo)  # NaN lines (unknown bounds) stay NaN
        ok_up = ok_up & torch.isfinite(slope_up)
        return (
            torch.where(ok_lo, s_lo, slope_lo),
            torch.where(ok_lo, i_lo, b_lo),
            torch.where(ok_up, s_up, slope_up),
            torch.where(ok_up, i_up, b_up),
        )


class SiLU(Unimodal):
    """$y = x \\sigma(x)$."""

    kind = "silu"
    slope = AS.SILU_SLOPE
    curvature = 0.5

    def function(self, x: Tensor) -> Tensor:
        return F.silu(x)


_MINIMA: dict[tuple[type, str], tuple[float, float, float]] = {}


def _minimum(op: Unimodal) -> tuple[float, float, float]:
    """A bracket $[a, b]$ of the minimiser $x^*$ and a lower bound of $f(x^*)$, computed
    once per function (Note [Relaxations of smooth activations])."""
    key = (type(op), str(getattr(op, "approximate", "")))
    if key not in _MINIMA:
        _MINIMA[key] = _bracket(op.function, op.slope)
    return _MINIMA[key]


def _bracket(function, slope: float) -> tuple[float, float, float]:
    def derivative(x: float) -> float:
        t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(function(t), t)
        return float(g)

    a, b = -3.0, 0.0  # f'(-3) < 0 < f'(0) = 1/2 for GELU (both forms) and SiLU
    while True:
        mid = a + (b - a) / 2
        if mid in (a, b):
            break
        if derivative(mid) < 0:
            a = mid
        else:
            b = mid
    values = function(torch.tensor([a, b], dtype=torch.float64))
    return a, b, float(values.min()) - slope * (b - a + 1e-12)


class LeakyCombination(LinearCombination):
    """$y = a x + (1 - a) r$ with $r = \\mathrm{relu}(x)$: LeakyReLU with slope $a$, whose
    interval is the exact image of $x$'s (Note [LeakyReLU as a ReLU])."""

    kind = "leaky"

    def __init__(self, shape: torch.Size, negative_slope: float) -> None:
        super().__init__([shape, shape], shape, [negative_slope, 1.0 - negative_slope], None)
        self.negative_slope = negative_slope

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        a, lo, up = self.negative_slope, lows[0], ups[0]
        f_lo, f_up = F.leaky_relu(lo, a), F.leaky_relu(up, a)
        if a >= 0:
            return f_lo, f_up
        lowest = F.leaky_relu(torch.clamp(torch.zeros_like(lo), lo, up), a)
        return lowest, torch.maximum(f_lo, f_up)
