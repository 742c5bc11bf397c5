"""GraftedReLU in bound propagation: exact on grafted neurons, sound everywhere, identical
to nn.ReLU with an all-zero mask (Note [Grafted neurons in propagation])."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lipnets
from lipnets.certify import certify_crown
from lipnets.estimators import jacobian_norm
from lipnets.graft import graft
from lipnets.nn import GraftedReLU
from lipnets.propagation import crown_bounds, interval_bounds, local_lipschitz
from lipnets.propagation.checks import check_args, session
from lipnets.propagation.graph import build
from lipnets.propagation.local import _compose
from lipnets.propagation.ops_grafted import Grafted
from lipnets.propagation.propagator import Propagator
from tests.helpers import assert_within

from .test_propagation_models import DT, ball_points

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)
    ).double()


def _cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4)
    ).double()


def _randomise(model: nn.Module, seed: int, scale: float = 2.0) -> nn.Module:
    """Grafts about half of every ReLU's neurons, with slopes of either sign and modulus up
    to a few units, and random intercepts."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"1": (12,), "3": (10,)} if isinstance(model[0], nn.Linear) else {"1": (3, 4, 4)}
    masks = {name: torch.rand(shape, generator=gen) < 0.5 for name, shape in shapes.items()}
    grafted = graft(model, masks)
    for name in masks:
        act = grafted.get_submodule(name)
        with torch.no_grad():
            act.slope.copy_(scale * torch.randn(act.shape, generator=gen, dtype=DT))
            act.intercept.copy_(0.5 * torch.randn(act.shape, generator=gen, dtype=DT))
    return grafted


def _inputs(model: nn.Module, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + seed)
    shape = (4, 5) if isinstance(model[0], nn.Linear) else (3, 2, 4, 4)
    return torch.randn(shape, generator=gen, dtype=DT)


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_all_zero_mask_gives_what_relu_gives_in_every_entry_point(make) -> None:
    model = make(0)
    x = _inputs(model, 0)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    shapes = {"1": (12,), "3": (10,)} if len(names) == 2 else {"1": (3, 4, 4)}
    same = graft(model, {n: torch.zeros(shapes[n], dtype=torch.bool) for n in names})
    assert all(isinstance(same.get_submodule(n), GraftedReLU) for n in names)
    assert torch.equal(same(x), model(x))
    shape = tuple(x.shape)
    assert torch.equal(lipnets.lipschitz_bound(same), lipnets.lipschitz_bound(model))
    assert torch.equal(
        lipnets.lipschitz_bound(same, input_shape=shape),
        lipnets.lipschitz_bound(model, input_shape=shape),
    )
    y = model(x).argmax(1)
    for norm, eps in ((2, 0.3), (math.inf, 0.05)):
        for fn in (interval_bounds, crown_bounds):
            a, b = fn(same, x, eps, norm=norm), fn(model, x, eps, norm=norm)
            assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper)
        assert torch.equal(
            local_lipschitz(same, x, eps, norm=norm), local_lipschitz(model, x, eps, norm=norm)
        )
        for method in ("crown", "ibp"):
            assert torch.equal(
                certify_crown(same, x, y, eps * 0.1, norm=norm, method=method),
                certify_crown(model, x, y, eps * 0.1, norm=norm, method=method),
            )


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("seed", range(4))
def test_sampled_outputs_never_leave_the_bounds(make, seed: int) -> None:
    model = _randomise(make(seed), seed)
    x = _inputs(model, seed)
    norm = (2, math.inf)[seed % 2]
    eps = 0.4 if norm == 2 else 0.1
    points = ball_points(x, eps, norm, 240)  # (count, N, ...)
    with torch.no_grad():
        y = model(points.flatten(0, 1)).reshape(points.shape[0], x.shape[0], -1)
    for fn in (interval_bounds, crown_bounds):
        bounds = fn(model, x, eps, norm=norm)
        assert_within(y, bounds, f"{fn.__name__} seed {seed}")
    # and every node of the graph, at the same points
    xr, radius = check_args(model, x, eps)
    with session(model):
        graph = build(model, xr, radius, float(norm))
        prop = Propagator(graph, xr, radius, float(norm), crown=True).run()
        for point in points[:40]:
            values = [point]
            for node in graph.nodes[1:]:
                values.append(node.op.forward([values[i] for i in node.inputs]))
            for i, v in enumerate(values):
                tol = 1e-9 * (1 + float(v.abs().max()))
                assert bool((prop.lows[i] <= v + tol).all() and (v <= prop.ups[i] + tol).all())


