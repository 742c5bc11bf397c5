"""Red-team attacks on functional convolutions (Note [Functional convolutions] in
lipnets.graph.conv_calls).

Every model here calls ``F.conv1d``/``F.conv2d`` in its own ``forward`` (or is a torch.nn
convolution that lipnets traces into). Lipschitz bounds are compared with the float64
spectral norm of the dense Jacobian, propagated bounds with float64 samples of the ball.
Tests that pass document an attack that held; the tests named ``test_hole_*`` fail while
the hole they describe is open.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import lipnets
from lipnets.errors import UnboundedModuleError, UntraceableModelError
from lipnets.graph import reuse_traces
from lipnets.propagation import crown_bounds, interval_bounds, local_lipschitz
from tests.helpers import dense_jacobian, spectral_norm

DT = torch.float64
SLACK = 1e-9


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


class Call(nn.Module):
    """``fn(x, w, b, **options)`` on its own parameters."""

    def __init__(self, weight, bias=None, fn=F.conv2d, **options):
        super().__init__()
        self.w = nn.Parameter(weight)
        self.b = None if bias is None else nn.Parameter(bias)
        self.fn, self.options = fn, options

    def forward(self, x):
        return torch.relu(self.fn(x, self.w, self.b, **self.options))


def _exact(fn, shape) -> float:
    return spectral_norm(dense_jacobian(fn, torch.zeros(shape, dtype=DT)))


def _ball(x: torch.Tensor, eps: float, norm, n: int = 64, seed: int = 3) -> torch.Tensor:
    """``n`` points of each ball (corners for linf, the sphere for l2), shape (n, *x.shape)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.rand((n, *x.shape), generator=g, dtype=DT) * 2 - 1
    if norm == "linf":
        return x + eps * d.sign()
    d = d / d.flatten(2).norm(dim=2).reshape(n, x.shape[0], *[1] * (x.ndim - 1))
    return x + eps * d


def _assert_contains(model, x, eps, norm, bounds) -> None:
    lo, up = bounds
    pts = _ball(x, eps, norm)
    with torch.no_grad():
        out = torch.stack([model(p) for p in pts])
    assert float((lo - out).max()) <= SLACK and float((out - up).max()) <= SLACK


def _assert_sound(model, shape, x, eps=0.1) -> float:
    bound = float(lipnets.lipschitz_bound(model, input_shape=shape))
    exact = _exact(lambda z: model.fn(z, model.w, None, **model.options), shape)
    assert exact <= bound * (1 + SLACK), (bound, exact)
    for norm in ("linf", 2):
        _assert_contains(model, x, eps, norm, crown_bounds(model, x, eps, norm=norm))
        _assert_contains(model, x, eps, norm, interval_bounds(model, x, eps, norm=norm))
    return bound


# -- holes found by the red team, fixed --------------------------------------------------


class _DroppedWeight(nn.Module):
    """A conv (or linear map) whose weight passes through nn.Dropout (random in training)."""

    def __init__(self, linear: bool = False):
        super().__init__()
        self.linear = linear
        self.w = nn.Parameter(_randn(4, 16, seed=0) if linear else _randn(2, 2, 3, 3, seed=0))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        if self.linear:
            return F.linear(x, self.drop(self.w))
        return F.conv2d(x, self.drop(self.w), padding=1)


