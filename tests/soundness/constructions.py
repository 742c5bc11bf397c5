"""The table of red-team constructions (issue 15).

Each `Case` is a named factory returning a `Built`: a model in float64 and
eval mode, the input batch shape its bounds are checked at, the number of
classes when it is a per-sample classifier (then the certification entry
points apply, labels being its own predictions), and, where the exact
Lipschitz constant is known in closed form, its square as a `Fraction` (so
that rounding can be checked in exact arithmetic).

Flags on the case say which entry points apply and what is expected:

* ``must_bound``: entry points where a refusal is a failure (positive
  controls; the suite cannot pass by refusing everything);
* ``must_refuse``: a substring that a typed refusal of every bound,
  propagation, certification and report entry point must contain
  (NaN parameters);
* ``wrong_shape``: an ``input_shape`` the model cannot take, which
  `lipschitz_bound` and the estimators must refuse with a typed error;
* ``route``: the number of the known-broken route of issue 15 it encodes;
* ``mutate``: a change made after a first pass through lipnets (cached traces
  must not outlive it);
* ``coupled``: the model mixes the samples of a batch (no certification; balls
  are sampled jointly at the case's own batch shape).

A case without ``classes`` whose batch shape starts with 1 is treated as
coupled too (e.g. fills from ``x.sum()``).

Every random number comes from a `torch.Generator` seeded from the case name,
so the table is deterministic and independent of the global RNG.
"""

from __future__ import annotations

import functools
import math
import operator
import types
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lipnets import nn as lnn

F64 = torch.float64

# Entry points (ids used by test_entry_points).
LIPSCHITZ = "lipschitz_bound"
LIPSCHITZ_SHAPE = "lipschitz_bound[input_shape]"
AUTOLIP = "autolip"
SEQLIP = "seqlip"
IBP = "interval_bounds"
CROWN = "crown_bounds"
LOCAL = "local_lipschitz"
CERT_VECTOR = "certified_accuracy[vector]"
CERT_LAST = "certified_accuracy[last_layer]"
CERT_CROWN = "certify_crown"
REPORT = "report"
CERT_REPORT = "certification_report"
VANILLA = "to_vanilla"
WRONG_SHAPE = "wrong_input_shape"

GENERAL = (LIPSCHITZ, LIPSCHITZ_SHAPE, AUTOLIP, SEQLIP, IBP, CROWN, LOCAL, REPORT, VANILLA)
CLASSIFIER = (CERT_VECTOR, CERT_CROWN, CERT_REPORT)
# Entry points whose answer may certify: a NaN model must be refused there.
SOUND = (
    LIPSCHITZ,
    LIPSCHITZ_SHAPE,
    IBP,
    CROWN,
    LOCAL,
    CERT_VECTOR,
    CERT_LAST,
    CERT_CROWN,
    REPORT,
    CERT_REPORT,
)


class Built(NamedTuple):
    model: nn.Module
    shape: tuple[int, ...]
    classes: int | None = None
    exact_sq: Fraction | None = None


@dataclass(frozen=True)
class Case:
    name: str
    factory: Callable[[torch.Generator], Built]
    must_bound: frozenset[str] = frozenset()
    must_refuse: str | None = None
    wrong_shape: tuple[int, ...] | None = None
    route: int | None = None
    scale: float = 1.0
    coupled: bool = False
    """The model mixes the samples of a batch (checked at its own batch shape only)."""
    mutate: Callable[[nn.Module], None] | None = None
    """Applied after a first pass through lipnets (which may cache a traced graph): the
    entry points must then bound or refuse the mutated model."""

    def seed(self) -> int:
        return zlib.crc32(self.name.encode())

    def build(self) -> Built:
        g = torch.Generator().manual_seed(self.seed())
        built = self.factory(g)
        model = built.model.to(F64).eval()
        return built._replace(model=model, shape=tuple(built.shape))

    def final(self) -> Built:
        """The model the entry points are checked on: `build`, then `mutate`."""
        built = self.build()
        if self.mutate is not None:
            self.mutate(built.model)
        return built

    def entry_points(self, built: Built) -> tuple[str, ...]:
        eps = list(GENERAL)
        if built.classes is not None and not self.coupled:
            eps += CLASSIFIER
            if ends_in_linear(built.model):
                eps.append(CERT_LAST)
        if self.wrong_shape is not None:
            eps.append(WRONG_SHAPE)
        return tuple(eps)


def ends_in_linear(model: nn.Module) -> bool:
    """``mode="last_layer"`` applies: an nn.Sequential whose last element is an nn.Linear."""
    return isinstance(model, nn.Sequential) and len(model) > 0 and isinstance(model[-1], nn.Linear)


# ---------------------------------------------------------------------------
# Deterministic initialisation
# ---------------------------------------------------------------------------


