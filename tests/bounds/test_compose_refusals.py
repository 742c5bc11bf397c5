"""Models that once got a number they did not earn (review of the composer).

Each must now be refused with a lipnets error, or bounded soundly. They cover
silent paths: rounding ops, dtype reinterpretation, overloads, aliasing
in-place updates, hooks, patched forwards and Python-side state.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lipnets
from lipnets import lipschitz_bound
from lipnets.errors import LipnetsError
from tests.helpers import lipschitz_ascent


class Fn(nn.Module):
    def __init__(self, fn, **extra) -> None:
        super().__init__()
        self.fn = fn
        self.lin = nn.Linear(4, 4)
        self.act = nn.LeakyReLU(10.0, inplace=True)
        self.register_buffer("ib", torch.zeros(1, dtype=torch.long))
        self.register_buffer("buf", torch.zeros(1, 4))
        for k, v in extra.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.fn(self, x)


def _alias_view(s, x):
    h = s.lin(x)
    h.view(-1).mul_(10)
    return h


def _alias_slice(s, x):
    x[:, :2].mul_(10)
    return x


def _alias_detach(s, x):
    h = s.lin(x)
    h.detach().mul_(10)
    return h


def _alias_module(s, x):
    h = s.lin(x)
    s.act(h[:, :2])
    return h


def _out_kwarg(s, x):
    h = s.lin(x)
    torch.mul(h, 10, out=h)
    return h


REFUSED = {
    "div-floor": lambda s, x: torch.div(x, 0.5, rounding_mode="floor"),
    "div-trunc-method": lambda s, x: x.div(0.5, rounding_mode="trunc"),
    "view-dtype": lambda s, x: x.view(torch.int32).float(),
    "type_as-int": lambda s, x: x.type_as(s.ib).float(),
    "to-int-tensor": lambda s, x: x.to(s.ib).float(),
    "type-str": lambda s, x: x.type("torch.LongTensor").float(),
    "sum-int": lambda s, x: torch.sum(x, dtype=torch.int64).float(),
    "long-method": lambda s, x: x.long().float(),
    "int-method": lambda s, x: x.int().float(),
    "bool-method": lambda s, x: x.bool().float(),
    "index-from-shape": lambda s, x: x[torch.zeros(x.shape[0] * 10, dtype=torch.long)],
    "list-from-shape": lambda s, x: x[:, [0] * (x.size(1) * 3)],
    "add-3-args": lambda s, x: torch.add(x, 10, x),
    "alias-view": _alias_view,
    "alias-slice": _alias_slice,
    "alias-detach": _alias_detach,
    "alias-module": _alias_module,
    "out-kwarg": _out_kwarg,
    "softplus-functional": lambda s, x: nn.functional.softplus(x, 1.0, 1.0),
}


@pytest.mark.parametrize("name", REFUSED)
@pytest.mark.parametrize("shape", [None, (2, 4)], ids=["no-shape", "shape"])
def test_refused(name, shape):
    with pytest.raises(LipnetsError):
        lipschitz_bound(Fn(REFUSED[name]), shape)


def test_forward_hooks_are_refused():
    lin = nn.Linear(4, 4)
    handle = lin.register_forward_hook(lambda m, i, o: 10 * o)
    for model in (lin, nn.Sequential(lin, nn.ReLU())):
        with pytest.raises(LipnetsError, match="hooks"):
            lipschitz_bound(model, (1, 4))
    handle.remove()
    pre = nn.Sequential(nn.Linear(4, 4))
    pre[0].register_forward_pre_hook(lambda m, i: (10 * i[0],))
    with pytest.raises(LipnetsError, match="hooks"):
        lipschitz_bound(pre)
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        with pytest.raises(LipnetsError, match="global"):
            lipschitz_bound(nn.ReLU())
    finally:
        handle.remove()


def test_patched_forward_and_overridden_helpers_do_not_inherit_rules():
    relu = nn.ReLU()
    relu.forward = lambda x: 10 * x
    with pytest.raises(LipnetsError):
        lipschitz_bound(nn.Sequential(relu), (1, 4))

    class Loud(nn.ReLU):
        def __call__(self, x):
            return 10 * super().__call__(x)

    with pytest.raises(LipnetsError):
        lipschitz_bound(nn.Sequential(Loud()))

    class BN(nn.BatchNorm1d):
        def _check_input_dim(self, input):
            input.mul_(10)

    with pytest.raises(LipnetsError):
        lipschitz_bound(BN(4).eval())


def test_python_side_state_is_refused_with_or_without_shapes():
    class Flip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.LeakyReLU(0.01)

        def forward(self, x):
            self.act.negative_slope = 10.0
            y = self.act(x)
            self.act.negative_slope = 0.01
            return y

    for shape in (None, (3, 4)):
        with pytest.raises(lipnets.UntraceableModelError, match="negative_slope"):
            lipschitz_bound(Flip(), shape)


@pytest.mark.parametrize(
    "fn,shape",
    [
        (lambda s, x: torch.relu(input=x), (1, 4)),
        (lambda s, x: torch.add(input=x, other=2 * x), (1, 4)),
        (lambda s, x: torch.stack(x.unbind(1), dim=1), (1, 4)),
        (lambda s, x: x[:, [[0, 0], [1, 2]]], (1, 4)),
        (lambda s, x, scale=2.0: scale * x, (1, 4)),
    ],
    ids=["relu-kwargs", "add-kwargs", "stack-unbind", "nested-index", "default-arg"],
)
def test_spellings_that_once_crashed_are_bounded_soundly(fn, shape):
    class Wrap(nn.Module):
        def forward(self, x, scale=2.0):
            return fn(self, x) if fn.__code__.co_argcount == 2 else fn(self, x, scale)

    model = Wrap()
    bound = float(lipschitz_bound(model, shape))
    assert lipschitz_ascent(model, shape, steps=20) <= bound * (1 + 1e-9)
    assert bound > 0


def test_reading_a_spectral_norm_weight_in_training_mode_has_no_side_effect():
    layer = nn.utils.parametrizations.spectral_norm(nn.Linear(5, 5))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    lipschitz_bound(nn.Sequential(layer))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_an_fx_graph_module_is_accepted():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    traced = torch.fx.symbolic_trace(model)
    assert torch.equal(lipschitz_bound(traced), lipschitz_bound(model))
