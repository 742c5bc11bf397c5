"""lipnets.graft: graft_mask scores and counts (Note [Grafting scores]), graft swaps modules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lipnets.graft import SCORES, graft, graft_mask
from lipnets.nn import GraftedReLU
from lipnets.propagation import crown_bounds
from lipnets.propagation.checks import check_args, session
from lipnets.propagation.graph import build
from lipnets.propagation.ops_base import ReLU
from lipnets.propagation.propagator import Propagator

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)
    ).double()


def _calib(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 5, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _independent_scores(model: nn.Sequential, x: torch.Tensor, eps: float, norm: float):
    """Instability and mean |pre-activation| of each ReLU, from crown_bounds of the model
    cut just before it and from its forward pass (not from graft_mask's code)."""
    u, m = [], []
    for i in (1, 3):
        head = model[:i]
        bounds = crown_bounds(head, x, eps, norm=norm)
        u.append(((bounds.lower < 0) & (bounds.upper > 0)).to(DT).mean(0))
        with torch.no_grad():
            m.append(head(x).abs().mean(0))
    return torch.cat(u), torch.cat(m)


@pytest.mark.parametrize("score", ["instability", "insignificance", "combined"])
@pytest.mark.parametrize("norm", [2, math.inf])
def test_masks_are_the_top_scores_ranked_globally(score: str, norm: float) -> None:
    model, x = _mlp(), _calib()
    eps = 0.5 if norm == 2 else 0.15
    ratio = 0.4
    mask = graft_mask(model, x, eps, norm=norm, ratio=ratio, score=score)
    assert list(mask) == ["1", "3"]
    assert mask["1"].shape == (12,) and mask["3"].shape == (10,)
    assert mask["1"].dtype == torch.bool
    u, m = _independent_scores(model, x, eps, norm)
    assert 0 < float(u.mean()) < 1  # some neurons are unstable, not all
    q = 1 - m / m.max()
    value = {"instability": u, "insignificance": q, "combined": u + q}[score]
    order = torch.sort(value, descending=True, stable=True).indices
    want = torch.zeros(22, dtype=torch.bool)
    want[order[: round(ratio * 22)]] = True
    assert torch.equal(torch.cat([mask["1"], mask["3"]]), want)
    chosen, left = value[want], value[~want]
    assert float(chosen.min()) >= float(left.max())


def test_chunks_of_the_calibration_batch_give_the_same_mask() -> None:
    model, x = _mlp(), _calib(24)
    eps = torch.linspace(0.1, 0.6, 24, dtype=DT)  # one radius per input, sliced per chunk
    whole = graft_mask(model, x, eps, norm=2, ratio=0.5)
    parts = graft_mask(model, x, eps, norm=2, ratio=0.5, batch_size=5)
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 0.75, 0.99, 1.0])
@pytest.mark.parametrize("score", SCORES)
def test_exactly_round_ratio_times_n_neurons(ratio: float, score: str) -> None:
    mask = graft_mask(_mlp(1), _calib(8), 0.2, norm=2, ratio=ratio, score=score)
    assert sum(int(v.sum()) for v in mask.values()) == round(ratio * 22)  # 0.75: 16.5 -> 16


def test_random_masks_come_from_the_generator() -> None:
    model, x = _mlp(), _calib(4)

    def draw(seed: int | None):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        mask = graft_mask(model, x, 0.1, norm=2, ratio=0.5, score="random", generator=gen)
        return torch.cat(list(mask.values()))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    assert torch.equal(draw(None), draw(0))  # the default: seeded with 0


def test_convolutional_masks_are_per_channel_and_position() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4)
    ).double()
    x = torch.randn(6, 2, 4, 4, dtype=DT)
    mask = graft_mask(model, x, 0.1, norm=math.inf, ratio=0.5)
    assert mask["1"].shape == (3, 4, 4) and int(mask["1"].sum()) == 24
    grafted = graft(model, mask)
    assert isinstance(grafted[1], GraftedReLU) and grafted[1].shape == (3, 4, 4)
    with torch.no_grad():
        z = model[0](x)
        want = model[3](torch.where(mask["1"], 0.4 * z, torch.relu(z)).flatten(1))
        assert torch.allclose(grafted(x), want, rtol=1e-12, atol=1e-12)


