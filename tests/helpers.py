"""Test-only tools: dense operators in float64 and empirical Lipschitz ascent.

These give *lower* values (the exact norm of a linear map, or the largest
slope found on a nonlinear one) against which lipnets' sound bounds are
checked. They are deliberately independent of lipnets' own code.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

import lipnets


def dense_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """Jacobian of ``fn`` at ``x`` (one batch) as a (numel_out, numel_in) float64 matrix."""
    x = x.detach().double()
    jac = torch.autograd.functional.jacobian(lambda t: fn(t).reshape(-1), x)
    return jac.reshape(-1, x.numel())


def spectral_norm(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix.double(), ord=2))


def gnp_mlp(width: int = 16) -> nn.Sequential:
    """A gradient-norm-preserving MLP: four square BjorckLinear layers, GroupSort(2) between."""
    layers: list[nn.Module] = []
    for i in range(4):
        layers.append(lipnets.BjorckLinear(width, width))
        if i < 3:
            layers.append(lipnets.GroupSort(2))
    return nn.Sequential(*layers)


def as_float64(module: nn.Module) -> nn.Module:
    """A float64 copy computing the *same* function as ``module`` does now.

    Parametrized weights are frozen at the value they realise (torch's own
    ``remove_parametrizations``) before the cast: casting the raw parameters
    instead would recompute, say, an orthogonalisation in float64 and test a
    different weight from the one the module uses.
    """
    module = copy.deepcopy(module)
    for sub in list(module.modules()):
        if parametrize.is_parametrized(sub):
            # deepcopy shares parametrize's generated class with the original, and
            # remove_parametrizations edits that class: give the copy its own.
            cls = type(sub)
            sub.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            for name in list(sub.parametrizations.keys()):
                parametrize.remove_parametrizations(sub, name, leave_parametrized=True)
    return module.double()


def max_jacobian_norm(fn, points: torch.Tensor) -> float:
    """Largest Jacobian spectral norm of the per-sample map over ``points`` (B, ...)."""
    best = 0.0
    for p in points:
        best = max(best, spectral_norm(dense_jacobian(fn, p.unsqueeze(0))))
    return best


def lipschitz_ascent(
    fn, input_shape: tuple[int, ...], *, starts: int = 16, steps: int = 60, seed: int = 0
) -> float:
    """Largest ||f(x) - f(y)|| / ||x - y|| found by gradient ascent over pairs.

    ``input_shape`` is one sample's shape with a batch dimension of 1. Pairs
    start at random points with small and large gaps; the ratio is maximised
    with Adam in float64, and the Jacobian norm at the best points is included.
    Always a lower bound on the true Lipschitz constant.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (starts, *input_shape[1:])
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).requires_grad_()
    scales = torch.logspace(-3, 0, starts, dtype=torch.float64).reshape(-1, *[1] * (len(shape) - 1))
    d = (torch.randn(shape, generator=g, dtype=torch.float64) * scales).requires_grad_()
    opt = torch.optim.Adam([x, d], lr=0.05)
    best = torch.zeros(starts, dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        num = (fn(x + d) - fn(x)).reshape(starts, -1).norm(dim=1)
        den = d.reshape(starts, -1).norm(dim=1).clamp_min(1e-12)
        ratio = num / den
        best = torch.maximum(best, ratio.detach())
        (-ratio.sum()).backward()
        opt.step()
    top = x.detach()[best.argsort(descending=True)[:4]]
    return max(float(best.max()), max_jacobian_norm(fn, top))


def trained_digits_model(
    activation: type[nn.Module], margin: float, train_size: int, steps: int = 80
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 64-64-64-10 BjorckLinear network with ``activation`` trained on scikit-learn's
    digits (pixels in [0, 1], seeded split, ``steps`` full-batch Adam steps of the
    multiclass hinge loss), then frozen in float64 with its held-out inputs and labels:
    certificates and attacks then see the same float64 function."""
    from sklearn.datasets import load_digits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load_digits()
        x = torch.tensor(data.data / 16.0, dtype=torch.float32)
        y = torch.tensor(data.target)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        train, test = perm[:train_size], perm[train_size:]
        torch.manual_seed(0)
        model = nn.Sequential(
            lipnets.BjorckLinear(64, 64), activation(), lipnets.BjorckLinear(64, 64),
            activation(), lipnets.BjorckLinear(64, 10),
        )  # fmt: skip
        loss_fn = lipnets.losses.MulticlassHingeLoss(margin=margin)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(steps):
            loss = loss_fn(model(x[train]), y[train])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return as_float64(model.eval()), x[test].double(), y[test]


class Fn(nn.Module):
    """A model that runs one function (a lambda or a def), for tracing tests."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def assert_within(y: torch.Tensor, bounds, what: str) -> None:
    """Every sampled output ``y`` (..., N, M) within ``bounds`` (N, M), to 1e-9 relative."""
    scale = float(torch.maximum(bounds.lower.abs(), bounds.upper.abs()).max())
    tol = 1e-9 * (1.0 + scale)
    below = float((bounds.lower - y).max())
    above = float((y - bounds.upper).max())
    assert below <= tol and above <= tol, (
        f"{what}: a point leaves the bounds by {max(below, above)}"
    )
