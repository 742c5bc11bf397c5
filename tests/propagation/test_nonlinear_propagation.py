"""IBP and CROWN through tanh, sigmoid, GELU, SiLU, LeakyReLU, maximum/minimum and max pooling.

Bounds are checked against the models at sampled points of the balls (boundary and
corners included), the relaxation lines against the functions on dense grids; ReLU goes
through the generic elementwise path with the same bits.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipnets.errors import UnboundedModuleError
from lipnets.propagation import Bounds, _ops, crown_bounds, interval_bounds
from lipnets.propagation.graph import build, evaluate
from lipnets.propagation.lirpa import check_args, session
from lipnets.propagation.propagator import Propagator, relaxation
from tests.helpers import Fn, assert_within

from .test_propagation_models import DT, ball_points

NORMS = [2, math.inf]
POINTS = 2000

pytestmark = pytest.mark.usefixtures("one_thread")

S = torch.Size([1])
ELEMENTWISE = {
    "tanh": _ops.Tanh([S], S),
    "sigmoid": _ops.Sigmoid([S], S),
    "gelu": _ops.GELU([S], S),
    "gelu_tanh": _ops.GELU([S], S, "tanh"),
    "silu": _ops.SiLU([S], S),
    "relu": _ops.ReLU([S], S),
    "relu_of_leaky": _ops.ReLU([S], S, leak=0.1),  # variant 1: LeakyReLU(0.1)'s slope rule
}


# -- the relaxations, function by function -------------------------------------------------


def _intervals() -> tuple[torch.Tensor, torch.Tensor]:
    """Random intervals: tiny, moderate, huge, one-sided, straddling 0, degenerate."""
    g = torch.Generator().manual_seed(0)
    n = 600
    scales = torch.tensor([1e-3, 0.3, 1.0, 3.0, 10.0, 1e3])
    centre = torch.randn(n, generator=g, dtype=DT) * scales.repeat(n // 6).to(DT)
    widths = torch.tensor([0.0, 1e-12, 1e-6, 1e-2, 1.0, 5.0, 40.0, 1e4]).to(DT)
    w = widths[torch.randint(len(widths), (n,), generator=g)] * torch.rand(n, generator=g)
    w[:8] = 0.0
    lo, up = centre - w, centre + w
    one_sided = torch.rand(n, generator=g, dtype=DT) * 6  # [0, u] and [-u, 0]
    return torch.cat([lo, torch.zeros(50, dtype=DT), -one_sided[:50]]), torch.cat(
        [up, one_sided[:50], torch.zeros(50, dtype=DT)]
    )


@pytest.mark.parametrize("variant", [0, 1])
@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_relaxation_lines_hold_on_dense_grids(name: str, variant: int) -> None:
    """Lower line <= f <= upper line, and the interval holds f, at 2001 points of each of
    700 intervals, for every relaxation variant (Note [Relaxation variants]); on narrow
    intervals the lines touch f (gap <= w^2)."""
    op = ELEMENTWISE[name]
    lo, up = _intervals()
    slope_lo, b_lo, slope_up, b_up = op.relaxation(lo, up, variant)
    b_lo = torch.zeros_like(lo) if b_lo is None else b_lo
    xs = lo[:, None] + (up - lo)[:, None] * torch.linspace(0, 1, 2001, dtype=DT)
    f = op.function(xs)
    low = slope_lo[:, None] * xs + b_lo[:, None]
    high = slope_up[:, None] * xs + b_up[:, None]
    tol = 1e-9 * (1 + f.abs() + (slope_up.abs() + slope_lo.abs())[:, None] * xs.abs())
    assert bool((low <= f + tol).all()), float((low - f).max())
    assert bool((f <= high + tol).all()), float((f - high).max())
    i_lo, i_up = op.interval([lo], [up])
    assert bool((i_lo[:, None] <= f + tol).all() and (f <= i_up[:, None] + tol).all())
    width = up - lo
    narrow = width <= 1e-2
    gap = (high - low).amax(1)
    if not name.startswith("relu"):  # smooth: second-order contact
        assert bool((gap[narrow] <= width[narrow] ** 2 + 1e-12 * (1 + lo[narrow].abs())).all())


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_s_shaped_lines_are_chords_and_tangents(name: str) -> None:
    """On a convex interval (u <= 0) the upper line is the chord, on a concave one the lower
    line is; straddling 0, the upper line touches f at its tangent point."""
    op = ELEMENTWISE[name]
    lo = torch.tensor([-3.0, 0.5, -2.0], dtype=DT)
    up = torch.tensor([-0.5, 3.0, 4.0], dtype=DT)
    slope_lo, b_lo, slope_up, b_up = op.relaxation(lo, up)
    f_lo, f_up = op.function(lo), op.function(up)
    torch.testing.assert_close(slope_up[0] * lo[0] + b_up[0], f_lo[0])
    torch.testing.assert_close(slope_up[0] * up[0] + b_up[0], f_up[0])
    torch.testing.assert_close(slope_lo[1] * lo[1] + b_lo[1], f_lo[1])
    torch.testing.assert_close(slope_lo[1] * up[1] + b_lo[1], f_up[1])
    xs = torch.linspace(-2.0, 4.0, 60001, dtype=DT)
    assert float((slope_up[2] * xs + b_up[2] - op.function(xs)).min()) <= 1e-8  # touches


def test_second_variants_are_the_documented_lines() -> None:
    """Note [Relaxation variants]: LeakyReLU(a)'s ReLU takes lower slope 1 exactly when the
    leaky chord is steeper than 1/2; tanh and sigmoid touch at the tangent point found for
    the grid endpoint l' <= l, never left of the default one."""
    lo = torch.tensor([-1.0, -1.0, -1.0, -3.0], dtype=DT)
    up = torch.tensor([0.7, 0.85, 1.2, 0.5], dtype=DT)
    leaky = _ops.ReLU([S], S, leak=0.1)
    assert leaky.relaxation(lo, up, 1)[0].tolist() == [0.0, 1.0, 1.0, 0.0]  # u > 0.8 |l|
    assert leaky.relaxation(lo, up, 0)[0].tolist() == [0.0, 0.0, 1.0, 0.0]  # u > |l|
    xs = torch.linspace(-4.0, 4.0, 80001, dtype=DT)
    for name in ("tanh", "sigmoid"):
        op = ELEMENTWISE[name]
        lo = torch.tensor([-2.004, -0.5, -3.333], dtype=DT)
        up = torch.tensor([2.5, 3.0, 3.0], dtype=DT)  # tangents (the chord is not above f)
        for variant in (0, 1):
            _, _, slope_up, b_up = op.relaxation(lo, up, variant)
            gap = slope_up[:, None] * xs + b_up[:, None] - op.function(xs)
            touch = xs[gap.argmin(1)]
            if variant == 0:
                default = touch
                continue
            assert bool((touch >= default - 1e-4).all()), (name, touch, default)
            grid = -(torch.floor(-lo / 0.01) + 1) * 0.01
            through = slope_up * grid + b_up - op.function(grid)  # passes through (l', f(l'))
            assert bool((through[[0, 2]].abs() <= 1e-12).all()), through
            assert float(through[1]) > 0.05  # the midpoint's tangent: d0' < m = 1.25