def test_graft_replaces_the_named_relus_in_a_copy() -> None:
    model, x = _mlp(), _calib(5)
    mask = {"1": torch.zeros(12, dtype=torch.bool), "3": torch.ones(10, dtype=torch.bool)}
    grafted = graft(model, mask)
    assert type(model[1]) is nn.ReLU and type(model[3]) is nn.ReLU  # untouched
    assert isinstance(grafted[1], GraftedReLU) and isinstance(grafted[3], GraftedReLU)
    assert grafted[3].slope.dtype == DT and grafted[0].weight is not model[0].weight
    with torch.no_grad():
        h = torch.relu(model[2](torch.relu(model[0](x))))  # the first one is still relu
        assert torch.equal(grafted[1](model[0](x)), torch.relu(model[0](x)))
        want = model[4](0.4 * model[2](torch.relu(model[0](x))))
        assert torch.allclose(grafted(x), want, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(grafted(x), model[4](h))
    none = graft(model, {"1": torch.zeros(12, dtype=torch.bool)})
    assert torch.equal(none(x), model(x))
    capped = graft(model, mask, max_slope=0.25)
    assert capped[3].max_slope == 0.25 and float(capped[3].lipschitz_bound()) == 0.25


def test_grafting_unstable_neurons_removes_them_from_what_crown_relaxes() -> None:
    """The first ReLU's pre-activation bounds do not depend on any graft, so its count of
    inexact (unstable) entries drops by exactly the unstable neurons grafted there."""
    model, x = _mlp(), _calib(12)
    eps = 0.4
    mask = graft_mask(model, x, eps, norm=2, ratio=0.3, score="instability")

    def unstable(net: nn.Module) -> torch.Tensor:
        xr, radius = check_args(net, x, eps)
        with session(net):
            graph = build(net, xr, radius, 2.0)
            prop = Propagator(graph, xr, radius, 2.0, crown=True).run()
        node = next(nd for nd in graph.nodes if isinstance(nd.op, ReLU))
        i = node.inputs[0]
        return node.op.inexact(prop.lows[i], prop.ups[i])

    before, after = unstable(model), unstable(graft(model, mask))
    assert torch.equal(after, before & ~mask["1"])
    assert int((before & mask["1"]).sum()) > 0


def test_errors_name_the_argument() -> None:
    model, x = _mlp(), _calib(3)
    with pytest.raises(ValueError, match=r"ratio must be finite and in \[0, 1\]"):
        graft_mask(model, x, 0.1, norm=2, ratio=1.5)
    with pytest.raises(ValueError, match="score must be one of"):
        graft_mask(model, x, 0.1, norm=2, ratio=0.5, score="magnitude")
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        graft_mask(model, x, 0.1, norm=2, ratio=0.5, score="random", generator=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="norm must be"):
        graft_mask(model, x, 0.1, norm=1, ratio=0.5)
    with pytest.raises(TypeError, match="dtype"):
        graft_mask(model, x.float(), 0.1, norm=2, ratio=0.5)
    with pytest.raises(ValueError, match=r"calls no nn\.ReLU"):
        graft_mask(nn.Sequential(nn.Linear(5, 2)).double(), x, 0.1, norm=2, ratio=0.5)
    shared = nn.ReLU()
    twice = nn.Sequential(nn.Linear(5, 5), shared, nn.Linear(5, 5), shared).double()
    with pytest.raises(ValueError, match="called more than once"):
        graft_mask(twice, x, 0.1, norm=2, ratio=0.5)
    with pytest.raises(ValueError, match="is also registered as"):
        graft(twice, {"1": torch.zeros(5, dtype=torch.bool)})
    with pytest.raises(ValueError, match="'9', which is not a submodule"):
        graft(model, {"9": torch.zeros(3, dtype=torch.bool)})
    with pytest.raises(TypeError, match=r"'0', which is a Linear, not an nn\.ReLU"):
        graft(model, {"0": torch.zeros(3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="mask must be a dict"):
        graft(model, [torch.zeros(12, dtype=torch.bool)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        graft("model", {})  # type: ignore[arg-type]