@pytest.mark.parametrize("linear", [False, True], ids=["conv2d", "linear"])
def test_a_weight_through_dropout_in_training_is_refused(linear) -> None:
    """Was: the bound read the weight once, through one random mask, and bounded that draw
    (seeded: 10.11, then 8.64, below 2 ||conv(w)|| = 13.45, reached when the mask keeps
    every entry; F.linear alike). A constant computed by a module that draws random numbers
    in its current mode is refused (`lipnets.graph.policy.draws_random`); in eval mode
    dropout is the identity and the bound is the plain weight's."""
    model = _DroppedWeight(linear).train()
    shape = (1, 16) if linear else (1, 2, 4, 4)
    with pytest.raises(UnboundedModuleError, match="Dropout in training mode"):
        lipnets.lipschitz_bound(model, input_shape=shape)
    # Propagation bounds the eval-mode function (dropout the identity) in every entry point,
    # the same on every call, and leaves the model in training mode.
    x = torch.rand(2, *shape[1:], generator=torch.Generator().manual_seed(1), dtype=DT)
    train = [
        crown_bounds(model, x, 0.1, norm="linf"),
        interval_bounds(model, x, 0.1, norm="linf"),
        (local_lipschitz(model, x, 0.1),),
    ]
    assert model.training
    model.eval()
    evaluated = [
        crown_bounds(model, x, 0.1, norm="linf"),
        interval_bounds(model, x, 0.1, norm="linf"),
        (local_lipschitz(model, x, 0.1),),
    ]
    for got, want in zip(train, evaluated, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    _assert_contains(model, x, 0.1, "linf", evaluated[0])
    fn = (lambda z: F.linear(z, model.w)) if linear else (lambda z: F.conv2d(z, model.w, padding=1))
    exact = _exact(fn, shape)
    bound = float(lipnets.lipschitz_bound(model, input_shape=shape))
    assert exact <= bound <= (1 + 1e-6 if linear else 1.5) * exact


@pytest.mark.parametrize(
    "options", [{"padding": (1,)}, {"stride": (2,)}, {"dilation": (2,)}], ids=str
)
def test_one_element_tuples_propagate_as_the_int_spelling(options) -> None:
    """Was: CROWN and local_lipschitz crashed in the convolution's adjoint (``zip()
    argument 4 is shorter``) on a one-entry stride, padding or dilation, which torch reads
    as that entry in every dimension; ``nn.Conv2d(..., padding=(1,))`` too."""
    w, b = _randn(2, 1, 3, 3, seed=1), _randn(2, seed=2)
    model = Call(w, b, **options)
    plain = Call(w, b, **{k: v[0] for k, v in options.items()})
    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(0), dtype=DT)
    got, want = crown_bounds(model, x, 0.1, norm=2), crown_bounds(plain, x, 0.1, norm=2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(local_lipschitz(model, x, 0.1), local_lipschitz(plain, x, 0.1))
    modules = []
    for spelling in (options, {k: v[0] for k, v in options.items()}):
        module = nn.Conv2d(1, 2, 3, **spelling, dtype=DT)
        with torch.no_grad():
            module.weight.copy_(w)
            module.bias.copy_(b)
        modules.append(module)
    got, want = (crown_bounds(m, x, 0.1, norm=2) for m in modules)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    _assert_contains(modules[0], x, 0.1, 2, got)


class _Unbatched(nn.Module):
    """conv2d on a 3-D input: torch reads it as one unbatched (C, H, W) image."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(_randn(1, 1, 3, 3, seed=4))

    def forward(self, x):
        return torch.relu(F.conv2d(x, self.w, padding=1))


def test_an_unbatched_conv_is_refused_by_propagation_and_bounded_soundly() -> None:
    """Was: CROWN and local_lipschitz crashed with a bare ``ValueError`` (the per-sample
    shape of a (1, 4, 4) input has no channel dimension). Propagation reads the first
    dimension as the batch, which torch's unbatched convolution does not: refused by name
    in every propagation entry point. The Lipschitz bound, of the whole tensor, is sound
    (5.57 >= 5.19)."""
    model = _Unbatched()
    x = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(5), dtype=DT)
    bound = float(lipnets.lipschitz_bound(model, input_shape=(1, 4, 4)))
    assert _exact(lambda z: F.conv2d(z, model.w, padding=1), (1, 4, 4)) <= bound
    for call in (
        lambda: crown_bounds(model, x, 0.1, norm="linf"),
        lambda: interval_bounds(model, x, 0.1, norm="linf"),
        lambda: local_lipschitz(model, x, 0.1),
    ):
        with pytest.raises(UnboundedModuleError, match="batched inputs"):
            call()


# -- attacks that held ----------------------------------------------------------------


def test_one_element_tuples_give_the_int_spellings_bound_and_ibp() -> None:
    w, b = _randn(2, 1, 3, 3, seed=1), _randn(2, seed=2)
    x = torch.rand(2, 1, 7, 7, generator=torch.Generator().manual_seed(0), dtype=DT)
    model = Call(w, b, padding=(1,), stride=(2,), dilation=[2])
    plain = Call(w, b, padding=1, stride=2, dilation=2)
    shape = (1, 1, 7, 7)
    assert torch.equal(
        lipnets.lipschitz_bound(model, input_shape=shape),
        lipnets.lipschitz_bound(plain, input_shape=shape),
    )
    assert torch.equal(lipnets.lipschitz_bound(model), lipnets.lipschitz_bound(plain))
    got, want = interval_bounds(model, x, 0.1, norm=2), interval_bounds(plain, x, 0.1, norm=2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    "case",
    [
        (2, (2, 1, 2, 2), {"padding": "same", "dilation": 3}),  # asymmetric 'same'
        (2, (2, 1, 3, 3), {"padding": 4}),  # padding larger than the kernel
        (2, (2, 1, 3, 3), {"padding": [2, 0], "stride": (1, 2)}),
        (2, (6, 1, 3, 3), {"padding": 1, "stride": 2, "groups": 3}),  # depthwise x2
        (1, (2, 1, 4), {"padding": "same", "dilation": (2,)}),
        (1, (2, 1, 4), {"padding": (2,), "stride": [2]}),
    ],
    ids=lambda c: str(c[2]),
)
def test_padding_stride_groups_spellings_are_sound(case) -> None:
    rank, wshape, options = case
    fn = {1: F.conv1d, 2: F.conv2d}[rank]
    cin = wshape[1] * options.get("groups", 1)
    model = Call(_randn(*wshape, seed=6), _randn(wshape[0], seed=7), fn=fn, **options)
    shape = (1, cin, *[5] * rank)
    x = torch.rand(2, *shape[1:], generator=torch.Generator().manual_seed(8), dtype=DT)
    _assert_sound(model, shape, x)


class _Computed(nn.Module):
    """Keyword input, a weight and a bias computed from parameters in forward."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(_randn(3, 2, 3, 3, seed=9))
        self.b = nn.Parameter(_randn(3, seed=10))

    def weight(self):
        return self.w.flip(-1).transpose(2, 3) * -4

    def forward(self, x):
        y = F.conv2d(weight=self.weight(), input=x, bias=2 * self.b, padding=(1, 0))
        return torch.relu(y)


def test_keyword_input_and_computed_weight_and_bias_equal_the_module() -> None:
    model = _Computed()
    conv = nn.Conv2d(2, 3, 3, padding=(1, 0), dtype=DT)
    with torch.no_grad():
        conv.weight.copy_(model.weight())
        conv.bias.copy_(2 * model.b)
    reference = nn.Sequential(conv, nn.ReLU())
    shape = (1, 2, 5, 5)
    bound = lipnets.lipschitz_bound(model, input_shape=shape)
    assert torch.equal(bound, lipnets.lipschitz_bound(reference, input_shape=shape))
    assert _exact(conv, shape) <= float(bound)
    x = torch.rand(2, 2, 5, 5, generator=torch.Generator().manual_seed(11), dtype=DT)
    got, want = crown_bounds(model, x, 0.1, norm=2), crown_bounds(reference, x, 0.1, norm=2)
    assert torch.allclose(got[0], want[0]) and torch.allclose(got[1], want[1])
    _assert_contains(model, x, 0.1, 2, got)


def test_subclasses_overriding_conv_forward_or_forward_are_sound() -> None:
    class Tenfold(nn.Conv2d):
        def _conv_forward(self, x, w, b):
            return F.conv2d(x, 10 * w, b, self.stride, self.padding, self.dilation, self.groups)

    class Reflect(nn.Conv2d):
        def forward(self, x):
            return 1.5 * super().forward(x)

    torch.manual_seed(12)
    shape = (1, 2, 5, 5)
    x = torch.rand(2, 2, 5, 5, generator=torch.Generator().manual_seed(13), dtype=DT)
    for layer in (
        Tenfold(2, 3, 3, padding=1, dtype=DT),
        Reflect(2, 3, 3, padding=(1, 2), padding_mode="reflect", dtype=DT),
        Reflect(2, 3, 3, padding=1, stride=2, padding_mode="circular", dtype=DT),
    ):
        bound = float(lipnets.lipschitz_bound(layer, input_shape=shape))
        assert _exact(layer, shape) <= bound * (1 + SLACK)
        _assert_contains(layer, x, 0.1, 2, crown_bounds(layer, x, 0.1, norm=2))


class _Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(_randn(3, 2, 3, 3, seed=14))
        self.b = nn.Parameter(_randn(3, seed=15))
        self.register_buffer("scale", torch.ones((), dtype=DT))
        self.plain = torch.ones(3, dtype=DT)

    def forward(self, x):
        return torch.relu(F.conv2d(x, self.w * self.scale, 2 * self.b + self.plain, padding=1))


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


_CHANGES = {
    "in place": lambda m: m.w.data.mul_(3),
    "new parameter": lambda m: setattr(m, "w", nn.Parameter(m.w.detach() * 3)),
    "buffer": lambda m: m.scale.fill_(5),
    "plain attribute in place": lambda m: m.plain.fill_(7),
    "plain attribute replaced": lambda m: setattr(m, "plain", torch.full((3,), 7.0, dtype=DT)),
    "load_state_dict": lambda m: m.load_state_dict({k: 3 * v for k, v in m.state_dict().items()}),
    "parametrized": lambda m: parametrize.register_parametrization(m, "w", _Double()),
}


@pytest.mark.parametrize("change", list(_CHANGES), ids=str)
def test_kept_graphs_read_the_changed_weights(change) -> None:
    model = _Stateful().eval()
    x = torch.rand(2, 2, 4, 4, generator=torch.Generator().manual_seed(16), dtype=DT)
    shape = (1, 2, 4, 4)

    def everything():
        return (
            *crown_bounds(model, x, 0.1, norm="linf"),
            *interval_bounds(model, x, 0.1, norm=2),
            lipnets.lipschitz_bound(model, input_shape=shape),
        )

    with reuse_traces():
        everything()
        with torch.no_grad():
            _CHANGES[change](model)
        inside = everything()
    fresh = everything()
    assert all(torch.equal(a, b) for a, b in zip(inside, fresh, strict=True))


def test_differentiable_bounds_reach_the_parameters_through_computed_weights() -> None:
    model = _Computed()
    conv = nn.Conv2d(2, 3, 3, padding=(1, 0), dtype=DT)
    with torch.no_grad():
        conv.weight.copy_(model.weight())
        conv.bias.copy_(2 * model.b)
    reference = nn.Sequential(conv, nn.ReLU())
    x = torch.rand(2, 2, 5, 5, generator=torch.Generator().manual_seed(17), dtype=DT)
    lo, up = crown_bounds(model, x, 0.1, norm="linf", differentiable=True)
    gw, gb = torch.autograd.grad((up - lo).sum() + up.sum(), [model.w, model.b])
    lo2, up2 = crown_bounds(reference, x, 0.1, norm="linf", differentiable=True)
    gW, gB = torch.autograd.grad((up2 - lo2).sum() + up2.sum(), [conv.weight, conv.bias])
    # W = -4 w.flip(-1).transpose(2, 3): dL/dw = -4 (dL/dW).transpose(2, 3).flip(-1)
    assert bool(gw.abs().sum() > 0)
    assert torch.allclose(gw, (-4 * gW).transpose(2, 3).flip(-1))
    assert torch.allclose(gb, 2 * gB)


class _Random(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.w = nn.Parameter(_randn(2, 2, 3, 3, seed=18))
        self.how = how

    def forward(self, x):
        if self.how == "dropout":
            w = F.dropout(self.w, 0.5, training=True)
        elif self.how == "noise":
            w = self.w * torch.rand_like(self.w)
        else:  # depends on the batch size
            w = self.w * x.shape[0]
        return F.conv2d(x, w, padding=1)


@pytest.mark.parametrize("how", ["dropout", "noise", "batch size"])
def test_random_and_shape_dependent_weights_are_refused_by_the_bound(how) -> None:
    with pytest.raises(UnboundedModuleError):
        lipnets.lipschitz_bound(_Random(how), input_shape=(1, 2, 4, 4))


def test_batch_size_dependent_weight_is_propagated_for_that_batch() -> None:
    model = _Random("batch size")
    x = torch.rand(2, 2, 4, 4, generator=torch.Generator().manual_seed(19), dtype=DT)
    _assert_contains(model, x, 0.1, "linf", crown_bounds(model, x, 0.1, norm="linf"))


def test_dropout_module_on_the_weight_is_evaluated_in_eval_mode_by_crown() -> None:
    model = _DroppedWeight().train()
    x = torch.rand(2, 2, 4, 4, generator=torch.Generator().manual_seed(20), dtype=DT)
    bounds = crown_bounds(model, x, 0.1, norm="linf")
    assert model.training
    _assert_contains(model.eval(), x, 0.1, "linf", bounds)


def test_aliases_and_other_convolution_entry_points() -> None:
    w = _randn(3, 2, 3, 3, seed=21)
    shape = (1, 2, 4, 4)
    assert torch.equal(
        lipnets.lipschitz_bound(Call(w, fn=torch.conv2d, padding=1), input_shape=shape),
        lipnets.lipschitz_bound(Call(w, padding=1), input_shape=shape),
    )
    others = [
        lambda x, w: torch.convolution(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
        lambda x, w: torch.ops.aten.conv2d(x, w, None, [1, 1], [1, 1]),
    ]
    for fn in others:
        with pytest.raises(UnboundedModuleError):
            lipnets.lipschitz_bound(Call(w, fn=fn), input_shape=shape)


class _InPlace(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.w = nn.Parameter(_randn(2, 2, 3, 3, seed=22))
        self.how = how

    def forward(self, x):
        if self.how == "after use":
            w = self.w * 2
            y = F.conv2d(x, w, padding=1)
            return F.conv2d(y, w.mul_(5), padding=1)
        if self.how == "unassigned":
            w = self.w * 2
            w.mul_(5)
            return F.conv2d(x, w, padding=1)
        w = self.w.detach()  # scaled for the call, restored after it
        w.mul_(4)
        y = F.conv2d(x, w, padding=1)
        w.div_(4)
        return y


@pytest.mark.parametrize("how", ["after use", "unassigned", "restored"])
def test_weights_updated_in_place_are_refused(how) -> None:
    x = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(23), dtype=DT)
    with pytest.raises(UntraceableModelError):
        lipnets.lipschitz_bound(_InPlace(how), input_shape=(1, 2, 4, 4))
    with pytest.raises(UntraceableModelError):
        crown_bounds(_InPlace(how), x, 0.1, norm="linf")


def test_hooks_and_the_old_weight_norm_are_refused() -> None:
    model = Call(_randn(2, 2, 3, 3, seed=24), padding=1)
    model.register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(UnboundedModuleError, match="hooks"):
        lipnets.lipschitz_bound(model, input_shape=(1, 2, 4, 4))
    torch.manual_seed(25)
    with pytest.warns(FutureWarning):
        conv = torch.nn.utils.weight_norm(nn.Conv2d(2, 3, 3, padding=1, dtype=DT))
    with torch.no_grad():
        conv.weight_g.mul_(5)  # conv.weight is stale until the next forward
    with pytest.raises(UnboundedModuleError, match="stale"):
        lipnets.lipschitz_bound(nn.Sequential(conv), input_shape=(1, 2, 4, 4))


@pytest.mark.parametrize(
    "pad", [("circular", (2, 2, 3, 3)), ("reflect", (3, 3, 3, 3)), ("replicate", (5, 0, 1, 4))]
)
def test_explicit_pad_then_conv_is_sound(pad) -> None:
    mode, widths = pad

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(_randn(3, 2, 3, 3, seed=26))

        def forward(self, x):
            return F.conv2d(F.pad(x, widths, mode=mode), self.w, dilation=2)

    model = Padded()
    shape = (1, 2, 4, 4)
    assert _exact(model, shape) <= float(lipnets.lipschitz_bound(model, input_shape=shape))
    x = torch.rand(2, 2, 4, 4, generator=torch.Generator().manual_seed(27), dtype=DT)
    _assert_contains(model, x, 0.1, 2, crown_bounds(model, x, 0.1, norm=2))


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"padding": -1}, ValueError, "padding"),
        ({"stride": 0}, ValueError, "stride"),
        ({"padding": "SAME"}, UnboundedModuleError, "SAME"),
        ({"padding": "same", "stride": 2}, UnboundedModuleError, "strided"),
        ({"groups": 2}, UnboundedModuleError, "groups=2"),
        ({"groups": 0}, UnboundedModuleError, "groups"),
        ({"padding": True}, UntraceableModelError, "conv2d"),
    ],
    ids=str,
)
def test_bad_arguments_without_an_input_shape_are_refused_clearly(options, error, match) -> None:
    model = Call(_randn(3, 2, 3, 3, seed=28), **options)
    with pytest.raises(error, match=match):
        lipnets.lipschitz_bound(model)


def test_local_lipschitz_through_functional_convolutions_is_sound() -> None:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(_randn(3, 2, 3, 3, seed=29))
            self.b = nn.Parameter(_randn(3, seed=30))
            self.w2 = nn.Parameter(_randn(2, 3, 3, 3, seed=31))

        def forward(self, x):
            h = torch.relu(F.conv2d(x, self.w, self.b, padding="same"))
            return F.conv2d(h, self.w2, stride=2, dilation=(1, 2)).flatten(1)

    model = Net()
    x = torch.rand(2, 2, 6, 6, generator=torch.Generator().manual_seed(32), dtype=DT)
    local = local_lipschitz(model, x, 0.3)
    pts = _ball(x, 0.3, 2, n=6)
    for i in range(2):
        seen = max(spectral_norm(dense_jacobian(model, p[i : i + 1])) for p in pts)
        assert seen <= float(local[i]) * (1 + SLACK)