def test_gelu_second_variant_follows_the_convexity_pieces() -> None:
    """Note [GELU by convexity pieces]: inside C = [-sqrt2, sqrt2] the chord above and the
    midpoint's tangent below; inside a concave piece the reverse; across both pieces the
    chord above and a tangent through the grid point u' >= u below."""
    op = ELEMENTWISE["gelu"]
    lo = torch.tensor([-1.0, 2.0, -3.0], dtype=DT)
    up = torch.tensor([1.0, 4.0, 3.0], dtype=DT)
    s_lo, b_lo, s_up, b_up = op.relaxation(lo, up, 1)
    f, root2 = op.function, math.sqrt(2)
    x = torch.linspace(-4, 4, 801, dtype=DT, requires_grad=True)
    (df,) = torch.autograd.grad(f(x).sum(), x)
    slope_at = dict(zip([round(v, 2) for v in x.tolist()], df.tolist(), strict=True))
    for i in (0, 2):  # the chord above
        torch.testing.assert_close(s_up[i] * lo[i] + b_up[i], f(lo[i]))
        torch.testing.assert_close(s_up[i] * up[i] + b_up[i], f(up[i]))
    torch.testing.assert_close(s_lo[0], torch.tensor(slope_at[0.0], dtype=DT))  # tangent at 0
    torch.testing.assert_close(b_lo[0], torch.tensor(0.0, dtype=DT), atol=1e-15, rtol=0)
    torch.testing.assert_close(s_lo[1] * lo[1] + b_lo[1], f(lo[1]))  # the chord below
    torch.testing.assert_close(s_lo[1] * up[1] + b_lo[1], f(up[1]))
    torch.testing.assert_close(s_up[1], torch.tensor(slope_at[3.0], dtype=DT))  # tangent at 3
    grid = root2 + 0.01 * (math.floor((3.0 - root2) / 0.01) + 1)
    point = torch.tensor(grid, dtype=DT)
    torch.testing.assert_close(s_lo[2] * point + b_lo[2], f(point), atol=1e-12, rtol=0)


