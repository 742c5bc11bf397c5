"""Models built with deel-torchlip and orthogonium get sound bounds and CROWN bounds.

Their layers are parametrized by torch (``ParametrizedSpectralLinear``, orthogonium's
power iteration that writes its vectors on every call): lipnets bounds them from the
weights they realise at the call (Note [Realised parametrizations] in
lipnets.graph.realise), which are what `lipnets.to_vanilla` exports, and leaves the model
as it was (Note [State restored] in lipnets._state). Ground truths are computed on the
exported model, whose weights are fixed: float64 dense Jacobians, gradient-ascent lower
bounds and 2000 sampled points per ball.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from deel import torchlip as tl
from orthogonium.layers import AdaptiveOrthoConv2d, OrthoLinear
from orthogonium.layers import MaxMin as OrthoMaxMin
from torch import nn

import lipnets
from lipnets.estimators import lower_bound
from lipnets.propagation import crown_bounds, interval_bounds, local_lipschitz
from tests.helpers import dense_jacobian, spectral_norm

pytestmark = pytest.mark.usefixtures("one_thread")  # small models on a shared machine

DT = torch.float64
SLACK = 1e-12  # float64 rounding of a few matmuls on O(1) entries


@contextlib.contextmanager
def _float64(seed: int):
    """Build in float64 (orthogonium's normalisers keep the dtype they were built with)."""
    old = torch.get_default_dtype()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.set_default_dtype(DT)
        try:
            yield
        finally:
            torch.set_default_dtype(old)


def _train(model: nn.Module, shape, seed: int, steps: int = 8) -> None:
    """A few Adam steps in training mode: the power iterations move off their fixed point."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.005)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, *shape[1:], generator=g, dtype=DT)
        target = torch.randn(16, 10, generator=g, dtype=DT)
        loss = ((model(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _deel():
    with _float64(0):
        model = tl.Sequential(
            tl.SpectralLinear(64, 256), tl.GroupSort2(),
            tl.SpectralLinear(256, 256), tl.GroupSort2(k_coef_lip=1.0),
            tl.SpectralLinear(256, 10),
        )  # fmt: skip
    _train(model, (1, 64), 0)
    return model, (1, 64)


def _orthogonium():
    with _float64(1):
        model = nn.Sequential(OrthoLinear(64, 256), OrthoMaxMin(), OrthoLinear(256, 10))
    _train(model, (1, 64), 1)
    return model, (1, 64)


def _orthogonium_conv():
    with _float64(2):
        model = nn.Sequential(
            AdaptiveOrthoConv2d(3, 8, 3, padding="same"), OrthoMaxMin(), nn.Flatten(),
            OrthoLinear(8 * 6 * 6, 10),
        )  # fmt: skip
    _train(model, (1, 3, 6, 6), 2, steps=4)
    return model, (1, 3, 6, 6)


BUILDERS = {
    "deel-torchlip": _deel,
    "orthogonium": _orthogonium,
    "orthogonium-conv": _orthogonium_conv,
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def peer(request, one_thread):
    return BUILDERS[request.param]()


def _tensors(model: nn.Module):
    named = [*model.named_parameters(remove_duplicate=False)]
    named += [*model.named_buffers(remove_duplicate=False)]
    return [(name, t, t.detach().clone()) for name, t in named]


def _assert_unchanged(model: nn.Module, saved, reference: nn.Module, x: torch.Tensor) -> None:
    """The same tensor objects with the same values, and the next forward pass computes what
    a copy taken before the calls computes (state outside the state dict included)."""
    now = dict((n, t) for n, t, _ in _tensors(model))
    assert list(now) == [n for n, _, _ in saved]
    for name, tensor, values in saved:
        assert now[name] is tensor, name
        assert torch.equal(tensor, values), name
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(model)(x), copy.deepcopy(reference)(x))


def _ball(x: torch.Tensor, eps: float, n: int, seed: int) -> torch.Tensor:
    """n points of each l2 ball: half on the sphere, half inside."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(x.shape[0], n, *x.shape[1:], generator=g, dtype=DT).flatten(2)
    d = d / d.norm(dim=-1, keepdim=True) * eps
    d[:, n // 2 :] *= torch.rand(x.shape[0], n - n // 2, 1, generator=g, dtype=DT)
    return (x[:, None] + d.reshape(x.shape[0], n, *x.shape[1:])).reshape(-1, *x.shape[1:])


def test_bound_is_sound_and_each_layer_is_its_exact_operator_norm(peer) -> None:
    model, shape = peer
    x = torch.randn(4, *shape[1:], generator=torch.Generator().manual_seed(5), dtype=DT)
    saved, reference = _tensors(model), copy.deepcopy(model)
    bound = float(lipnets.lipschitz_bound(model, shape))
    _assert_unchanged(model, saved, reference, x[:1])
    plain = lipnets.to_vanilla(model)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in plain.modules())
    lower = float(lower_bound(plain, x, steps=20, restarts=2))
    assert lower <= bound * (1 + SLACK)
    assert lower >= 0.5 * bound  # the bound is close to the truth (GroupSort nets, ~1)
    # Each parametrized layer alone: the bound is the float64 norm of its dense operator.
    size = torch.Size(shape)
    for layer, copy_ in zip(model, plain, strict=True):
        if torch.nn.utils.parametrize.is_parametrized(layer):
            exact = spectral_norm(dense_jacobian(copy_, torch.zeros(size, dtype=DT)))
            got = float(lipnets.lipschitz_bound(nn.Sequential(layer), size))
            assert exact <= got <= exact * (1 + 1e-10), (type(layer).__name__, got, exact)
        with torch.no_grad():
            size = copy_(torch.zeros(size, dtype=DT)).shape
    _assert_unchanged(model, saved, reference, x[:1])


def test_crown_contains_sampled_outputs_and_equals_crown_on_the_export(peer) -> None:
    model, shape = peer
    x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(6), dtype=DT)
    eps = 0.05
    saved, reference = _tensors(model), copy.deepcopy(model)
    lo, up = crown_bounds(model, x, eps, norm=2)
    _assert_unchanged(model, saved, reference, x)
    plain = lipnets.to_vanilla(model)
    with torch.no_grad():  # the export is the function of the model's next call
        assert torch.equal(copy.deepcopy(model)(x), plain(x))
    lo_v, up_v = crown_bounds(plain, x, eps, norm=2)
    assert torch.equal(lo, lo_v) and torch.equal(up, up_v)
    n = 2000
    with torch.no_grad():
        out = plain(_ball(x, eps, n, 7)).reshape(3, n, -1)
    assert bool((out >= lo[:, None] - SLACK).all()) and bool((out <= up[:, None] + SLACK).all())
    ilo, iup = interval_bounds(model, x, eps, norm=2)
    assert bool((ilo <= lo + SLACK).all()) and bool((iup >= up - SLACK).all())
    local = local_lipschitz(model, x, eps)
    assert bool((local <= lipnets.lipschitz_bound(model, shape) * (1 + SLACK)).all())
    _assert_unchanged(model, saved, reference, x)


