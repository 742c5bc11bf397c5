"""Red-team attacks on reused propagation graphs (Note [Propagation graphs reused]).

Within `lipnets.graph.reuse_traces` a propagation graph is kept per batch shape and reused
while every tensor the model can read equals a snapshot. Each test changes the model (or
the call) between two bounds inside the context, in one way, and compares the second bound
with a fresh call outside the context and with float64 sampling of the ball. Tests that
pass document a defended attack; the tests named ``test_hole_*`` fail while the hole they
describe is open.
"""

from __future__ import annotations

import contextvars
import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lipnets.certify import certify_crown
from lipnets.errors import LipnetsError
from lipnets.graph import reuse_traces
from lipnets.propagation import crown_bounds, interval_bounds
from lipnets.reports import certification_report
from lipnets.verify import verify

DT = torch.float64
SLACK = 1e-9


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return module


def _mlp(seed: int = 0) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).to(DT).eval()
    return _seeded(net, seed)


def _x(n: int = 4, d: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _sampled(model: nn.Module, x: torch.Tensor, eps: float, norm: float = 2.0, n: int = 400):
    """Least and largest outputs on points of each ball (corners / sphere and inside)."""
    g = torch.Generator().manual_seed(2)
    u = torch.randn((n, *x.shape), generator=g, dtype=DT)
    if norm == 2.0:
        u = u / u.flatten(2).norm(dim=2).reshape(n, x.shape[0], *([1] * (x.ndim - 1)))
        u[n // 2 :] *= torch.rand((n - n // 2, x.shape[0], *([1] * (x.ndim - 1))), generator=g)
    else:
        u = u.sign()
    with torch.no_grad():
        out = torch.stack([model(x + eps * ui) for ui in u])
    return out.amin(0), out.amax(0)


def _assert_sound(bounds, model: nn.Module, x: torch.Tensor, eps: float, norm: float = 2.0):
    lo, up = _sampled(model, x, eps, norm)
    assert (bounds.lower <= lo + SLACK).all(), (bounds.lower, lo)
    assert (bounds.upper >= up - SLACK).all(), (bounds.upper, up)


def _fresh_equal(bounds, model: nn.Module, x: torch.Tensor, eps, norm: float = 2.0, **kw):
    with torch.no_grad():
        fresh = crown_bounds(model, x, eps, norm=norm, **kw)
    torch.testing.assert_close(bounds.lower, fresh.lower, rtol=0, atol=1e-12)
    torch.testing.assert_close(bounds.upper, fresh.upper, rtol=0, atol=1e-12)


def _twice(model: nn.Module, change, x: torch.Tensor | None = None, eps: float = 0.1, **kw):
    """Bound, ``change()``, bound again inside one reuse context; the second bound is
    checked against sampling and a fresh call (and must differ from the first)."""
    x = _x() if x is None else x
    with torch.no_grad(), reuse_traces():
        first = crown_bounds(model, x, eps, norm=2, **kw)
        change()
        second = crown_bounds(model, x, eps, norm=2, **kw)
    _assert_sound(second, model, x, eps)
    _fresh_equal(second, model, x, eps, **kw)
    assert not torch.equal(first.upper, second.upper)  # the change matters
    return second


def _sound_or_refused(model: nn.Module, change, x: torch.Tensor | None = None):
    """Like `_twice` for a change a fresh build refuses (its eager check fails): the second
    call inside the context may refuse it too, or return a sound bound."""
    x = _x() if x is None else x
    with torch.no_grad(), reuse_traces():
        crown_bounds(model, x, 0.1, norm=2)
        change()
        try:
            second = crown_bounds(model, x, 0.1, norm=2)
        except LipnetsError:
            return
    _assert_sound(second, model, x, 0.1)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def test_graph_is_kept_without_a_change(monkeypatch):
    """The attacks below exercise a kept graph: without a change, one build serves both."""
    from lipnets.propagation import builder

    runs = []
    real = builder.Builder.run
    monkeypatch.setattr(builder.Builder, "run", lambda self: runs.append(1) or real(self))
    model = _mlp()
    with torch.no_grad(), reuse_traces():
        crown_bounds(model, _x(), 0.1, norm=2)
        crown_bounds(model, _x(seed=3), 0.05, norm=2)
        assert len(runs) == 2  # the batch's graph and its first sample's, which checks it
        with torch.no_grad():
            model[0].weight.add_(1e-3)
        crown_bounds(model, _x(seed=3), 0.05, norm=2)
    assert len(runs) == 4


# -- weights changed between calls ---------------------------------------------------


def test_optimizer_step_between_calls():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def step():
        with torch.enable_grad():
            opt.zero_grad()
            model(_x(seed=5)).square().sum().backward()
            opt.step()

    _twice(model, step)


def test_interval_bounds_conv_memo_after_weight_change():
    """IBP reads the memoised |W| of linear and conv ops (`Affine.memo`)."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    model = _seeded(model.to(DT), 14).eval()
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=DT)
    with torch.no_grad(), reuse_traces():
        first = interval_bounds(model, x, 0.1, norm=2)
        model[0].weight.mul_(-2.0)
        model[3].weight.mul_(3.0)
        second = interval_bounds(model, x, 0.1, norm=2)
        fresh_crown = crown_bounds(model, x, 0.1, norm=2)
    assert not torch.equal(first.upper, second.upper)
    with torch.no_grad():
        fresh = interval_bounds(model, x, 0.1, norm=2)
    torch.testing.assert_close(second.upper, fresh.upper, rtol=0, atol=1e-12)
    torch.testing.assert_close(second.lower, fresh.lower, rtol=0, atol=1e-12)
    _fresh_equal(fresh_crown, model, x, 0.1)
    _assert_sound(second, model, x, 0.1)


def test_data_assignment_and_inplace_data_edit():
    model = _mlp()

    def change():
        model[0].weight.data = model[0].weight.data * 3  # a new storage behind the same Parameter
        model[2].bias.data.add_(1.0)

    _twice(model, change)


def test_load_state_dict_between_calls():
    model, other = _mlp(0), _mlp(7)
    _twice(model, lambda: model.load_state_dict(other.state_dict()))


def test_swapped_submodule():
    model = _mlp()
    _twice(model, lambda: model.__setitem__(2, _seeded(nn.Linear(6, 2).to(DT), 9)))


def test_leaky_relu_slope_and_batchnorm_eps_changed():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.LeakyReLU(0.01), nn.Linear(4, 2))
    model = _seeded(model.to(DT), 3).eval()

    def change():
        model[2].negative_slope = 0.9
        model[1].eps = 10.0

    _twice(model, change)


def test_batchnorm_running_stats_changed():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model = _seeded(model.to(DT), 4).eval()

    def change():
        model[1].running_mean.add_(2.0)
        model[1].running_var.mul_(0.1)

    _twice(model, change)


def test_train_forward_updates_buffers_between_calls():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model = _seeded(model.to(DT), 4).eval()

    def change():
        model.train()
        model(_x(8, seed=9) * 5 + 3)  # running statistics move
        model.eval()

    _twice(model, change)


class _ListHolder(nn.Module):
    """Reads tensors held in a list, a dict and an attribute of a plain object."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = _seeded(nn.Linear(3, 2).to(DT), 5)
        self.ws = [torch.ones(2, dtype=DT)]
        self.named = {"shift": torch.zeros(2, dtype=DT)}
        self.box = type("Box", (), {})()
        self.box.scale = torch.ones(2, dtype=DT)

    def forward(self, x):
        return (self.lin(x) * self.ws[0] + self.named["shift"]) * self.box.scale


def test_tensors_in_list_dict_and_plain_object_edited_in_place():
    model = _ListHolder().eval()

    def change():
        model.ws[0].mul_(3.0)
        model.named["shift"].add_(1.0)
        model.box.scale.mul_(-2.0)  # fx holds this tensor as a constant of the graph module

    _twice(model, change)


def test_tensor_attribute_reassigned():
    class WithExtra(_ListHolder):
        def forward(self, x):
            return self.lin(x) * self.extra

    model = WithExtra().eval()
    model.extra = torch.ones(2, dtype=DT)
    _twice(model, lambda: setattr(model, "extra", torch.full((2,), -4.0, dtype=DT)))


def test_inplace_double_cast_between_calls():
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    _seeded(model, 6)
    x32 = _x().float()
    with torch.no_grad(), reuse_traces():
        crown_bounds(model, x32, 0.1, norm=2)
        model.double()
        with torch.no_grad():
            model[0].weight.mul_(2)
        second = crown_bounds(model, _x(), 0.1, norm=2)
    _fresh_equal(second, model, _x(), 0.1)
    _assert_sound(second, model, _x(), 0.1)


def test_requires_grad_toggle_and_grad_mode_switches():
    model = _mlp()
    x = _x()
    with reuse_traces():
        with torch.no_grad():
            crown_bounds(model, x, 0.1, norm=2)
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            model[0].weight.mul_(1.5)
        d = crown_bounds(model, x, 0.1, norm=2)  # grad on, nothing requires grad
        for p in model.parameters():
            p.requires_grad_(True)
        diff = crown_bounds(model, x, 0.1, norm=2, differentiable=True)
        diff.upper.sum().backward()
        assert model[0].weight.grad is not None
        with torch.no_grad():
            model[0].weight.mul_(-1)
            nd = crown_bounds(model, x, 0.1, norm=2)
    _fresh_equal(nd, model, x, 0.1)
    _assert_sound(nd, model, x, 0.1)
    with torch.no_grad():
        model[0].weight.mul_(-1)
    _fresh_equal(d, model, x, 0.1)
    torch.testing.assert_close(diff.upper.detach(), d.upper, rtol=0, atol=1e-12)


# -- calls that differ -----------------------------------------------------------------


def test_other_batch_values_radii_and_norms():
    model = _mlp()
    with torch.no_grad(), reuse_traces():
        crown_bounds(model, _x(seed=1), 0.05, norm=2)
        radii = torch.tensor([0.01, 0.5, 0.02, 0.3], dtype=DT)
        per_sample = crown_bounds(model, _x(seed=2), radii, norm=2)
        small = crown_bounds(model, _x(seed=3), 0.01, norm=float("inf"))
        large = crown_bounds(model, _x(seed=3), 0.2, norm=float("inf"))
    _fresh_equal(per_sample, model, _x(seed=2), radii)
    _fresh_equal(small, model, _x(seed=3), 0.01, norm=float("inf"))
    _fresh_equal(large, model, _x(seed=3), 0.2, norm=float("inf"))
    _assert_sound(large, model, _x(seed=3), 0.2, norm=float("inf"))


def test_threads_with_copied_context():
    model = _mlp()
    x = _x()
    out: list = []
    with torch.no_grad(), reuse_traces():
        crown_bounds(model, x, 0.1, norm=2)
        with torch.no_grad():
            model[0].weight.mul_(2.0)

        def work():
            with torch.no_grad():
                out.append(crown_bounds(model, x, 0.1, norm=2))

        threads = [
            threading.Thread(target=contextvars.copy_context().run, args=(work,)) for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(out) == 3
    for b in out:
        _fresh_equal(b, model, x, 0.1)
        _assert_sound(b, model, x, 0.1)


def test_alpha_crown_inside_reuse():
    model = _mlp(2)
    x = _x()
    with torch.no_grad(), reuse_traces():
        crown_bounds(model, x, 0.3, norm=2)
        with torch.no_grad():
            model[2].weight.mul_(-1.0)
        alpha = crown_bounds(model, x, 0.3, norm=2, optimize=5)
    fresh = crown_bounds(model, x, 0.3, norm=2, optimize=5)
    torch.testing.assert_close(alpha.lower, fresh.lower, rtol=0, atol=1e-12)
    _assert_sound(alpha, model, x, 0.3)


def test_verify_inside_reuse_matches_outside():
    model = _mlp(3)
    x = _x()
    y = model(x).argmax(1).detach()
    kw = dict(norm=2, optimize=3, split_steps=2, time_limit=20.0, max_nodes=40, attack=False)
    with torch.no_grad(), reuse_traces():
        crown_bounds(model, x, 0.4, norm=2)
        with torch.no_grad():
            model[0].weight.mul_(0.7)
        inside = verify(model, x, y, 0.4, **kw)
    outside = verify(model, x, y, 0.4, **kw)
    assert inside.status == outside.status
    assert "verified" in inside.status
    g = torch.Generator().manual_seed(3)
    for i, s in enumerate(inside.status):  # a verified input has no sampled point that flips
        if s == "verified":
            u = F.normalize(torch.randn(400, 3, generator=g, dtype=DT), dim=1)
            pts = x[i] + 0.4 * u * torch.rand(400, 1, generator=g, dtype=DT)
            with torch.no_grad():
                assert (model(pts).argmax(1) == y[i]).all()


def test_certify_crown_batch_size_and_report_skipping():
    model = _mlp(4)
    x = _x(12, seed=4)
    y = model(x).argmax(1).detach()
    y[0] = 1 - y[0]  # one misclassified point
    radii = (0.05, 0.2, 0.6)
    alone = [certify_crown(model, x, y, r, batch_size=1) for r in radii]
    whole = [certify_crown(model, x, y, r, batch_size=100) for r in radii]
    for a, w in zip(alone, whole, strict=True):
        assert torch.equal(a, w)
        assert not a[0]
    before = _state(model)
    report = certification_report(model, x, y, radii, attack=False, batch_size=5)
    _same_state(before, model)
    for k, row in enumerate(report.rows):  # certified here or at a larger radius (its ball)
        expected = torch.stack(alone[k:]).any(0)
        assert row.crown_count == int(expected.sum())
    g = torch.Generator().manual_seed(5)
    for r, cert in zip(radii, alone, strict=True):  # no sampled point flips a certified one
        u = F.normalize(torch.randn(300, 3, generator=g, dtype=DT), dim=1)
        for i in cert.nonzero().flatten().tolist():
            with torch.no_grad():
                assert (model(x[i] + r * u).argmax(1) == y[i]).all()


# -- parametrizations inside the context ---------------------------------------------


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


class _TrainScale(nn.Module):
    def forward(self, w):
        return w * (3.0 if self.training else 1.0)


class _Stepping(nn.Module):
    """Steps a buffer on every read, in eval mode too (as a power iteration would)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=DT))

    def forward(self, w):
        self.count.add_(1.0)
        return w / (1.0 + 0.0 * self.count)


def test_parametrized_original_changes_nested_and_bias():
    model = _mlp(5)
    parametrize.register_parametrization(model[0], "weight", _Double())
    parametrize.register_parametrization(model[0], "weight", _Double())  # nested
    parametrize.register_parametrization(model[2], "bias", _Double())
    before = _state(model)

    def change():
        with torch.no_grad():
            model[0].parametrizations.weight.original.mul_(-3.0)
            model[2].parametrizations.bias.original.add_(5.0)
        before.update(_state(model))

    _twice(model, change)
    _same_state(before, model)


def test_parametrization_by_mode_and_stepping_state():
    model = _mlp(6).train()  # crown_bounds bounds the eval-mode function
    parametrize.register_parametrization(model[0], "weight", _TrainScale())
    parametrize.register_parametrization(model[2], "weight", _Stepping())
    before = _state(model)
    x = _x()
    with torch.no_grad(), reuse_traces():
        first = crown_bounds(model, x, 0.1, norm=2)
        second = crown_bounds(model, x, 0.1, norm=2)
    assert model.training and model[0].parametrizations.weight[0].training
    _same_state(before, model)
    torch.testing.assert_close(first.upper, second.upper, rtol=0, atol=0)
    ref = copy.deepcopy(model).eval()
    _assert_sound(second, ref, x, 0.1)
    _fresh_equal(second, model, x, 0.1)


def test_random_parametrization_refused_inside_reuse():
    class Noisy(nn.Module):
        def forward(self, w):
            return w + 0.1 * torch.randn_like(w)

    model = _mlp(7)
    with torch.no_grad(), reuse_traces():
        crown_bounds(_mlp(8), _x(), 0.1, norm=2)
        parametrize.register_parametrization(model[0], "weight", Noisy())
        with pytest.raises(LipnetsError):
            crown_bounds(model, _x(), 0.1, norm=2)


def test_hook_added_between_calls_refused():
    model = _mlp(9)
    with torch.no_grad(), reuse_traces():
        crown_bounds(model, _x(), 0.1, norm=2)
        handle = model[1].register_forward_hook(lambda m, i, o: o * 0 + 1)
        try:
            with pytest.raises(LipnetsError):
                crown_bounds(model, _x(), 0.1, norm=2)
        finally:
            handle.remove()


def test_torchlip_groupsort_coefficient_changed():
    from deel.torchlip.modules.activation import GroupSort2

    model = nn.Sequential(nn.Linear(3, 4), GroupSort2(), nn.Linear(4, 2)).to(DT).eval()
    _seeded(model, 10)
    _twice(model, lambda: setattr(model[1], "_coefficient_lip", 4.0))


# -- open holes: these fail while the hole is open -------------------------------------


class _ObjScale(nn.Module):
    """A parametrization whose tensor lives on a plain (non-module) object."""

    def __init__(self) -> None:
        super().__init__()
        self.box = type("Box", (), {})()
        self.box.t = torch.tensor(1.0, dtype=DT)

    def forward(self, w):
        return w * self.box.t


def test_hole_parametrization_tensor_on_plain_object_edited_in_place():
    """The parametrization's tensor is neither a parameter, a buffer, nor a module attribute
    (nor an fx constant: the ParametrizationList is run, not traced), so `_state_tensors`
    misses it and the kept graph keeps the realised weight of the first call."""
    model = _mlp(11)
    p = _ObjScale()
    parametrize.register_parametrization(model[0], "weight", p)
    _twice(model, lambda: p.box.t.fill_(-5.0))


class _DictScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = _seeded(nn.Linear(3, 2).to(DT), 12)
        self.cfg = {"scale": 1.0}
        self.scales = [1.0] * 100  # longer than the fingerprint reads by value

    def forward(self, x):
        return self.lin(x) * self.cfg["scale"] * self.scales[5]


def test_hole_dict_attribute_mutated():
    """The fingerprint reads a dict by identity, so the trace is reused with the old
    constant; a fresh build's eager check would refuse it, but the kept graph skips that
    check and returns the bound of the old function."""
    model = _DictScale().eval()
    _sound_or_refused(model, lambda: model.cfg.__setitem__("scale", 5.0))


def test_hole_long_list_attribute_mutated():
    model = _DictScale().eval()
    _sound_or_refused(model, lambda: model.scales.__setitem__(5, -5.0))


class _Strided(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = _seeded(nn.Linear(3, 3).to(DT), 13)

    def forward(self, x):
        return self.lin(x) * (4 - x.stride(0))


def test_hole_kept_graph_for_other_strides():
    """The graph's key is (shape, dtype, device); ``stride`` is metadata the builder freezes
    at the build batch, so a batch of the same shape with other strides reuses it."""
    model = _Strided().eval()
    x = _x(3, 3)
    xt = _x(3, 3, seed=4).t()  # same shape, strides (1, 3)
    with torch.no_grad(), reuse_traces():
        crown_bounds(model, x, 0.1, norm=2)
        second = crown_bounds(model, xt, 0.1, norm=2)
    _assert_sound(second, model, xt, 0.1)


# -- more calls that differ (kept graph, nothing changed) -------------------------------


def test_other_spec_on_a_kept_graph():
    """certify_crown's batches pass another specification each time on one kept graph."""
    model = _mlp(15)
    x = _x()
    specs = [
        torch.tensor([[[1.0, -1.0]]], dtype=DT).expand(4, 1, 2),
        torch.tensor([[[-1.0, 1.0], [2.0, 0.5]]], dtype=DT).expand(4, 2, 2),
    ]
    with torch.no_grad(), reuse_traces():
        kept = [
            fn(model, x, 0.2, norm=2, spec=s)
            for s in specs
            for fn in (crown_bounds, interval_bounds)
        ]
    with torch.no_grad():
        fresh = [
            fn(model, x, 0.2, norm=2, spec=s)
            for s in specs
            for fn in (crown_bounds, interval_bounds)
        ]
    for a, b in zip(kept, fresh, strict=True):
        torch.testing.assert_close(a.lower, b.lower, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.upper, b.upper, rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(4)
    u = F.normalize(torch.randn(300, *x.shape, generator=g, dtype=DT), dim=-1)
    with torch.no_grad():
        outs = torch.stack([model(x + 0.2 * ui) for ui in u])  # (300, 4, 2)
    for s, b in ((specs[0], kept[0]), (specs[1], kept[2])):
        values = torch.einsum("nkc,pnc->pnk", s, outs)
        assert (values >= b.lower - SLACK).all() and (values <= b.upper + SLACK).all()


def test_alpha_crown_twice_on_a_kept_graph_matches_fresh():
    """No optimised slopes carried from one call to the next on a kept graph."""
    model = _mlp(16)
    with torch.no_grad(), reuse_traces():
        crown_bounds(model, _x(seed=1), 0.3, norm=2, optimize=5)
        second = crown_bounds(model, _x(seed=2), 0.3, norm=2, optimize=5)
    fresh = crown_bounds(model, _x(seed=2), 0.3, norm=2, optimize=5)
    torch.testing.assert_close(second.lower, fresh.lower, rtol=0, atol=1e-12)
    _assert_sound(second, model, _x(seed=2), 0.3)


def test_inference_mode_build_then_no_grad_and_differentiable():
    model = _mlp(17)
    x = _x()
    with reuse_traces():
        with torch.inference_mode():
            crown_bounds(model, x, 0.1, norm=2)
        with torch.no_grad():
            model[0].weight.mul_(2.0)
            second = crown_bounds(model, x, 0.1, norm=2)
        diff = crown_bounds(model, x, 0.1, norm=2, differentiable=True)
        diff.upper.sum().backward()
    _fresh_equal(second, model, x, 0.1)
    _assert_sound(second, model, x, 0.1)


def test_load_state_dict_assign_new_parameters():
    model, other = _mlp(0), _mlp(18)
    _twice(model, lambda: model.load_state_dict(other.state_dict(), assign=True))


class _OtherModuleScale(nn.Module):
    """A parametrization that reads an unregistered module kept in a list."""

    def __init__(self, other: nn.Module) -> None:
        super().__init__()
        self.others = [other]

    def forward(self, w):
        return w * self.others[0].weight


def test_hole_parametrization_reads_unregistered_module():
    """Same root cause as the plain-object case: `_state_tensors` walks tensors of the
    module tree (and lists/dicts of tensors), not modules held in a list."""
    model = _mlp(19)
    other = nn.Linear(3, 6, bias=False).to(DT)
    with torch.no_grad():
        other.weight.fill_(1.0)
    parametrize.register_parametrization(model[0], "weight", _OtherModuleScale(other))
    _twice(model, lambda: other.weight.data.mul_(-4.0))


def test_hole_class_forward_patched_between_calls(monkeypatch):
    """A class-level patch is a global change (which `reuse_traces` asks callers not to
    make), but a fresh build refuses it (the eager check on the centres fails), and the
    kept graph, which skips that check, returns the bound of the old function silently."""
    model = _mlp(20)
    patch = lambda: monkeypatch.setattr(nn.ReLU, "forward", lambda self, h: F.relu(h) * 3)  # noqa: E731
    _sound_or_refused(model, patch)


# -- more defended changes ---------------------------------------------------------------


def test_instance_forward_replaced_between_calls_refused():
    model = _mlp(21)
    with torch.no_grad(), reuse_traces():
        crown_bounds(model, _x(), 0.1, norm=2)
        model[1].forward = lambda h: F.relu(h) * 3
        with pytest.raises(LipnetsError, match="replaced on the instance"):
            crown_bounds(model, _x(), 0.1, norm=2)


def test_conv_padding_mode_changed():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2))
    model = _seeded(model.to(DT), 22).eval()
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=DT)
    _twice(model, lambda: setattr(model[0], "padding_mode", "circular"), x=x)


class _ScaledLinear(nn.Linear):
    """A subclass that overrides forward (traced into, not trusted with nn.Linear's rule)."""

    def forward(self, x):
        return F.linear(x, 2 * self.weight, self.bias)


def test_parametrized_subclass_with_forward_original_changed():
    model = nn.Sequential(_ScaledLinear(3, 5), nn.ReLU(), nn.Linear(5, 2)).to(DT).eval()
    _seeded(model, 23)
    parametrize.register_parametrization(model[0], "weight", _Double())
    before = _state(model)

    def change():
        with torch.no_grad():
            model[0].parametrizations.weight.original.mul_(-2.0)
        before.update(_state(model))

    _twice(model, change)
    _same_state(before, model)


def test_parametrization_registered_and_removed_between_calls():
    model = _mlp(24)
    with torch.no_grad(), reuse_traces():
        first = crown_bounds(model, _x(), 0.1, norm=2)
        parametrize.register_parametrization(model[0], "weight", _Double())
        doubled = crown_bounds(model, _x(), 0.1, norm=2)
        _fresh_equal(doubled, model, _x(), 0.1)
        _assert_sound(doubled, model, _x(), 0.1)
        parametrize.remove_parametrizations(model[0], "weight", leave_parametrized=True)
        removed = crown_bounds(model, _x(), 0.1, norm=2)
    assert not torch.equal(first.upper, doubled.upper)
    torch.testing.assert_close(removed.upper, doubled.upper, rtol=0, atol=1e-12)
    _fresh_equal(removed, model, _x(), 0.1)


def test_lipschitz_bound_and_crown_share_a_context_after_a_change():
    from lipnets import lipschitz_bound

    model = _mlp(25)
    with torch.no_grad(), reuse_traces():
        crown_bounds(model, _x(), 0.1, norm=2)
        lipschitz_bound(model, input_shape=(1, 3))
        model[2].weight.mul_(10.0)
        inside = float(lipschitz_bound(model, input_shape=(1, 3)))
        second = crown_bounds(model, _x(), 0.1, norm=2)
    assert inside == float(lipschitz_bound(model, input_shape=(1, 3)))
    _fresh_equal(second, model, _x(), 0.1)
    jac = torch.autograd.functional.jacobian(lambda v: model(v[None])[0], _x(1)[0])
    assert inside >= float(torch.linalg.matrix_norm(jac, ord=2)) - SLACK
