"""Attacks on the bounds of parametrized layers (Note [Realised parametrizations]).

Every entry point bounds a layer parametrized with ``torch.nn.utils.parametrize`` from the
weights it realises at the call and puts the parametrizations' state back (Note [State
restored] in lipnets._state). Each test here tries one way for that to go wrong: a
subclass with its own forward, a parametrization that depends on the mode, draws random
numbers, steps its state (on every read, or through a random ``right_inverse``), a
parametrized bias, hooks, a model left in training mode, two threads, torch's global
parametrization cache, differentiable bounds. Ground truths are float64 dense Jacobians and
sampled points of the exported model (`lipnets.to_vanilla`), whose weights are fixed.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

import lipnets
from lipnets.errors import UnboundedModuleError, UntraceableModelError
from lipnets.propagation import crown_bounds
from tests.helpers import dense_jacobian, spectral_norm

DT = torch.float64
SLACK = 1e-12


def _linear(n_in: int, n_out: int, seed: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, dtype=DT)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return layer


class Scale(nn.Module):
    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, w):
        return self.c * w


class ModeScale(nn.Module):
    """3 w in training mode, w in eval mode."""

    def forward(self, w):
        return w * (3.0 if self.training else 1.0)


class Noisy(nn.Module):
    def forward(self, w):
        return w + 0.5 * torch.randn_like(w)


class Counter(nn.Module):
    """Steps a plain int attribute on every read: (1 + calls) w."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, w):
        self.calls = self.calls + 1
        return w * (1.0 + self.calls)


class Inverse(nn.Module):
    def __init__(self, random: bool) -> None:
        super().__init__()
        self.random = random

    def forward(self, s):
        return s

    def right_inverse(self, s):
        return s + torch.rand_like(s) if self.random else s


class Stepping(nn.Module):
    """orthogonium's pattern: a parametrized parameter assigned in forward (through its
    right_inverse and Tensor.set_), on every call, in every mode."""

    def __init__(self, random: bool) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(1, dtype=DT), requires_grad=False)
        parametrize.register_parametrization(self, "s", Inverse(random))

    def forward(self, w):
        self.s = self.s * 1.5
        return w * self.s


def _tensors(model: nn.Module):
    named = [*model.named_parameters(remove_duplicate=False)]
    named += [*model.named_buffers(remove_duplicate=False)]
    return [(n, t, t.detach().clone()) for n, t in named]


def _assert_unchanged(model, saved, reference, x) -> None:
    now = dict((n, t) for n, t, _ in _tensors(model))
    assert list(now) == [n for n, _, _ in saved]
    for name, tensor, values in saved:
        assert now[name] is tensor and torch.equal(tensor, values), name
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(model)(x), copy.deepcopy(reference)(x))


def _exact(model, shape) -> float:
    """The float64 norm of the dense Jacobian of the export's first layer (the next call's
    function; the models here are one layer, then 1-Lipschitz maps that are exactly
    1-Lipschitz near their input's large entries)."""
    plain = lipnets.to_vanilla(model)
    return spectral_norm(dense_jacobian(plain[0], torch.zeros(shape, dtype=DT)))


class TenTimes(nn.Linear):
    def forward(self, x):
        return 10 * F.linear(x, self.weight, self.bias)


def test_a_parametrized_subclass_that_overrides_forward_is_traced_into() -> None:
    layer = orthogonal(TenTimes(5, 5, dtype=DT))
    model = nn.Sequential(layer)
    bound = float(lipnets.lipschitz_bound(model, (1, 5)))
    exact = _exact(model, (1, 5))
    assert exact == pytest.approx(10.0, rel=1e-12)
    assert exact <= bound <= exact * (1 + 1e-12)


def test_a_subclass_of_a_peer_layer_that_overrides_forward_is_traced_into() -> None:
    from orthogonium.layers import OrthoLinear

    class Doubled(OrthoLinear):
        def forward(self, x):
            return super().forward(x) * 2.0

    old = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    try:
        layer = Doubled(6, 6)
    finally:
        torch.set_default_dtype(old)
    model = nn.Sequential(layer).eval()
    bound = float(lipnets.lipschitz_bound(model, (1, 6)))
    exact = _exact(model, (1, 6))
    assert exact <= bound <= exact * (1 + 1e-12) and bound > 1.9


