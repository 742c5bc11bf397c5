"""Estimators compute parametrized weights once without torch's process-wide cache.

`torch.nn.utils.parametrize.cached()` switches on a cache that every thread
reads, so a model trained in another thread would see stale weights while an
estimator runs. The estimators evaluate a frozen private copy instead (Note
[Realised weights] in `lipnets._state`). These tests check that another thread
never sees a cached weight, that the copy computes what the model computes, and
that a model that cannot be copied still works.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lipnets.estimators import autolip, jacobian_norm, pgd_l2, power_iteration, seqlip
from lipnets.nn import BjorckLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        BjorckLinear(6, 8), nn.ReLU(), BjorckLinear(8, 8), nn.ReLU(), BjorckLinear(8, 3)
    ).double()


def test_another_thread_never_reads_a_cached_weight() -> None:
    model = _mlp()
    x = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 3
    other = BjorckLinear(5, 5).double()
    original = other.parametrizations.weight.original
    done = threading.Event()
    stale: list[float] = []
    rounds = [0]
    flags: list[int] = []

    def watch() -> None:
        while not done.is_set():
            flags.append(parametrize._cache_enabled)
            with torch.no_grad():
                original.add_(0.01 * torch.eye(5, dtype=torch.float64))
                expected = other.parametrizations.weight[0](original)
                gap = float((other.weight - expected).abs().max())
            if gap > 0:
                stale.append(gap)
            rounds[0] += 1

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        gen = torch.Generator().manual_seed(0)
        pgd_l2(model, x, y, 0.5, steps=30, restarts=2, generator=gen)
        jacobian_norm(model, x[:4], dense_limit=0, iters=20, generator=gen)
        power_iteration(model[0], (1, 6), iters=20, generator=gen)
        seqlip(model, (1, 6), generator=gen)
        autolip(model, (1, 6), generator=gen)
    finally:
        done.set()
        watcher.join()
    assert rounds[0] > 0
    assert stale == [], f"the other thread read {len(stale)} stale weights"
    assert not any(flags), "parametrize.cached() was switched on while the other thread ran"


def _as_callable(model: nn.Module):
    return lambda t: model(t)  # not an nn.Module: evaluated as it is, weights recomputed


def test_the_frozen_copy_computes_what_the_model_computes() -> None:
    model = _mlp(2).eval()  # a callable is not put in eval mode by the estimators
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    x = torch.randn(8, 6, dtype=torch.float64, generator=gen())
    y = torch.arange(8) % 3
    pairs = [
        (
            pgd_l2(model, x, y, 0.4, steps=20, restarts=2, generator=gen()),
            pgd_l2(_as_callable(model), x, y, 0.4, steps=20, restarts=2, generator=gen()),
        ),
        (
            jacobian_norm(model, x, dense_limit=0, iters=30, generator=gen()),
            jacobian_norm(_as_callable(model), x, dense_limit=0, iters=30, generator=gen()),
        ),
        (jacobian_norm(model, x), jacobian_norm(_as_callable(model), x)),
        (
            power_iteration(model[2], (1, 8), generator=gen()),
            power_iteration(_as_callable(model[2]), (1, 8), dtype=torch.float64, generator=gen()),
        ),
    ]
    for ours, reference in pairs:
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    # the dense operator: a Björck weight is orthogonal, so power iteration finds 1
    sigma = torch.linalg.matrix_norm(model[2].weight.detach(), ord=2)
    assert abs(float(power_iteration(model[2], (1, 8), generator=gen())) - float(sigma)) < 1e-9


def test_a_model_that_cannot_be_copied_is_evaluated_as_it_is() -> None:
    model = _mlp(4).eval()
    locked = nn.Sequential(*model)
    locked.lock = threading.Lock()  # copy.deepcopy refuses a lock
    with pytest.raises(TypeError):
        copy.deepcopy(locked)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    x = torch.randn(6, 6, dtype=torch.float64, generator=gen())
    y = torch.arange(6) % 3
    torch.testing.assert_close(
        pgd_l2(locked, x, y, 0.3, steps=10, restarts=1, generator=gen()),
        pgd_l2(model, x, y, 0.3, steps=10, restarts=1, generator=gen()),
        rtol=0,
        atol=1e-12,
    )
    torch.testing.assert_close(
        seqlip(locked, (1, 6), generator=gen()),
        seqlip(model, (1, 6), generator=gen()),
        rtol=0,
        atol=1e-12,
    )
    torch.testing.assert_close(
        jacobian_norm(locked, x), jacobian_norm(model, x), rtol=0, atol=1e-12
    )


def test_the_original_model_is_left_as_it_was() -> None:
    model = _mlp(6).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 6, dtype=torch.float64)
    pgd_l2(model, x, torch.arange(4) % 3, 0.5, steps=5, restarts=1)
    jacobian_norm(model, x, dense_limit=0, iters=5)
    autolip(model, (1, 6))
    assert all(m.training for m in model.modules())
    assert type(model[0]).__name__ == "ParametrizedBjorckLinear"
    assert parametrize.is_parametrized(model[0], "weight")
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
