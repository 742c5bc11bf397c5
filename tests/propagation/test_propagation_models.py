"""Seeded random small models for the propagation tests, one builder per operator mix.

This module holds no tests; the other ``test_propagation*`` files import it.

Each builder takes a seed and returns ``(model, x, eps)``: a float64 model in
eval mode, a batch of centres and a radius chosen so that many ReLUs and
comparators are unstable on the ball.
"""

from __future__ import annotations

import math
import random

import torch
from torch import nn

import lipnets

DT = torch.float64


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Cat(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module | None) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        right = x if self.b is None else self.b(x)
        return torch.cat([self.a(x), right], dim=1)


def _head(body: nn.Sequential, sample_shape: tuple[int, ...], outputs: int) -> nn.Sequential:
    with torch.no_grad():
        features = body(torch.zeros(1, *sample_shape, dtype=DT)).flatten(1).shape[1]
    return nn.Sequential(*body, nn.Flatten(), nn.Linear(features, outputs, dtype=DT))


def _finish(model: nn.Module, rng: random.Random, sample_shape, n: int, eps_choices):
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    x = torch.randn(n, *sample_shape, generator=g, dtype=DT)
    return model.to(DT).eval(), x, rng.choice(eps_choices)


def mlp(seed: int, act: str = "relu", depth: int | None = None, n: int = 2):
    """Linear layers with ReLU, MaxMin, GroupSort(4) or FullSort between them."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    d = rng.choice([2, 3, 4, 8, 12, 16])
    depth = depth or rng.randint(2, 4)
    widths = [4, 8] if act in ("groupsort4", "maxmin") else [4, 5, 6, 7, 8]
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        w = rng.choice(widths)
        layers.append(nn.Linear(d, w))
        layers.append(
            {
                "relu": nn.ReLU,
                "maxmin": lipnets.MaxMin,
                "groupsort4": lambda: lipnets.GroupSort(4),
                "fullsort": lipnets.FullSort,
            }[act]()
        )
        d = w
    layers.append(nn.Linear(d, rng.choice([1, 3])))
    return _finish(nn.Sequential(*layers), rng, (layers[0].in_features,), n, [0.05, 0.2, 0.5])


def conv(seed: int):
    """Conv2d (zero or circular padding, stride 2, dilation, groups), ReLU, flatten, Linear."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    c = rng.choice([1, 2])
    kind = rng.choice(["zeros", "circular", "stride", "dilation", "groups"])
    cout = rng.choice([2, 4])
    kwargs: dict = {"padding": 1}
    if kind == "circular":
        kwargs["padding_mode"] = "circular"
    elif kind == "stride":
        kwargs["stride"] = 2
    elif kind == "dilation":
        kwargs = {"padding": 2, "dilation": 2}
    elif kind == "groups":
        c, kwargs["groups"] = 2, 2
    body = nn.Sequential(nn.Conv2d(c, cout, 3, dtype=DT, **kwargs), nn.ReLU())
    if rng.random() < 0.25:
        mode = rng.choice(["zeros", "circular"])
        body.append(nn.Conv2d(cout, 2, 3, padding=1, padding_mode=mode, dtype=DT))
        body.append(nn.ReLU())
    return _finish(_head(body, (c, 4, 4), 3), rng, (c, 4, 4), 1, [0.05, 0.2, 0.5])


def residual(seed: int):
    """x + f(x) blocks of Linear-ReLU-Linear."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    d = rng.choice([4, 6, 8])
    layers: list[nn.Module] = []
    for _ in range(rng.randint(1, 2)):
        layers.append(Residual(nn.Sequential(nn.Linear(d, 6), nn.ReLU(), nn.Linear(6, d))))
        layers.append(nn.ReLU())
    layers.append(nn.Linear(d, 2))
    return _finish(nn.Sequential(*layers), rng, (d,), 2, [0.05, 0.2, 0.5])


def cat(seed: int):
    """torch.cat of two branches (or of a branch and the input), then ReLU and Linear."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    d = rng.choice([3, 4, 6])
    a = nn.Sequential(nn.Linear(d, 5), nn.ReLU(), nn.Linear(5, 4))
    b = None if rng.random() < 0.4 else nn.Sequential(nn.Linear(d, 3), nn.ReLU())
    width = 4 + (d if b is None else 3)
    model = nn.Sequential(Cat(a, b), nn.ReLU(), nn.Linear(width, 5), nn.ReLU(), nn.Linear(5, 2))
    return _finish(model, rng, (d,), 2, [0.05, 0.2, 0.5])


def avgpool(seed: int):
    """Conv2d, ReLU, AvgPool2d (or adaptive, or after constant padding), flatten, Linear."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    c = rng.choice([1, 2])
    pool = rng.choice(
        [
            nn.AvgPool2d(2),
            nn.AvgPool2d(3, stride=1, padding=1),
            nn.AdaptiveAvgPool2d(3),
            nn.Sequential(nn.ConstantPad2d(1, 0.5), nn.AvgPool2d(2, count_include_pad=False)),
        ]
    )
    body = nn.Sequential(nn.Conv2d(c, 3, 3, padding=1, dtype=DT), nn.ReLU(), pool)
    return _finish(_head(body, (c, 4, 4), 2), rng, (c, 4, 4), 1, [0.1, 0.3, 1.0])


def batchnorm(seed: int):
    """Conv2d, eval-mode BatchNorm2d with random running statistics, ReLU, flatten, Linear."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    c = rng.choice([1, 2])
    bn = nn.BatchNorm2d(3, dtype=DT)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.3, 2.0)
        bn.weight.normal_()  # some negative scales
        bn.bias.normal_()
    body = nn.Sequential(nn.Conv2d(c, 3, 3, padding=1, dtype=DT), bn, nn.ReLU())
    return _finish(_head(body, (c, 4, 4), 2), rng, (c, 4, 4), 1, [0.05, 0.2, 0.5])


