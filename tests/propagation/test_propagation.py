"""IBP and CROWN: soundness by sampling, CROWN against IBP, specs, exactness at eps = 0.

Every bound is checked against the model evaluated at points of the ball
(l-infinity and l2, boundary included), never against golden numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import lipnets
from lipnets.propagation import Bounds, crown_bounds, interval_bounds
from lipnets.propagation._ops import sorting_network
from tests.helpers import assert_within

from .test_propagation_models import DT, MIXES, ball_points, mlp

NORMS = [2, math.inf]
MODELS_PER_MIX = 100
POINTS = 10_000


pytestmark = pytest.mark.usefixtures("one_thread")


def _tol(bounds: Bounds) -> float:
    scale = float(torch.maximum(bounds.lower.abs(), bounds.upper.abs()).max())
    return 1e-9 * (1.0 + scale)


def _outputs(model: nn.Module, points: torch.Tensor) -> torch.Tensor:
    count, n = points.shape[:2]
    with torch.no_grad(), parametrize.cached():
        y = model(points.reshape(count * n, *points.shape[2:]))
    return y.reshape(count, n, *y.shape[1:])


@pytest.mark.parametrize("norm", NORMS, ids=["l2", "linf"])
@pytest.mark.parametrize("mix", list(MIXES))
def test_bounds_contain_sampled_outputs(mix: str, norm: float) -> None:
    """For 100 random models of the mix, 10 000 points per ball never leave IBP or CROWN bounds,
    and CROWN is never looser than IBP (Note [CROWN never looser than IBP])."""
    looser = 0.0
    for seed in range(MODELS_PER_MIX):
        model, x, eps = MIXES[mix](seed)
        ibp = interval_bounds(model, x, eps, norm=norm)
        crown = crown_bounds(model, x, eps, norm=norm)
        y = _outputs(model, ball_points(x, eps, norm, POINTS))
        assert_within(y, ibp, f"{mix} seed {seed} IBP")
        assert_within(y, crown, f"{mix} seed {seed} CROWN")
        with torch.no_grad():
            centre = model(x)
        assert_within(centre.unsqueeze(0), crown, f"{mix} seed {seed} centre")
        looser = max(
            looser, float((ibp.lower - crown.lower).max()), float((crown.upper - ibp.upper).max())
        )
    assert looser <= 0.0, f"a CROWN bound is looser than IBP's by {looser}"  # exactly never


@pytest.mark.parametrize("norm", NORMS, ids=["l2", "linf"])
@pytest.mark.parametrize("depth", [3, 4])
def test_crown_strictly_tighter_on_deep_mlps(depth: int, norm: float) -> None:
    crown_width = ibp_width = 0.0
    for seed in range(20):
        model, x, eps = mlp(1000 + seed, "relu", depth=depth, n=4)
        crown = crown_bounds(model, x, eps, norm=norm)
        ibp = interval_bounds(model, x, eps, norm=norm)
        crown_width += float((crown.upper - crown.lower).mean())
        ibp_width += float((ibp.upper - ibp.lower).mean())
    assert crown_width < 0.9 * ibp_width


@pytest.mark.parametrize("mix", list(MIXES))
def test_zero_radius_is_the_output(mix: str, dtype: torch.dtype, tol) -> None:
    model, x, _ = MIXES[mix](7)
    model, x = model.to(dtype), x.to(dtype)
    with torch.no_grad():
        y = model(x)
    for fn in (interval_bounds, crown_bounds):
        for norm in NORMS:
            lower, upper = fn(model, x, 0.0, norm=norm)
            assert lower.shape == y.shape == upper.shape
            tol.assert_close(lower, y)
            tol.assert_close(upper, y)


def _margin_spec(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """C with rows e_y - e_j for every j != y: shape (N, classes - 1, classes)."""
    eye = torch.eye(classes, dtype=DT)
    rows = []
    for y in labels.tolist():
        others = [j for j in range(classes) if j != y]
        rows.append(eye[y].expand(len(others), classes) - eye[others])
    return torch.stack(rows)


@pytest.mark.parametrize("norm", NORMS, ids=["l2", "linf"])
def test_spec_bounds_margins_directly(norm: float) -> None:
    direct_width = derived_width = 0.0
    for seed in range(20):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4)
        ).to(DT)
        x = torch.randn(3, 6, dtype=DT)
        labels = torch.randint(4, (3,))
        spec = _margin_spec(labels, 4)
        eps = 0.2
        margins = crown_bounds(model, x, eps, norm=norm, spec=spec)
        assert margins.lower.shape == (3, 3)
        out = crown_bounds(model, x, eps, norm=norm)
        pos, neg = spec.clamp_min(0), spec.clamp_max(0)
        derived_lo = (pos * out.lower.unsqueeze(1) + neg * out.upper.unsqueeze(1)).sum(-1)
        derived_up = (pos * out.upper.unsqueeze(1) + neg * out.lower.unsqueeze(1)).sum(-1)
        tol = _tol(margins)
        assert bool((margins.lower >= derived_lo - tol).all())
        assert bool((margins.upper <= derived_up + tol).all())
        direct_width += float((margins.upper - margins.lower).sum())
        derived_width += float((derived_up - derived_lo).sum())
        points = ball_points(x, eps, norm, POINTS)
        f = _outputs(model, points)
        assert_within(torch.einsum("nrm,cnm->cnr", spec, f), margins, f"spec seed {seed}")
        ibp = interval_bounds(model, x, eps, norm=norm, spec=spec)
        assert_within(torch.einsum("nrm,cnm->cnr", spec, f), ibp, f"IBP spec seed {seed}")
    assert direct_width < derived_width  # merging C into the last layer pays off


def test_spec_shared_by_the_batch_and_per_sample_eps() -> None:
    model, x, _ = mlp(3, "relu", depth=3, n=4)
    spec = torch.randn(5, model[-1].out_features, dtype=DT)
    eps = torch.tensor([0.0, 0.1, 0.2, 0.4], dtype=DT)
    shared = crown_bounds(model, x, eps, norm=2, spec=spec)
    repeated = crown_bounds(model, x, eps, norm=2, spec=spec.expand(4, *spec.shape))
    torch.testing.assert_close(shared.lower, repeated.lower)
    for i in range(4):
        alone = crown_bounds(model, x[i : i + 1], float(eps[i]), norm=2, spec=spec)
        torch.testing.assert_close(alone.lower[0], shared.lower[i])
        torch.testing.assert_close(alone.upper[0], shared.upper[i])
    with torch.no_grad():
        exact = model(x[:1]) @ spec.T
    torch.testing.assert_close(shared.lower[:1], exact)


def test_first_layer_is_exact() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(5, 3).to(DT)
    x = torch.randn(4, 5, dtype=DT)
    centre = layer(x).detach()
    rows = layer.weight.detach()
    for norm, spread in ((2, rows.norm(dim=1)), (math.inf, rows.abs().sum(1))):
        for fn in (interval_bounds, crown_bounds):
            lower, upper = fn(layer, x, 0.3, norm=norm)
            torch.testing.assert_close(lower, centre - 0.3 * spread)
            torch.testing.assert_close(upper, centre + 0.3 * spread)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(6, 2)).to(DT)  # a flattened ball is a ball
    z = torch.randn(2, 2, 3, dtype=DT)
    lower, _ = interval_bounds(flat, z, 0.5, norm=2)
    expected = flat(z).detach() - 0.5 * flat[1].weight.detach().norm(dim=1)
    torch.testing.assert_close(lower, expected)


def _dense(layer: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    zero = torch.zeros(1, *shape, dtype=DT)
    jac = torch.autograd.functional.jacobian(lambda t: layer(t).reshape(-1), zero)
    return jac.reshape(-1, math.prod(shape))


@pytest.mark.parametrize(
    "layer",
    [
        lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", dtype=DT),
        lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1, groups=2, dtype=DT),
        lambda: lipnets.CayleyConv2d(2, 4, 3, dtype=DT),
        lambda: lipnets.CayleyConv2d(2, 8, 3, stride=2, dtype=DT),
        lambda: lipnets.BCOPConv2d(2, 2, 3, dtype=DT),
    ],
    ids=["circular", "strided-groups", "cayley", "cayley-stride2", "bcop"],
)
def test_interval_of_a_convolution_is_exact(layer) -> None:
    """Note [Interval rules]: |K| gives |W| exactly for these convolutions."""
    torch.manual_seed(0)
    layer = layer()
    shape = (2, 4, 4)
    x = torch.randn(3, *shape, dtype=DT)
    dense = _dense(layer, shape)
    with torch.no_grad():
        centre = layer(x).reshape(3, -1)
    lower, upper = interval_bounds(layer, x, 0.25, norm=math.inf)
    spread = 0.25 * dense.abs().sum(1)
    torch.testing.assert_close(lower.reshape(3, -1), centre - spread)
    torch.testing.assert_close(upper.reshape(3, -1), centre + spread)
    lower, _ = interval_bounds(layer, x, 0.25, norm=2)
    if not isinstance(layer, nn.Conv2d) or layer.padding_mode == "zeros":
        torch.testing.assert_close(lower.reshape(3, -1), centre - 0.25 * dense.norm(dim=1))


@pytest.mark.parametrize("n", range(1, 13))
def test_sorting_network_sorts_every_binary_input(n: int) -> None:
    """0-1 principle: a comparator network sorts everything iff it sorts all 0-1 inputs
    (the networks of Note [Comparators as ReLUs])."""
    layers = sorting_network(n)
    codes = torch.arange(2**n)
    values = ((codes.unsqueeze(1) >> torch.arange(n)) & 1).clone()
    for layer in layers:
        wires = [w for pair in layer for w in pair]
        assert len(wires) == len(set(wires))  # disjoint pairs
        for i, j in layer:
            assert i < j
            lo, hi = (
                torch.minimum(values[:, i], values[:, j]),
                torch.maximum(values[:, i], values[:, j]),
            )
            values[:, i], values[:, j] = lo, hi
    assert bool((values[:, 1:] >= values[:, :-1]).all())
    assert len(layers) <= {1: 0, 2: 1, 4: 3, 8: 6}.get(n, n)


def test_sorting_activations_with_other_dims_and_functions() -> None:
    """Comparators along dim -1 on images, and the functional forms, stay sound."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1, dtype=DT)
            self.sort = lipnets.GroupSort(2, dim=-1)
            self.fc = nn.Linear(64, 3, dtype=DT)

        def forward(self, x):
            h = self.sort(self.conv(x))
            h = lipnets.functional.max_min(h, dim=1)
            h = lipnets.functional.group_sort(h, 4, dim=2)
            return self.fc(torch.flatten(h, 1))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 2, 4, 4, dtype=DT)
    for norm in NORMS:
        crown = crown_bounds(model, x, 0.3, norm=norm)
        ibp = interval_bounds(model, x, 0.3, norm=norm)
        y = _outputs(model, ball_points(x, 0.3, norm, POINTS))
        assert_within(y, crown, "crown")
        assert_within(y, ibp, "ibp")