def test_a_mode_dependent_parametrization_is_bounded_in_the_mode_the_model_is_in() -> None:
    layer = _linear(4, 4, 0)
    parametrize.register_parametrization(layer, "weight", ModeScale())
    model = nn.Sequential(layer, nn.ReLU())
    sigma = spectral_norm(layer.parametrizations.weight.original.detach())
    model.train()
    assert float(lipnets.lipschitz_bound(model, (1, 4))) == pytest.approx(3 * sigma, rel=1e-12)
    assert _exact(model, (1, 4)) <= float(lipnets.lipschitz_bound(model)) * (1 + SLACK)
    model.eval()
    assert float(lipnets.lipschitz_bound(model, (1, 4))) == pytest.approx(sigma, rel=1e-12)
    # Propagation runs in eval mode and gives every submodule its mode back.
    model.train()
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1), dtype=DT)
    lo, up = crown_bounds(model, x, 0.1, norm=2)
    assert all(m.training for m in model.modules())
    with torch.no_grad():
        out = model.eval()(x)
    assert bool((lo <= out + SLACK).all() and (out <= up + SLACK).all())


def test_a_random_parametrization_is_refused() -> None:
    layer = _linear(4, 4, 1)
    parametrize.register_parametrization(layer, "weight", Noisy())
    for call in (
        lambda m: lipnets.lipschitz_bound(m),
        lambda m: lipnets.lipschitz_bound(m, (1, 4)),
        lambda m: crown_bounds(m, torch.zeros(1, 4, dtype=DT), 0.1, norm=2),
    ):
        with pytest.raises(UntraceableModelError, match="differently when run twice"):
            call(nn.Sequential(layer))


def test_a_random_right_inverse_behind_a_stepping_state_is_refused() -> None:
    layer = _linear(4, 4, 2)
    parametrize.register_parametrization(layer, "weight", Stepping(random=True))
    with pytest.raises(UntraceableModelError, match="differently when run twice"):
        lipnets.lipschitz_bound(nn.Sequential(layer), (1, 4))


@pytest.mark.parametrize("make", [lambda: Stepping(random=False), Counter], ids=["set_", "int"])
def test_a_stepping_parametrization_is_bounded_for_its_next_call_and_left_as_it_was(make) -> None:
    layer = _linear(4, 4, 3)
    parametrize.register_parametrization(layer, "weight", make())
    model = nn.Sequential(layer, nn.Tanh())
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=DT)
    saved, reference = _tensors(model), copy.deepcopy(model)
    counter = layer.parametrizations.weight[0]
    calls = getattr(counter, "calls", None)
    bounds = [float(lipnets.lipschitz_bound(model, (1, 4))) for _ in range(3)]
    lo, up = crown_bounds(model, x, 0.2, norm=2)
    _assert_unchanged(model, saved, reference, x)
    assert getattr(counter, "calls", None) == calls
    assert bounds[0] == bounds[1] == bounds[2]
    exact = _exact(model, (1, 4))  # the export is the next call's function
    assert exact <= bounds[0] <= exact * (1 + SLACK)
    plain = lipnets.to_vanilla(model)
    lo_v, up_v = crown_bounds(plain, x, 0.2, norm=2)
    assert torch.equal(lo, lo_v) and torch.equal(up, up_v)


def test_a_module_read_twice_whose_parametrization_steps_is_refused() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = _linear(4, 4, 4)
            parametrize.register_parametrization(self.f, "weight", Counter())

        def forward(self, x):
            return self.f(torch.tanh(self.f(x)))

    # f(f(x)) reads 2 W, then 3 W: one graph holds one value per module.
    for shape in (None, (1, 4)):
        with pytest.raises(UntraceableModelError, match="read more than once"):
            lipnets.lipschitz_bound(Twice(), shape)


def test_a_module_read_twice_with_a_stateless_parametrization_is_bounded() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = orthogonal(nn.Linear(4, 4, dtype=DT))

        def forward(self, x):
            return self.f(torch.tanh(self.f(x)))

    model = Twice()
    assert float(lipnets.lipschitz_bound(model, (1, 4))) == pytest.approx(1.0, rel=1e-12)


def test_a_parametrized_bias_is_propagated_as_realised() -> None:
    layer = _linear(4, 3, 5)
    parametrize.register_parametrization(layer, "bias", Scale(100.0))
    parametrize.register_parametrization(layer, "weight", Stepping(random=False))
    model = nn.Sequential(_linear(4, 4, 6), nn.ReLU(), layer)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(7), dtype=DT)
    lo, up = crown_bounds(model, x, 0.3, norm=2)
    plain = lipnets.to_vanilla(model)
    lo_v, up_v = crown_bounds(plain, x, 0.3, norm=2)
    assert torch.equal(lo, lo_v) and torch.equal(up, up_v)
    g = torch.Generator().manual_seed(8)
    d = torch.randn(2, 2000, 4, generator=g, dtype=DT)
    d = 0.3 * d / d.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        out = plain((x[:, None] + d).reshape(-1, 4)).reshape(2, 2000, 3)
    assert bool((out >= lo[:, None] - SLACK).all() and (out <= up[:, None] + SLACK).all())
    assert float(out.abs().max()) > 50  # the realised bias (x100) is the one bounded