def invertible_downsample(seed: int):
    """Conv2d, ReLU, InvertibleDownsample(2), MaxMin, flatten, Linear."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    c = rng.choice([1, 2])
    body = nn.Sequential(
        nn.Conv2d(c, 2, 3, padding=1, dtype=DT),
        nn.ReLU(),
        lipnets.InvertibleDownsample(2),
        lipnets.MaxMin(),
    )
    return _finish(_head(body, (c, 4, 4), 2), rng, (c, 4, 4), 1, [0.05, 0.2, 0.5])


def orthogonal_linear(seed: int):
    """BjorckLinear and CayleyLinear layers with ReLU or MaxMin."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    d = rng.choice([4, 6, 8])
    act = rng.choice([nn.ReLU, lipnets.MaxMin])
    model = nn.Sequential(
        lipnets.BjorckLinear(d, 6, dtype=DT),
        act(),
        lipnets.CayleyLinear(6, 6, dtype=DT),
        act(),
        rng.choice([lipnets.BjorckLinear, lipnets.CayleyLinear])(6, 2, dtype=DT),
    )
    return _finish(model, rng, (d,), 2, [0.1, 0.5, 1.0])


def bcop(seed: int):
    """BCOPConv2d (circular or zero padding, stride 1 or 2), ReLU or MaxMin, flatten, Linear."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    c = 2
    stride = rng.choice([1, 2])
    layer = lipnets.BCOPConv2d(
        c, 4, 3, stride=stride, padding_mode=rng.choice(["circular", "zeros"]), dtype=DT
    )
    body = nn.Sequential(layer, rng.choice([nn.ReLU, lipnets.MaxMin])())
    return _finish(_head(body, (c, 4, 4), 2), rng, (c, 4, 4), 1, [0.1, 0.5, 1.0])


def cayley_conv(seed: int):
    """CayleyConv2d (stride 1 or 2), ReLU, flatten, Linear."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    c = rng.choice([1, 2])
    stride = rng.choice([1, 2])
    layer = lipnets.CayleyConv2d(c, 4, 3, stride=stride, dtype=DT)
    body = nn.Sequential(layer, nn.ReLU())
    return _finish(_head(body, (c, 4, 4), 2), rng, (c, 4, 4), 1, [0.1, 0.5, 1.0])


MIXES = {
    "linear_relu": lambda s: mlp(s, "relu"),
    "linear_maxmin": lambda s: mlp(s, "maxmin"),
    "linear_groupsort4": lambda s: mlp(s, "groupsort4"),
    "linear_fullsort": lambda s: mlp(s, "fullsort"),
    "conv": conv,
    "residual": residual,
    "cat": cat,
    "avgpool": avgpool,
    "batchnorm": batchnorm,
    "invertible_downsample": invertible_downsample,
    "orthogonal_linear": orthogonal_linear,
    "bcop": bcop,
    "cayley_conv": cayley_conv,
}


_UNIT: dict[tuple, torch.Tensor] = {}


def unit_ball(shape: tuple[int, ...], norm: float, count: int) -> torch.Tensor:
    """``count`` points of the unit ball of ``norm``, shape (count, *shape), boundary included.

    l2: half uniform in the ball, half uniform on its sphere. l-infinity: a
    third at corners, a third on faces (one coordinate at +-1), a third
    uniform in the cube. Drawn once per (shape, norm, count) with a fixed seed
    and shared by the models of a test (the models are random, the points
    need not be redrawn).
    """
    key = (tuple(shape), norm, count)
    if key not in _UNIT:
        gen = torch.Generator().manual_seed(hash(key) % 2**31)
        n, d = shape[0], math.prod(shape[1:])
        if norm == 2:
            u = torch.randn(count, n, d, generator=gen, dtype=DT)
            u = u / torch.linalg.vector_norm(u, dim=2, keepdim=True)
            r = torch.rand(count, n, 1, generator=gen, dtype=DT) ** (1.0 / d)
            r[: count // 2] = 1.0
            u = u * r
        else:
            assert norm == math.inf
            u = torch.rand(count, n, d, generator=gen, dtype=DT) * 2 - 1
            third = count // 3
            u[:third] = torch.where(u[:third] >= 0, 1.0, -1.0)
            face = torch.randint(d, (third, n, 1), generator=gen)
            sign = torch.randint(2, (third, n, 1), generator=gen).to(DT) * 2 - 1
            u[third : 2 * third].scatter_(2, face, sign)
        _UNIT[key] = u.reshape(count, *shape)
    return _UNIT[key]


def ball_points(x: torch.Tensor, eps: float, norm: float, count: int) -> torch.Tensor:
    """``count`` points in the ball of radius ``eps`` around each centre: (count, N, ...)."""
    return x.unsqueeze(0) + eps * unit_ball(tuple(x.shape), norm, count)
