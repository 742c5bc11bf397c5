"""Power iteration and Jacobian norms against dense float64 truths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lipnets
from lipnets.estimators.power import jacobian_norm, power_iteration
from tests.helpers import dense_jacobian, spectral_norm

RTOL = 1e-4


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check(estimate: torch.Tensor, truth: float) -> None:
    assert estimate.dtype == torch.float64 and estimate.ndim == 0
    assert estimate <= truth * (1 + 1e-6)
    assert abs(float(estimate) - truth) <= RTOL * truth


def test_orthogonal_linear_times_scale() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 12)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
        layer.weight.copy_(1.3 * q)
    _check(power_iteration(layer, (1, 12), generator=_gen()), 1.3)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(("groups", "dilation"), [(1, 1), (2, 1), (2, 2)])
def test_conv2d_matches_dense_svd(
    stride: int, groups: int, dilation: int, dtype: torch.dtype
) -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=stride, groups=groups, dilation=dilation)
    shape = (1, 4, 7, 7)
    truth = spectral_norm(dense_jacobian(conv.double(), torch.zeros(shape)))
    conv.to(dtype)  # float32: the default of a module built without a dtype
    estimate = power_iteration(conv, shape, iters=3000, tol=1e-9, generator=_gen())
    if dtype == torch.float64:
        _check(estimate, truth)
    else:
        assert abs(float(estimate) - truth) <= RTOL * truth


def test_plain_function() -> None:
    _check(power_iteration(lambda x: 2 * x.flip(-1), (1, 7), generator=_gen()), 2.0)


def test_affine_bias_ignored_and_under_no_grad() -> None:
    layer = nn.Linear(3, 3).double()
    with torch.no_grad():
        layer.weight.copy_(torch.diag(torch.tensor([0.5, 3.0, 1.0])))
        layer.bias.fill_(100.0)
        estimate = power_iteration(layer, (1, 3), generator=_gen())
    _check(estimate, 3.0)


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: lipnets.BjorckLinear(6, 9), (1, 6)),
        (lambda: lipnets.BCOPConv2d(4, 4, 3), (1, 4, 6, 6)),
    ],
)
def test_lipnets_layers(make, shape) -> None:
    torch.manual_seed(2)
    layer = make()
    truth = spectral_norm(dense_jacobian(lambda t: layer(t.float()), torch.zeros(shape)))
    estimate = power_iteration(layer, shape, generator=_gen())
    assert abs(float(estimate) - truth) <= 1e-4 * truth
    assert estimate <= layer.lipschitz_bound() * (1 + 1e-6)


def test_mode_restored_and_no_parameter_grads() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.train()
    model[2].eval()
    power_iteration(model, (1, 4), generator=_gen())
    jacobian_norm(model, torch.randn(3, 4))
    jacobian_norm(model, torch.randn(3, 4), dense_limit=0)
    assert model.training and model[0].training and model[1].training
    assert not model[2].training
    assert all(p.grad is None for p in model.parameters())


def _mlp(act: nn.Module) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 8), act, nn.Linear(8, 8), act, nn.Linear(8, 3)).double()


@pytest.mark.parametrize("act", [nn.ReLU(), lipnets.GroupSort(2)], ids=["relu", "groupsort"])
@pytest.mark.parametrize("dense_limit", [2**22, 0], ids=["dense", "power"])
def test_jacobian_norm_matches_dense(act: nn.Module, dense_limit: int) -> None:
    model = _mlp(act)
    x = torch.randn(5, 6, dtype=torch.float64, generator=_gen(4))
    norms = jacobian_norm(
        model, x, dense_limit=dense_limit, iters=3000, tol=1e-12, generator=_gen()
    )
    assert norms.shape == (5,) and norms.dtype == torch.float64
    truths = torch.tensor([spectral_norm(dense_jacobian(model, p.unsqueeze(0))) for p in x])
    assert torch.all(norms <= truths * (1 + 1e-6))
    torch.testing.assert_close(norms, truths.double(), rtol=RTOL, atol=0.0)
    assert torch.all(norms <= lipnets.lipschitz_bound(model))


def test_jacobian_norm_chunks_and_conv_input() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4))
    x = torch.randn(3, 2, 4, 4)
    dense = jacobian_norm(model, x, chunk_size=2)
    power = jacobian_norm(model, x, dense_limit=0, iters=2000, tol=1e-10, generator=_gen())
    torch.testing.assert_close(dense, power, rtol=1e-4, atol=0.0)
    truths = torch.tensor([spectral_norm(dense_jacobian(model.double(), p[None])) for p in x])
    torch.testing.assert_close(dense, truths.double(), rtol=1e-4, atol=0.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"input_shape": (4,)}, ValueError, "batch dimension of 1"),
        ({"input_shape": (2, 4)}, ValueError, "batch dimension of 1"),
        ({"input_shape": "14"}, ValueError, "sequence of positive ints"),
        ({"input_shape": (1, 4.0)}, ValueError, "positive ints"),
        ({"input_shape": (1, 4), "iters": 0}, ValueError, "iters must be an int >= 1, got 0"),
        ({"input_shape": (1, 4), "tol": -1.0}, ValueError, "tol must be"),
        ({"input_shape": (1, 4), "dtype": torch.int64}, TypeError, "dtype must be"),
    ],
)
def test_power_iteration_argument_errors(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        power_iteration(nn.Linear(4, 2), **kwargs)


def test_power_iteration_bad_outputs() -> None:
    with pytest.raises(TypeError, match=r"floating-point tensor, got dtype torch\.int64"):
        power_iteration(lambda x: x.long(), (1, 3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        power_iteration(lambda x: x / 0.0, (1, 3))
    with pytest.raises(RuntimeError, match="does not depend on its input"):
        power_iteration(lambda x: x.detach() * 2, (1, 3))


def test_jacobian_norm_errors() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="at least 2 dimensions, got shape \\(3,\\)"):
        jacobian_norm(model, torch.randn(3))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        jacobian_norm(model, torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"floating-point tensor, got dtype torch\.int64"):
        jacobian_norm(lambda t: t.long(), torch.randn(2, 3))
    with pytest.raises(ValueError, match="x contains NaN"):
        jacobian_norm(model, torch.tensor([[1.0, float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        jacobian_norm(lambda t: t / 0.0, torch.randn(2, 3))
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        jacobian_norm(model, torch.randn(2, 3), chunk_size=0)
