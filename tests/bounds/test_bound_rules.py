"""Sound bound rules for torch built-ins, checked against dense float64 operators."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import lipnets
from lipnets import lipschitz_bound
from lipnets.errors import ShapeRequiredError, UnboundedModuleError
from tests.helpers import as_float64, dense_jacobian, lipschitz_ascent, spectral_norm


def _exact_linear_norm(module: nn.Module, shape) -> float:
    x = torch.randn(shape, dtype=torch.float64)
    return spectral_norm(dense_jacobian(as_float64(module), x))


def test_linear_bound_is_exact_spectral_norm_in_float64():
    torch.manual_seed(0)
    for out_f, in_f in [(5, 7), (7, 5), (16, 16), (1, 9)]:
        layer = nn.Linear(in_f, out_f)
        exact = torch.linalg.svdvals(layer.weight.detach().double())[0]
        bound = lipschitz_bound(layer)
        assert exact <= bound <= exact * (1 + 1e-10)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_linear_with_nan_or_inf_weight_raises(bad):
    layer = nn.Linear(3, 3)
    with torch.no_grad():
        layer.weight[0, 0] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        lipschitz_bound(layer)


def test_lazy_linear_before_first_forward_raises():
    with pytest.raises(ValueError, match="uninitialised"):
        lipschitz_bound(nn.LazyLinear(3))


def test_overlapping_maxpool_counter_example():
    # ytsmiling/lmt #5: overlapping max pooling is not 1-Lipschitz.
    pool = nn.MaxPool1d(kernel_size=2, stride=1)
    x = torch.tensor([[[1.0, 2.0, 1.0, 2.0, 1.0]]], dtype=torch.float64)
    zero = torch.zeros_like(x)
    ratio = float((pool(x) - pool(zero)).norm() / (x - zero).norm())
    assert ratio > 1.0
    bound = float(lipschitz_bound(pool))
    assert bound >= ratio
    assert bound == pytest.approx(math.sqrt(2))


@pytest.mark.parametrize(
    "pool,shape",
    [
        (nn.MaxPool2d(2), (1, 1, 6, 6)),
        (nn.MaxPool2d(3, stride=1, padding=1), (1, 1, 5, 5)),
        (nn.MaxPool2d(3, stride=2), (1, 1, 7, 7)),
        (nn.MaxPool2d(2, stride=1, dilation=2), (1, 1, 6, 6)),
    ],
)
def test_maxpool_bound_is_reached_by_a_spike(pool, shape):
    bound = float(lipschitz_bound(pool, shape))
    # A single large entry is the max of every window containing it, so the
    # Jacobian there maps it to all those outputs: norm sqrt(cover) = the bound.
    slope = 0.0
    for i, j in itertools.product(range(shape[-2]), range(shape[-1])):
        x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        x[..., i, j] = 10.0
        slope = max(slope, spectral_norm(dense_jacobian(pool, x)))
    assert slope <= bound * (1 + 1e-12)
    assert slope == pytest.approx(bound, rel=1e-9)
    assert lipschitz_ascent(pool, shape, steps=30) <= bound * (1 + 1e-9)


_AVG_CONFIGS = [
    dict(kernel_size=k, stride=s, padding=p, ceil_mode=c, count_include_pad=i)
    for k, s, p, c, i in itertools.product([2, 3], [1, 2, 3], [0, 1], [False, True], [True, False])
    if p <= k // 2
]


@pytest.mark.parametrize("cfg", _AVG_CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("size", [(5, 6), (8, 8)])
def test_avgpool_bound_against_dense_operator(cfg, size):
    pool = nn.AvgPool2d(**cfg)
    shape = (1, 1, *size)
    exact = _exact_linear_norm(pool, shape)
    with_shape = float(lipschitz_bound(pool, shape))
    every_size = float(lipschitz_bound(pool))
    assert exact <= with_shape * (1 + 1e-12)
    assert with_shape == pytest.approx(exact, rel=1e-9)  # exact when the size is known
    assert exact <= every_size * (1 + 1e-12)


def test_avgpool_divisor_override_and_1d_3d():
    cases = [
        (nn.AvgPool2d(3, 1, 1, divisor_override=2), (1, 1, 6, 6)),
        (nn.AvgPool1d(3, 2, 1), (1, 1, 9)),
        (nn.AvgPool3d(2), (1, 1, 4, 4, 4)),
    ]
    for pool, shape in cases:
        exact = _exact_linear_norm(pool, shape)
        assert float(lipschitz_bound(pool, shape)) == pytest.approx(exact, rel=1e-9)
        assert exact <= float(lipschitz_bound(pool)) * (1 + 1e-12)


def test_non_overlapping_avgpool_every_size_bound_is_tight():
    assert float(lipschitz_bound(nn.AvgPool2d(2))) == pytest.approx(0.5)


@pytest.mark.parametrize("out,size", [((3, 3), (2, 2)), ((2, 3), (5, 7)), ((1, 1), (4, 4))])
def test_adaptive_avgpool_exact_with_shape(out, size):
    pool = nn.AdaptiveAvgPool2d(out)
    shape = (1, 1, *size)
    exact = _exact_linear_norm(pool, shape)
    assert float(lipschitz_bound(pool, shape)) == pytest.approx(exact, rel=1e-9)
    if out == (3, 3):
        assert exact > 1.0  # upsampling adaptive pooling is not 1-Lipschitz


def test_adaptive_pool_without_shape():
    assert float(lipschitz_bound(nn.AdaptiveAvgPool2d(1))) == 1.0
    assert float(lipschitz_bound(nn.AdaptiveMaxPool2d((1, 1)))) == 1.0
    with pytest.raises(ShapeRequiredError, match="input_shape"):
        lipschitz_bound(nn.AdaptiveAvgPool2d(3))


def test_adaptive_maxpool_with_shape_is_sound():
    pool = nn.AdaptiveMaxPool2d(3)
    shape = (1, 1, 4, 4)
    assert lipschitz_ascent(pool, shape, steps=30) <= float(lipschitz_bound(pool, shape)) * (
        1 + 1e-9
    )


def test_batchnorm_eval_exact_and_train_raises():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(5)
    with torch.no_grad():
        bn.running_var.uniform_(0.1, 3.0)
        bn.weight.uniform_(-3, 3)
    bn.eval()
    exact = _exact_linear_norm(bn, (1, 5))
    assert float(lipschitz_bound(bn)) == pytest.approx(exact, rel=1e-12)
    assert float(lipschitz_bound(bn)) >= exact
    bn.train()
    with pytest.raises(UnboundedModuleError, match="training mode"):
        lipschitz_bound(bn)
    with pytest.raises(UnboundedModuleError, match="training mode"):
        lipschitz_bound(nn.BatchNorm1d(5, track_running_stats=False).eval())


def test_dropout_is_one_in_eval_and_scaled_in_training():
    drop = nn.Dropout(0.25)
    assert float(lipschitz_bound(drop)) == pytest.approx(1 / 0.75)
    assert float(lipschitz_bound(drop.eval())) == 1.0


@pytest.mark.parametrize(
    "act,expected",
    [
        (nn.ReLU(), 1.0),
        (nn.Tanh(), 1.0),
        (nn.Sigmoid(), 0.25),
        (nn.LeakyReLU(0.1), 1.0),
        (nn.LeakyReLU(2.5), 2.5),
        (nn.ELU(2.0), 2.0),
        (nn.CELU(0.5), 1.0),
        (nn.Hardtanh(), 1.0),
        (nn.Identity(), 1.0),
        (nn.Softsign(), 1.0),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v),
)
def test_activation_rules_are_sound_and_tight(act, expected):
    assert float(lipschitz_bound(act)) == pytest.approx(expected)
    # The derivative's supremum, found on a dense grid, never exceeds the rule
    # and comes within 1% of it (each constant is reached or approached).
    x = torch.linspace(-8, 8, 20001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(act(x).sum(), x)
    sup = float(slope.abs().max())
    assert sup <= expected * (1 + 1e-12)
    assert sup >= 0.99 * expected


def test_rules_refuse_maps_that_are_not_lipschitz():
    # Softplus switches to the identity above `threshold`: a jump, not a slope.
    soft = nn.Softplus(threshold=0.0).double()
    x = torch.tensor([-1e-7, 1e-7], dtype=torch.float64)
    assert float((soft(x[1:]) - soft(x[:1])).abs() / 2e-7) > 1e5
    with pytest.raises(UnboundedModuleError, match="Softplus"):
        lipschitz_bound(nn.Sequential(soft))
    with pytest.raises(UnboundedModuleError, match="alpha"):
        lipschitz_bound(nn.CELU(-1.0))


def test_subclass_that_overrides_forward_does_not_inherit_the_rule():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    layer = Doubled(4, 3)
    sigma = torch.linalg.svdvals(layer.weight.detach().double())[0]
    assert float(lipschitz_bound(layer)) == pytest.approx(2 * float(sigma), rel=1e-9)


def test_parametrized_linear_uses_the_realised_weight():
    layer = nn.utils.parametrizations.orthogonal(nn.Linear(6, 4))
    exact = _exact_linear_norm(layer, (1, 6))
    assert float(lipschitz_bound(layer)) == pytest.approx(exact, rel=1e-9)


def test_deprecated_spectral_norm_hook_is_refused():
    layer = nn.utils.spectral_norm(nn.Linear(4, 4))
    with pytest.raises(UnboundedModuleError, match="deprecated"):
        lipschitz_bound(nn.Sequential(layer))


def test_register_bound_for_a_custom_module_and_bad_registrations():
    class Halve(nn.Module):
        def forward(self, x):
            return torch.where(x > 0, x, x - 1)  # a jump at 0: refused

    with pytest.raises(UnboundedModuleError, match="Halve"):
        lipschitz_bound(nn.Sequential(nn.Linear(3, 3), Halve()))
    lipnets.register_bound(Halve)(lambda m, s: 1.0)
    model = nn.Sequential(nn.Linear(3, 3), Halve())
    assert float(lipschitz_bound(model)) == pytest.approx(float(lipschitz_bound(model[0])))
    with pytest.raises(TypeError):
        lipnets.register_bound(int)
    with pytest.raises(TypeError):
        lipnets.register_bound()
    lipnets.register_bound(Halve)(lambda m, s: float("nan"))
    with pytest.raises(UnboundedModuleError, match=">= 0"):
        lipschitz_bound(model)


def test_transposed_conv3d_has_no_rule():
    # 1-D and 2-D transposed convolutions have rules (tests/bounds/test_linear_op_bounds.py);
    # the 3-D one does not, and must raise.
    with pytest.raises(UnboundedModuleError, match=r"0 \(ConvTranspose3d\) has no bound rule"):
        lipschitz_bound(nn.Sequential(nn.ConvTranspose3d(1, 1, 3)))
