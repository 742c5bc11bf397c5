"""Seeded verification cases with their exact answers, for checking complete verifiers.

This module holds no tests; ``test_milp.py`` and the branch-and-bound tests import it.

`verification_cases` returns ``count`` (default 200) cases: a small random float64 network
(a ReLU MLP or a MaxMin network: 2-16 inputs, 1-3 hidden layers of width 4-16, 3 or 4
classes; PyTorch's default initialisation with biases drawn from [-0.5, 0.5] so that ReLUs
switch inside the balls), one input ``x`` (1, d), its label ``y`` (the prediction at ``x``),
an l-infinity radius ``eps`` and, for one case in ten, the input domain ``(0, 1)`` with ``x``
inside it (Note [Input domain] in `lipnets.verify.milp`: the verifier under test must use
it). The radius is drawn around the radius CROWN certifies (a log-spaced scan): a fifth of
the cases between 0.3 and 1 times it, the others between 1 and 4 times it, so the set mixes
points CROWN certifies, points only a complete verifier certifies, and falsified points
(seed 0: 64, 62 and 74 of the 200).

Each case carries `milp_verify`'s answer, computed with ``tol=GAP``, ``all_margins=False``
(a sample stops once decided) and ``tighten=False`` (faster on networks this small): a
verified case has every margin's proven lower bound above ``GAP``; a falsified one has a
counterexample confirmed by a forward pass and an exact minimum margin below ``-GAP`` for
the class it falsifies. A radius whose answer is within ``GAP`` of 0, or that the MILP does
not decide within ``NODE_LIMIT`` nodes per margin, is redrawn (four tries, then a new
network), so every answer is decided with room to spare for another verifier's float64 rounding.

The cases are computed once per process (``functools.cache``).
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import torch
from torch import nn

import lipnets
from lipnets.propagation import crown_bounds
from lipnets.verify import milp_verify

DT = torch.float64
GAP = 1e-4
"""Every case's exact minimum margin is at least this far from 0."""
NODE_LIMIT = 300
"""Branch-and-bound nodes per margin; a case the MILP does not decide within them is redrawn
(keeps the set fast; a node budget, unlike a time limit, picks the same cases everywhere)."""


@dataclass(frozen=True)
class Case:
    """One verification problem and its exact answer."""

    name: str
    model: nn.Module
    x: torch.Tensor
    """(1, d) float64."""
    y: torch.Tensor
    """(1,) int64, the model's prediction at ``x``."""
    eps: float
    """The l-infinity radius."""
    domain: tuple[float, float] | None
    """The input box the ball is intersected with, or None."""
    status: str
    """``"verified"`` or ``"falsified"`` (never ``"unknown"``)."""
    margins: torch.Tensor
    """(C,) float64: the exact minimum of f_y - f_j over the ball for the classes the MILP
    solved (NaN at y and for the others)."""
    lower: torch.Tensor
    """(C,) float64: proven lower bounds of those minima (MILP or CROWN; NaN at y)."""
    counterexample: torch.Tensor | None
    """(1, d) for a falsified case: a point of the ball (and domain) where a forward pass
    gives a margin <= 0."""
    crown_verified: bool
    """Whether CROWN alone certifies the case (over the whole ball, ignoring the domain)."""
    milp_seconds: float
    """The time `milp_verify` took."""


def _network(rng: random.Random, maxmin: bool) -> nn.Sequential:
    d = rng.choice([2, 3, 4, 6, 8, 12, 16])
    layers: list[nn.Module] = []
    width_in = d
    for _ in range(rng.randint(1, 3)):
        width = rng.choice([4, 6, 8, 10, 12, 14, 16])
        linear = nn.Linear(width_in, width)
        with torch.no_grad():
            linear.bias.uniform_(-0.5, 0.5)
        layers += [linear, lipnets.MaxMin() if maxmin else nn.ReLU()]
        width_in = width
    layers.append(nn.Linear(width_in, rng.choice([3, 4])))
    return nn.Sequential(*layers).to(DT).eval()


def _margin_bounds(model: nn.Module, x: torch.Tensor, y: int, radii: torch.Tensor):
    """CROWN lower bounds of min_j f_y - f_j for each radius (x repeated)."""
    classes = model(x).shape[1]
    eye = torch.eye(classes, dtype=DT)
    spec = eye[y] - eye[[j for j in range(classes) if j != y]]
    xs = x.expand(radii.shape[0], -1)
    return crown_bounds(model, xs, radii, norm=math.inf, spec=spec).lower.amin(1)


def _crown_radius(model: nn.Module, x: torch.Tensor, y: int) -> float:
    """About the largest radius CROWN certifies (a log-spaced scan, steps of 45 %)."""
    radii = torch.logspace(-4, 1, 32, dtype=DT)
    ok = (_margin_bounds(model, x, y, radii) > 0).nonzero()
    return float(radii[int(ok.max())]) if ok.numel() else 1e-4


@functools.cache
def verification_cases(count: int = 200, seed: int = 0) -> tuple[Case, ...]:
    """``count`` seeded cases with exact MILP answers (see the module docs)."""
    cases: list[Case] = []
    draw = 0
    while len(cases) < count:
        i = len(cases)
        rng = random.Random(f"{seed}-{draw}")  # each draw on its own stream
        draw += 1
        maxmin = i % 2 == 1
        domain = (0.0, 1.0) if i % 10 == 9 else None
        with torch.random.fork_rng():  # the global generator is left as it was
            torch.manual_seed(rng.randrange(2**31))
            model = _network(rng, maxmin)
            d = model[0].in_features
            x = torch.rand(1, d, dtype=DT) if domain else torch.randn(1, d, dtype=DT)
        with torch.no_grad():
            y = int(model(x).argmax())
            radius = _crown_radius(model, x, y)
        for _ in range(4):  # redraw the radius while the answer is too close to 0
            low, high = (0.3, 1.0) if rng.random() < 0.2 else (1.0, 4.0)
            eps = radius * math.exp(rng.uniform(math.log(low), math.log(high)))
            res = milp_verify(
                model,
                x,
                torch.tensor([y]),
                eps,
                domain=domain,
                tol=GAP,
                all_margins=False,
                node_limit=NODE_LIMIT,
                tighten=False,
            )
            if res.status[0] == "verified" or (
                res.status[0] == "falsified" and float(res.min_margin[0]) < -GAP
            ):
                break
        else:
            continue  # a new model instead
        crown_ok = bool((res.crown[0].nan_to_num(nan=math.inf) > 0).all())
        kind = "maxmin" if maxmin else "relu"
        cases.append(
            Case(
                name=f"{i}-{kind}-d{d}-depth{(len(model) - 1) // 2}", model=model, x=x,
                y=torch.tensor([y]), eps=eps, domain=domain, status=res.status[0],
                margins=res.margins[0], lower=res.lower[0],
                counterexample=res.counterexample if res.status[0] == "falsified" else None,
                crown_verified=crown_ok, milp_seconds=float(res.time[0]),
            )
        )  # fmt: skip
    return tuple(cases)
