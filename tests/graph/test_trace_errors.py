"""Trace failures name their cause: a forward that calls a module that is not a submodule
(held in a global, a closure or a plain list) is refused with the fix, by every entry
point."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lipnets import lipschitz_bound
from lipnets.errors import UntraceableModelError
from lipnets.propagation import crown_bounds

OUTSIDE = nn.Linear(4, 4).double()


class GlobalResidual(nn.Module):
    def forward(self, x):
        return x + OUTSIDE(x)


class ListHolder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = [nn.Linear(4, 4).double()]  # a plain list: not registered

    def forward(self, x):
        return self.layers[0](x)


def _closure() -> nn.Module:
    inner = nn.Linear(4, 4).double()

    class Closure(nn.Module):
        def forward(self, x):
            return torch.relu(inner(x))

    return Closure()


@pytest.mark.parametrize(
    "model", [GlobalResidual(), ListHolder(), _closure()], ids=["global", "list", "closure"]
)
def test_a_module_outside_the_model_is_named_as_the_cause(model: nn.Module) -> None:
    calls = [
        lambda: lipschitz_bound(model),
        lambda: lipschitz_bound(model, input_shape=(1, 4)),
        lambda: crown_bounds(model, torch.zeros(1, 4, dtype=torch.float64), 0.1, norm=2),
    ]
    for call in calls:
        with pytest.raises(UntraceableModelError, match="not one of the model's submodules"):
            call()