def test_a_fully_grafted_network_is_affine_and_crown_is_exact() -> None:
    """Every neuron grafted: the network is x -> W2 diag(a) W1 x + c, whose exact bounds
    over a ball are c' +- eps * ||row||_dual; CROWN finds them, IBP does not."""
    torch.manual_seed(3)
    first, last = nn.Linear(4, 6).double(), nn.Linear(6, 3).double()
    act = GraftedReLU((6,), torch.ones(6, dtype=torch.bool), dtype=DT)
    with torch.no_grad():
        act.slope.copy_(torch.tensor([2.0, -1.5, 0.3, 0.0, -0.2, 1.1], dtype=DT))
        act.intercept.copy_(torch.randn(6, dtype=DT))
    model = nn.Sequential(first, act, last)
    x = torch.randn(5, 4, dtype=DT)
    w = last.weight.detach() @ torch.diag(act.slope.detach()) @ first.weight.detach()
    with torch.no_grad():
        centre = model(x)
    for norm, dual in ((2, 2), (math.inf, 1)):
        eps = 0.3
        spread = eps * torch.linalg.vector_norm(w, ord=dual, dim=1)
        crown = crown_bounds(model, x, eps, norm=norm)
        torch.testing.assert_close(crown.lower, centre - spread, rtol=0, atol=1e-12)
        torch.testing.assert_close(crown.upper, centre + spread, rtol=0, atol=1e-12)
        ibp = interval_bounds(model, x, eps, norm=norm)
        assert bool(((ibp.upper - ibp.lower) > (crown.upper - crown.lower) + 1e-6).any())
    # and its constant is the product of the layers' (with max |a_i| = 2), above ||W||
    assert float(lipnets.lipschitz_bound(model)) >= float(torch.linalg.matrix_norm(w, ord=2))


def test_the_op_is_exact_and_never_unstable_on_grafted_entries() -> None:
    mask = torch.tensor([[True, False], [True, False]])
    a = torch.tensor([[-2.0, 0.4], [0.5, 0.4]], dtype=DT)
    b = torch.tensor([[1.0, 0.0], [-3.0, 0.0]], dtype=DT)
    shape = torch.Size((2, 2))
    op = Grafted([shape], shape, mask, a, b)
    lower = torch.tensor([[[-1.0, -1.0], [-2.0, -1.0]]], dtype=DT)
    upper = torch.tensor([[[3.0, 2.0], [1.0, -0.5]]], dtype=DT)
    assert op.inexact(lower, upper).tolist() == [[[False, True], [False, False]]]
    flat = op.inexact(lower.reshape(1, -1), upper.reshape(1, -1))  # as tightening calls it
    assert flat.tolist() == [[False, True, False, False]]
    lo, up = op.interval([lower], [upper])
    # -2 x + 1 on [-1, 3] is [-5, 3]; relu on [-1, 2] is [0, 2]; 0.5 x - 3 on [-2, 1]
    assert lo.tolist() == [[[-5.0, 0.0], [-4.0, 0.0]]]
    assert up.tolist() == [[[3.0, 2.0], [-2.5, 0.0]]]
    nan = lower.clone()
    nan[0, 0, 0] = math.nan  # exact lines do not need the bounds
    slope_lo, intercept_lo, slope_up, intercept_up = op.relaxation(nan, upper)
    assert slope_lo[0, 0, 0] == slope_up[0, 0, 0] == -2.0
    assert intercept_lo[0, 0, 0] == intercept_up[0, 0, 0] == 1.0
    assert slope_lo[0, 1, 0] == slope_up[0, 1, 0] == 0.5
    assert intercept_lo[0, 1, 0] == intercept_up[0, 1, 0] == -3.0
    # the ReLU entries keep the ReLU's lines: chord 2/3 above, lower slope 1 (u > -l)
    assert slope_up[0, 0, 1] == pytest.approx(2.0 / 3.0) and slope_lo[0, 0, 1] == 1.0
    assert intercept_lo[0, 0, 1] == 0.0 and slope_up[0, 1, 1] == 0.0
    assert op.slope == 2.0  # Elementwise.slope: the op's Lipschitz constant