def test_functional_ops_slicing_and_constants() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 8, dtype=DT)
            self.b = nn.Linear(4, 3, dtype=DT)
            self.register_buffer("shift", torch.linspace(-1, 1, 8, dtype=DT))
            self.c = nn.Parameter(torch.randn(2, 3, dtype=DT))
            self.d = nn.Parameter(torch.randn(2, dtype=DT))

        def forward(self, x):
            h = torch.relu(self.a(x) * 2.0 - self.shift)
            h = h.view(x.size(0), 2, 4).transpose(1, 2).reshape(x.size(0), -1)
            left, right = h.chunk(2, dim=1)
            h = torch.cat([left - 0.5 * right, torch.ones_like(left)], dim=1)[:, 2:6]
            h = torch.nn.functional.pad(h, (1, 1), value=0.25).relu()
            out = self.b(h[:, 1:5]) / 3.0 + h.mean(dim=1, keepdim=True)
            return F.linear(out, self.c, self.d) - out.sum(1, keepdim=True)

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(3, 6, dtype=DT)
    for norm in NORMS:
        for fn in (crown_bounds, interval_bounds):
            bounds = fn(model, x, 0.4, norm=norm)
            y = _outputs(model, ball_points(x, 0.4, norm, POINTS))
            assert_within(y, bounds, fn.__name__)