def test_crown_meets_every_variant_pass() -> None:
    """crown_bounds intersects one full pass per variant: never looser than either, and
    strictly tighter than the default pass somewhere on LeakyReLU, tanh and GELU MLPs."""
    for act in (nn.LeakyReLU(0.1), nn.Tanh(), nn.GELU()):
        torch.manual_seed(5)
        model = nn.Sequential(nn.Linear(4, 12), act, nn.Linear(12, 12), act, nn.Linear(12, 3))
        model = model.to(DT).eval()
        x = torch.randn(16, 4, dtype=DT)
        gained = False
        for norm in NORMS:
            bounds = crown_bounds(model, x, 0.3, norm=norm)
            x_, radius = check_args(model, x, 0.3)
            with session(model):
                graph = build(model, x_, radius, float(norm))
                passes = [Propagator(graph, x_, radius, float(norm), True, v).run() for v in (0, 1)]
            eye = torch.eye(3, dtype=DT).expand(16, 3, 3)
            widths = []
            for prop in passes:
                lo, up = prop.linear_bounds(graph.output, eye)
                assert bool((bounds.lower >= lo).all() and (bounds.upper <= up).all())
                widths.append(up - lo)
            gained |= bool((bounds.upper - bounds.lower < widths[0] - 1e-12).any())
        assert gained, act


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu"])
def test_unimodal_minimum_and_curvature(name: str) -> None:
    """The bracketed minimum is a lower bound of f within 1e-9 of the grid minimum, and
    the curvature constant bounds |f''| (autograd on a dense grid)."""
    op = ELEMENTWISE[name]
    xs = torch.linspace(-8, 8, 400001, dtype=DT)
    f = op.function(xs)
    lo, up = op.interval([xs[:1]], [xs[-1:]])
    assert float(lo) <= float(f.min()) <= float(lo) + 1e-9
    assert float(up) == float(f.max())
    where = float(xs[f.argmin()])
    expected = {"gelu": -0.7518, "gelu_tanh": -0.7518, "silu": -1.27846}[name]
    assert abs(where - expected) < 2e-3
    x = xs[::10].clone().requires_grad_(True)
    (d1,) = torch.autograd.grad(op.function(x).sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    assert float(d2.abs().max()) <= op.curvature
    assert float(d1.detach().abs().max()) <= op.slope


def test_relu_generic_path_agrees_bitwise() -> None:
    """ReLU's relaxation is relaxation()'s, and a ReLU relaxed through the generic path (an
    explicit zero lower intercept, the ``inexact`` mask of ReLU) gives the same bits at
    every node and for the output's linear bounds, on ReLU MLPs and CNNs."""

    class GenericReLU(_ops.Elementwise):
        def function(self, x):
            return torch.relu(x)

        def relaxation(self, lower, upper, variant=0):
            s_lo, s_up, b_up = relaxation(lower, upper)
            return s_lo, torch.zeros_like(lower), s_up, b_up

        def inexact(self, lower, upper):
            return (lower < 0) & (upper > 0)

    lo = torch.randn(50, dtype=DT)
    up = lo + torch.rand(50, dtype=DT) * 2
    mine = _ops.ReLU([S], S).relaxation(lo, up)
    assert mine[1] is None
    for a, b in zip((mine[0], mine[2], mine[3]), relaxation(lo, up), strict=True):
        assert torch.equal(a, b)
    for seed in range(6):
        torch.manual_seed(seed)
        if seed % 2:
            model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten())
            model.append(nn.Linear(48, 4)).append(nn.ReLU()).append(nn.Linear(4, 2))
            x = torch.randn(2, 1, 4, 4, dtype=DT)
        else:
            model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
            model.append(nn.Linear(8, 2))
            x = torch.randn(2, 3, dtype=DT)
        model = model.to(DT).eval()
        for norm in NORMS:
            x_, radius = check_args(model, x, 0.3)
            with session(model):
                graph = build(model, x_, radius, float(norm))
                relu = Propagator(graph, x_, radius, float(norm), crown=True).run()
                for node in graph.nodes:
                    if isinstance(node.op, _ops.ReLU):
                        node.op = GenericReLU(node.op.in_shapes, node.op.out_shape)
                generic = Propagator(graph, x_, radius, float(norm), crown=True).run()
            for a, b in zip(relu.lows + relu.ups, generic.lows + generic.ups, strict=True):
                assert torch.equal(a, b)
            eye = torch.eye(2, dtype=DT).expand(2, 2, 2)
            got, want = (
                relu.linear_bounds(graph.output, eye),
                generic.linear_bounds(graph.output, eye),
            )
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


