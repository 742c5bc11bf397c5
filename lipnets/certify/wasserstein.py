r"""A certified lower bound on the Wasserstein-1 distance from a trained critic.

`wasserstein_estimate` divides the Kantorovich–Rubinstein objective of a
critic (the loss `lipnets.losses.KRLoss` trains) by a sound Lipschitz bound of
the critic (`lipnets.lipschitz_bound`), which makes it a lower bound on the
Wasserstein-1 distance between two samples. Like every certificate here it
relies on a *bound*, never on an estimate or an assumed constant.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lipnets._checks import check_int, check_real, check_tensor
from lipnets._state import eval_mode
from lipnets.bounds import lipschitz_bound

__all__ = ["wasserstein_estimate"]


def _check_samples(x: object, name: str) -> Tensor:
    x = check_tensor(x, name)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(
            f"{name} must be a batch of samples of shape (N, ...) with N >= 1, got {tuple(x.shape)}"
        )
    return x


def _check_lipschitz(lipschitz: object) -> float:
    if isinstance(lipschitz, Tensor):
        if lipschitz.numel() != 1:
            raise ValueError(
                f"lipschitz must be a number, got a tensor of shape {tuple(lipschitz.shape)}"
            )
        lipschitz = lipschitz.item()
    return check_real(lipschitz, "lipschitz", low=0.0, low_open=True)


def _critic_mean(critic: nn.Module, x: Tensor, batch_size: int, name: str) -> float:
    total = 0.0
    for chunk in x.split(batch_size):
        scores = critic(chunk)
        n = chunk.shape[0]
        if not isinstance(scores, Tensor) or tuple(scores.shape) not in ((n,), (n, 1)):
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(
                f"the critic must return one score per sample, shape ({n},) or ({n}, 1), "
                f"got {shape} on {name}"
            )
        total += float(scores.double().sum())
    if not math.isfinite(total):
        raise ValueError(f"the critic returned non-finite scores on {name}")
    return total / x.shape[0]


def wasserstein_estimate(
    critic: nn.Module,
    x_p: Tensor,
    x_q: Tensor,
    *,
    lipschitz: float | Tensor | None = None,
    batch_size: int = 1024,
) -> float:
    r"""Certified lower estimate of Wasserstein-1 from a critic: $(\bar f_P - \bar f_Q) / L$.

    With $\bar f_P$ and $\bar f_Q$ the mean scores of the critic on ``x_p``
    and ``x_q``, and $L$ a sound Lipschitz bound of the critic. Since $f / L$
    is 1-Lipschitz, Kantorovich–Rubinstein duality gives
    $|\bar f_P - \bar f_Q| / L \le W_1(\hat P, \hat Q)$ for the empirical
    distributions $\hat P, \hat Q$ of the two samples, with $W_1$ measured in
    the l2 norm of the input: the absolute value of the result is a lower
    bound on that distance, never an over-estimate (up to float rounding of
    the scores). It is positive when the critic scores ``x_p`` higher, the
    convention of `lipnets.losses.KRLoss` ($P$ = label 1), and it is tight
    when the critic is an optimal transport potential.

    The critic is evaluated in eval mode, the function its bound is computed
    for, under ``torch.no_grad()``, ``batch_size`` samples at a time; the
    train/eval mode of each of its modules is restored afterwards, also when
    an error is raised.

    Args:
        critic: a module returning one score per sample, shape $(N,)$ or
            $(N, 1)$.
        x_p: samples of $P$, shape $(N_P, \dots)$.
        x_q: samples of $Q$, shape $(N_Q, \dots)$, the same per-sample shape.
        lipschitz: a Lipschitz bound $L > 0$ to use instead of
            `lipnets.lipschitz_bound` ``(critic, input_shape=(1, *x_p.shape[1:]))``.
            It must be sound for the result to be a lower bound.
        batch_size: the number of samples per forward pass.

    Returns:
        The estimate as a Python float.

    Raises:
        TypeError: if ``critic`` is not an ``nn.Module`` or the samples are not
            tensors.
        ValueError: on empty samples, different per-sample shapes, a critic
            returning other than one score per sample or non-finite scores, a
            ``lipschitz`` that is not a finite number $> 0$, or a
            ``batch_size`` below 1.
        UnboundedModuleError: if ``lipschitz`` is not given and the critic has
            a part without a sound bound rule.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> critic = nn.Linear(1, 1)
        >>> with torch.no_grad():
        ...     _ = critic.weight.fill_(3.0), critic.bias.fill_(0.5)
        >>> x_p, x_q = torch.tensor([[2.0], [4.0]]), torch.tensor([[0.0], [1.0]])
        >>> w = wasserstein_estimate(critic, x_p, x_q)  # W1 of these samples is 2.5
        >>> w <= 2.5, round(w, 6)  # L is a hair above 3 (a sound bound rounds up)
        (True, 2.5)

    References:
        Arjovsky, M., Chintala, S. & Bottou, L. (2017). Wasserstein generative
        adversarial networks. *ICML*.
        Villani, C. (2009). *Optimal Transport: Old and New*, Thm 5.10
        (Kantorovich duality).
    """
    if not isinstance(critic, nn.Module):
        raise TypeError(f"critic must be an nn.Module, got {type(critic).__name__}")
    x_p = _check_samples(x_p, "x_p")
    x_q = _check_samples(x_q, "x_q")
    if x_p.shape[1:] != x_q.shape[1:]:
        raise ValueError(
            "x_p and x_q must have the same per-sample shape, got "
            f"{tuple(x_p.shape[1:])} and {tuple(x_q.shape[1:])}"
        )
    batch_size = check_int(batch_size, "batch_size")
    given = None if lipschitz is None else _check_lipschitz(lipschitz)

    with eval_mode(critic):
        if given is None:
            bound = float(lipschitz_bound(critic, input_shape=(1, *x_p.shape[1:])))
        else:
            bound = given
        with torch.no_grad():
            mean_p = _critic_mean(critic, x_p, batch_size, "x_p")
            mean_q = _critic_mean(critic, x_q, batch_size, "x_q")
    if bound == 0:
        # A sound bound of 0 means a constant critic: it tells nothing about W1.
        return 0.0
    return (mean_p - mean_q) / bound