def rand(g: torch.Generator, *shape: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    return torch.empty(shape, dtype=F64).uniform_(low, high, generator=g)


def init_(module: nn.Module, g: torch.Generator) -> nn.Module:
    """Every parameter (raw parametrization originals included) and BatchNorm statistic
    drawn from `g`: uniform in +-1/sqrt(fan-in), BatchNorm scales in [0.5, 1.5]."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                n = sub.num_features
                sub.weight.copy_(rand(g, n, low=0.5, high=1.5))
                sub.bias.copy_(rand(g, n, low=-0.5, high=0.5))
                if sub.running_mean is not None:
                    sub.running_mean.copy_(rand(g, n, low=-0.5, high=0.5))
                    sub.running_var.copy_(rand(g, n, low=0.5, high=2.0))
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                continue
            for p in sub.parameters(recurse=False):
                fan_in = p[0].numel() if p.ndim > 1 else max(p.numel(), 1)
                b = 1.0 / math.sqrt(fan_in)
                p.copy_(rand(g, *p.shape, low=-b, high=b).to(p.dtype))
    return module


def linear(i: int, o: int, bias: bool = True) -> nn.Linear:
    return nn.Linear(i, o, bias=bias, dtype=F64)


def bjorck(i: int, o: int) -> lnn.BjorckLinear:
    return lnn.BjorckLinear(i, o, dtype=F64)


def _scale_output(factor: float):
    def hook(module, args, output):
        return output * factor

    return hook


def _scale_input(factor: float):
    def hook(module, args):
        return (args[0] * factor,)

    return hook


def _sq(v: float) -> Fraction:
    return Fraction(v) ** 2


# ---------------------------------------------------------------------------
# Subclasses of lipnets and torch layers with their own forward / __call__ / helpers
# ---------------------------------------------------------------------------


class BjorckTimes10(lnn.BjorckLinear):
    """Route 1: an own forward on a lipnets layer."""

    def forward(self, x):
        return super().forward(x) * 10


class BjorckCallTimes10(lnn.BjorckLinear):
    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **kwargs) * 10


class CayleyFunctional(lnn.CayleyLinear):
    def forward(self, x):
        return F.linear(x, 5 * self.weight, self.bias)


class GroupSortTimes4(lnn.GroupSort):
    def forward(self, x):
        return super().forward(x) * 4


class MaxMinCallTimes3(lnn.MaxMin):
    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **kwargs) * 3


class FullSortPlusInput(lnn.FullSort):
    def forward(self, x):
        return super().forward(x) + x


class BCOPConvForward(lnn.BCOPConv2d):
    """Overrides nn.Conv2d's helper, which BCOPConv2d.forward reaches through super()."""

    def _conv_forward(self, input, weight, bias):
        return super()._conv_forward(input, 3 * weight, bias)


class BCOPTimes3(lnn.BCOPConv2d):
    def forward(self, input):
        return super().forward(input) * 3


class CayleyConvTimes3(lnn.CayleyConv2d):
    def forward(self, x):
        return super().forward(x) * 3


class DownsampleTwice(lnn.InvertibleDownsample):
    def forward(self, x):
        y = super().forward(x)
        return torch.cat([y, y], dim=1)


class L2PoolTimes3(lnn.L2NormPool2d):
    def forward(self, x):
        return super().forward(x) * 3


class LinearTimes5(nn.Linear):
    def forward(self, x):
        return F.linear(x, 5 * self.weight, self.bias)


class LinearTimes10(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 10


class LinearCallTimes5(nn.Linear):
    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **kwargs) * 5


class LinearHelper(nn.Linear):
    """An own forward that goes through a helper method."""

    def forward(self, x):
        return self._affine(x)

    def _affine(self, x):
        return F.linear(x, self.weight * 6, self.bias)


class Conv2dForward(nn.Conv2d):
    def _conv_forward(self, input, weight, bias):
        return super()._conv_forward(input, 4 * weight, bias)


class ReLUTimes3(nn.ReLU):
    def forward(self, x):
        return torch.relu(x) * 3


class BatchNormTimes3(nn.BatchNorm1d):
    def forward(self, x):
        return super().forward(x) * 3


# ---------------------------------------------------------------------------
# Small model shells
# ---------------------------------------------------------------------------


class Head(nn.Module):
    """`body(x)` flattened to (N, C), optionally followed by a linear head."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x).flatten(1)


def mlp_with(middle: nn.Module, i: int = 4, h: int = 8, o: int = 3) -> nn.Sequential:
    return nn.Sequential(linear(i, h), middle, linear(h, o))


def classifier(g, model, shape, classes, exact_sq=None) -> Built:
    return Built(init_(model, g), shape, classes, exact_sq)


# ---------------------------------------------------------------------------
# Merges with broadcasting constant operands
# ---------------------------------------------------------------------------


class ConstMerge(nn.Module):
    """``op(x, c)`` with x of shape (N, 1, 4) and a constant c of shape (k, 4), flattened."""

    def __init__(self, op: Callable, const: torch.Tensor, other: torch.Tensor | None = None):
        super().__init__()
        self.op = op
        self.register_buffer("c", const)
        self.register_buffer("d", other if other is not None else const)

    def forward(self, x):
        return self.op(x, self.c, self.d).flatten(1)


def _merge_case(op, k: int, exact_sq=None, low=-1.0, high=1.0, other=None):
    def factory(g):
        c = rand(g, k, 4, low=low, high=high)
        d = None if other is None else other(g, c)
        model = ConstMerge(op, c, d)
        sq = exact_sq(c) if callable(exact_sq) else exact_sq
        return Built(model, (2, 1, 4), 4 * k, sq)

    return factory


def _col_sq(c: torch.Tensor, f=lambda v: Fraction(v) ** 2) -> Fraction:
    return max(sum((f(float(v)) for v in col), Fraction(0)) for col in c.T)


class Route2Clamp(nn.Module):
    def __init__(self, g):
        super().__init__()
        self.register_buffer("lo", rand(g, 10, 4, low=-1.0, high=0.0))

    def forward(self, x):
        return torch.clamp(x, min=self.lo).flatten(1)


class Route2Clip(nn.Module):
    def __init__(self, g):
        super().__init__()
        self.register_buffer("hi", rand(g, 10, 4, low=0.0, high=1.0))

    def forward(self, x):
        return torch.clip(x, max=self.hi).flatten(1)


class WhereMask(nn.Module):
    def __init__(self, g):
        super().__init__()
        mask = rand(g, 4, 4) > 0
        mask[:, 0] = True  # column 0 of x is copied 4 times
        self.register_buffer("mask", mask)
        self.register_buffer("c", rand(g, 4, 4))

    def forward(self, x):
        return torch.where(self.mask, x, self.c).flatten(1)


class WhereJump(nn.Module):
    """Input-dependent condition with different branches: discontinuous at 0."""

    def forward(self, x):
        return torch.where(x > 0, x, x - 1)


class StackScaled(nn.Module):
    def forward(self, x):
        return torch.stack([x, 2 * x], dim=1).flatten(1)


class CatConstant(nn.Module):
    def __init__(self, g):
        super().__init__()
        self.register_buffer("c", rand(g, 1, 3))

    def forward(self, x):
        return torch.cat([x, self.c.expand(x.shape[0], 3)], dim=1)


class ExpandInput(nn.Module):
    def forward(self, x):
        return x.expand(-1, 5, -1).flatten(1)


class OuterSum(nn.Module):
    """Two input-dependent operands broadcast against each other: x_i + x_j."""

    def forward(self, x):
        return (x.unsqueeze(2) + x.unsqueeze(1)).flatten(1)


class ScalarTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("s", torch.tensor(3.0, dtype=F64))

    def forward(self, x):
        return x * self.s


class InlineConstAdd(nn.Module):
    """A constant created inside forward, broadcasting the input."""

    def forward(self, x):
        return (x + torch.zeros(3, 4, dtype=x.dtype)).flatten(1)


class Cat3(nn.Module):
    def forward(self, x):
        return torch.cat([x, x, x], dim=1)


class Lambda(nn.Module):
    """``fn(x)`` with named constant buffers (``fn(x, self)`` reads them)."""

    def __init__(self, fn: Callable, **buffers: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        for name, value in buffers.items():
            self.register_buffer(name, value)

    def forward(self, x):
        return self.fn(x, self)


class StubbornBatchNorm(nn.BatchNorm1d):
    """Stays in training mode under eval(): batch statistics couple the samples."""

    def train(self, mode: bool = True):
        return super().train(True)


class CallImplTimes10(nn.Module):
    """The model overrides ``_call_impl``: torch.fx traces ``forward``, eager mode runs this."""

    def __init__(self):
        super().__init__()
        self.lin = linear(4, 3)

    def forward(self, x):
        return self.lin(x)

    def _call_impl(self, *args, **kwargs):
        return super()._call_impl(*args, **kwargs) * 10


class DefaultArgScale(nn.Module):
    """A second forward argument with a default: torch.fx makes it a placeholder."""

    def __init__(self):
        super().__init__()
        self.lin = linear(4, 3)

    def forward(self, x, scale=10.0):
        return self.lin(x) * scale


class BjorckGetattribute(lnn.BjorckLinear):
    def __getattribute__(self, name):
        value = super().__getattribute__(name)
        return value * 10 if name == "weight" else value


class LinearWeightProperty(nn.Linear):
    """``weight`` is a property computing 5x a raw parameter."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        raw = self._parameters.pop("weight")
        self.register_parameter("raw", raw)

    @property
    def weight(self):
        return 5 * self.raw


class PatchedLater(lnn.BjorckLinear):
    """Defines no method; its forward is patched onto the class after creation."""


def _patched_forward(self, x):
    return nn.Linear.forward(self, x) * 10


class DirectForwardCall(nn.Module):
    """Calls a hooked child's ``forward`` directly: eager mode skips the hook."""

    def __init__(self):
        super().__init__()
        self.lin = linear(4, 3)
        self.lin.register_forward_hook(_scale_output(10.0))

    def forward(self, x):
        return self.lin.forward(x)


# --- changes after a first pass through lipnets (a cached trace must not outlive them) ---

SETTINGS = {"scale": 1.0}  # read by GlobalScale.forward at call time


class GlobalScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = linear(4, 3)

    def forward(self, x):
        return self.lin(x) * SETTINGS["scale"]


class PrivateScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = linear(4, 3)
        self._scale = 1.0

    def forward(self, x):
        return self.lin(x) * self._scale


def _global_scale(g):
    SETTINGS["scale"] = 1.0
    return classifier(g, GlobalScale(), (2, 4), 3)


def _set_global_scale(model):
    SETTINGS["scale"] = 10.0


def _set_private_scale(model):
    model._scale = 10.0


def _fresh_subclass(g):
    """A subclass of BjorckLinear defining no method (trusted), made anew for each build."""
    cls = type("LaterPatched", (lnn.BjorckLinear,), {"__module__": __name__})
    model = nn.Sequential(cls(4, 8, dtype=F64), lnn.MaxMin(), linear(8, 3))
    return classifier(g, model, (2, 4), 3)


def _patch_class_forward(model):
    type(model[0]).forward = _patched_forward


def _add_hook(model):
    model[0].register_forward_hook(_scale_output(10.0))


def _replace_forward(model):
    original = model[0].forward
    model[0].forward = lambda x: original(x) * 10


def _set_nan(model):
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")


def _scale_weights(model):
    with torch.no_grad():
        model[0].weight.mul_(10.0)


def _scale_raw_bjorck(model):
    with torch.no_grad():
        model[0].parametrizations.weight.original.mul_(10.0)


def _swap_activation(model):
    model[1] = ReLUTimes3()


def _mlp_relu(g):
    return classifier(g, mlp_with(nn.ReLU()), (2, 4), 3)


def _mlp_bjorck(g):
    model = nn.Sequential(bjorck(4, 8), lnn.MaxMin(), linear(8, 3))
    return classifier(g, model, (2, 4), 3)


class ScaleParam(nn.Module):
    """A parametrization stacked on top of BjorckLinear's orthogonalisation."""

    def forward(self, w):
        return 10 * w


# ---------------------------------------------------------------------------
# Constant fills from input-dependent values
# ---------------------------------------------------------------------------


class FullLikeSum(nn.Module):
    """Route 3: torch.full_like with an input-dependent 0-dim tensor."""

    def forward(self, x):
        h = 2 * x
        return torch.full_like(x, h.sum())


class NewFullSum(nn.Module):
    def forward(self, x):
        return x.new_full(x.shape, x.sum())


class EmptyLikeFill(nn.Module):
    def forward(self, x):
        return torch.empty_like(x).fill_(x.sum())


class ZerosLikePlusSum(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x) + x.sum()


class OnesLikeTimesRowSum(nn.Module):
    def forward(self, x):
        return torch.ones_like(x) * x.sum(1, keepdim=True) + x


class ExpandRowSum(nn.Module):
    def forward(self, x):
        return x.sum(1, keepdim=True).expand(-1, 4) + x


# ---------------------------------------------------------------------------
# In-place updates
# ---------------------------------------------------------------------------


def triple_(t):
    t.mul_(3.0)


def _passthrough(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class InPlaceBase(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = linear(4, 3)


class HelperAugmented(InPlaceBase):
    """Route 5: an in-place update (``t *= 3.0``) in a helper method called from forward.

    torch.fx records ``t *= 3.0`` on a proxy as an out-of-place ``mul`` that rebinds
    the helper's local name only, so the traced graph returns the un-scaled tensor."""

    def forward(self, x):
        h = self.lin(x)
        self._scale(h)
        return h

    def _scale(self, t):
        t *= 3.0


class HelperIaddSelf(InPlaceBase):
    def forward(self, x):
        h = self.lin(x)
        self._double(h)
        return h

    def _double(self, t):
        t += t


def triple_augmented(t):
    t *= 3.0


class ModuleHelperAugmented(InPlaceBase):
    def forward(self, x):
        h = self.lin(x)
        triple_augmented(h)
        return h


class DecoratedForwardAugmented(InPlaceBase):
    @_passthrough
    def forward(self, x):
        h = self.lin(x)
        h *= 3.0
        return h


class StaticHelperMul(InPlaceBase):
    def forward(self, x):
        h = self.lin(x)
        self._scale(h)
        return h

    @staticmethod
    def _scale(t):
        t.mul_(3.0)


class IntermediateUsedLater(InPlaceBase):
    def forward(self, x):
        h = self.lin(x)
        g = h + 0
        self._scale(g)
        return g * 1

    def _scale(self, t):
        t.mul_(3.0)


class CloneBeforeLinear(InPlaceBase):
    def forward(self, x):
        g = x.clone()
        self._scale(g)
        return self.lin(g)

    def _scale(self, t):
        t.mul_(3.0)


class HelperMul(InPlaceBase):
    """``t.mul_(3.0)`` in a helper method called from forward."""

    def forward(self, x):
        h = self.lin(x)
        self._scale(h)
        return h

    def _scale(self, t):
        t.mul_(3.0)


class ModuleHelperMul(InPlaceBase):
    def forward(self, x):
        h = self.lin(x)
        triple_(h)
        return h


class DecoratedForwardMul(InPlaceBase):
    @_passthrough
    def forward(self, x):
        h = self.lin(x)
        h.mul_(3.0)
        return h


class DecoratedHelperMul(InPlaceBase):
    def forward(self, x):
        h = self.lin(x)
        self._scale(h)
        return h

    @_passthrough
    def _scale(self, t):
        t.mul_(3.0)


class OperatorIadd(InPlaceBase):
    def forward(self, x):
        h = self.lin(x)
        operator.iadd(h, h)
        return h


class AliasIadd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = linear(4, 3)
        self.b = linear(4, 3)

    def forward(self, x):
        y = self.a(x)
        z = y
        z += self.b(x)
        return y + z


class DataMul(InPlaceBase):
    def forward(self, x):
        h = self.lin(x)
        h.data.mul_(3.0)
        return h


class OutKwarg(InPlaceBase):
    def forward(self, x):
        h = self.lin(x)
        torch.mul(h, 3.0, out=h)
        return h


class ViewInPlace(InPlaceBase):
    def forward(self, x):
        h = self.lin(x)
        h[:, :2].mul_(5.0)
        return h


class SetItem(InPlaceBase):
    def forward(self, x):
        h = self.lin(x)
        h[:, 0] = h[:, 0] * 10
        return h


class CopyInPlace(InPlaceBase):
    def forward(self, x):
        h = self.lin(x)
        h.copy_(h * 4)
        return h


class InputMul(InPlaceBase):
    def forward(self, x):
        x.mul_(3.0)
        return self.lin(x)


# ---------------------------------------------------------------------------
# Methods replaced on the instance
# ---------------------------------------------------------------------------


def _replace_submodule_forward(g):
    model = mlp_with(lnn.MaxMin())
    model[0] = bjorck(4, 8)
    init_(model, g)
    first = model[0]
    original = first.forward
    first.forward = lambda x: original(x) * 10
    return Built(model, (2, 4), 3)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = linear(4, 3)

    def forward(self, x):
        return self.lin(x)


def _replace_model_forward(g):
    model = init_(Plain(), g)

    def forward(self, x):
        return self.lin(x) * 7

    model.forward = types.MethodType(forward, model)
    return Built(model, (2, 4), 3)


def _replace_conv_forward(g):
    conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular", dtype=F64)
    init_(conv, g)
    conv._conv_forward = lambda i, w, b: nn.Conv2d._conv_forward(conv, i, 4 * w, b)
    return Built(Head(conv), (2, 2, 4, 4), 32)


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def _hooked(g, module, hook, *, pre=False, kwargs=False, shape=(2, 4), classes=3, where=0):
    model = mlp_with(lnn.MaxMin())
    model[where] = module
    init_(model, g)
    target = model[where]
    if pre:
        target.register_forward_pre_hook(hook, with_kwargs=kwargs)
    else:
        target.register_forward_hook(hook)
    return Built(model, shape, classes)


def _pre_hook_kwargs(module, args, kwargs):
    return (args[0] * 5,), kwargs


def _nan_linear(g):
    model = init_(mlp_with(nn.ReLU()), g)
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    return Built(model, (2, 4), 3)


def _nan_bjorck(g):
    model = mlp_with(lnn.MaxMin())
    model[0] = bjorck(4, 8)
    init_(model, g)
    with torch.no_grad():
        model[0].parametrizations.weight.original[0, 0] = float("nan")
    return Built(model, (2, 4), 3)


def _nan_bn_buffer(g):
    model = nn.Sequential(linear(4, 8), nn.BatchNorm1d(8, dtype=F64), nn.ReLU(), linear(8, 3))
    init_(model, g)
    model[1].running_var[3] = float("nan")
    return Built(model, (2, 4), 3)


def _residual(g):
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(linear(4, 8), nn.ReLU(), linear(8, 4))
            self.head = linear(4, 3)

        def forward(self, x):
            return self.head(x + self.f(x))

    return classifier(g, Residual(), (2, 4), 3)


def _conv_control(g):
    model = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular", dtype=F64),
        nn.ReLU(),
        nn.Flatten(),
        linear(32, 3),
    )
    return classifier(g, model, (2, 2, 4, 4), 3)


def _bcop_control(g):
    model = nn.Sequential(
        lnn.BCOPConv2d(2, 2, 3, dtype=F64), lnn.MaxMin(), nn.Flatten(), bjorck(32, 3)
    )
    return classifier(g, model, (2, 2, 4, 4), 3)


def _conv_head(conv: nn.Module, out: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.Flatten(), linear(out, 3))


ALL_BOUND = frozenset(GENERAL + CLASSIFIER + (CERT_LAST,)) - {SEQLIP}

CASES: list[Case] = [
    # --- the known-broken routes of issue 15 ---
    Case(
        "route1_bjorck_subclass_forward_x10",
        lambda g: classifier(
            g, nn.Sequential(BjorckTimes10(4, 8, dtype=F64), lnn.MaxMin(), linear(8, 3)), (2, 4), 3
        ),
        route=1,
    ),
    Case(
        "route1_bjorck_forward_hook",
        lambda g: _hooked(g, bjorck(4, 8), _scale_output(10.0)),
        route=1,
    ),
    Case(
        "route2_clamp_tensor_min_broadcast",
        lambda g: Built(Route2Clamp(g), (2, 1, 4), 40, Fraction(10)),
        route=2,
    ),
    Case(
        "route2_clip_tensor_max_broadcast",
        lambda g: Built(Route2Clip(g), (2, 1, 4), 40, Fraction(10)),
        route=2,
    ),
    Case(
        "route3_full_like_input_dependent",
        lambda g: Built(FullLikeSum(), (1, 4), None, Fraction(64)),
        route=3,
    ),
    Case(
        "route4_last_linear_forward_hook",
        lambda g: _hooked(g, linear(8, 3), _scale_output(10.0), where=2),
        route=4,
    ),
    Case(
        "route4_last_linear_subclass_forward",
        lambda g: classifier(
            g, nn.Sequential(bjorck(4, 8), lnn.MaxMin(), LinearTimes10(8, 3, dtype=F64)), (2, 4), 3
        ),
        route=4,
    ),
    Case("route5_mul_in_helper_method", lambda g: classifier(g, HelperMul(), (2, 4), 3), route=5),
    Case(
        "route5_augmented_in_helper_method",
        lambda g: classifier(g, HelperAugmented(), (2, 4), 3),
        route=5,
    ),
    Case("route6_cat_three_copies", lambda g: Built(Cat3(), (2, 4), 12, Fraction(3)), route=6),
    # --- subclasses of lipnets layers ---
    Case(
        "bjorck_subclass_call_override",
        lambda g: classifier(
            g,
            nn.Sequential(BjorckCallTimes10(4, 8, dtype=F64), lnn.MaxMin(), linear(8, 3)),
            (2, 4),
            3,
        ),
    ),
    Case(
        "cayley_linear_subclass_functional_forward",
        lambda g: classifier(
            g,
            nn.Sequential(CayleyFunctional(4, 8, dtype=F64), lnn.MaxMin(), linear(8, 3)),
            (2, 4),
            3,
        ),
    ),
    Case(
        "groupsort_subclass_forward_x4",
        lambda g: classifier(g, mlp_with(GroupSortTimes4(2)), (2, 4), 3),
    ),
    Case(
        "maxmin_subclass_call_override_x3",
        lambda g: classifier(g, mlp_with(MaxMinCallTimes3()), (2, 4), 3),
    ),
    Case(
        "fullsort_subclass_forward_plus_input",
        lambda g: classifier(g, mlp_with(FullSortPlusInput()), (2, 4), 3),
    ),
    Case(
        "bcop_subclass_conv_forward_override",
        lambda g: classifier(
            g, _conv_head(BCOPConvForward(2, 2, 3, dtype=F64), 32), (2, 2, 4, 4), 3
        ),
    ),
    Case(
        "bcop_subclass_forward_x3",
        lambda g: classifier(g, _conv_head(BCOPTimes3(2, 2, 3, dtype=F64), 32), (2, 2, 4, 4), 3),
    ),
    Case(
        "cayley_conv_subclass_forward_x3",
        lambda g: classifier(
            g, _conv_head(CayleyConvTimes3(2, 2, 3, dtype=F64), 32), (2, 2, 4, 4), 3
        ),
    ),
    Case(
        "invertible_downsample_subclass_cat",
        lambda g: Built(Head(DownsampleTwice(2)), (2, 1, 4, 4), 32, Fraction(2)),
    ),
    Case(
        "l2normpool_subclass_forward_x3",
        lambda g: classifier(g, _conv_head(L2PoolTimes3(2), 4), (2, 1, 4, 4), 3),
    ),
    # --- subclasses of torch layers ---
    Case(
        "linear_subclass_forward_midnet",
        lambda g: classifier(
            g, nn.Sequential(LinearTimes5(4, 8, dtype=F64), nn.ReLU(), linear(8, 3)), (2, 4), 3
        ),
    ),
    Case(
        "linear_subclass_call_override",
        lambda g: classifier(
            g, nn.Sequential(LinearCallTimes5(4, 8, dtype=F64), nn.ReLU(), linear(8, 3)), (2, 4), 3
        ),
    ),
    Case(
        "linear_subclass_helper_method",
        lambda g: classifier(
            g, nn.Sequential(LinearHelper(4, 8, dtype=F64), nn.ReLU(), linear(8, 3)), (2, 4), 3
        ),
    ),
    Case(
        "conv2d_subclass_conv_forward_override",
        lambda g: classifier(
            g,
            _conv_head(Conv2dForward(2, 2, 3, padding=1, padding_mode="circular", dtype=F64), 32),
            (2, 2, 4, 4),
            3,
        ),
    ),
    Case("relu_subclass_forward_x3", lambda g: classifier(g, mlp_with(ReLUTimes3()), (2, 4), 3)),
    Case(
        "batchnorm1d_subclass_forward_x3",
        lambda g: classifier(g, mlp_with(BatchNormTimes3(8, dtype=F64)), (2, 4), 3),
    ),
    # --- hooks ---
    Case(
        "bjorck_forward_pre_hook_x5",
        lambda g: _hooked(g, bjorck(4, 8), _scale_input(5.0), pre=True),
    ),
    Case(
        "groupsort_forward_hook_x4",
        lambda g: _hooked(g, lnn.GroupSort(2), _scale_output(4.0), where=1),
    ),
    Case(
        "maxmin_forward_pre_hook_with_kwargs_x5",
        lambda g: _hooked(g, lnn.MaxMin(), _pre_hook_kwargs, pre=True, kwargs=True, where=1),
    ),
    Case(
        "linear_forward_pre_hook_x5",
        lambda g: _hooked(g, linear(4, 8), _scale_input(5.0), pre=True),
    ),
    Case("relu_forward_hook_x3", lambda g: _hooked(g, nn.ReLU(), _scale_output(3.0), where=1)),
    Case("cayley_conv_forward_hook_x3", lambda g: _conv_hooked(g)),
    Case("model_level_forward_hook_x7", lambda g: _model_hooked(g)),
    Case(
        "batchnorm1d_forward_hook_x3",
        lambda g: _hooked(g, nn.BatchNorm1d(8, dtype=F64), _scale_output(3.0), where=1),
    ),
    # --- methods replaced on the instance ---
    Case("instance_forward_replaced_on_submodule", _replace_submodule_forward),
    Case("instance_forward_replaced_on_model", _replace_model_forward),
    Case("instance_conv_forward_replaced", _replace_conv_forward),
    # --- merges with broadcasting constant operands ---
    Case("add_const_broadcast", _merge_case(lambda x, c, d: x + c, 3, Fraction(3))),
    Case("sub_const_broadcast", _merge_case(lambda x, c, d: c - x, 6, Fraction(6))),
    Case(
        "mul_const_tensor_broadcast",
        _merge_case(lambda x, c, d: x * c, 3, _col_sq, low=0.5, high=2.0),
    ),
    Case(
        "div_const_tensor_broadcast",
        _merge_case(
            lambda x, c, d: x / c,
            3,
            lambda c: _col_sq(c, lambda v: 1 / Fraction(v) ** 2),
            low=0.5,
            high=1.0,
        ),
    ),
    Case(
        "maximum_const_broadcast", _merge_case(lambda x, c, d: torch.maximum(x, c), 5, Fraction(5))
    ),
    Case(
        "minimum_const_broadcast", _merge_case(lambda x, c, d: torch.minimum(c, x), 5, Fraction(5))
    ),
    Case(
        "clamp_tensor_both_broadcast",
        _merge_case(
            lambda x, c, d: torch.clamp(x, min=c - 2.0, max=c + 2.0),
            6,
            Fraction(6),
            low=-0.1,
            high=0.1,
        ),
    ),
    Case("where_const_mask_broadcast", lambda g: Built(WhereMask(g), (2, 1, 4), 16, Fraction(4))),
    Case("where_input_condition_jump", lambda g: Built(WhereJump(), (2, 4), 4)),
    Case("stack_scaled_copies", lambda g: Built(StackScaled(), (2, 4), 8, Fraction(5))),
    Case("cat_constant_broadcast", lambda g: Built(CatConstant(g), (2, 4), 7, Fraction(1))),
    Case("expand_input_broadcast", lambda g: Built(ExpandInput(), (2, 1, 4), 20, Fraction(5))),
    Case("outer_sum_two_input_operands", lambda g: Built(OuterSum(), (2, 4), 16)),
    Case("mul_0dim_const_tensor", lambda g: Built(ScalarTensor(), (2, 4), 4, Fraction(9))),
    Case(
        "inline_const_add_broadcast", lambda g: Built(InlineConstAdd(), (2, 1, 4), 12, Fraction(3))
    ),
    Case(
        "add_alpha_scales_input_broadcast",
        lambda g: Built(
            Lambda(lambda x, m: torch.add(m.c, x, alpha=3.0).flatten(1), c=rand(g, 4, 4)),
            (2, 1, 4),
            16,
            Fraction(36),
        ),
    ),
    Case(
        "sub_alpha_scales_input_broadcast",
        lambda g: Built(
            Lambda(lambda x, m: torch.sub(m.c, x, alpha=2.0).flatten(1), c=rand(g, 3, 4)),
            (2, 1, 4),
            12,
            Fraction(12),
        ),
    ),
    Case(
        "mul_const_column_broadcast_both_ways",
        lambda g: Built(
            Lambda(
                lambda x, m: (x * m.c).flatten(1), c=torch.tensor([[2.0], [1.0], [2.0]], dtype=F64)
            ),
            (2, 1, 4),
            12,
            Fraction(9),
        ),
    ),
    Case(
        "mul_method_const_broadcast",
        _merge_case(lambda x, c, d: x.mul(c), 3, _col_sq, low=0.5, high=2.0),
    ),
    Case(
        "multiply_function_const_broadcast",
        _merge_case(lambda x, c, d: torch.multiply(c, x), 3, _col_sq, low=-2.0, high=-0.5),
    ),
    Case(
        "true_divide_const_broadcast",
        _merge_case(
            lambda x, c, d: torch.true_divide(x, c),
            3,
            lambda c: _col_sq(c, lambda v: 1 / Fraction(v) ** 2),
            low=0.5,
            high=1.0,
        ),
    ),
    Case(
        "concat_with_broadcast_sum",
        _merge_case(
            lambda x, c, d: torch.concat([x + c, x.expand(-1, 2, -1)], dim=1), 3, Fraction(5)
        ),
    ),
    Case("fmax_const_broadcast", _merge_case(lambda x, c, d: torch.fmax(x, c), 5, Fraction(5))),
    Case("fmin_const_broadcast", _merge_case(lambda x, c, d: torch.fmin(c, x), 5, Fraction(5))),
    Case(
        "clamp_min_tensor_broadcast",
        _merge_case(lambda x, c, d: torch.clamp_min(x, c - 5.0), 7, Fraction(7)),
    ),
    Case(
        "clamp_max_method_tensor_broadcast",
        _merge_case(lambda x, c, d: x.clamp_max(c + 5.0), 7, Fraction(7)),
    ),
    Case(
        "hstack_copies",
        lambda g: Built(Lambda(lambda x, m: torch.hstack([x, x])), (2, 4), 8, Fraction(2)),
    ),
    Case(
        "concatenate_with_broadcast_copy",
        lambda g: Built(
            Lambda(lambda x, m: torch.concatenate([x, x.expand(-1, 3, -1)], dim=1).flatten(1)),
            (2, 1, 4),
            16,
            Fraction(4),
        ),
    ),
    Case(
        "vstack_mixes_batch",
        lambda g: Built(Lambda(lambda x, m: torch.vstack([x, 2 * x])), (2, 4), None, Fraction(5)),
        coupled=True,
    ),
    Case(
        "repeat_input",
        lambda g: Built(Lambda(lambda x, m: x.repeat(1, 3)), (2, 4), 12, Fraction(3)),
    ),
    Case(
        "broadcast_to_input",
        lambda g: Built(
            Lambda(lambda x, m: torch.broadcast_to(x, (x.shape[0], 6, 4)).flatten(1)),
            (2, 1, 4),
            24,
            Fraction(6),
        ),
    ),
    Case(
        "getitem_repeated_index",
        lambda g: Built(Lambda(lambda x, m: x[:, [0, 0, 0, 1]]), (2, 4), 4, Fraction(3)),
    ),
    Case(
        "sum_over_features_expand",
        lambda g: Built(
            Lambda(lambda x, m: torch.cat([x, x.sum(1, keepdim=True)], dim=1)),
            (2, 4),
            5,
            Fraction(5),
        ),
    ),
    Case("mul_input_by_input", lambda g: Built(Lambda(lambda x, m: x * x.flip(1)), (2, 4), 4)),
    Case(
        "div_by_input_dependent",
        lambda g: Built(Lambda(lambda x, m: x / (1.0 + x.abs().sum(1, keepdim=True))), (2, 4), 4),
    ),
    Case(
        "linear_input_dependent_weight",
        lambda g: Built(Lambda(lambda x, m: F.linear(x, x[:1].expand(4, 4))), (2, 4), 4),
        coupled=True,
    ),
    # --- state that eval() does not reach, stacked parametrizations ---
    Case(
        "batchnorm_stays_in_train_mode",
        lambda g: Built(init_(StubbornBatchNorm(4, dtype=F64), g), (2, 4)),
        coupled=True,
    ),
    Case("bjorck_extra_parametrization_x10", lambda g: _stacked_parametrization(g)),
    # --- pooling, padding and activation rules of torch layers ---
    Case(
        "maxpool1d_overlapping",
        lambda g: Built(Head(nn.MaxPool1d(2, stride=1)), (2, 1, 5), 4, Fraction(2)),
    ),
    Case(
        "maxpool2d_dilated_overlapping",
        lambda g: Built(Head(nn.MaxPool2d(2, stride=1, dilation=2, padding=1)), (2, 1, 5, 5), 25),
    ),
    Case(
        "avgpool1d_no_pad_count",
        lambda g: Built(
            Head(nn.AvgPool1d(3, stride=1, padding=1, count_include_pad=False)), (2, 1, 6), 6
        ),
    ),
    Case(
        "avgpool2d_ceil_divisor_override",
        lambda g: Built(
            Head(nn.AvgPool2d(2, stride=1, ceil_mode=True, divisor_override=1)), (2, 1, 3, 3), 4
        ),
    ),
    Case(
        "adaptive_avgpool2d_upsampling",
        lambda g: Built(Head(nn.AdaptiveAvgPool2d((3, 7))), (2, 1, 4, 4), 21),
    ),
    Case(
        "adaptive_maxpool1d_upsampling",
        lambda g: Built(Head(nn.AdaptiveMaxPool1d(7)), (2, 1, 4), 7),
    ),
    Case(
        "lppool1d_overlapping_ceil",
        lambda g: Built(Head(nn.LPPool1d(2, 3, stride=2, ceil_mode=True)), (2, 1, 6), 3),
    ),
    Case(
        "replication_pad1d",
        lambda g: Built(Head(nn.ReplicationPad1d((0, 3))), (2, 1, 4), 7, Fraction(4)),
    ),
    Case(
        "reflection_pad1d", lambda g: Built(Head(nn.ReflectionPad1d(2)), (2, 1, 4), 8, Fraction(3))
    ),
    Case(
        "circular_pad_functional",
        lambda g: Built(
            Lambda(lambda x, m: F.pad(x, (1, 1), mode="circular").flatten(1)),
            (2, 1, 4),
            6,
            Fraction(2),
        ),
    ),
    Case(
        "conv1d_reflect_padding",
        lambda g: classifier(
            g,
            _conv_head(nn.Conv1d(1, 2, 3, padding=1, padding_mode="reflect", dtype=F64), 8),
            (2, 1, 4),
            3,
        ),
    ),
    Case(
        "conv2d_stride2_dilation2",
        lambda g: classifier(
            g,
            _conv_head(nn.Conv2d(2, 2, 3, stride=2, dilation=2, padding=2, dtype=F64), 8),
            (2, 2, 4, 4),
            3,
        ),
    ),
    Case(
        "conv_transpose2d",
        lambda g: classifier(
            g, _conv_head(nn.ConvTranspose2d(2, 1, 3, stride=2, dtype=F64), 81), (2, 2, 4, 4), 3
        ),
    ),
    Case(
        "upsample_nearest",
        lambda g: Built(Head(nn.Upsample(scale_factor=2)), (2, 1, 2, 2), 16, Fraction(4)),
    ),
    Case("leaky_relu_slope_5", lambda g: classifier(g, mlp_with(nn.LeakyReLU(5.0)), (2, 4), 3)),
    Case(
        "leaky_relu_functional_negative_slope",
        lambda g: Built(Lambda(lambda x, m: F.leaky_relu(x, -4.0)), (2, 4), 4, Fraction(16)),
    ),
    Case("elu_alpha_3", lambda g: classifier(g, mlp_with(nn.ELU(alpha=3.0)), (2, 4), 3)),
    Case("celu_alpha_half", lambda g: classifier(g, mlp_with(nn.CELU(alpha=0.5)), (2, 4), 3)),
    Case("gelu", lambda g: Built(nn.GELU(), (2, 4), 4)),
    Case("silu", lambda g: Built(nn.SiLU(), (2, 4), 4)),
    Case("hardswish", lambda g: Built(nn.Hardswish(), (2, 4), 4)),
    Case(
        "softplus_threshold_jump", lambda g: Built(nn.Softplus(beta=1.0, threshold=0.5), (2, 4), 4)
    ),
    Case("hardshrink_jump", lambda g: Built(nn.Hardshrink(0.5), (2, 4), 4)),
    Case("threshold_jump", lambda g: Built(nn.Threshold(0.1, 20.0), (2, 4), 4)),
    Case("layernorm", lambda g: classifier(g, mlp_with(nn.LayerNorm(8, dtype=F64)), (2, 4), 3)),
    Case("softmax", lambda g: Built(nn.Softmax(dim=1), (2, 4), 4)),
    Case(
        "batchnorm_without_running_stats",
        lambda g: Built(init_(nn.BatchNorm1d(4, track_running_stats=False, dtype=F64), g), (2, 4)),
        coupled=True,
    ),
    # --- the batch dimension moved, mixed or reduced ---
    Case(
        "transpose_batch_dim",
        lambda g: Built(Lambda(lambda x, m: x.T), (2, 4), None, Fraction(1)),
        coupled=True,
    ),
    Case(
        "roll_over_batch",
        lambda g: Built(Lambda(lambda x, m: torch.roll(x, 1, dims=0)), (2, 4), None, Fraction(1)),
        coupled=True,
    ),
    Case(
        "index_repeats_sample",
        lambda g: Built(Lambda(lambda x, m: x[[0, 0, 1]]), (2, 4), None, Fraction(2)),
        coupled=True,
    ),
    Case(
        "batch_mean_broadcast",
        lambda g: Built(
            Lambda(lambda x, m: x - x.mean(0, keepdim=True)), (2, 4), None, Fraction(1)
        ),
        coupled=True,
    ),
    # --- values detached from autograd, Python-level tricks ---
    Case(
        "detach_then_scale",
        lambda g: Built(Lambda(lambda x, m: x.detach() * 10), (2, 4), 4, Fraction(100)),
    ),
    Case(
        "data_then_scale",
        lambda g: Built(Lambda(lambda x, m: x.data * 10), (2, 4), 4, Fraction(100)),
    ),
    Case(
        "item_scale_input_dependent",
        lambda g: Built(Lambda(lambda x, m: x * x.norm().item()), (1, 4), None),
    ),
    Case("sign_and_round", lambda g: Built(Lambda(lambda x, m: torch.round(3 * x) + x), (2, 4), 4)),
    Case(
        "unfold_overlapping_windows",
        lambda g: Built(Lambda(lambda x, m: x.unfold(1, 2, 1).flatten(1)), (2, 4), 6, Fraction(2)),
    ),
    Case("matmul_const", lambda g: Built(Lambda(lambda x, m: x @ m.w, w=rand(g, 4, 3)), (2, 4), 3)),
    Case(
        "functional_linear_const_weight",
        lambda g: Built(
            Lambda(lambda x, m: F.linear(x, m.w, m.b), w=rand(g, 3, 4), b=rand(g, 3)), (2, 4), 3
        ),
    ),
    Case("model_call_impl_override", lambda g: classifier(g, CallImplTimes10(), (2, 4), 3)),
    Case("forward_default_arg_scale", lambda g: classifier(g, DefaultArgScale(), (2, 4), 3)),
    Case(
        "bjorck_subclass_getattribute_weight_x10",
        lambda g: classifier(
            g,
            nn.Sequential(BjorckGetattribute(4, 8, dtype=F64), lnn.MaxMin(), linear(8, 3)),
            (2, 4),
            3,
        ),
    ),
    Case(
        "linear_subclass_weight_property_x5",
        lambda g: classifier(
            g,
            nn.Sequential(LinearWeightProperty(4, 8, dtype=F64), nn.ReLU(), linear(8, 3)),
            (2, 4),
            3,
        ),
    ),
    Case("bjorck_subclass_patched_after_creation", lambda g: _patched_later(g)),
    Case("hook_on_parametrization_module", lambda g: _hook_parametrization(g)),
    Case("direct_forward_call_skips_hook", lambda g: classifier(g, DirectForwardCall(), (2, 4), 3)),
    # --- changes after a first pass through lipnets ---
    Case("after_trace_class_forward_patched", _fresh_subclass, mutate=_patch_class_forward),
    Case(
        "after_trace_private_attribute_scale",
        lambda g: classifier(g, PrivateScale(), (2, 4), 3),
        mutate=_set_private_scale,
    ),
    Case("after_trace_global_scale", _global_scale, mutate=_set_global_scale),
    Case("after_trace_hook_added", _mlp_relu, mutate=_add_hook),
    Case("after_trace_forward_replaced", _mlp_relu, mutate=_replace_forward),
    Case("after_trace_weight_set_nan", _mlp_relu, mutate=_set_nan, must_refuse="NaN"),
    Case("after_trace_activation_swapped", _mlp_relu, mutate=_swap_activation),
    Case(
        "after_trace_weights_scaled_x10",
        _mlp_relu,
        mutate=_scale_weights,
        must_bound=frozenset({LIPSCHITZ, LIPSCHITZ_SHAPE, IBP, CROWN, LOCAL, CERT_VECTOR}),
    ),
    Case("after_trace_bjorck_raw_scaled", _mlp_bjorck, mutate=_scale_raw_bjorck),
    # --- constant fills from input-dependent values ---
    Case("new_full_input_dependent", lambda g: Built(NewFullSum(), (1, 4), None, Fraction(16))),
    Case(
        "empty_like_fill_input_dependent",
        lambda g: Built(EmptyLikeFill(), (1, 4), None, Fraction(16)),
    ),
    Case(
        "zeros_like_plus_input_scalar",
        lambda g: Built(ZerosLikePlusSum(), (1, 4), None, Fraction(16)),
    ),
    Case(
        "zeros_like_fill_inplace",
        lambda g: Built(
            Lambda(lambda x, m: torch.zeros_like(x).fill_(x.sum())), (1, 4), None, Fraction(16)
        ),
    ),
    Case(
        "full_like_times_input_scalar",
        lambda g: Built(
            Lambda(lambda x, m: torch.full_like(x, 2.0) * x.sum()), (1, 4), None, Fraction(64)
        ),
    ),
    Case(
        "expand_0dim_input_scalar",
        lambda g: Built(Lambda(lambda x, m: x.sum().expand(1, 4)), (1, 4), None, Fraction(16)),
    ),
    Case(
        "repeat_0dim_input_scalar",
        lambda g: Built(Lambda(lambda x, m: x.sum().repeat(1, 4)), (1, 4), None, Fraction(16)),
    ),
    Case(
        "ones_like_times_row_sum", lambda g: Built(OnesLikeTimesRowSum(), (2, 4), 4, Fraction(25))
    ),
    Case("expand_row_sum", lambda g: Built(ExpandRowSum(), (2, 4), 4, Fraction(25))),
    # --- in-place updates ---
    Case("inplace_helper_iadd_self", lambda g: classifier(g, HelperIaddSelf(), (2, 4), 3)),
    Case(
        "inplace_module_function_augmented",
        lambda g: classifier(g, ModuleHelperAugmented(), (2, 4), 3),
    ),
    Case(
        "inplace_decorated_forward_augmented",
        lambda g: classifier(g, DecoratedForwardAugmented(), (2, 4), 3),
    ),
    Case("inplace_static_helper", lambda g: classifier(g, StaticHelperMul(), (2, 4), 3)),
    Case(
        "inplace_intermediate_used_later",
        lambda g: classifier(g, IntermediateUsedLater(), (2, 4), 3),
    ),
    Case("inplace_clone_before_linear", lambda g: classifier(g, CloneBeforeLinear(), (2, 4), 3)),
    Case("inplace_alias_iadd", lambda g: classifier(g, AliasIadd(), (2, 4), 3)),
    Case("inplace_module_helper_function", lambda g: classifier(g, ModuleHelperMul(), (2, 4), 3)),
    Case("inplace_decorated_forward", lambda g: classifier(g, DecoratedForwardMul(), (2, 4), 3)),
    Case("inplace_decorated_helper", lambda g: classifier(g, DecoratedHelperMul(), (2, 4), 3)),
    Case("inplace_operator_iadd", lambda g: classifier(g, OperatorIadd(), (2, 4), 3)),
    Case("inplace_data_mul", lambda g: classifier(g, DataMul(), (2, 4), 3)),
    Case("inplace_out_kwarg", lambda g: classifier(g, OutKwarg(), (2, 4), 3)),
    Case("inplace_view_mul", lambda g: classifier(g, ViewInPlace(), (2, 4), 3)),
    Case("inplace_setitem", lambda g: classifier(g, SetItem(), (2, 4), 3)),
    Case("inplace_copy", lambda g: classifier(g, CopyInPlace(), (2, 4), 3)),
    Case("inplace_on_input", lambda g: classifier(g, InputMul(), (2, 4), 3)),
    # --- NaN parameters and buffers ---
    Case("nan_linear_weight", _nan_linear, must_refuse="NaN"),
    Case("nan_bjorck_raw_weight", _nan_bjorck, must_refuse="NaN"),
    Case("nan_batchnorm_running_var", _nan_bn_buffer, must_refuse="NaN"),
    # --- wrong input_shape for single-layer models (honest otherwise) ---
    Case(
        "wrong_shape_single_linear",
        lambda g: classifier(g, linear(4, 3), (2, 4), 3),
        wrong_shape=(1, 5),
        must_bound=ALL_BOUND - {CERT_LAST},
    ),
    Case(
        "wrong_shape_single_bjorck",
        lambda g: classifier(g, bjorck(4, 3), (2, 4), 3),
        wrong_shape=(1, 5),
        must_bound=ALL_BOUND - {CERT_LAST},
    ),
    Case(
        "wrong_shape_single_maxmin",
        lambda g: Built(lnn.MaxMin(), (2, 4), 4, Fraction(1)),
        wrong_shape=(1, 5),
        must_bound=frozenset({LIPSCHITZ, LIPSCHITZ_SHAPE}),
    ),
    Case(
        "wrong_shape_single_bcop",
        lambda g: classifier(g, lnn.BCOPConv2d(2, 2, 3, dtype=F64), (2, 2, 4, 4), None),
        wrong_shape=(1, 3, 4, 4),
        must_bound=frozenset({LIPSCHITZ_SHAPE}),
    ),
    Case(
        "wrong_shape_single_conv",
        lambda g: Built(
            init_(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", dtype=F64), g),
            (1, 2, 4, 4),
        ),
        wrong_shape=(1, 3, 4, 4),
        must_bound=frozenset({LIPSCHITZ, LIPSCHITZ_SHAPE}),
    ),
    # --- honest positive controls: must be bounded ---
    Case(
        "control_relu_mlp",
        lambda g: classifier(g, mlp_with(nn.ReLU()), (2, 4), 3),
        must_bound=ALL_BOUND | {SEQLIP},
    ),
    Case(
        "control_bjorck_groupsort_mlp",
        lambda g: classifier(
            g,
            nn.Sequential(
                bjorck(4, 8), lnn.GroupSort(2), bjorck(8, 8), lnn.GroupSort(2), linear(8, 3)
            ),
            (2, 4),
            3,
        ),
        must_bound=ALL_BOUND,
    ),
    Case("control_residual_block", _residual, must_bound=ALL_BOUND - {LIPSCHITZ, CERT_LAST}),
    Case("control_conv_relu_linear", _conv_control, must_bound=ALL_BOUND),
    Case("control_bcop_maxmin_bjorck", _bcop_control, must_bound=ALL_BOUND),
    Case(
        "control_batchnorm_mlp",
        lambda g: classifier(
            g,
            nn.Sequential(linear(4, 8), nn.BatchNorm1d(8, dtype=F64), nn.ReLU(), linear(8, 3)),
            (2, 4),
            3,
        ),
        must_bound=ALL_BOUND | {SEQLIP},
    ),
]


def _stacked_parametrization(g):
    from torch.nn.utils import parametrize

    model = nn.Sequential(bjorck(4, 8), lnn.MaxMin(), linear(8, 3))
    init_(model, g)
    parametrize.register_parametrization(model[0], "weight", ScaleParam())
    return Built(model, (2, 4), 3)


def _patched_later(g):
    model = nn.Sequential(PatchedLater(4, 8, dtype=F64), lnn.MaxMin(), linear(8, 3))
    init_(model, g)
    PatchedLater.forward = _patched_forward
    return Built(model, (2, 4), 3)


def _hook_parametrization(g):
    model = nn.Sequential(bjorck(4, 8), lnn.MaxMin(), linear(8, 3))
    init_(model, g)
    model[0].parametrizations.weight[0].register_forward_hook(_scale_output(10.0))
    return Built(model, (2, 4), 3)


def _conv_hooked(g):
    conv = lnn.CayleyConv2d(2, 2, 3, dtype=F64)
    conv.register_forward_hook(_scale_output(3.0))
    return classifier(g, _conv_head(conv, 32), (2, 2, 4, 4), 3)


def _model_hooked(g):
    model = init_(mlp_with(nn.ReLU()), g)
    model.register_forward_hook(_scale_output(7.0))
    return Built(model, (2, 4), 3)


BY_NAME = {case.name: case for case in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"
