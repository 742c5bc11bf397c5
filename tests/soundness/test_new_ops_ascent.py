"""Gradient ascent never finds a ratio above the Lipschitz bound on 100 random models that
mix the ops of the op-coverage wave (smooth activations, the softmax family, transposed
convolutions, interpolation, copying pads, unfold, cumsum, diff, torch.where of a
comparison, u * sigmoid(u)) with the older ones (Linear, Conv2d, ReLU, GroupSort, residual
sums)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipnets
from tests.helpers import lipschitz_ascent

C, S = 2, 6  # channels and side of every image block


def _conv() -> nn.Module:
    return nn.Conv2d(C, C, 3, padding=1)


class _Block(nn.Module):
    def __init__(self, kind: str, rng: random.Random) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Conv2d(C, C, 3, padding=1)
        self.b = nn.Conv2d(C, C, 2, stride=2)
        self.c = nn.Conv2d(C, C, 3)
        self.t = nn.ConvTranspose2d(C, C, 4, stride=2, padding=1)
        self.mode = rng.choice(["bilinear", "bicubic", "nearest", "nearest-exact"])
        self.pad = rng.choice(["reflect", "replicate", "circular"])
        self.act = rng.choice(["relu", "gelu", "gelu_tanh", "silu", "swish", "mish", "hardswish",
                               "selu", "groupsort", "where"])  # fmt: skip
        self.slope = rng.uniform(0.0, 1.5)
        self.groupsort = lipnets.GroupSort(2, dim=1)
        self.pool = nn.AvgPool2d(2)

    def activation(self, h):
        return {
            "relu": lambda: torch.relu(h),
            "gelu": lambda: F.gelu(h),
            "gelu_tanh": lambda: F.gelu(h, approximate="tanh"),
            "silu": lambda: F.silu(h),
            "swish": lambda: h * torch.sigmoid(h),
            "mish": lambda: F.mish(h),
            "hardswish": lambda: F.hardswish(h),
            "selu": lambda: F.selu(h),
            "groupsort": lambda: self.groupsort(h),
            "where": lambda: torch.where(h > 0.25, h - 0.25, self.slope * (h - 0.25)),
        }[self.act]()

    def forward(self, h):
        if self.kind == "conv":
            return self.activation(self.a(h))
        if self.kind == "pad":
            return self.activation(self.c(F.pad(h, (1, 1, 1, 1), mode=self.pad)))
        if self.kind == "up":
            return self.b(F.interpolate(h, scale_factor=2, mode=self.mode))
        if self.kind == "transpose":
            return self.pool(self.activation(self.t(h)))
        if self.kind == "softmax":
            return torch.softmax(self.a(h), dim=1)
        if self.kind == "unfold":  # patches summed back: fold(unfold(h)) on the same grid
            return F.fold(F.unfold(self.a(h), 2, padding=1), (S, S), 2, padding=1) * 0.25
        return h + 0.5 * self.activation(self.a(h))  # residual


class _Random(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        rng = random.Random(seed)
        kinds = ["conv", "pad", "up", "transpose", "softmax", "unfold", "residual"]
        self.blocks = nn.Sequential(
            *[_Block(rng.choice(kinds), rng) for _ in range(rng.randint(2, 4))]
        )
        self.head = nn.Linear(C * S * S, 6)
        tails = ["none", "log_softmax", "logsumexp", "cumsum", "diff", "softmin", "normalize"]
        self.tail = rng.choice(tails)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)

    def forward(self, x):
        y = self.head(self.blocks(x).flatten(1))
        return {
            "none": lambda: y,
            "log_softmax": lambda: F.log_softmax(y, dim=1),
            "logsumexp": lambda: torch.logsumexp(y, dim=1, keepdim=True),
            "cumsum": lambda: y.cumsum(-1),
            "diff": lambda: torch.diff(y, n=2),
            "softmin": lambda: F.softmin(y, dim=-1),
            "normalize": lambda: F.normalize(y, dim=1, eps=0.5),
        }[self.tail]()


@pytest.mark.parametrize("seed", range(100))
def test_ascent_stays_below_the_bound(seed):
    model = _Random(seed).double().eval()
    shape = (1, C, S, S)
    bound = float(lipnets.lipschitz_bound(model, shape))
    low = lipschitz_ascent(model, shape, starts=6, steps=30, seed=seed)
    assert 0 < low <= bound * (1 + 1e-9), (low, bound)