@pytest.mark.parametrize("norm", NORMS, ids=["l2", "linf"])
@pytest.mark.parametrize(
    "mix", ["linear_groupsort4", "linear_fullsort", "cat", "bcop", "batchnorm", "residual"]
)
def test_every_node_stays_within_its_bounds(mix: str, norm: float) -> None:
    """The intermediate bounds (ReLU inputs, comparator differences) that CROWN relaxes
    and local_lipschitz reads are sound too, not only the outputs."""
    from lipnets.propagation.graph import build, evaluate
    from lipnets.propagation.lirpa import Propagator, check_args, session

    for seed in range(10):
        model, x, eps = MIXES[mix](seed)
        x, radius = check_args(model, x, eps)
        with session(model):
            graph = build(model, x)
            prop = Propagator(graph, x, radius, float(norm), crown=True).run()
            points = ball_points(x, eps, norm, 2000)
            values = evaluate(graph.nodes, points.reshape(-1, *x.shape[1:]))
        for node, value in zip(graph.nodes, values, strict=True):
            value = value.reshape(2000, *prop.lows[node.index].shape)
            bounds = Bounds(prop.lows[node.index], prop.ups[node.index])
            assert_within(value, bounds, f"{mix} seed {seed} node {node.index} ({node.where})")


def _other_model(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    if kind == "conv1d-reflect":
        body = nn.Sequential(nn.Conv1d(2, 3, 3, padding=2, padding_mode="reflect"), nn.ReLU())
        shape: tuple[int, ...] = (2, 6)
    elif kind == "conv1d-replicate-stride":
        body = nn.Sequential(nn.Conv1d(1, 2, 3, stride=2, padding=1, padding_mode="replicate"))
        shape = (1, 7)
    elif kind == "conv2d-same-even":
        body = nn.Sequential(nn.Conv2d(1, 2, 4, padding="same"), nn.ReLU(), nn.PixelShuffle(1))
        shape = (1, 4, 5)
    elif kind == "conv2d-circular-wraps":  # a kernel wider than the input: taps fold together
        body = nn.Sequential(nn.Conv2d(1, 2, 5, padding=2, padding_mode="circular"), nn.ReLU())
        shape = (1, 3, 3)
    else:
        body = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.ChannelShuffle(2))
        shape = (1, 3, 3, 3)
    return nn.Sequential(*body, nn.Flatten(), nn.LazyLinear(2)), shape


@pytest.mark.parametrize(
    "kind",
    [
        "conv1d-reflect",
        "conv1d-replicate-stride",
        "conv2d-same-even",
        "conv2d-circular-wraps",
        "conv3d",
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_other_convolutions_and_shuffles(kind: str) -> None:
    for seed in range(4):
        torch.manual_seed(seed)
        model, shape = _other_model(kind)
        x = torch.randn(2, *shape)
        model(x)  # initialise the lazy layer
        model = model.to(DT).eval()
        x = x.to(DT)
        for norm in NORMS:
            points = ball_points(x, 0.3, norm, POINTS)
            y = _outputs(model, points)
            for fn in (interval_bounds, crown_bounds):
                assert_within(y, fn(model, x, 0.3, norm=norm), f"{kind} {fn.__name__}")
