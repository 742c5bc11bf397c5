"""α-CROWN (`crown_bounds(..., optimize=...)`): sound, never looser than CROWN, tighter.

Soundness is checked by sampling in float64 (corners and uniform points of l-infinity
balls, sphere and interior points of l2 balls) and by PGD on each output bound.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lipnets
from lipnets.propagation import crown_bounds
from tests.helpers import assert_within

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.block = nn.Sequential(nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12))
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(torch.relu(h + self.block(h)))


def _models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "mlp": (
            nn.Sequential(
                nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
            ),
            (6,),
        ),
        "leaky": (
            nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.1), nn.Linear(16, 3)),
            (6,),
        ),
        "maxmin": (
            nn.Sequential(
                nn.Linear(6, 16),
                lipnets.MaxMin(),
                nn.Linear(16, 16),
                lipnets.GroupSort(4),
                nn.Linear(16, 3),
            ),
            (6,),
        ),
        "cnn": (
            nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(4, 4, 3, stride=2),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(16, 3),
            ),
            (1, 5, 5),
        ),
        "residual": (Residual(), (6,)),
        "smooth": (
            nn.Sequential(
                nn.Linear(6, 16),
                nn.Tanh(),
                nn.Linear(16, 16),
                nn.GELU(),
                nn.Linear(16, 16),
                nn.Sigmoid(),
                nn.Linear(16, 3),
            ),
            (6,),
        ),
    }


MODELS = _models()


def _points(x: torch.Tensor, eps: float, norm: float, count: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (count, *x.shape)
    if norm == math.inf:
        u = torch.rand(shape, generator=g, dtype=DT) * 2 - 1
        u[: count // 2] = u[: count // 2].sign()  # corners
        return x + eps * u
    u = torch.randn(shape, generator=g, dtype=DT)
    u = u / u.flatten(2).norm(dim=2).reshape(count, x.shape[0], *([1] * (x.ndim - 1)))
    scale = torch.rand((count, x.shape[0]) + (1,) * (x.ndim - 1), generator=g, dtype=DT)
    scale[: count // 2] = 1.0  # the sphere
    return x + eps * u * scale


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("norm", [math.inf, 2.0])
def test_sound_and_never_looser_than_crown(name, norm):
    model, shape = MODELS[name]
    model = model.to(DT).eval()
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    eps = 0.15 if norm == math.inf else 0.4
    crown = crown_bounds(model, x, eps, norm=norm)
    alpha = crown_bounds(model, x, eps, norm=norm, optimize=10)
    assert (alpha.lower >= crown.lower).all() and (alpha.upper <= crown.upper).all()
    points = _points(x, eps, norm, 256)
    with torch.no_grad():
        y = model(points.reshape(-1, *shape)).reshape(256, 4, -1)
    assert_within(y, alpha, f"{name} alpha-CROWN")


def test_tighter_than_crown_and_improves_with_steps():
    model, _ = MODELS["mlp"]
    model = model.to(DT).eval()
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=DT)
    widths = []
    for steps in (0, 5, 30):
        b = crown_bounds(model, x, 0.3, norm=math.inf, optimize=steps)
        widths.append(float((b.upper - b.lower).sum()))
    assert widths[1] < widths[0] and widths[2] <= widths[1]
    assert widths[2] < 0.97 * widths[0]  # measured 0.89 on this model


def test_optimize_zero_is_crown_bitwise():
    model, shape = MODELS["maxmin"]
    model = model.to(DT).eval()
    x = torch.randn(3, *shape, dtype=DT)
    a = crown_bounds(model, x, 0.2, norm=2, optimize=0)
    b = crown_bounds(model, x, 0.2, norm=2)
    assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper)


def test_spec_rows_sound_and_tighter_against_pgd():
    model, shape = MODELS["mlp"]
    model = model.to(DT).eval()
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(4), dtype=DT)
    spec = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]], dtype=DT)
    eps = 0.25
    crown = crown_bounds(model, x, eps, norm=math.inf, spec=spec)
    alpha = crown_bounds(model, x, eps, norm=math.inf, spec=spec, optimize=20)
    assert (alpha.lower >= crown.lower).all() and (alpha.upper <= crown.upper).all()
    assert float((alpha.upper - alpha.lower).sum()) < float((crown.upper - crown.lower).sum())
    # PGD on each row, both directions: the attacked values never cross the bounds
    delta = torch.zeros(2, 2, *x.shape, dtype=DT, requires_grad=True)  # (direction, row, ...)
    opt = torch.optim.Adam([delta], lr=0.05)

    def attacked() -> torch.Tensor:
        point = x + eps * torch.tanh(delta)
        rows = model(point.reshape(-1, *shape)).reshape(2, 2, 5, 3) @ spec.T  # (d, k, N, R)
        return torch.stack([rows[:, k, :, k] for k in range(2)], -1)  # (d, N, R)

    for _ in range(150):
        values = attacked()
        opt.zero_grad()
        (values[0].sum() - values[1].sum()).backward()
        opt.step()
    with torch.no_grad():
        values = attacked()
    assert (values[0] >= alpha.lower - 1e-9).all() and (values[1] <= alpha.upper + 1e-9).all()


def test_slopes_stay_in_unit_interval_after_steps():
    from lipnets.propagation.alpha import optimized_bounds
    from lipnets.propagation.checks import check_args, session
    from lipnets.propagation.graph import build
    from lipnets.propagation.propagator import Propagator

    model, shape = MODELS["mlp"]
    model = model.to(DT).eval()
    x, radius = check_args(model, torch.randn(3, *shape, dtype=DT), 0.5)
    with session(model):
        graph = build(model, x, radius, math.inf)
        ref = [Propagator(graph, x, radius, math.inf, True).run()]
        eye = torch.eye(3, dtype=DT).expand(3, 3, 3)
        _, _, prop = optimized_bounds(ref, graph.output, eye, 25, 5.0)  # a large step
    assert prop.alphas
    for alpha in prop.alphas.values():
        assert float(alpha.detach().min()) >= 0.0 and float(alpha.detach().max()) <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"optimize": -1}, ValueError, "optimize must be"),
        ({"optimize": 2.5}, ValueError, "optimize must be"),
        ({"optimize": 5, "lr": 0.0}, ValueError, "lr must be"),
        ({"optimize": 5, "lr": float("nan")}, ValueError, "lr must be"),
        ({"optimize": 5, "differentiable": True}, ValueError, "cannot be combined"),
    ],
)
def test_errors(kwargs, error, text):
    model, shape = MODELS["mlp"]
    model = model.to(DT)
    with pytest.raises(error, match=text):
        crown_bounds(model, torch.randn(2, *shape, dtype=DT), 0.1, norm=2, **kwargs)


def test_certify_crown_alpha_method_certifies_a_superset():
    from lipnets.certify import certify_crown

    model, shape = MODELS["maxmin"]
    model = model.to(DT).eval()
    x = torch.randn(40, *shape, generator=torch.Generator().manual_seed(6), dtype=DT)
    y = model(x).argmax(1)
    for eps in (0.05, 0.15):
        crown = certify_crown(model, x, y, eps, norm=math.inf)
        alpha = certify_crown(model, x, y, eps, norm=math.inf, method="alpha-crown")
        assert bool((alpha | ~crown).all())
