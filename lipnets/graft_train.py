r"""Fine-tuning after linearity grafting: FGSM from a random start plus GradAlign.

`finetune` is the recipe of linearity grafting (Chen et al., 2022) for the model that
`lipnets.graft.graft` returns: adversarial training with single-step attacks from a
random start, regularised by GradAlign, the slopes and intercepts of the
`lipnets.nn.GraftedReLU` modules trained at a larger learning rate than the weights and
without weight decay. It trains any model (an un-grafted one too: that is the paper's
control, and a way to train the baseline).

# Note [FGSM with GradAlign]

For a batch $(x, y)$, a radius $\varepsilon$ and the cross-entropy $\ell$:

* the attack (FGSM from a random start, Wong et al. 2020): $\delta_0$ uniform in the
  ball (the cube $[-\varepsilon, \varepsilon]^d$ for $\ell_\infty$; uniform in the
  $\ell_2$ ball), then one step of length $\alpha$ (default $1.25 \varepsilon$) along
  $\mathrm{sign}(g)$ ($\ell_\infty$) or $g / \|g\|_2$ ($\ell_2$), $g = \nabla_x
  \ell(x + \delta_0)$ per sample, projected back onto the ball and, with ``domain``,
  clipped to the box of valid inputs;
* GradAlign (Andriushchenko & Flammarion, 2020): with $\eta$ drawn like $\delta_0$,
  $R = 1 - \cos(\nabla_x \ell(x), \nabla_x \ell(x + \eta))$ per sample, averaged; its
  gradient goes through both input gradients (double back-propagation). It keeps the
  loss locally linear, which is what makes single-step training not collapse
  ("catastrophic overfitting"); a zero input gradient counts as orthogonal;
* the step minimises $\ell(x + \delta) + \lambda R$ ($\lambda$ = ``grad_align``, 0 for
  plain FGSM-RS) over the trainable parameters, in two groups: the weights (learning
  rate $\eta$, weight decay ``weight_decay``) and every `GraftedReLU`'s slope and
  intercept (learning rate ``slope_lr_scale`` $\cdot \eta$, no weight decay).
  Parameters with ``requires_grad=False`` are left alone: pruning (slopes and
  intercepts fixed at 0) is fine-tuned the same way.

The learning rates follow ``schedule`` per step (``"cosine"``: from the peak to 0). All
random numbers come from ``generator`` (shuffling, random starts, GradAlign's noise),
so a run is reproducible; the global RNG is not used.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipnets._checks import check_choice, check_int, check_norm, check_real
from lipnets._progress import progress_bar
from lipnets.nn import GraftedReLU

__all__ = ["FinetuneHistory", "finetune"]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class FinetuneHistory:
    """What `finetune` did."""

    losses: tuple[float, ...]
    """Per epoch, the mean training objective $\\ell(x + \\delta) + \\lambda R$."""
    alignment: tuple[float, ...]
    """Per epoch, the mean cosine of GradAlign's two input gradients (NaN without it)."""
    steps: int
    """Optimiser steps taken."""
    seconds: float
    """Wall time."""


def _grafted_parameters(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, GraftedReLU):
            ids |= {id(module.slope), id(module.intercept)}
    return ids


def _batches(
    data: object, batch_size: int, generator: torch.Generator
) -> tuple[Iterable[tuple[Tensor, Tensor]], int | None]:
    """The batches of one epoch and their number (None when unknown)."""
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(
                f"data must be (inputs, labels) with the same number N >= 1 of rows, got "
                f"shapes {tuple(x.shape)} and {tuple(y.shape)}"
            )
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        chunks = order.split(batch_size)
        return ((x[i], y[i]) for i in chunks), len(chunks)
    if isinstance(data, Iterable) and not isinstance(data, (Tensor, str, bytes)):
        try:
            size = len(data)  # type: ignore[arg-type]
        except TypeError:
            size = None
        return data, size  # type: ignore[return-value]
    raise TypeError(
        "data must be a tuple (inputs, labels) of tensors or an iterable of (inputs, labels) "
        f"batches (a DataLoader), got {type(data).__name__}"
    )


def _uniform(x: Tensor, eps: float, q: float, generator: torch.Generator) -> Tensor:
    """A point uniformly distributed in the ball of radius ``eps`` (per sample)."""
    if q == math.inf:
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype)
        return ((2 * u - 1) * eps).to(x.device)
    n, d = x.shape[0], x[0].numel()
    g = torch.randn((n, d), generator=generator, dtype=x.dtype)
    g = g / g.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    r = torch.rand((n, 1), generator=generator, dtype=x.dtype) ** (1.0 / d)
    return (eps * r * g).reshape(x.shape).to(x.device)