def test_training_mode_bound_is_that_of_the_next_training_call(peer) -> None:
    """In training mode the parametrizations step on every call (deel-torchlip's Björck
    and power iteration, orthogonium's power iteration): the bound is that of the weights
    the next call realises, exported by to_vanilla in the same mode, and nothing steps."""
    model, shape = peer
    x = torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(8), dtype=DT)
    model.train()
    try:
        saved, reference = _tensors(model), copy.deepcopy(model)
        bound = lipnets.lipschitz_bound(model, shape)
        _assert_unchanged(model, saved, reference, x)
        plain = lipnets.to_vanilla(model)
        with torch.no_grad():
            assert torch.equal(copy.deepcopy(model)(x), plain(x))
        assert torch.equal(bound, lipnets.lipschitz_bound(plain, shape))
    finally:
        model.eval()


def test_report_leaves_the_model_unchanged(peer) -> None:
    model, shape = peer
    x = torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(9), dtype=DT)
    saved, reference = _tensors(model), copy.deepcopy(model)
    result = lipnets.report(model, x, steps=2, restarts=1, progress=False)
    assert float(result.bound) == float(lipnets.lipschitz_bound(model, shape))
    _assert_unchanged(model, saved, reference, x)


def test_deel_conv_layers_are_bounded_from_their_realised_weights() -> None:
    """SpectralConv2d and FrobeniusConv2d are traced into: their forward calls F.conv2d
    with the weight the parametrizations realise (Note [Functional convolutions]). The
    bound, CROWN and IBP equal those of deel-torchlip's own export, the bound is sound,
    and the model is left as it was."""
    with _float64(3):
        model = tl.Sequential(
            tl.SpectralConv2d(2, 4, 3, padding=1), tl.GroupSort2(),
            tl.FrobeniusConv2d(4, 4, 3, padding=1),
        )  # fmt: skip
    model.eval()
    shape = (1, 2, 6, 6)
    x = torch.rand(3, 2, 6, 6, generator=torch.Generator().manual_seed(4), dtype=DT)
    saved, reference = _tensors(model), copy.deepcopy(model)
    bound = lipnets.lipschitz_bound(model, shape)
    lo, up = crown_bounds(model, x, 0.1, norm=2)
    ilo, iup = interval_bounds(model, x, 0.1, norm="linf")
    _assert_unchanged(model, saved, reference, x)
    plain = tl.vanilla_model(model, in_place=False)
    assert torch.equal(bound, lipnets.lipschitz_bound(plain, shape))
    lo_v, up_v = crown_bounds(plain, x, 0.1, norm=2)
    assert torch.equal(lo, lo_v) and torch.equal(up, up_v)
    ilo_v, iup_v = interval_bounds(plain, x, 0.1, norm="linf")
    assert torch.equal(ilo, ilo_v) and torch.equal(iup, iup_v)
    exact = spectral_norm(dense_jacobian(plain[0], torch.zeros(shape, dtype=DT)))
    first = float(lipnets.lipschitz_bound(nn.Sequential(model[0]), shape))
    assert exact <= first <= 1.05 * exact  # zero padding: the conv rule is an upper bound
    lower = float(lower_bound(plain, x, steps=20, restarts=2))
    assert lower <= float(bound) * (1 + SLACK)
    n = 1000
    with torch.no_grad():
        out = plain(_ball(x, 0.1, n, 5)).reshape(3, n, -1)
    assert bool((out >= lo.flatten(1)[:, None] - SLACK).all())
    assert bool((out <= up.flatten(1)[:, None] + SLACK).all())


def test_certification_entry_points_leave_a_stepping_model_unchanged() -> None:
    """orthogonium's power iteration steps on every call, in eval mode too: every forward
    of the certification entry points runs on the state the bounds saw and leaves it
    (the logits of a second batch came from stepped weights before)."""
    from lipnets.certify import certified_accuracy, certify_crown

    model, shape = _orthogonium()
    x = torch.rand(12, *shape[1:], dtype=DT, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = lipnets.to_vanilla(model)(x).argmax(1)
    before = copy.deepcopy(model.state_dict())

    def unchanged() -> bool:
        after = model.state_dict()
        return all(torch.equal(before[k], after[k]) for k in before)

    certify_crown(model, x, y, 0.05, batch_size=5)
    assert unchanged()
    certified_accuracy(model, x, y, [0.1], batch_size=5)
    assert unchanged()
    lipnets.certification_report(model, x, y, [0.05], attack_steps=3, batch_size=5,
                                 progress=False)  # fmt: skip
    assert unchanged()