@pytest.mark.parametrize("seed", range(4))
def test_local_lipschitz_bounds_slopes_on_the_ball_and_stays_below_the_global_bound(
    seed: int,
) -> None:
    model = _randomise(_mlp(seed), seed, scale=3.0)
    x = _inputs(model, seed)
    norm = (2, math.inf)[seed % 2]
    eps = 0.05
    local = local_lipschitz(model, x, eps, norm=norm)
    overall = lipnets.lipschitz_bound(model, input_shape=tuple(x.shape))
    assert bool((local <= overall).all())
    points = ball_points(x, eps, norm, 60)
    for i in range(x.shape[0]):
        slopes = jacobian_norm(model, torch.cat([x[i : i + 1], points[:, i]]))
        assert float(slopes.max()) <= float(local[i]) * (1 + 1e-9)
        p, q = points[:30, i], points[30:, i]
        with torch.no_grad():
            ratio = (model(p) - model(q)).norm(dim=1) / (p - q).norm(dim=1)
        assert float(ratio.max()) <= float(local[i]) * (1 + 1e-9)


def test_local_composition_uses_the_slope_factor_not_the_two_branches() -> None:
    """Before the rule, a graft written in plain torch got its two branches bounded
    separately; now the composition of the local rules (uncapped) is at most the product
    of the layer bounds, even on a ball where every ReLU is unstable."""
    model = _randomise(_mlp(7), 7, scale=3.0)
    x = _inputs(model, 7)
    overall = float(lipnets.lipschitz_bound(model, input_shape=tuple(x.shape)))
    xr, radius = check_args(model, x, 50.0)
    with session(model):
        graph = build(model, xr, radius, 2.0)
        prop = Propagator(graph, xr, radius, 2.0, crown=True).run()
        composed = _compose(graph, prop)
    assert bool((composed <= overall * (1 + 1e-12)).all())
    assert composed.tolist() == pytest.approx([overall] * len(composed), rel=1e-12)  # none stable


def test_local_factor_is_the_grafted_slope() -> None:
    """Identity weights around one grafted neuron of slope -3 (true constant 3), and a
    network whose every neuron is grafted with slope 0 (a constant: local bound 0)."""
    first, last = nn.Linear(3, 3).double(), nn.Linear(3, 3).double()
    with torch.no_grad():
        first.weight.copy_(torch.eye(3, dtype=DT))
        last.weight.copy_(torch.eye(3, dtype=DT))
    act = GraftedReLU((3,), torch.tensor([True, False, False]), dtype=DT)
    with torch.no_grad():
        act.slope[0] = -3.0
    model = nn.Sequential(first, act, last)
    x = torch.tensor([[-1.0, -2.0, -2.0], [1.0, 1.0, 1.0]], dtype=DT)
    local = local_lipschitz(model, x, 0.1)
    assert local.tolist() == pytest.approx([3.0, 3.0], rel=1e-12)
    assert bool((local >= 3.0).all())
    flat = GraftedReLU((3,), torch.ones(3, dtype=torch.bool), dtype=DT)
    with torch.no_grad():
        flat.slope.zero_()
    constant = nn.Sequential(first, flat, last)
    assert local_lipschitz(constant, x, 0.1).tolist() == [0.0, 0.0]
    assert float(lipnets.lipschitz_bound(constant)) == 0.0


def test_bounds_are_differentiable_in_the_slopes_and_intercepts() -> None:
    model = _randomise(_mlp(2), 2)[:3]  # one hidden layer (Note [Differentiable bounds])
    x = _inputs(model, 2)
    bounds = crown_bounds(model, x, 0.1, norm=2, differentiable=True)
    bounds.lower.sum().backward()
    act = model.get_submodule("1")
    assert act.slope.grad is not None and act.intercept.grad is not None
    # only the grafted entries have a slope in the bounds
    assert bool((act.slope.grad[~act.mask] == 0).all())
    assert bool((act.intercept.grad[act.mask] != 0).any())
