r"""Train a Wasserstein critic between two 2-D samples and check it against exact OT.

The critic (``critic`` in `zoo.models`: BjorckLinear + GroupSort, one output)
maximises the Kantorovich–Rubinstein objective $\bar f_P - \bar f_Q$ over the
two samples, full batch, with `lipnets.losses.KRLoss`.
`lipnets.certify.wasserstein_estimate` divides that objective by the critic's
sound bound, which makes it a lower bound on the Wasserstein-1 distance
between the two samples. It is printed next to the exact distance of the same
samples from POT (`ot.emd2` on the Euclidean cost matrix) and the median
gradient norm of the critic on the data (an optimal potential has gradient
norm 1 almost everywhere on the transport rays).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import lipnets
from lipnets.certify import wasserstein_estimate
from lipnets.losses import KRLoss
from zoo import cards, data, models
from zoo.errors import ZooError

__all__ = ["CriticConfig", "WassersteinResult", "exact_w1", "gradient_norms", "train_critic"]


@dataclass(frozen=True)
class CriticConfig:
    """Options of ``python -m zoo wasserstein``.

    Attributes:
        p: the 2-D distribution scored high (KR label 1), a name of `zoo.data.DISTRIBUTIONS`.
        q: the distribution scored low.
        samples: samples drawn from each.
        steps: full-batch Adam steps.
        lr: peak learning rate (cosine decay to 0).
        seed: seed of the samples (``seed`` for P, ``seed + 1`` for Q) and of the critic.
    """

    p: str = "8gaussians"
    q: str = "gaussian"
    samples: int = 2000
    steps: int = 500
    lr: float = 5e-3
    seed: int = 0


@dataclass(frozen=True)
class WassersteinResult:
    estimate: float
    exact: float
    relative_gap: float
    median_gradient_norm: float
    lipschitz_bound: float
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def exact_w1(x_p: Tensor, x_q: Tensor) -> float:
    """The exact Wasserstein-1 distance between two uniform empirical samples (POT, float64)."""
    try:
        import ot
    except ImportError:
        raise ZooError(
            "python -m zoo wasserstein needs POT for the exact distance: pip install pot"
        ) from None
    a = x_p.detach().double().cpu().numpy()
    b = x_q.detach().double().cpu().numpy()
    cost = ot.dist(a, b, metric="euclidean")
    weights_a = ot.unif(a.shape[0])
    weights_b = ot.unif(b.shape[0])
    return float(ot.emd2(weights_a, weights_b, cost, numItermax=10_000_000))


def gradient_norms(critic: nn.Module, x: Tensor) -> Tensor:
    """l2 norm of the critic's input gradient at every sample (eval mode), flattened per sample."""
    was_training = critic.training
    critic.eval()
    points = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(points).sum(), points)
    critic.train(was_training)
    return grad.flatten(1).norm(dim=1).detach()


def train_critic(
    config: CriticConfig,
    options: dict[str, Any] | None = None,
    *,
    progress: bool = False,
) -> tuple[nn.Module, Tensor, Tensor, WassersteinResult]:
    """Draw the two samples, train the critic full batch, and measure it.

    Returns:
        ``(critic, x_p, x_q, result)``; the critic is in eval mode.
    """
    x_p = data.sample(config.p, config.samples, seed=config.seed)
    x_q = data.sample(config.q, config.samples, seed=config.seed + 1)
    torch.manual_seed(config.seed)
    critic = models.build("critic", input_shape=(2,), num_outputs=1, **(options or {}))
    x = torch.cat([x_p, x_q])
    labels = torch.cat([torch.ones(config.samples), torch.zeros(config.samples)])
    loss_fn = KRLoss(positive_fraction=0.5)
    optimizer = torch.optim.Adam(critic.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    steps: Any = range(config.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="critic", unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    critic.train()
    for step in steps:
        loss = loss_fn(critic(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if progress and step % 50 == 0:
            steps.set_postfix(objective=f"{-float(loss):.4f}")
    seconds = time.perf_counter() - start
    critic.eval()
    estimate = wasserstein_estimate(critic, x_p, x_q)
    bound = float(lipnets.lipschitz_bound(critic, input_shape=(1, 2)))
    exact = exact_w1(x_p, x_q)
    median = float(gradient_norms(critic, x).median())
    result = WassersteinResult(
        estimate=estimate,
        exact=exact,
        relative_gap=(exact - estimate) / exact if exact > 0 else 0.0,
        median_gradient_norm=median,
        lipschitz_bound=bound,
        seconds=seconds,
    )
    return critic, x_p, x_q, result


def write_run(
    out: str | Path,
    name: str,
    critic: nn.Module,
    x_p: Tensor,
    x_q: Tensor,
    config: CriticConfig,
    result: WassersteinResult,
    *,
    options: dict[str, Any],
    command: str,
) -> Path:
    """Checkpoint, card (``card.json``) and contour plot (``contour.png``) of a critic run.

    Written whole into ``out/name`` (or ``out/name-2``, ... when taken) by
    `zoo.runs.write_run_folder`, never over an earlier run; returns the folder.
    """
    from zoo import plots, runs

    arch = cards.architecture("critic", options, (2,), 1)

    def checkpoint(path: Path) -> None:
        cards.save_checkpoint(path, critic, arch)

    def card(path: Path) -> None:
        fields = {
            "model": "critic",
            "options": arch["options"],
            "data": {"p": config.p, "q": config.q, "samples": config.samples, "seed": config.seed},
            "training": asdict(config),
            "wasserstein_estimate": result.estimate,
            "exact_w1": result.exact,
            "relative_gap": result.relative_gap,
            "median_gradient_norm": result.median_gradient_norm,
            "lipschitz_bound": result.lipschitz_bound,
            "train_seconds": result.seconds,
            **cards.provenance(path.parent, command),
        }
        cards.write_card(path.parent, fields)

    def plot(path: Path) -> None:
        plots.critic_contour(
            path,
            critic,
            x_p,
            x_q,
            title=f"critic: W1 estimate {result.estimate:.4f}, exact {result.exact:.4f}",
            labels=(f"P = {config.p}", f"Q = {config.q}"),
        )

    return runs.write_run_folder(
        out, name, [(cards.WEIGHTS, checkpoint), (cards.CARD, card), ("contour.png", plot)]
    )
