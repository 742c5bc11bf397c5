r"""The attack `lipnets.verify.verify` runs first: PGD on the margins over the ball.

An **estimate**, never a bound: a point it returns proves non-robustness only when a
forward pass gives it a margin $\le 0$, which is what `verify` checks.

# Note [Margin attack]

PGD minimises the margins $(C f)(x')$ over the ball: restart 0 from the centre on the
smallest margin, restart $k \ge 1$ from a random point of the ball on margin $k - 1$ (mod
the number of margins), the targeted attack on each other class in turn. Each step moves
by the sign of the gradient (l-infinity) or the normalised gradient (l2), with a length
falling linearly from $\varepsilon / 2$ to $\varepsilon / (2 \cdot \text{steps})$, and
projects back into the ball; the point of smallest margin over all steps is kept.
Gradients are taken with respect to the input only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["attack_margins"]


def attack_margins(
    model: nn.Module,
    x: Tensor,
    spec: Tensor,
    radius: Tensor,
    norm: float,
    generator: torch.Generator | None = None,
    domain: tuple[Tensor, Tensor] | None = None,
    steps: int = 50,
    restarts: int = 5,
) -> Tensor:
    """The point of the ball around each input (N, ...) with the smallest margin found
    (Note [Margin attack]); ``spec`` (N, R, M) gives the margins, ``radius`` (N,), and
    ``domain`` an optional box ``(lo, hi)`` the points stay in as well."""
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(0)
    n = x.shape[0]
    r = radius.reshape(n, *([1] * (x.ndim - 1)))

    def margins(points: Tensor) -> Tensor:
        scores = model(points).reshape(n, -1, 1).to(spec.dtype)
        return torch.bmm(spec, scores)[..., 0]

    def project(delta: Tensor) -> Tensor:
        if norm == math.inf:
            delta = torch.maximum(torch.minimum(delta, r), -r)
        else:
            size = delta.flatten(1).norm(dim=1).reshape(r.shape)
            delta = delta * torch.clamp(r / size.clamp_min(1e-300), max=1.0)
        if domain is not None:  # clamping towards x (inside the box) stays in the ball
            delta = torch.maximum(torch.minimum(x + delta, domain[1]), domain[0]) - x
        return delta

    with torch.no_grad():
        best = x.clone()
        best_value = margins(x).min(1).values
    for k in range(restarts):
        if k == 0:
            delta = torch.zeros_like(x)
        else:
            u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            delta = project((2 * u - 1) * r)
        for t in range(steps):
            with torch.enable_grad():
                point = (x + delta).detach().requires_grad_(True)
                m = margins(point)
                value = m.min(1).values
                goal = value if k == 0 else m[:, (k - 1) % m.shape[1]]
                (grad,) = torch.autograd.grad(goal.sum(), point)
            with torch.no_grad():
                better = value < best_value
                best = torch.where(better.reshape(r.shape), point.detach(), best)
                best_value = torch.where(better, value.detach(), best_value)
                length = r * (0.5 - 0.5 * t / steps)
                if norm == math.inf:
                    move = grad.sign()
                else:
                    size = grad.flatten(1).norm(dim=1).clamp_min(1e-300)
                    move = grad / size.reshape(r.shape)
                delta = project(delta - length * move)
        with torch.no_grad():
            point = x + delta
            value = margins(point).min(1).values
            better = value < best_value
            best = torch.where(better.reshape(r.shape), point, best)
            best_value = torch.where(better, value, best_value)
    return best