# -- models ---------------------------------------------------------------------------------


class TwoBranches(nn.Module):
    """fn(a(x), b(x)), b's output optionally broadcast from one channel or feature."""

    def __init__(self, a: nn.Module, b: nn.Module, fn, narrow: bool) -> None:
        super().__init__()
        self.a, self.b, self.fn, self.narrow = a, b, fn, narrow

    def forward(self, x):
        other = self.b(x)
        return self.fn(self.a(x), other[:, :1] if self.narrow else other)


def _activation(kind: str, rng: random.Random) -> nn.Module:
    choices = {
        "tanh": [nn.Tanh(), Fn(torch.tanh), Fn(lambda x: x.tanh())],
        "sigmoid": [nn.Sigmoid(), Fn(torch.sigmoid), Fn(lambda x: x.sigmoid())],
        "gelu": [
            nn.GELU(),
            Fn(F.gelu),
            nn.GELU("tanh"),
            Fn(lambda x: F.gelu(x, approximate="tanh")),
        ],
        "silu": [nn.SiLU(), Fn(F.silu), Fn(lambda x: x * torch.sigmoid(x))],
        "leaky": [
            nn.LeakyReLU(rng.choice([0.0, 0.01, 0.3, 1.0, 1.7, -0.4])),
            Fn(lambda x: F.leaky_relu(x, -0.8)),
            Fn(lambda x: F.leaky_relu(x, negative_slope=2.5)),
        ],
    }[kind]
    return rng.choice(choices)


