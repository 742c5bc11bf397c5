"""Functional convolutions (Note [Functional convolutions] in lipnets.graph.conv_calls).

``F.conv1d``/``conv2d``/``conv3d`` with constant weights are bounded and propagated by
torch.nn's rules on a stand-in module: the bound equals that of the equivalent
``nn.ConvNd`` and is at least the float64 norm of the dense operator, CROWN and IBP equal
the module's bit for bit and contain sampled outputs, gradients of propagated bounds reach
the parameters, and calls whose weight depends on the input are refused.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipnets
from lipnets.errors import InvalidModelError, UnboundedModuleError, UntraceableModelError
from lipnets.propagation import crown_bounds, interval_bounds
from tests.helpers import dense_jacobian, spectral_norm

DT = torch.float64
CONVS = {1: (F.conv1d, nn.Conv1d), 2: (F.conv2d, nn.Conv2d), 3: (F.conv3d, nn.Conv3d)}

# (rank, in, out, kernel, stride, padding, dilation, groups, bias, by keyword)
CASES = [
    (2, 3, 4, 3, 1, 1, 1, 1, True, False),
    (2, 4, 6, (3, 2), (2, 1), (1, 0), 1, 2, False, True),
    (2, 2, 4, 3, 1, "same", 2, 1, True, True),
    (2, 3, 3, 2, 1, "valid", 1, 3, True, False),
    (1, 2, 3, 3, 2, 1, 1, 1, True, True),
    (1, 4, 4, 5, 1, "same", 1, 2, False, False),
]


class Functional(nn.Module):
    """A forward that calls the functional convolution on its own parameters."""

    def __init__(self, rank, cin, cout, kernel, stride, padding, dilation, groups, bias, kw):
        super().__init__()
        self.module = CONVS[rank][1](
            cin, cout, kernel, stride=stride, padding=padding, dilation=dilation,
            groups=groups, bias=bias, dtype=DT,
        )  # fmt: skip
        self.fn, self.kw = CONVS[rank][0], kw
        self.options = (stride, padding, dilation, groups)

    def forward(self, x):
        m = self.module
        stride, padding, dilation, groups = self.options
        if self.kw:
            y = self.fn(
                x, weight=m.weight, bias=m.bias, stride=stride, padding=padding,
                dilation=dilation, groups=groups,
            )  # fmt: skip
        else:
            y = self.fn(x, m.weight, m.bias, stride, padding, dilation, groups)
        return torch.relu(y)


def _shape(rank: int, cin: int) -> tuple[int, ...]:
    return (1, cin, *([7] * rank))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"conv{c[0]}d-{c[5]}-g{c[7]}")
def test_bound_and_propagation_equal_the_module_and_are_sound(case) -> None:
    torch.manual_seed(0)
    functional = Functional(*case)
    module = nn.Sequential(functional.module, nn.ReLU())
    shape = _shape(case[0], case[1])
    x = torch.rand(3, *shape[1:], dtype=DT)
    with torch.no_grad():
        assert torch.equal(functional(x), module(x))
    bound = lipnets.lipschitz_bound(functional, input_shape=shape)
    assert torch.equal(bound, lipnets.lipschitz_bound(module, input_shape=shape))
    exact = spectral_norm(dense_jacobian(functional.module, torch.zeros(shape, dtype=DT)))
    assert exact <= float(bound)
    for norm, eps in (("linf", 0.05), (2, 0.2)):
        lo, up = crown_bounds(functional, x, eps, norm=norm)
        lo_m, up_m = crown_bounds(module, x, eps, norm=norm)
        assert torch.equal(lo, lo_m) and torch.equal(up, up_m)
        ilo, iup = interval_bounds(functional, x, eps, norm=norm)
        ilo_m, iup_m = interval_bounds(module, x, eps, norm=norm)
        assert torch.equal(ilo, ilo_m) and torch.equal(iup, iup_m)
        g = torch.Generator().manual_seed(1)
        d = torch.rand(200, *x.shape, generator=g, dtype=DT) * 2 - 1
        if norm == 2:
            d = d / d.flatten(2).norm(dim=-1).reshape(200, 3, *[1] * (d.ndim - 2))
        with torch.no_grad():
            out = functional((x + eps * d).reshape(-1, *x.shape[1:])).reshape(200, *lo.shape)
        assert bool((out >= lo - 1e-12).all() and (out <= up + 1e-12).all())


def test_conv3d_is_propagated_and_refused_by_the_bound_with_its_name() -> None:
    torch.manual_seed(1)
    functional = Functional(3, 2, 2, 3, 1, 1, 1, 1, True, False)
    x = torch.rand(2, 2, 4, 4, 4, dtype=DT)
    lo, up = crown_bounds(functional, x, 0.05, norm="linf")
    lo_m, up_m = crown_bounds(nn.Sequential(functional.module, nn.ReLU()), x, 0.05, norm="linf")
    assert torch.equal(lo, lo_m) and torch.equal(up, up_m)
    with pytest.raises(UnboundedModuleError, match="Conv3d"):
        lipnets.lipschitz_bound(functional, input_shape=(1, 2, 4, 4, 4))


def test_traced_circular_conv_is_pad_then_conv_and_stays_sound() -> None:
    """A subclass with its own forward is traced into: circular padding becomes F.pad and a
    zero-padding call, bounded by the product of their rules (sound, not exact)."""

    class Scaled(nn.Conv2d):
        def forward(self, x):  # a forward of its own: not trusted with nn.Conv2d's rule
            return 2 * super().forward(x)

    torch.manual_seed(2)
    layer = Scaled(3, 4, 3, padding=1, padding_mode="circular", dtype=DT)
    shape = (1, 3, 6, 6)
    bound = float(lipnets.lipschitz_bound(layer, input_shape=shape))
    exact = spectral_norm(dense_jacobian(layer, torch.zeros(shape, dtype=DT)))
    assert exact <= bound
    x = torch.rand(2, 3, 6, 6, dtype=DT)
    lo, up = crown_bounds(layer, x, 0.1, norm=2)
    g = torch.Generator().manual_seed(3)
    d = torch.randn(500, *x.shape, generator=g, dtype=DT)
    d = 0.1 * d / d.flatten(2).norm(dim=-1)[..., None, None, None]
    with torch.no_grad():
        out = layer((x + d).reshape(-1, 3, 6, 6)).reshape(500, *lo.shape)
    assert bool((out >= lo - 1e-12).all() and (out <= up + 1e-12).all())


def test_propagated_bounds_are_differentiable_in_the_weight() -> None:
    torch.manual_seed(4)
    functional = Functional(2, 2, 3, 3, 1, 1, 1, 1, True, False)
    module = nn.Sequential(functional.module, nn.ReLU())
    x = torch.rand(2, 2, 5, 5, dtype=DT)
    grads = []
    for model in (functional, module):
        lo, up = crown_bounds(model, x, 0.1, norm="linf", differentiable=True)
        (grad,) = torch.autograd.grad((up - lo).sum(), functional.module.weight)
        grads.append(grad)
    assert bool(grads[0].abs().sum() > 0)
    assert torch.equal(grads[0], grads[1])


class _InputWeight(nn.Module):
    def forward(self, x):
        return F.conv2d(x, x[:1].expand(2, -1, -1, -1).contiguous())


class _BadGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 1, 3, 3, dtype=DT))

    def forward(self, x):
        return F.conv2d(x, self.w, groups=2)


def test_input_dependent_weight_is_refused_everywhere() -> None:
    x = torch.rand(1, 1, 5, 5, dtype=DT)
    with pytest.raises(UnboundedModuleError):
        lipnets.lipschitz_bound(_InputWeight(), input_shape=(1, 1, 5, 5))
    with pytest.raises((UnboundedModuleError, UntraceableModelError)):
        crown_bounds(_InputWeight(), x, 0.1, norm="linf")


def test_a_call_that_fails_on_its_input_is_refused_before_any_rule() -> None:
    with pytest.raises(InvalidModelError, match="groups=2"):
        lipnets.lipschitz_bound(_BadGroups(), input_shape=(1, 2, 5, 5))


class _SelfWeight(nn.Module):
    def forward(self, x):
        return F.conv2d(x, x)  # the input as its own weight: (1, 1, 3, 3) * itself


def test_the_input_as_its_own_weight_is_refused_everywhere() -> None:
    x = torch.rand(1, 1, 3, 3, dtype=DT)
    with pytest.raises(UnboundedModuleError):
        lipnets.lipschitz_bound(_SelfWeight(), input_shape=(1, 1, 3, 3))
    for call in (crown_bounds, interval_bounds):
        with pytest.raises(UnboundedModuleError, match="other than its input"):
            call(_SelfWeight(), x, 0.1, norm="linf")