def _project(delta: Tensor, x: Tensor, eps: float, q: float, domain: tuple | None) -> Tensor:
    if q == math.inf:
        delta = delta.clamp(-eps, eps)
    else:
        size = delta.flatten(1).norm(dim=1).clamp_min(torch.finfo(delta.dtype).tiny)
        delta = delta * (eps / size).clamp(max=1.0).reshape(-1, *([1] * (x.ndim - 1)))
    if domain is not None:  # towards x (inside the box): stays in the ball
        delta = (x + delta).clamp(domain[0], domain[1]) - x
    return delta


def _input_grad(model: nn.Module, x: Tensor, y: Tensor, create_graph: bool) -> Tensor:
    point = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(point), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, point, create_graph=create_graph)
    return grad


def _step_direction(grad: Tensor, q: float) -> Tensor:
    if q == math.inf:
        return grad.sign()
    size = grad.flatten(1).norm(dim=1).clamp_min(torch.finfo(grad.dtype).tiny)
    return grad / size.reshape(-1, *([1] * (grad.ndim - 1)))


def _epochs(bar: object, epochs: int) -> Iterator[int]:
    for epoch in range(epochs):
        yield epoch
        if bar is not None:
            bar.update(1)  # type: ignore[attr-defined]


def finetune(
    model: nn.Module,
    data: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]],
    eps: float,
    *,
    norm: float | str = math.inf,
    epochs: int,
    lr: float,
    slope_lr_scale: float = 10.0,
    grad_align: float = 0.2,
    step_size: float | None = None,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    schedule: str = "cosine",
    batch_size: int = 128,
    domain: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
) -> FinetuneHistory:
    r"""Fine-tune ``model`` in place with FGSM from a random start plus GradAlign.

    The recipe of linearity grafting (Note [FGSM with GradAlign]): each step attacks the
    batch with one signed (or normalised) gradient step from a random point of the ball,
    and minimises the cross-entropy there plus ``grad_align`` times GradAlign's
    misalignment of the input gradients. The slopes and intercepts of every
    `lipnets.nn.GraftedReLU` train at ``slope_lr_scale`` times ``lr`` and without weight
    decay; the other trainable parameters at ``lr`` with ``weight_decay``. The model is in
    train mode while it trains, and each submodule's mode is restored afterwards.

    Args:
        model: a classifier returning scores $(N, C)$ (the grafted copy `graft` made,
            or any model).
        data: ``(inputs, labels)`` tensors (shuffled each epoch by ``generator``, in
            batches of ``batch_size``) or an iterable of such batches (a ``DataLoader``;
            ``batch_size`` is then unused). Inputs are cast to the model's dtype and
            device.
        eps: the radius of the training balls, a float $\ge 0$ (0: clean training).
        norm: ``float("inf")`` (default) or ``2`` (``"inf"``, ``"linf"``, ``"l2"``).
        epochs: passes over ``data``, an int $\ge 1$.
        lr: the peak learning rate of the weights, $> 0$.
        slope_lr_scale: the grafted slopes' and intercepts' learning rate over ``lr``,
            $> 0$ (the paper's 10).
        grad_align: GradAlign's weight $\lambda \ge 0$ (0: plain FGSM-RS).
        step_size: the FGSM step $\alpha > 0$ (default $1.25 \varepsilon$).
        weight_decay: the weights' weight decay, $\ge 0$ (never the grafted lines').
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        momentum: SGD's momentum, in $[0, 1)$.
        schedule: ``"cosine"`` (per step, from ``lr`` to 0) or ``"constant"``.
        batch_size: the batch size with tensor ``data``, an int $\ge 1$.
        domain: optional ``(lo, hi)``: attacked inputs are clipped to this box (pixels in
            $[0, 1]$).
        generator: the random numbers (default: a CPU generator seeded with 0).
        progress: a progress bar over the epochs (None: when attached to a terminal).

    Returns:
        A `FinetuneHistory` (the mean objective per epoch, GradAlign's mean cosine, the
        number of steps, the time).

    Raises:
        ValueError: for a value out of range (the message names the argument), an unknown
            ``norm``, ``optimizer`` or ``schedule``, tensors of different lengths, a model
            without trainable parameters, or a non-finite loss (training diverged: lower
            ``lr``).
        TypeError: for ``data`` that is neither tensors nor an iterable of batches, a
            ``generator`` that is not a ``torch.Generator``, or a ``model`` that is not a
            module.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lipnets.graft import finetune, graft
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.rand(64, 4, generator=g, dtype=torch.float64)
        >>> y = (x[:, 0] > x[:, 1]).long()
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double()
        >>> grafted = graft(model, {"1": torch.arange(8) < 4})
        >>> history = finetune(grafted, (x, y), 0.05, epochs=3, lr=0.05, batch_size=16,
        ...                    generator=g, progress=False)
        >>> history.steps, len(history.losses)
        (12, 3)
        >>> bool(grafted[1].slope.detach()[:4].ne(0.4).all())  # the grafted lines moved
        True
        >>> bool(grafted[1].slope.detach()[4:].eq(0.4).all())  # the others cannot
        True

    References:
        Chen, T., Zhang, H., Zhang, Z., Chang, S., Liu, S., Chen, P.-Y. & Wang, Z. (2022).
        Linearity grafting: relaxed neuron pruning helps certifiable robustness. *ICML*.

        Wong, E., Rice, L. & Kolter, J. Z. (2020). Fast is better than free: revisiting
        adversarial training. *ICLR*.

        Andriushchenko, M. & Flammarion, N. (2020). Understanding and improving fast
        adversarial training. *NeurIPS*.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    eps = check_real(eps, "eps", low=0.0)
    q = check_norm(norm)
    epochs = check_int(epochs, "epochs")
    lr = check_real(lr, "lr", low=0.0, low_open=True)
    scale = check_real(slope_lr_scale, "slope_lr_scale", low=0.0, low_open=True)
    lam = check_real(grad_align, "grad_align", low=0.0)
    alpha = 1.25 * eps
    if step_size is not None:
        alpha = check_real(step_size, "step_size", low=0.0, low_open=True)
    decay = check_real(weight_decay, "weight_decay", low=0.0)
    optimizer = str(check_choice(optimizer, "optimizer", OPTIMIZERS))
    momentum = check_real(momentum, "momentum", low=0.0, high=1.0, high_open=True)
    schedule = str(check_choice(schedule, "schedule", SCHEDULES))
    batch_size = check_int(batch_size, "batch_size")
    if domain is not None:
        if not isinstance(domain, tuple) or len(domain) != 2:
            raise TypeError(f"domain must be None or a pair (lo, hi), got {domain!r}")
        lo = check_real(domain[0], "domain[0]")
        hi = check_real(domain[1], "domain[1]", low=lo)
        domain = (lo, hi)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    lines = _grafted_parameters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no trainable parameter (every requires_grad is False)")
    groups = [
        {"params": [p for p in trainable if id(p) not in lines], "lr": lr,
         "weight_decay": decay},
        {"params": [p for p in trainable if id(p) in lines], "lr": scale * lr,
         "weight_decay": 0.0},
    ]  # fmt: skip
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["peak"] = g["lr"]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    else:
        opt = torch.optim.Adam(groups, lr=lr)
    first = trainable[0]
    modes = {m: m.training for m in model.modules()}
    losses: list[float] = []
    alignment: list[float] = []
    steps = 0
    start = time.perf_counter()
    bar = progress_bar(progress, epochs, "finetune")
    try:
        model.train()
        for epoch in _epochs(bar, epochs):
            batches, size = _batches(data, batch_size, generator)
            total, cosines, count = 0.0, 0.0, 0
            for i, (xb, yb) in enumerate(batches):
                if schedule == "cosine":
                    t = (epoch + (i / size if size else 0.0)) / epochs
                    for g in opt.param_groups:
                        g["lr"] = g["peak"] * 0.5 * (1 + math.cos(math.pi * t))
                x = xb.to(device=first.device, dtype=first.dtype)
                y = torch.as_tensor(yb).to(first.device)
                delta = torch.zeros_like(x)
                if eps > 0:
                    delta = _project(_uniform(x, eps, q, generator), x, eps, q, domain)
                    grad = _input_grad(model, x + delta, y, create_graph=False)
                    delta = _project(delta + alpha * _step_direction(grad, q), x, eps, q, domain)
                loss = F.cross_entropy(model((x + delta).detach()), y)
                cos = None
                if lam > 0 and eps > 0:
                    g0 = _input_grad(model, x, y, create_graph=True).flatten(1)
                    eta = _project(_uniform(x, eps, q, generator), x, eps, q, domain)
                    g1 = _input_grad(model, x + eta, y, create_graph=True).flatten(1)
                    cos = F.cosine_similarity(g0, g1, dim=1)
                    loss = loss + lam * (1 - cos).mean()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise ValueError(
                        f"finetune: the loss became {value} at epoch {epoch}, step {i}: "
                        "training diverged, lower lr"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                total += value * x.shape[0]
                if cos is not None:
                    cosines += float(cos.detach().sum())
                count += x.shape[0]
            losses.append(total / max(count, 1))
            alignment.append(cosines / count if lam > 0 and eps > 0 and count else math.nan)
    finally:
        for m, mode in modes.items():
            m.train(mode)
        if bar is not None:
            bar.close()
    return FinetuneHistory(tuple(losses), tuple(alignment), steps, time.perf_counter() - start)
