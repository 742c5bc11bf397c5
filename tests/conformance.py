"""The conformance harness every lipnets layer (and bounded torch built-in) joins.

Add one line to ``CASES`` and ``tests/test_conformance.py`` runs the whole
property list on it:

* output shape, dtype and device follow the input (float32 and float64);
* module == functional, when the case names its functional form;
* ``lipschitz_bound`` (the module's own method and the composed bound) is a
  0-dim float64 tensor >= the exact spectral norm of the dense Jacobian,
  computed in float64 at several inputs (for a linear map: its dense operator);
* state_dict round trip into a fresh instance gives the same outputs;
* eval mode is deterministic across repeated calls;
* the estimators sit below the bound: ``lower_bound <= max jacobian_norm <=
  lipschitz_bound``, and AutoLip (and SeqLip where it applies) lies between
  the lower bound and the sound bound, up to the power-iteration tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

import lipnets
import lipnets.functional as LF
from lipnets.estimators import autolip, jacobian_norm, lower_bound, seqlip
from lipnets.functional.fft_cayley import fft_cayley_conv2d
from lipnets.functional.reshape import space_to_depth

from .helpers import as_float64, dense_jacobian, spectral_norm


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    functional: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None

    def __str__(self) -> str:
        return self.name


def _bn_eval() -> nn.Module:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 2.0)
        bn.weight.uniform_(-2, 2)
    return bn.eval()


def _orthogonal_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    raw = module.parametrizations.weight.original
    if isinstance(module, lipnets.BjorckLinear):
        weight = LF.bjorck(raw)
    else:
        weight = LF.cayley(raw, module.out_features, module.in_features)
    return F.linear(x, weight, module.bias)


CASES: list[Case] = [
    # lipnets layers
    Case("GroupSort2-NC", lambda: lipnets.GroupSort(2), (2, 8), lambda m, x: LF.group_sort(x, 2)),
    Case(
        "GroupSort4-NCHW",
        lambda: lipnets.GroupSort(4),
        (2, 8, 3, 3),
        lambda m, x: LF.group_sort(x, 4),
    ),
    Case(
        "GroupSort2-NHWC",
        lambda: lipnets.GroupSort(2, dim=-1),
        (2, 3, 3, 6),
        lambda m, x: LF.group_sort(x, 2, -1),
    ),
    Case("MaxMin-NC", lambda: lipnets.MaxMin(), (2, 6), lambda m, x: LF.max_min(x)),
    Case("MaxMin-NCHW", lambda: lipnets.MaxMin(), (2, 4, 3, 3), lambda m, x: LF.max_min(x)),
    Case("FullSort-NC", lambda: lipnets.FullSort(), (2, 7), lambda m, x: LF.full_sort(x)),
    Case("BjorckLinear-square", lambda: lipnets.BjorckLinear(6, 6), (2, 6), _orthogonal_linear),
    Case("BjorckLinear-tall", lambda: lipnets.BjorckLinear(4, 9), (2, 4), _orthogonal_linear),
    Case("BjorckLinear-wide", lambda: lipnets.BjorckLinear(9, 4), (2, 9), _orthogonal_linear),
    Case("CayleyLinear-tall", lambda: lipnets.CayleyLinear(4, 9), (2, 4), _orthogonal_linear),
    Case(
        "CayleyLinear-wide",
        lambda: lipnets.CayleyLinear(9, 4, bias=False),
        (2, 9),
        _orthogonal_linear,
    ),
    Case("BCOPConv2d-circular", lambda: lipnets.BCOPConv2d(4, 4, 3), (2, 4, 6, 6)),
    Case("BCOPConv2d-stride2-tall", lambda: lipnets.BCOPConv2d(2, 12, 3, stride=2), (2, 2, 6, 6)),
    Case(
        "BCOPConv2d-zeros-wide",
        lambda: lipnets.BCOPConv2d(6, 3, 3, padding_mode="zeros"),
        (2, 6, 5, 5),
    ),
    Case(
        "CayleyConv2d",
        lambda: lipnets.CayleyConv2d(3, 4, 3, input_size=(6, 6)),
        (2, 3, 6, 6),
        lambda m, x: fft_cayley_conv2d(x, m.weight, m.bias),
    ),
    Case(
        "CayleyConv2d-stride2",
        lambda: lipnets.CayleyConv2d(2, 8, 3, stride=2, input_size=(4, 6)),
        (2, 2, 4, 6),
        lambda m, x: fft_cayley_conv2d(x, m.weight, m.bias, stride=2),
    ),
    Case(
        "InvertibleDownsample",
        lambda: lipnets.InvertibleDownsample(2),
        (2, 3, 4, 6),
        lambda m, x: space_to_depth(x, 2),
    ),
    Case("L2NormPool2d-overlap", lambda: lipnets.L2NormPool2d(3, 1, 1), (1, 2, 5, 5)),
    # torch built-ins bounded by registered rules
    Case("Conv2d-zeros-stride2", lambda: nn.Conv2d(3, 4, 3, 2, 1), (1, 3, 7, 7)),
    Case(
        "Conv2d-circular", lambda: nn.Conv2d(3, 3, 3, 1, 1, padding_mode="circular"), (1, 3, 6, 6)
    ),
    Case("Conv2d-dilated-groups", lambda: nn.Conv2d(4, 4, 3, 1, 2, 2, groups=2), (1, 4, 7, 7)),
    Case("LPPool2d", lambda: nn.LPPool2d(2, 2, 1), (1, 2, 5, 5)),
    Case("Linear", lambda: nn.Linear(7, 5), (1, 7), lambda m, x: x @ m.weight.T + m.bias),
    Case("BatchNorm2d-eval", _bn_eval, (1, 3, 4, 4)),
    Case("MaxPool2d-overlap", lambda: nn.MaxPool2d(3, 1, 1), (1, 2, 5, 5)),
    Case("AvgPool2d", lambda: nn.AvgPool2d(2), (1, 2, 6, 6)),
    Case(
        "Sequential-MLP",
        lambda: nn.Sequential(nn.Linear(6, 8), lipnets.MaxMin(), nn.Linear(8, 3)),
        (1, 6),
    ),
]


def _input(case: Case, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(case.input_shape, generator=g, dtype=torch.float64).to(dtype)


def check_dtype_device(case: Case) -> None:
    for dtype in (torch.float32, torch.float64):
        module = case.make().to(dtype)
        x = _input(case, dtype)
        y = module(x)
        assert y.dtype == dtype and y.device == x.device
        assert y.shape[0] == x.shape[0]


def check_functional(case: Case) -> None:
    if case.functional is None:
        return
    module = case.make()
    x = _input(case)
    # The functional form first: a training-mode call may update raw parameters
    # (Note [Bjorck reprojection]) after computing its output.
    expected = case.functional(module, x)
    torch.testing.assert_close(module(x), expected, rtol=0, atol=0)


def check_bound(case: Case) -> None:
    module = case.make()
    shape = torch.Size(case.input_shape[:1]) + torch.Size(case.input_shape[1:])
    one = (1, *case.input_shape[1:])
    bounds = [lipnets.lipschitz_bound(module, one), lipnets.lipschitz_bound(module)]
    if callable(getattr(module, "lipschitz_bound", None)):
        bounds.append(module.lipschitz_bound())
        bounds.append(module.lipschitz_bound(input_shape=shape))
    ref = as_float64(module)
    exact = max(
        spectral_norm(dense_jacobian(ref, _input(case, torch.float64, seed)[:1]))
        for seed in range(4)
    )
    for b in bounds:
        assert isinstance(b, torch.Tensor) and b.ndim == 0 and b.dtype == torch.float64
        assert not b.requires_grad and torch.isfinite(b)
        assert float(b) >= exact * (1 - 1e-9), f"{case}: bound {float(b)} < dense norm {exact}"


def check_state_dict(case: Case) -> None:
    torch.manual_seed(1)
    a = case.make()
    torch.manual_seed(2)
    b = case.make()
    b.load_state_dict(a.state_dict())
    x = _input(case)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    torch.testing.assert_close(
        lipnets.lipschitz_bound(a, (1, *case.input_shape[1:])),
        lipnets.lipschitz_bound(b, (1, *case.input_shape[1:])),
    )


def check_eval_determinism(case: Case) -> None:
    module = case.make().eval()
    x = _input(case)
    first = module(x)
    for _ in range(2):
        assert torch.equal(module(x), first)


def check_estimators(case: Case) -> None:
    module = case.make()
    one = (1, *case.input_shape[1:])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, *one[1:], generator=g)
    low = lower_bound(module, x, steps=10, restarts=2, generator=g)
    points = [x.double(), low.x, low.y]  # the witness is in float64, like the search
    if low.kind == "pair":  # the ratio is an average of Jacobians along the segment
        t = torch.linspace(0, 1, 65, dtype=torch.float64).reshape(-1, *[1] * (len(one) - 1))
        points.append(low.x + t * (low.y - low.x))
    jac = float(jacobian_norm(as_float64(module), torch.cat(points)).max())
    bound = float(lipnets.lipschitz_bound(module, one))
    auto = float(autolip(module, one, generator=g))
    assert 0 < float(low.value) <= jac * (1 + 1e-5), f"{case}: lower {float(low.value)} > {jac}"
    assert jac <= bound * (1 + 1e-6), f"{case}: Jacobian norm {jac} > bound {bound}"
    assert float(low.value) * (1 - 1e-4) <= auto <= bound * (1 + 1e-6), f"{case}: autolip {auto}"
    try:
        seq = float(seqlip(module, one, generator=g))
    except ValueError as exc:
        assert "derivatives in [0, 1]" in str(exc)
        return
    assert float(low.value) * (1 - 1e-4) <= seq <= bound * (1 + 1e-6), f"{case}: seqlip {seq}"


CHECKS = [
    check_dtype_device,
    check_functional,
    check_bound,
    check_state_dict,
    check_eval_determinism,
    check_estimators,
]
