"""Propagation graphs kept within `reuse_traces` (Note [Propagation graphs reused]).

A kept graph must give exactly the bounds a fresh build gives, and must never serve a
model whose tensors changed (optimiser steps, ``load_state_dict``, ``.data`` edits,
tensor attributes), another batch shape, or differentiable bounds.
"""

from __future__ import annotations

import contextvars
import threading

import pytest
import torch
from torch import nn

import lipnets
from lipnets.graph import reuse_traces
from lipnets.propagation import builder, crown_bounds, interval_bounds

DT = torch.float64


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return (
        nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 4, 12),
            lipnets.MaxMin(),
            nn.Linear(12, 5),
        )
        .to(DT)
        .eval()
    )


class _Scaled(nn.Module):
    """A forward that reads a plain tensor attribute (not a buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        self.scale = torch.tensor(2.0, dtype=DT)

    def forward(self, x):
        return self.body(x) * self.scale


@pytest.fixture
def builds(monkeypatch):
    """Counts propagation graphs built (Builder runs)."""
    count = [0]
    run = builder.Builder.run

    def counting(self):
        count[0] += 1
        return run(self)

    monkeypatch.setattr(builder.Builder, "run", counting)
    return count


def _same(a, b) -> bool:
    return torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper)


@pytest.mark.parametrize("norm", [2.0, float("inf")])
def test_kept_graph_gives_the_fresh_bounds_exactly(builds, norm) -> None:
    model = _cnn()
    xs = [torch.rand(3, 1, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(k))
          for k in range(3)]  # fmt: skip
    fresh = [(f(model, x, e, norm=norm)) for x in xs for e in (0.01, 0.05) for f in
             (interval_bounds, crown_bounds)]  # fmt: skip
    before = builds[0]
    with reuse_traces():
        kept = [(f(model, x, e, norm=norm)) for x in xs for e in (0.01, 0.05) for f in
                (interval_bounds, crown_bounds)]  # fmt: skip
    # one batch shape: one build (and one of its first sample, which checks it on later
    # calls) serves all twelve calls
    assert builds[0] - before == 2
    assert all(_same(a, b) for a, b in zip(fresh, kept, strict=True))


def _edits():
    def step(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model(torch.rand(2, 1, 8, 8, dtype=DT)).sum().backward()
        opt.step()

    def data(model):
        model[5].weight.data.mul_(3.0)  # bypasses autograd's version counter

    def load(model):
        model.load_state_dict(_cnn(seed=7).state_dict())

    def bias_no_grad(model):
        with torch.no_grad():
            model[0].bias.add_(1.0)

    return {"optimizer step": step, ".data edit": data, "load_state_dict": load,
            "no_grad edit": bias_no_grad}  # fmt: skip


@pytest.mark.parametrize("edit", list(_edits()))
def test_changed_weights_are_never_served_by_a_kept_graph(builds, edit) -> None:
    model = _cnn()
    x = torch.rand(2, 1, 8, 8, dtype=DT)
    with reuse_traces():
        first = crown_bounds(model, x, 0.05, norm=2)
        _edits()[edit](model)
        model.eval()
        again = crown_bounds(model, x, 0.05, norm=2)
    fresh = crown_bounds(model, x, 0.05, norm=2)
    assert _same(again, fresh)
    assert not _same(first, fresh)  # the edit changed the bounds
    with torch.no_grad():
        out = model(x)
    assert bool((again.lower <= out).all() and (out <= again.upper).all())


def test_tensor_attribute_edit_rebuilds(builds) -> None:
    model = _Scaled().to(DT).eval()
    x = torch.randn(4, 6, dtype=DT)
    with reuse_traces():
        first = interval_bounds(model, x, 0.1, norm=2)
        model.scale.mul_(-3.0)  # in place on a plain attribute
        again = interval_bounds(model, x, 0.1, norm=2)
    fresh = interval_bounds(model, x, 0.1, norm=2)
    assert _same(again, fresh) and not _same(first, fresh)


def test_other_batch_shapes_and_dtypes_get_their_own_graph(builds) -> None:
    model = _cnn()
    with reuse_traces():
        before = builds[0]
        for n in (1, 4, 1, 4):
            x = torch.rand(n, 1, 8, 8, dtype=DT)
            assert _same(crown_bounds(model, x, 0.02, norm=2), _fresh(model, x))
        assert builds[0] - before == 2
        model32 = _cnn().float()
        x32 = torch.rand(2, 1, 8, 8)
        b = crown_bounds(model32, x32, 0.02, norm=2)
        assert b.lower.dtype == torch.float32


def _fresh(model, x):
    return crown_bounds(model, x, 0.02, norm=2)


def test_a_larger_radius_or_another_norm_is_checked_again(builds, monkeypatch) -> None:
    from lipnets.propagation import graph as graph_module

    checks = []
    check = graph_module._check_on_balls
    monkeypatch.setattr(
        graph_module, "_check_on_balls",
        lambda g, t, x, r, q: (checks.append((float(r.max()), q)), check(g, t, x, r, q)),
    )  # fmt: skip
    model = _cnn()
    x = torch.rand(2, 1, 8, 8, dtype=DT)
    with reuse_traces():
        for eps, norm in [(0.1, 2.0), (0.05, 2.0), (0.1, 2.0), (0.2, 2.0), (0.1, float("inf"))]:
            interval_bounds(model, x, eps, norm=norm)
    assert checks == [(0.1, 2.0), (0.2, 2.0), (0.1, float("inf"))]
    assert builds[0] == 2  # the batch's graph and its first sample's


def test_differentiable_bounds_never_keep_a_graph(builds) -> None:
    model = _cnn()
    x = torch.rand(2, 1, 8, 8, dtype=DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with reuse_traces():
        for _ in range(3):
            b = crown_bounds(model, x, 0.02, norm=2, differentiable=True)
            opt.zero_grad()
            (b.upper - b.lower).sum().backward()  # a second backward would fail on a kept graph
            assert all(p.grad is not None for p in model.parameters())
            opt.step()
    assert builds[0] == 3
    assert _same(crown_bounds(model, x, 0.02, norm=2), _fresh(model, x))


def test_threads_share_a_kept_graph(builds) -> None:
    model = _cnn()
    xs = [torch.rand(3, 1, 8, 8, dtype=DT) for _ in range(8)]
    expected = [crown_bounds(model, x, 0.03, norm=2) for x in xs]
    got: dict[int, object] = {}
    failures: list[BaseException] = []

    def work(k: int) -> None:
        try:
            got[k] = crown_bounds(model, xs[k], 0.03, norm=2)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    with reuse_traces():
        crown_bounds(model, xs[0], 0.03, norm=2)
        # threads do not inherit context variables: each runs in a copy of this context,
        # which shares the context's graphs
        threads = [
            threading.Thread(target=contextvars.copy_context().run, args=(work, k))
            for k in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failures
    # the expected bounds, then one build (and its first sample's) for all threads
    assert builds[0] == 8 + 2
    assert all(_same(got[k], expected[k]) for k in range(8))


_SCALE = [1.0]


class _ReadsAGlobal(nn.Module):
    """A forward reading a module-level value: no copy of tensors and no fingerprint sees
    it (reuse_traces asks that it does not change), but the check of a kept graph on the
    batch's first sample does."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        return self.lin(x) * _SCALE[0]


@pytest.mark.parametrize("n", [1, 5])
def test_a_change_no_copy_sees_is_caught_on_the_first_sample(n) -> None:
    model = _ReadsAGlobal().to(DT).eval()
    x = torch.randn(n, 6, dtype=DT)
    try:
        with reuse_traces():
            interval_bounds(model, x, 0.1, norm=2)
            _SCALE[0] = -4.0
            with pytest.raises(lipnets.errors.UntraceableModelError):
                interval_bounds(model, x, 0.1, norm=2)  # a fresh build refuses the stale trace
    finally:
        _SCALE[0] = 1.0