def _model(kind: str, seed: int) -> tuple[nn.Module, torch.Tensor, float]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cnn = seed % 2 == 1
    if kind in ("maximum", "minimum"):
        fn = torch.maximum if kind == "maximum" else torch.minimum
        if seed % 3 == 2:  # a constant operand (broadcast)
            c = torch.randn(5, dtype=DT) * 0.3
            model: nn.Module = nn.Sequential(nn.Linear(4, 5), Fn(lambda x: fn(x, c)))
            model.append(nn.Linear(5, 2))
            shape: tuple[int, ...] = (4,)
        elif cnn:
            a, b = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)
            model = nn.Sequential(TwoBranches(a, b, fn, rng.random() < 0.5), nn.Flatten())
            model.append(nn.Linear(32, 2))
            shape = (1, 4, 4)
        else:
            body = TwoBranches(nn.Linear(4, 5), nn.Linear(4, 5), fn, rng.random() < 0.5)
            model = nn.Sequential(body, nn.Linear(5, 3))
            shape = (4,)
    elif kind == "maxpool1d":
        pool = nn.MaxPool1d(
            rng.choice([2, 3]), stride=rng.choice([1, 2, None]), padding=rng.choice([0, 1]),
            dilation=rng.choice([1, 2]), ceil_mode=rng.random() < 0.5,
        )  # fmt: skip
        model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), pool, nn.Flatten(), nn.LazyLinear(2))
        shape = (2, 7)
    elif kind == "maxpool2d":
        k = rng.choice([2, 3, (2, 3)])
        pool = nn.MaxPool2d(
            k, stride=rng.choice([1, 2, (2, 1), None]), padding=rng.choice([0, 1]),
            dilation=rng.choice([1, 2]) if k != 3 else 1, ceil_mode=rng.random() < 0.5,
        )  # fmt: skip
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), pool, nn.Flatten(), nn.LazyLinear(2))
        shape = (1, 5, 5)
    elif kind == "adaptive":  # overlapping windows when the size is not a multiple
        out = rng.choice([(3, 2), 4, (None, 3), 1])
        pool = rng.choice([nn.AdaptiveMaxPool2d(out), Fn(lambda h: F.adaptive_max_pool2d(h, out))])
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), pool, nn.Flatten(), nn.LazyLinear(2))
        shape = (1, 7, 5)
    elif kind == "functional-pool":
        pool = rng.choice(
            [
                Fn(lambda h: F.max_pool2d(h, 3, 2, 1, ceil_mode=True)),
                Fn(lambda h: F.max_pool2d(h, (2, 3), stride=1, dilation=(2, 1))),
                Fn(lambda h: torch.max_pool2d(h, 2)),
                Fn(lambda h: F.avg_pool2d(h, 2, 1) + F.adaptive_avg_pool2d(h, 4)[..., :4, :4]),
            ]
        )
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), pool, nn.Flatten(), nn.LazyLinear(2))
        shape = (1, 5, 5)
    elif cnn:
        model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), _activation(kind, rng))
        model.append(nn.Conv2d(3, 2, 3, stride=2)).append(_activation(kind, rng))
        model.append(nn.Flatten()).append(nn.LazyLinear(2))
        shape = (1, 5, 5)
    else:
        model = nn.Sequential(nn.Linear(4, 6), _activation(kind, rng), nn.Linear(6, 6))
        model.append(_activation(kind, rng)).append(nn.Linear(6, 2))
        shape = (4,)
    model = model.to(DT).eval()
    x = torch.randn(2, *shape, dtype=DT)
    with torch.no_grad():
        model(x)  # materialise lazy layers
    return model, x, rng.choice([0.1, 0.4, 1.0])


KINDS = ["tanh", "sigmoid", "gelu", "silu", "leaky", "maximum", "minimum"]
KINDS += ["maxpool1d", "maxpool2d", "adaptive", "functional-pool"]


@pytest.mark.parametrize("kind", KINDS)
def test_bounds_contain_sampled_outputs(kind: str) -> None:
    """MLPs and CNNs with the op: 2000 points of each l2 and l-infinity ball (boundary and
    corners included) stay within IBP and CROWN, and CROWN is never looser than IBP."""
    for seed in range(6 if kind.startswith(("max", "min", "adaptive", "functional")) else 4):
        model, x, eps = _model(kind, seed)
        for norm in NORMS:
            ibp = interval_bounds(model, x, eps, norm=norm)
            crown = crown_bounds(model, x, eps, norm=norm)
            points = ball_points(x, eps, norm, POINTS)
            with torch.no_grad():
                y = model(points.reshape(-1, *x.shape[1:])).reshape(POINTS, *ibp.lower.shape)
            assert_within(y, ibp, f"{kind} seed {seed} norm {norm} IBP")
            assert_within(y, crown, f"{kind} seed {seed} norm {norm} CROWN")
            assert bool((crown.lower >= ibp.lower).all() and (crown.upper <= ibp.upper).all())


