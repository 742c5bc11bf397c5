"""BjorckLinear, CayleyLinear and the orthogonalisation maths behind them.

Truths checked: singular values from float64 SVD, the polar factor from the
SVD, gradients by gradcheck, constraints after optimiser steps.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import lipnets
import lipnets.functional as LF
from lipnets.errors import LipnetsWarning
from lipnets.functional.orthogonal import _CAPS
from lipnets.parametrizations import BJORCK_DEFAULT, BJORCK_EXPORT, BjorckConfig

LAYERS = [lipnets.BjorckLinear, lipnets.CayleyLinear]
SHAPES = [(48, 48), (64, 24), (24, 64)]  # (out, in): square, tall, wide


def svd64(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.detach().double())


def polar64(w: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u @ vh


def raw(layer: nn.Module) -> torch.Tensor:
    return layer.parametrizations.weight.original


# --- the maths -------------------------------------------------------------------------------


@pytest.mark.parametrize("order", sorted(_CAPS))
def test_scalar_map_converges_below_cap(order):
    # Note [Bjorck pre-scaling]: every eigenvalue of X^T X in (0, cap] converges to 1.
    lam = np.linspace(1e-6, _CAPS[order], 100_001)
    for _ in range(80):
        e = lam - 1
        lam = lam * (1 - e / 2) ** 2 if order == 1 else lam * (1 - e / 2 + 3 * e * e / 8) ** 2
    assert np.abs(lam - 1).max() < 1e-12


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("shape", [(7, 7), (9, 4), (4, 9)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_bjorck_is_the_polar_factor(shape, order, scale):
    g = torch.Generator().manual_seed(0)
    w = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    q = LF.bjorck(w, order=order, tol=1e-6)
    torch.testing.assert_close(q, polar64(w), rtol=0, atol=1e-10)


def test_bjorck_nearly_orthogonal_input_takes_few_steps():
    q0 = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))[0]
    w = q0 + 1e-3 * torch.randn(64, 64, dtype=torch.float64)
    # Three fixed steps reach the polar factor to float64 precision from this close.
    torch.testing.assert_close(LF.bjorck(w, iterations=3), polar64(w), rtol=0, atol=1e-12)


def test_bjorck_stopping_rule_bound():
    # Note [Bjorck stopping rule]: after the last step every |sigma^2 - 1| <= 3/4 tol^2 + tol^3/4.
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(30, 20, generator=g, dtype=torch.float64)
        for tol in (1e-1, 1e-2, 1e-3):
            s = svd64(LF.bjorck(w, tol=tol))
            assert (s**2 - 1).abs().max() <= 0.75 * tol**2 + tol**3 / 4 + 1e-14


def test_bjorck_gradient_flows_by_autograd():
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: LF.bjorck(x, tol=1e-8), (w,))


@pytest.mark.parametrize("shape", [(6, 6), (8, 3), (3, 8)])
def test_retraction_backward_gradcheck_at_orthogonal_points(shape):
    g = torch.Generator().manual_seed(1)
    w = LF.bjorck(torch.randn(shape, generator=g, dtype=torch.float64), tol=1e-8)
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: LF.bjorck_retraction(x, tol=1e-8), (w,))


def test_retraction_gradient_equals_autograd_through_iterations():
    g = torch.Generator().manual_seed(2)
    w0 = LF.bjorck(torch.randn(10, 6, generator=g, dtype=torch.float64), tol=1e-8)
    cot = torch.randn(10, 6, generator=g, dtype=torch.float64)
    grads = []
    for fn in (LF.bjorck, LF.bjorck_retraction):
        w = w0.clone().requires_grad_()
        (fn(w, tol=1e-8) * cot).sum().backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-9)


def test_bjorck_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN or infinite"):
        LF.bjorck(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="all-zero"):
        LF.bjorck(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        LF.bjorck(torch.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        LF.bjorck(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="order must be one of"):
        LF.bjorck(torch.eye(3), order=3)
    with pytest.raises(ValueError, match="tol must be"):
        LF.bjorck(torch.eye(3), tol=0.0)
    with pytest.raises(ValueError, match="iterations must be"):
        BjorckConfig(iterations=0)


def test_bjorck_warns_on_rank_deficient_input():
    w = torch.ones(4, 4, dtype=torch.float64)  # rank 1: no unique polar factor
    with pytest.warns(LipnetsWarning, match="did not converge"):
        LF.bjorck(w, max_iterations=5)


def test_cayley_is_orthogonal_and_matches_the_definition():
    a = torch.randn(7, 7, dtype=torch.float64)
    s = torch.triu(a, 1) - torch.triu(a, 1).mT
    eye = torch.eye(7, dtype=torch.float64)
    full = torch.linalg.inv(eye - s / 2) @ (eye + s / 2)
    torch.testing.assert_close(LF.cayley(a, 7, 7), full)
    torch.testing.assert_close(LF.cayley(a, 7, 3), full[:, :3])
    torch.testing.assert_close(LF.cayley(a, 3, 7), full[:, :3].mT)
    assert (svd64(LF.cayley(a, 3, 7)) - 1).abs().max() < 1e-12
    with pytest.raises(ValueError, match=r"a must be \(7, 7\)"):
        LF.cayley(torch.zeros(6, 6), 7, 3)


# --- the layers ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_layer_is_orthogonal_and_bound_is_honest(cls, shape):
    out_f, in_f = shape
    torch.manual_seed(0)
    layer = cls(in_f, out_f)
    with torch.no_grad():  # a training-mode access with gradients would reproject first
        s = svd64(layer.weight)
    assert (s - 1).abs().max() < 1e-4
    bound = layer.lipschitz_bound()
    assert bound.dtype == torch.float64 and bound.ndim == 0
    assert s.max() <= bound <= 1 + 1e-4
    assert float(bound) != 1.0  # measured from the realised weight, not nominal
    torch.testing.assert_close(layer.orthogonality_error(), (s - 1).abs().max())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_adamw_steps_keep_weight_orthogonal(cls, shape):
    # PITFALLS 13: sigma_min must not collapse under weight decay.
    out_f, in_f = shape
    torch.manual_seed(0)
    model = nn.Sequential(cls(in_f, out_f), lipnets.MaxMin(), nn.Linear(out_f, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    x = torch.randn(256, in_f)
    y = torch.randn(256, 1)
    start = model[0].weight.detach().clone()
    for _ in range(100):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    model.eval()  # read the weight without a training-mode write-back
    weight = model[0].weight.detach()
    assert (weight - start).abs().max() > 1e-2  # it did train
    s = svd64(weight)
    assert (s - 1).abs().max() < 1e-4, (s.min(), s.max())
    assert s.max() <= model[0].lipschitz_bound() <= 1 + 1e-4


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_wild_optimiser_steps_keep_weight_orthogonal(cls):
    # Any optimiser, however large its steps: the weight is still orthogonal.
    torch.manual_seed(0)
    layer = cls(20, 30)
    opt = torch.optim.SGD(layer.parameters(), lr=10.0, momentum=0.9)
    for _ in range(10):
        opt.zero_grad()
        layer(torch.randn(64, 20)).sin().sum().backward()
        opt.step()
    assert (svd64(raw(layer)) - 1).abs().max() > 0.5 or cls is lipnets.CayleyLinear
    assert torch.isfinite(raw(layer)).all()
    assert layer.orthogonality_error() < 1e-4


def test_bjorck_minimal_iterations_bound_still_sound():
    # PITFALLS 5: at the cheapest setting the weight is not orthogonal and the bound says so.
    torch.manual_seed(0)
    layer = lipnets.BjorckLinear(16, 16, config=BjorckConfig(iterations=1))
    with torch.no_grad():
        raw(layer).copy_(torch.randn(16, 16))
    s = svd64(layer.weight)
    assert layer.orthogonality_error() > 1e-2
    assert layer.lipschitz_bound() >= s.max()


def test_bjorck_training_keeps_raw_weight_on_the_manifold():
    # Note [Bjorck reprojection]
    torch.manual_seed(0)
    layer = lipnets.BjorckLinear(32, 32)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(8, 32)).square().sum().backward()
        opt.step()
    assert (svd64(raw(layer)) - 1).abs().max() > 1e-3  # the step left the manifold
    layer(torch.randn(8, 32))  # a training forward writes the polar factor back
    assert (svd64(raw(layer)) - 1).abs().max() < 1e-5
    before = raw(layer).detach().clone()
    opt.step()  # no grads changed, but AdamW moves it: check eval does not write back
    moved = raw(layer).detach().clone()
    assert not torch.equal(before, moved)
    layer.eval()
    first = layer(torch.ones(1, 32))
    assert torch.equal(raw(layer), moved)
    assert torch.equal(layer(torch.ones(1, 32)), first)
    with torch.no_grad():
        layer.train()(torch.ones(1, 32))
    assert torch.equal(raw(layer), moved)  # no write-back without gradients


def test_bjorck_functional_call_uses_autograd_path():
    layer = lipnets.BjorckLinear(6, 6)
    w = torch.randn(6, 6, requires_grad=True)
    params = {"parametrizations.weight.original": w, "bias": layer.bias}
    y = torch.func.functional_call(layer, params, (torch.randn(3, 6),))
    y.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    assert (svd64(LF.bjorck(w.detach())) - 1).abs().max() < 1e-5


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_no_buffers_and_no_cached_tensors(cls):
    layer = cls(5, 7)
    assert list(layer.buffers()) == []
    assert set(layer.state_dict()) == {"bias", "parametrizations.weight.original"}


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_ema_of_parameters_and_buffers_stays_orthogonal(cls):
    # PITFALLS 12: an EMA (here over buffers too) must not corrupt the constraint.
    torch.manual_seed(0)
    layer = cls(12, 12)
    ema = torch.optim.swa_utils.AveragedModel(
        layer, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True
    )
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(16, 12)).pow(2).sum().backward()
        opt.step()
        ema.update_parameters(layer)
    averaged = ema.module
    assert (svd64(averaged.weight) - 1).abs().max() < 1e-4
    assert not torch.equal(averaged.weight, layer.weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_autocast_orthogonalises_in_float32(cls, dtype):
    # PITFALLS 19
    torch.manual_seed(0)
    layer = cls(32, 16)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=dtype):
        w = layer.weight
        y = layer(x)
    assert w.dtype == torch.float32 and y.dtype == dtype
    assert (svd64(w) - 1).abs().max() < 1e-5
    y.float().sum().backward()
    assert raw(layer).grad is not None and torch.isfinite(raw(layer).grad).all()
    torch.testing.assert_close(y.float(), layer(x), rtol=2e-2, atol=2e-2)


def test_low_precision_weights_are_orthogonalised_in_float32():
    layer = lipnets.BjorckLinear(8, 8).to(torch.bfloat16)
    w = layer.weight
    assert w.dtype == torch.bfloat16
    # bf16 has 8 bits: the realised weight is orthogonal to bf16 rounding, and the bound says so.
    assert layer.orthogonality_error() < 2e-2
    assert layer.lipschitz_bound() >= svd64(w).max()


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_torch_compile_matches_eager(cls):
    # PITFALLS 14
    torch.manual_seed(0)
    model = nn.Sequential(cls(8, 12), lipnets.GroupSort(2), cls(12, 4))
    x = torch.randn(5, 8)
    compiled = torch.compile(model, backend="aot_eager")
    model.eval()
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)
    model.train()
    grads = []
    for fn in (model, compiled):
        model.zero_grad()
        fn(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_state_dict_round_trip_and_resume(cls):
    # PITFALLS 11 and 20
    torch.manual_seed(0)
    a = cls(6, 9)
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        a(torch.randn(4, 6)).sum().backward()
        opt.step()
    b = cls(6, 9)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 6)
    torch.testing.assert_close(b.eval()(x), a.eval()(x), rtol=0, atol=0)
    # strict=False with an extra and a missing key
    state = dict(a.state_dict())
    state["unexpected"] = torch.zeros(1)
    del state["bias"]
    c = cls(6, 9)
    result = c.load_state_dict(state, strict=False)
    assert result.unexpected_keys == ["unexpected"] and result.missing_keys == ["bias"]
    torch.testing.assert_close(c.weight, a.weight, rtol=0, atol=0)
    # resume training: one more step keeps it orthogonal
    opt_b = torch.optim.AdamW(b.train().parameters(), lr=1e-2)
    opt_b.load_state_dict(opt.state_dict())
    opt_b.zero_grad()
    b(torch.randn(4, 6)).sum().backward()
    opt_b.step()
    assert b.orthogonality_error() < 1e-4


def test_bjorck_config_presets_and_validation():
    assert BJORCK_DEFAULT.dtype == torch.float32 and BJORCK_EXPORT.dtype == torch.float64
    with pytest.raises(dataclasses.FrozenInstanceError):
        BJORCK_DEFAULT.tol = 1.0  # type: ignore[misc]
    layer = lipnets.BjorckLinear(40, 40)
    with torch.no_grad():
        raw(layer).add_(0.05 * torch.randn(40, 40))
    default_error = layer.orthogonality_error()
    layer.config = BJORCK_EXPORT
    assert layer.orthogonality_error() <= default_error
    assert layer.orthogonality_error() < 1e-6
    order2 = lipnets.BjorckLinear(40, 40, config=dataclasses.replace(BJORCK_DEFAULT, order=2))
    assert order2.orthogonality_error() < 1e-5
    with pytest.raises(TypeError, match="BjorckConfig"):
        lipnets.BjorckLinear(3, 3, config={"order": 2})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype must be"):
        BjorckConfig(dtype=torch.float16)


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_layer_constructor_errors_and_nan(cls):
    with pytest.raises(ValueError, match="in_features must be an int >= 1, got 0"):
        cls(0, 3)
    with pytest.raises(ValueError, match="out_features"):
        cls(3, 2.5)  # type: ignore[arg-type]
    layer = cls(3, 3)
    with torch.no_grad():
        raw(layer)[0, 1] = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cls is lipnets.BjorckLinear:
            with pytest.raises(ValueError, match="NaN or infinite"):
                layer(torch.randn(2, 3))
        with pytest.raises(ValueError, match="NaN or infinite"):
            layer.lipschitz_bound()


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_composed_bound_uses_the_layer_bound(cls):
    torch.manual_seed(0)
    model = nn.Sequential(cls(10, 20), lipnets.MaxMin(), cls(20, 5))
    expected = model[0].lipschitz_bound() * model[2].lipschitz_bound()
    torch.testing.assert_close(lipnets.lipschitz_bound(model), expected, rtol=1e-12, atol=0)
    assert abs(float(lipnets.lipschitz_bound(model)) - 1) <= 2e-4


def test_parametrization_on_a_plain_linear():
    layer = nn.Linear(5, 3)
    orthogonal = lipnets.parametrizations.BjorckOrthogonal()
    parametrize.register_parametrization(layer, "weight", orthogonal)
    assert (svd64(layer.weight) - 1).abs().max() < 1e-5
    # The registered Linear rule measures the realised weight.
    assert lipnets.lipschitz_bound(layer) >= svd64(layer.weight).max()


@settings(max_examples=40, deadline=None)
@given(out_f=st.integers(1, 40), in_f=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_any_shape_is_orthogonal(out_f, in_f, seed):
    torch.manual_seed(seed)
    for layer in (lipnets.BjorckLinear(in_f, out_f), lipnets.CayleyLinear(in_f, out_f)):
        with torch.no_grad():
            s = svd64(layer.weight)
        assert s.numel() == min(out_f, in_f)
        assert (s - 1).abs().max() < 1e-5
        assert s.max() <= layer.lipschitz_bound() <= 1 + 1e-5


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    torch.manual_seed(0)  # the same initial model on both ranks
    model = nn.Sequential(
        lipnets.BjorckLinear(8, 16), lipnets.MaxMin(), lipnets.CayleyLinear(16, 4)
    )
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.1)
    torch.manual_seed(1 + rank)  # different data on each rank
    for _ in range(5):
        opt.zero_grad()
        ddp(torch.randn(32, 8)).square().mean().backward()
        opt.step()
    ddp(torch.randn(4, 8))  # a last training forward writes the Björck polar factor back
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_ranks_stay_in_sync_and_orthogonal(tmp_path):
    # PITFALLS 12: no buffers for DDP to broadcast; the write-back is identical on each rank.
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)
    w = states[0]["0.parametrizations.weight.original"]
    assert (svd64(w) - 1).abs().max() < 1e-5  # the Björck raw weight is on the manifold
    cayley = lipnets.CayleyLinear(16, 4)
    cayley.load_state_dict({k[2:]: v for k, v in states[0].items() if k.startswith("2.")})
    assert cayley.orthogonality_error() < 1e-5
