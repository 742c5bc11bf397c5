"""Models constrained with geotorch: exact bounds, sound propagation, faithful export.

geotorch constrains a weight through `torch.nn.utils.parametrize`, so lipnets needs
no geotorch code: every entry point reads the weight the module realises. These
tests check that for `geotorch.orthogonal` (square and rectangular `nn.Linear`,
`nn.Conv2d`, whose kernels it makes orthogonal slice by slice) and `geotorch.sphere`
(the rows of a weight on a sphere of a given radius), against the dense float64
operator, points sampled in l2 balls, and training steps after which the constraint
and the bound must still agree. geotorch is an optional dependency (the `geotorch`
and `test` extras).
"""

from __future__ import annotations

import geotorch
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import lipnets
from lipnets.propagation import crown_bounds, interval_bounds

from .helpers import assert_within, dense_jacobian, spectral_norm

DT = torch.float64
REL = 1e-6  # the bound may exceed the exact float64 norm by this much, relatively
POINTS = 300
RADIUS = 2.5


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stiefel_point(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal rows or columns, from a seeded generator."""
    tall = max(rows, cols), min(rows, cols)
    q, r = torch.linalg.qr(torch.randn(*tall, generator=gen, dtype=DT))
    q = q * torch.sign(torch.diagonal(r))
    return q if rows >= cols else q.T


def _orthogonal(module: nn.Module, seed: int) -> nn.Module:
    """``geotorch.orthogonal`` on ``module.weight``, set to a seeded point of the manifold.

    geotorch samples its initial point with the global RNG: that draw runs under
    ``fork_rng`` (the global state is left as it was), and the realised weight is
    then set through the parametrization's ``right_inverse`` from a seeded generator.
    """
    with torch.random.fork_rng(devices=[]):
        geotorch.orthogonal(module, "weight")
    gen = _gen(seed)
    shape = module.weight.shape
    points = [_stiefel_point(shape[-2], shape[-1], gen) for _ in range(shape[:-2].numel())]
    with torch.no_grad():
        module.weight = torch.stack(points).reshape(shape)
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen, dtype=DT))
    return module


def _sphere(module: nn.Module, seed: int, radius: float = RADIUS) -> nn.Module:
    """``geotorch.sphere``: each row of ``module.weight`` on the sphere of ``radius``."""
    with torch.random.fork_rng(devices=[]):
        geotorch.sphere(module, "weight", radius=radius)
    gen = _gen(seed)
    w = torch.randn(module.weight.shape, generator=gen, dtype=DT)
    with torch.no_grad():
        module.weight = radius * w / torch.linalg.vector_norm(w, dim=-1, keepdim=True)
        module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen, dtype=DT))
    return module


def _linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, dtype=DT)


def _realised(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(DT)


def _exact(layer: nn.Linear) -> float:
    return spectral_norm(_realised(layer.weight))


def _assert_exact(bound: torch.Tensor | float, exact: float, what: str) -> None:
    value = float(bound)
    assert value >= exact, f"{what}: bound {value} below the exact norm {exact}"
    assert value <= exact * (1 + REL), f"{what}: bound {value} vs exact {exact}"


def _orthogonality_error(weight: torch.Tensor) -> float:
    matrices = _realised(weight).reshape(-1, *weight.shape[-2:])
    return float((torch.linalg.svdvals(matrices) - 1).abs().max())


# (out_features, in_features): square, wide (orthonormal rows), tall (orthonormal columns)
SHAPES = [(8, 8), (5, 12), (12, 5)]


def _chain(seed: int) -> nn.Sequential:
    """Linear-ReLU-Linear: an orthogonal 6 -> 10 layer, then 10 -> 4 rows on a sphere."""
    return nn.Sequential(
        _orthogonal(_linear(6, 10), seed), nn.ReLU(), _sphere(_linear(10, 4), seed + 1)
    )


# ---------------------------------------------------------------------------------
# lipschitz_bound: the exact operator norm of the realised weights
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=["square", "wide", "tall"])
def test_orthogonal_linear_bound_is_exact(shape) -> None:
    layer = _orthogonal(_linear(shape[1], shape[0]), seed=shape[0] * 100 + shape[1])
    assert parametrize.is_parametrized(layer, "weight")
    assert _orthogonality_error(layer.weight) < 1e-12
    exact = _exact(layer)
    _assert_exact(lipnets.lipschitz_bound(layer), exact, f"orthogonal {shape}")
    _assert_exact(lipnets.lipschitz_bound(layer, input_shape=(3, shape[1])), exact, "with shape")
    assert abs(exact - 1.0) < 1e-12


@pytest.mark.parametrize("rows", [1, 4], ids=["vector", "rows"])
def test_sphere_linear_bound_is_exact(rows: int) -> None:
    """A (1, n) weight on the sphere has spectral norm = radius; (m, n) rows on it have
    spectral norm <= radius * sqrt(m), and the bound is the exact value in between."""
    layer = _sphere(_linear(9, rows), seed=rows)
    norms = torch.linalg.vector_norm(_realised(layer.weight), dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, RADIUS), rtol=0, atol=1e-12)
    exact = _exact(layer)
    _assert_exact(lipnets.lipschitz_bound(layer), exact, f"sphere rows={rows}")
    if rows == 1:
        assert abs(exact - RADIUS) < 1e-12


def test_chain_bound_is_the_product_of_the_spectral_norms() -> None:
    model = _chain(seed=3)
    product = _exact(model[0]) * _exact(model[2])
    _assert_exact(lipnets.lipschitz_bound(model), product, "chain")
    _assert_exact(lipnets.lipschitz_bound(model, input_shape=(2, 6)), product, "chain with shape")


def _conv_operator_norm(conv: nn.Conv2d, size: tuple[int, ...]) -> float:
    weight = _realised(conv.weight)
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        padding=conv.padding,
        padding_mode=conv.padding_mode,
        bias=False,
        dtype=DT,
    )
    with torch.no_grad():
        plain.weight.copy_(weight)
    return spectral_norm(dense_jacobian(plain, torch.zeros(size, dtype=DT)))


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_orthogonal_conv2d_bound_is_sound(padding_mode: str) -> None:
    """geotorch makes each k x k kernel slice orthogonal, which does not make the
    convolution orthogonal: its norm is well above 1. The bound is still sound for
    every size and for the given size, and exact for circular padding."""
    conv = _orthogonal(nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode, dtype=DT), 11)
    assert _orthogonality_error(conv.weight) < 1e-12
    size = (1, 3, 6, 6)
    exact = _conv_operator_norm(conv, size)
    assert exact > 1.5  # orthogonal kernels, not an orthogonal convolution
    any_size = float(lipnets.lipschitz_bound(conv))
    this_size = float(lipnets.lipschitz_bound(conv, input_shape=size))
    assert any_size >= exact and this_size >= exact
    if padding_mode == "circular":
        _assert_exact(this_size, exact, "circular conv")


# ---------------------------------------------------------------------------------
# Propagation: sampled outputs inside the IBP and CROWN bounds
# ---------------------------------------------------------------------------------


def _l2_ball(x: torch.Tensor, eps: float, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` points per centre, (count, N, ...): uniform in the ball, a quarter on its
    boundary."""
    shape = (count, *x.shape)
    d = torch.randn(shape, generator=gen, dtype=DT).flatten(2)
    d = d / torch.linalg.vector_norm(d, dim=-1, keepdim=True)
    r = torch.rand(count, x.shape[0], 1, generator=gen, dtype=DT) ** (1.0 / d.shape[-1])
    r[: count // 4] = 1.0
    return x.unsqueeze(0) + eps * (r * d).reshape(shape)


def _conv_net(seed: int) -> nn.Sequential:
    return nn.Sequential(
        _orthogonal(nn.Conv2d(2, 3, 3, padding=1, dtype=DT), seed),
        nn.ReLU(),
        nn.Flatten(),
        _sphere(_linear(3 * 5 * 5, 4), seed + 1, radius=0.5),
    )


PROPAGATION_MODELS = {
    "orthogonal-wide": (lambda: _orthogonal(_linear(12, 5), 21), (12,)),
    "sphere": (lambda: _sphere(_linear(7, 3), 22), (7,)),
    "chain": (lambda: _chain(23), (6,)),
    "conv": (lambda: _conv_net(24), (2, 5, 5)),
}


@pytest.mark.parametrize("name", list(PROPAGATION_MODELS))
def test_propagation_contains_sampled_outputs(name: str) -> None:
    build, sample_shape = PROPAGATION_MODELS[name]
    model = build()
    gen = _gen(99)
    x = torch.randn(3, *sample_shape, generator=gen, dtype=DT)
    eps = 0.3
    ibp = interval_bounds(model, x, eps, norm=2)
    crown = crown_bounds(model, x, eps, norm=2)
    points = _l2_ball(x, eps, POINTS, gen)
    with torch.no_grad():
        y = model(points.flatten(0, 1)).reshape(POINTS, *ibp.lower.shape)
        centre = model(x)
    assert_within(y, ibp, f"{name} IBP")
    assert_within(y, crown, f"{name} CROWN")
    assert_within(centre.unsqueeze(0), crown, f"{name} centre")
    assert (crown.lower >= ibp.lower).all() and (crown.upper <= ibp.upper).all()
    # correct, not only sound: the ball's sampled range reaches into the bounds, and a
    # radius of 0 gives the output itself
    assert (y.amax(0) > crown.lower).all() and (y.amin(0) < crown.upper).all()
    zero = crown_bounds(model, x, 0.0, norm=2)
    assert torch.allclose(zero.lower, centre, rtol=0, atol=1e-10)
    assert torch.allclose(zero.upper, centre, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------
# to_vanilla: plain torch modules, same function, original left parametrized
# ---------------------------------------------------------------------------------


def _parametrizations(model: nn.Module) -> dict[str, type]:
    return {
        name: type(sub.parametrizations.weight[0])
        for name, sub in model.named_modules()
        if parametrize.is_parametrized(sub, "weight")
    }


@pytest.mark.parametrize("name", list(PROPAGATION_MODELS))
def test_to_vanilla_is_plain_and_faithful(name: str, f64_tol) -> None:
    build, sample_shape = PROPAGATION_MODELS[name]
    model = build()
    before = _parametrizations(model)
    assert before  # the model carries geotorch parametrizations
    weights = {k: _realised(v).clone() for k, v in model.state_dict().items()}
    plain = lipnets.to_vanilla(model)
    for sub in plain.modules():
        assert not parametrize.is_parametrized(sub)
        assert type(sub) in (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.Sequential)
    x = torch.randn(5, *sample_shape, generator=_gen(7), dtype=DT)
    with torch.no_grad():
        f64_tol.assert_close(plain(x), model(x))
    # the original is untouched: same parametrizations, same state, still trainable
    assert _parametrizations(model) == before
    state = model.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(_realised(state[k]), w) for k, w in weights.items())
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    shape = (1, *sample_shape)
    assert torch.allclose(
        lipnets.lipschitz_bound(plain, input_shape=shape),
        lipnets.lipschitz_bound(model, input_shape=shape),
        rtol=1e-12,
        atol=0,
    )


# ---------------------------------------------------------------------------------
# Training: the constraint holds after optimiser steps, and the bound follows it
# ---------------------------------------------------------------------------------


def test_constraint_and_bound_after_adam_steps() -> None:
    model = nn.Sequential(_orthogonal(_linear(6, 10), 31), nn.ReLU(), _sphere(_linear(10, 1), 32))
    start = [_realised(model[i].weight).clone() for i in (0, 2)]
    gen = _gen(33)
    x = torch.randn(64, 6, generator=gen, dtype=DT)
    target = torch.randn(64, 1, generator=gen, dtype=DT)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
    for i, w0 in zip((0, 2), start, strict=True):
        assert not torch.allclose(_realised(model[i].weight), w0, atol=1e-3)  # it trained
    assert _orthogonality_error(model[0].weight) < 1e-5
    norm = float(torch.linalg.vector_norm(_realised(model[2].weight)))
    assert abs(norm - RADIUS) < 1e-10
    _assert_exact(lipnets.lipschitz_bound(model[0]), _exact(model[0]), "orthogonal after Adam")
    _assert_exact(lipnets.lipschitz_bound(model[2]), norm, "sphere after Adam")
    _assert_exact(
        lipnets.lipschitz_bound(model), _exact(model[0]) * _exact(model[2]), "chain after Adam"
    )