def test_every_node_stays_within_its_bounds() -> None:
    """The tightened intermediate bounds (inputs of tanh, GELU, the comparators of a max
    pool and of a maximum) are sound too, not only the outputs."""
    torch.manual_seed(3)
    body = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2, stride=1), nn.GELU()
    )
    model = nn.Sequential(
        TwoBranches(body, nn.Conv2d(1, 2, 2), torch.maximum, False), nn.SiLU(), nn.Flatten()
    )
    model = model.append(nn.Linear(18, 2)).to(DT).eval()
    x = torch.randn(2, 1, 4, 4, dtype=DT)
    for norm in NORMS:
        x_, radius = check_args(model, x, 0.5)
        with session(model):
            graph = build(model, x_, radius, float(norm))
            prop = Propagator(graph, x_, radius, float(norm), crown=True).run()
            points = ball_points(x, 0.5, norm, POINTS)
            values = evaluate(graph.nodes, points.reshape(-1, *x.shape[1:]))
        assert any(isinstance(node.op, _ops.Compare) for node in graph.nodes)
        for node, value in zip(graph.nodes, values, strict=True):
            value = value.reshape(POINTS, *prop.lows[node.index].shape)
            bounds = Bounds(prop.lows[node.index], prop.ups[node.index])
            assert_within(value, bounds, f"node {node.index} ({node.where})")


def test_crown_is_strictly_tighter_on_deep_smooth_mlps() -> None:
    """On depth-4 tanh and GELU MLPs CROWN's bounds are narrower than IBP's on average."""
    for act in (nn.Tanh, nn.GELU):
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Linear(4, 8), act()]
        for _ in range(2):
            layers += [nn.Linear(8, 8), act()]
        model = nn.Sequential(*layers, nn.Linear(8, 2)).to(DT).eval()
        x = torch.randn(3, 4, dtype=DT)
        crown = crown_bounds(model, x, 0.2, norm=2)
        ibp = interval_bounds(model, x, 0.2, norm=2)
        ratio = float((crown.upper - crown.lower).mean() / (ibp.upper - ibp.lower).mean())
        assert ratio < 0.8, (act.__name__, ratio)


@pytest.mark.parametrize("slope", [-0.7, 0.2, 1.0, 2.5])
def test_leaky_relu_and_max_pool_intervals_are_exact(slope: float) -> None:
    """Over an l-infinity box, the interval of a LeakyReLU (any slope) and of a max pool
    (padding, ceil_mode) is the exact image: its ends are attained."""
    torch.manual_seed(1)
    x = torch.randn(3, 6, dtype=DT)
    bounds = interval_bounds(nn.LeakyReLU(slope), x, 0.8, norm=math.inf)
    lo, up = x - 0.8, x + 0.8
    f = F.leaky_relu
    exact_lo = torch.where(
        (lo < 0) & (up > 0), torch.zeros_like(lo), torch.minimum(f(lo, slope), f(up, slope))
    )
    torch.testing.assert_close(bounds.lower, exact_lo if slope < 0 else f(lo, slope))
    torch.testing.assert_close(bounds.upper, torch.maximum(f(lo, slope), f(up, slope)))
    pools = [nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), nn.AdaptiveMaxPool2d((3, 4))]
    img = torch.randn(2, 2, 5, 6, dtype=DT)
    for pool in [*pools, Fn(lambda h: F.max_pool2d(h, 2, 1))]:
        pooled = interval_bounds(pool, img, 0.3, norm=math.inf)
        torch.testing.assert_close(pooled.lower, pool(img - 0.3))
        torch.testing.assert_close(pooled.upper, pool(img + 0.3))


def test_refusals_name_the_reason() -> None:
    pool = nn.Sequential(nn.Conv2d(1, 1, 1), nn.MaxPool2d(2, return_indices=True))
    with pytest.raises(UnboundedModuleError, match="return_indices"):
        crown_bounds(pool.to(DT), torch.randn(1, 1, 4, 4, dtype=DT), 0.1, norm=2)
    with pytest.raises(UnboundedModuleError, match="propagation rule"):
        crown_bounds(
            nn.Sequential(nn.Linear(2, 2), nn.Hardtanh()).to(DT),
            torch.randn(1, 2, dtype=DT),
            0.1,
            norm=2,
        )