@pytest.mark.parametrize("where", ["layer", "list", "parametrization", "pre-hook"])
def test_hooks_on_a_parametrized_layer_or_its_parametrizations_are_refused(where) -> None:
    layer = _linear(4, 4, 9)
    parametrize.register_parametrization(layer, "weight", Scale(1.0))
    target = {
        "layer": layer,
        "list": layer.parametrizations.weight,
        "parametrization": layer.parametrizations.weight[0],
        "pre-hook": layer.parametrizations.weight,
    }[where]
    if where == "pre-hook":
        target.register_forward_pre_hook(lambda m, args: None)
    else:
        target.register_forward_hook(lambda m, args, out: out * 10)
    with pytest.raises(UnboundedModuleError, match="hooks"):
        lipnets.lipschitz_bound(nn.Sequential(layer))


def test_torch_spectral_norm_in_training_mode_is_bounded_for_its_next_step() -> None:
    layer = torch.nn.utils.parametrizations.spectral_norm(_linear(5, 5, 10))
    model = nn.Sequential(layer, nn.ReLU()).train()
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(11), dtype=DT)
    saved, reference = _tensors(model), copy.deepcopy(model)
    bound = float(lipnets.lipschitz_bound(model, (1, 5)))
    _assert_unchanged(model, saved, reference, x)
    exact = _exact(model, (1, 5))
    assert exact <= bound <= exact * (1 + SLACK)
    assert all(m.training for m in model.modules())


def test_two_threads_bounding_one_stepping_model_leave_it_unchanged() -> None:
    layer = _linear(6, 6, 12)
    parametrize.register_parametrization(layer, "weight", Stepping(random=False))
    model = nn.Sequential(layer, nn.ReLU(), _linear(6, 3, 13))
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(14), dtype=DT)
    saved, reference = _tensors(model), copy.deepcopy(model)
    expected = float(lipnets.lipschitz_bound(model, (1, 6)))
    expected_lo = crown_bounds(model, x, 0.1, norm=2).lower
    results: list[tuple[float, torch.Tensor]] = []
    failures: list[BaseException] = []
    start = threading.Barrier(2)

    def work() -> None:
        try:
            start.wait()
            for _ in range(8):
                bound = float(lipnets.lipschitz_bound(model, (1, 6)))
                results.append((bound, crown_bounds(model, x, 0.1, norm=2).lower))
        except BaseException as exc:  # pragma: no cover - the test reports it
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert len(results) == 16
    for bound, lo in results:
        assert bound == expected and torch.equal(lo, expected_lo)
    _assert_unchanged(model, saved, reference, x)


def test_tracing_inside_torch_parametrize_cache_is_refused() -> None:
    layer = orthogonal(nn.Linear(4, 4, dtype=DT))
    with parametrize.cached(), pytest.raises(UntraceableModelError, match="cached"):
        lipnets.lipschitz_bound(nn.Sequential(layer))


def test_differentiable_bounds_reach_the_raw_parameters_of_a_stand_in() -> None:
    layer = orthogonal(nn.Linear(4, 4, dtype=DT))  # a leaf trusted as nn.Linear
    model = nn.Sequential(layer, nn.ReLU(), _linear(4, 2, 15))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(16), dtype=DT)
    plain = crown_bounds(model, x, 0.1, norm=2)
    bounds = crown_bounds(model, x, 0.1, norm=2, differentiable=True)
    assert torch.equal(bounds.lower.detach(), plain.lower)
    bounds.lower.sum().backward()
    raw = layer.parametrizations.weight.original
    assert raw.grad is not None and float(raw.grad.abs().sum()) > 0


def test_a_parametrization_that_realises_nan_gets_no_finite_bound() -> None:
    layer = _linear(3, 3, 17)
    parametrize.register_parametrization(layer, "weight", Scale(float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        lipnets.lipschitz_bound(nn.Sequential(layer), (1, 3))
    with pytest.raises(ValueError, match="NaN"):
        crown_bounds(nn.Sequential(layer), torch.zeros(1, 3, dtype=DT), 0.1, norm=2)
