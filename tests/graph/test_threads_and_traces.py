"""The front end has no global side effects and traces a model once (issue 15)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import lipnets
from lipnets.graph import reuse_traces, trace, trace_count

DT = torch.float64


def _mlp(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), lipnets.GroupSort(2), nn.Linear(8, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return model


def test_two_threads_bounds_and_forwards_do_not_interfere() -> None:
    """Thread A computes 50 bounds (50 new models, so 50 traces) while thread B runs 50
    forward passes of its own model on inputs from the global RNG, and then the same in
    the other order; nothing fails and B's random stream is the one it would draw alone."""
    other = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)).to(DT)
    seed, draws = 1234, 50
    models = [_mlp(k) for k in range(draws)]  # built here: nn.Linear's init draws from the RNG
    torch.manual_seed(seed)
    expected = [torch.randn(4, 6, dtype=DT) for _ in range(draws)]
    expected_out = [other(x) for x in expected]
    failures: list[BaseException] = []
    got: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    bounds: list[float] = []
    start = threading.Barrier(2)

    def bounding() -> None:
        try:
            start.wait()
            for model in models:
                bounds.append(float(lipnets.lipschitz_bound(model, (1, 6))))
                model(torch.zeros(1, 6, dtype=DT))
        except BaseException as exc:  # pragma: no cover - the test reports it
            failures.append(exc)

    def forwarding() -> None:
        try:
            torch.manual_seed(seed)
            start.wait()
            for _ in range(draws):
                x = torch.randn(4, 6, dtype=DT)
                got.append(x)
                outs.append(other(x))
        except BaseException as exc:  # pragma: no cover - the test reports it
            failures.append(exc)

    threads = [threading.Thread(target=bounding), threading.Thread(target=forwarding)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert len(bounds) == draws and len(got) == draws
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)  # the global stream of the other thread is untouched
    for a, b in zip(outs, expected_out, strict=True):
        assert torch.equal(a, b)
    # The bounds themselves are what a single thread computes.
    for k in (0, draws - 1):
        assert bounds[k] == float(lipnets.lipschitz_bound(_mlp(k), (1, 6)))


def test_two_threads_computing_bounds_at_once() -> None:
    failures: list[BaseException] = []
    results: dict[int, list[float]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def work(t: int) -> None:
        try:
            start.wait()
            for k in range(50):
                model = _mlp(100 * t + k)
                results[t].append(float(lipnets.lipschitz_bound(model, (1, 6))))
        except BaseException as exc:  # pragma: no cover
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    for t in (0, 1):
        for k in (0, 49):
            assert results[t][k] == float(lipnets.lipschitz_bound(_mlp(100 * t + k), (1, 6)))


def test_certification_report_traces_once() -> None:
    model = _mlp(7).eval()  # the mode a trace may read: the same for every call below
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=DT)
    y = model(x).argmax(1)
    before = trace_count()
    report = lipnets.certification_report(
        model, x, y, eps=(0.01, 0.05, 0.1), attack=False, batch_size=20
    )
    assert trace_count() - before == 1
    assert len(report.rows) == 3 and report.samples == 40
    # Within reuse_traces calls reuse the graph; a change of structure retraces.
    with reuse_traces():
        lipnets.lipschitz_bound(model)
        lipnets.propagation.crown_bounds(model, x[:3], 0.1, norm=2)
        assert trace_count() - before == 2
        model[1] = nn.ReLU()
        lipnets.lipschitz_bound(model)
        assert trace_count() - before == 3
    lipnets.lipschitz_bound(model)  # outside: a fresh trace (a global may have changed)
    assert trace_count() - before == 4


def test_a_cached_trace_follows_plain_attributes() -> None:
    """fx reads Python attributes as constants, so a changed attribute retraces."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3).to(DT)
            self.scale = 2.0

        def forward(self, x):
            return self.lin(x) * self.scale

    model = Scaled()
    with reuse_traces():
        first = float(lipnets.lipschitz_bound(model))
        model.scale = 20.0
        assert float(lipnets.lipschitz_bound(model)) == pytest.approx(10 * first, rel=1e-12)
        assert trace(model) is trace(model)


def test_a_cached_trace_follows_private_attributes_and_reassigned_weights() -> None:
    """A private Python attribute is read as a constant too, and a reassigned parameter is
    a new tensor the cached graph would not read: both retrace."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3).to(DT)
            self._c = 1e-3

        def forward(self, x):
            # The gated branch is 0 on any sample near the origin: only the trace sees _c.
            return self.lin(x) + self._c * torch.relu(x - 100.0)

    model = Gated()
    with reuse_traces():
        first = float(lipnets.lipschitz_bound(model, (1, 3)))
        count = trace_count()
        assert float(lipnets.lipschitz_bound(model, (1, 3))) == first
        assert trace_count() == count  # reused
        model._c = 1000.0
        assert float(lipnets.lipschitz_bound(model, (1, 3))) >= 999.0
        with torch.no_grad():
            weight = torch.eye(3, dtype=DT) * 50.0
        model.lin.weight = nn.Parameter(weight)
        model._c = 1e-3
        assert float(lipnets.lipschitz_bound(model, (1, 3))) == pytest.approx(50.001, rel=1e-9)
        x = torch.randn(4, 3, dtype=DT)
        lo, up = lipnets.propagation.interval_bounds(model, x, 0.0, norm=2)
        assert torch.allclose(lo, model(x), atol=1e-9) and torch.allclose(up, model(x), atol=1e-9)
