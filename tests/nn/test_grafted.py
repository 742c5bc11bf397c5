"""GraftedReLU: the function it computes, its parameters, its Lipschitz bound, its errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lipnets
from lipnets.nn import GraftedReLU
from tests.helpers import dense_jacobian, spectral_norm

DT = torch.float64


def _random(shape, seed: int, scale: float = 2.0, dtype=DT) -> GraftedReLU:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=gen) < 0.5
    act = GraftedReLU(shape, mask, dtype=dtype)
    with torch.no_grad():
        act.slope.copy_(scale * torch.randn(shape, generator=gen, dtype=dtype))
        act.intercept.copy_(torch.randn(shape, generator=gen, dtype=dtype))
    return act


@pytest.mark.parametrize("shape", [(7,), (3, 4, 5)])
def test_forward_is_relu_or_the_line_per_entry(shape) -> None:
    act = _random(shape, 0)
    x = torch.randn(6, *shape, dtype=DT)
    y = act(x)
    line = act.slope * x + act.intercept
    want = torch.where(act.mask, line, x.clamp_min(0))
    assert torch.equal(y, want)
    assert bool(act.mask.any()) and not bool(act.mask.all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(9,), (2, 3, 3)])
def test_all_zero_mask_is_relu_to_the_bit(shape, dtype) -> None:
    act = GraftedReLU.from_relu(nn.ReLU(), shape, dtype=dtype)
    x = torch.randn(5, *shape, dtype=dtype) * 1e3
    x.view(-1)[:3] = torch.tensor([0.0, -0.0, 1e-40], dtype=dtype)
    assert torch.equal(act(x), torch.relu(x))
    assert float(act.lipschitz_bound()) == 1.0


def test_parameters_start_as_in_the_paper_and_train() -> None:
    mask = torch.tensor([True, False, True])
    act = GraftedReLU((3,), mask)
    assert torch.equal(act.slope.detach(), torch.full((3,), 0.4))
    assert torch.equal(act.intercept.detach(), torch.zeros(3))
    assert {n for n, _ in act.named_parameters()} == {"slope", "intercept"}
    assert act.mask.dtype == torch.bool and "mask" in act.state_dict()
    x = torch.tensor([[-1.0, -1.0, 2.0]])
    act(x).sum().backward()
    # d/da (a x + b) = x on grafted entries, nothing on the ReLU entry
    assert torch.equal(act.slope.grad, torch.tensor([-1.0, 0.0, 2.0]))
    assert torch.equal(act.intercept.grad, torch.tensor([1.0, 0.0, 1.0]))
    other = GraftedReLU((3,))
    other.load_state_dict(act.state_dict())
    assert torch.equal(other.mask, mask) and torch.equal(other(x), act(x))


def test_mask_accepts_zero_one_tensors_and_is_copied() -> None:
    mask = torch.tensor([1, 0, 1])
    act = GraftedReLU((3,), mask)
    mask[1] = 1
    assert act.mask.tolist() == [True, False, True]


def test_max_slope_clamps_in_forward_and_in_the_bound() -> None:
    act = GraftedReLU((4,), torch.tensor([True, True, True, False]), max_slope=1.0, dtype=DT)
    with torch.no_grad():
        act.slope.copy_(torch.tensor([5.0, -3.0, 0.5, 9.0], dtype=DT))
    x = torch.tensor([[2.0, 2.0, 2.0, 2.0]], dtype=DT)
    assert act(x).tolist() == [[2.0, -2.0, 1.0, 2.0]]
    assert float(act.lipschitz_bound()) == 1.0
    unclamped = GraftedReLU((4,), act.mask, dtype=DT)
    unclamped.load_state_dict(act.state_dict())
    assert float(unclamped.lipschitz_bound()) == 5.0  # 9.0 is on a ReLU entry: not counted


def test_bound_is_the_largest_grafted_slope_and_is_attained() -> None:
    """max(1, max |a_i| over grafted i); max |a_i| alone when every entry is grafted; a pair
    of inputs differing in one entry reaches it (Note [Grafted ReLU])."""
    act = GraftedReLU((5,), torch.tensor([True, False, True, True, False]), dtype=DT)
    with torch.no_grad():
        act.slope.copy_(torch.tensor([0.3, 7.0, -2.5, 1.5, 0.1], dtype=DT))
    assert float(act.lipschitz_bound()) == 2.5
    every = GraftedReLU((5,), torch.ones(5, dtype=torch.bool), dtype=DT)
    with torch.no_grad():
        every.slope.copy_(torch.tensor([0.3, -0.7, 0.2, 0.5, 0.1], dtype=DT))
    assert float(every.lipschitz_bound()) == 0.7
    x = torch.zeros(1, 5, dtype=DT)
    dx = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]], dtype=DT)
    with torch.no_grad():
        ratio = (every(x + dx) - every(x)).norm() / dx.norm()
    assert float(ratio) == pytest.approx(0.7, rel=1e-15)
    none_but_relu = GraftedReLU((5,), dtype=DT)
    assert float(none_but_relu.lipschitz_bound()) == 1.0


def test_global_bound_includes_the_slope_factor() -> None:
    """A tiny net whose true constant is the grafted slope: identity weights around one
    grafted neuron of slope -3; the dense Jacobian has norm 3 and the bound is >= 3."""
    first, last = nn.Linear(3, 3).double(), nn.Linear(3, 2).double()
    with torch.no_grad():
        first.weight.copy_(torch.eye(3, dtype=DT))
        last.weight.copy_(torch.eye(3, dtype=DT)[:2])
    act = GraftedReLU((3,), torch.tensor([True, False, False]), dtype=DT)
    with torch.no_grad():
        act.slope[0] = -3.0
    model = nn.Sequential(first, act, last)
    bound = float(lipnets.lipschitz_bound(model))
    jac = spectral_norm(dense_jacobian(model, torch.randn(1, 3, dtype=DT)))
    assert jac == pytest.approx(3.0, rel=1e-12)
    assert bound >= jac and bound <= 3.0 * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_estimates_never_exceed_the_global_bound(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    act = _random((6,), seed, scale=3.0)
    model = nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 3)).double()
    bound = float(lipnets.lipschitz_bound(model))
    for _ in range(10):
        x = torch.randn(1, 4, generator=gen, dtype=DT)
        assert spectral_norm(dense_jacobian(model, x)) <= bound * (1 + 1e-12)


def test_errors_name_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"mask must have the module's shape \(3,\).*\(4,\)"):
        GraftedReLU((3,), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="0/1"):
        GraftedReLU((2,), torch.tensor([0.5, 1.0]))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        GraftedReLU((2,), [True, False])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape must be a sequence"):
        GraftedReLU((0, 3))
    with pytest.raises(ValueError, match="max_slope"):
        GraftedReLU((3,), max_slope=0.0)
    act = GraftedReLU((3, 2, 2))
    with pytest.raises(ValueError, match=r"shape=\(3, 2, 2\).*got shape \(5, 3, 2, 3\)"):
        act(torch.zeros(5, 3, 2, 3))
    with pytest.raises(ValueError, match=r"got shape \(3, 2, 2\)"):
        act(torch.zeros(3, 2, 2))  # no batch dimension
    with pytest.raises(ValueError, match=r"got input_shape \(1, 4, 2, 2\)"):
        act.lipschitz_bound(input_shape=(1, 4, 2, 2))
    with pytest.raises(TypeError, match=r"relu must be an nn\.ReLU"):
        GraftedReLU.from_relu(nn.Tanh(), (3,))  # type: ignore[arg-type]
    bad = GraftedReLU((2,), torch.tensor([True, False]))
    with torch.no_grad():
        bad.slope[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite slope"):
        bad.lipschitz_bound()


def test_repr_counts_the_grafted_neurons() -> None:
    act = GraftedReLU((2, 2), torch.tensor([[True, False], [True, True]]), max_slope=1.0)
    assert repr(act) == "GraftedReLU(shape=(2, 2), grafted=3/4, max_slope=1.0)"
    assert lipnets.GraftedReLU is GraftedReLU
