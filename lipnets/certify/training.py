r"""Certified training: cross-entropy of the worst-case margins over norm balls (IBP, CROWN-IBP).

A network trained on plain cross-entropy is rarely certifiable by bound propagation: its
bounds are loose because nothing asked them to be tight. Certified training minimises a
loss of the *bounds* instead, so the optimiser makes them tight where the data are. The
bounds are the ones that certify (`lipnets.propagation.interval_bounds` and
`lipnets.propagation.crown_ibp_bounds`, run with ``differentiable=True``: Note
[Differentiable bounds] in `lipnets.propagation.checks`), not a second implementation,
so what is trained is exactly what `lipnets.certify.certify_crown` later checks.

# Note [Certified cross-entropy]

For a sample $(x_0, y)$ and a radius $\varepsilon$, let $\underline m_j$ be a lower
bound of the margin $f_y(x) - f_j(x)$ over the ball $B$ around $x_0$ (the rows $e_y -
e_j$ of a specification, as in Note [CROWN certificates] in `lipnets.certify.crown`;
$\underline m_y = 0$). The *worst-case logits* are $z_j = -\underline m_j$: for every
$x \in B$, $f_j(x) - f_y(x) \le z_j - z_y$, and cross-entropy depends only on these
differences and increases with each of them, so

$$\mathrm{CE}(z, y) \ge \max_{x \in B} \mathrm{CE}(f(x), y),$$

an upper bound of the robust loss (Wong & Kolter 2018; Gowal et al. 2018). It is zero
only in the limit of infinitely certified margins, and $\mathrm{CE}(z, y) < \log 2$
implies $\underline m_j > 0$ for every $j \ne y$: a certified sample.

CROWN-IBP (Zhang et al. 2020) takes $\underline m = \beta\, \underline m^{\text{CROWN-IBP}}
+ (1 - \beta)\, \underline m^{\text{IBP}}$ (a convex combination of two lower bounds is a
lower bound), and mixes in the clean loss:

$$L = \kappa\, \mathrm{CE}(f(x_0), y) + (1 - \kappa)\, \mathrm{CE}(-\underline m, y).$$

$\beta = 1$ early (the CROWN-IBP bound is tight for a network near its initialisation,
whose IBP bounds are useless) and $\beta \to 0$ at the end (IBP bounds are what the
trained network makes tight, and they are cheaper); $\kappa$ goes from 1 (clean
training) to $\kappa_{\text{end}}$, and $\varepsilon$ ramps up from 0
(Note [Certified training schedules]). With $\beta = 0$ the loss is IBP's (Gowal et al.
2018). A term whose weight is 0 is not computed.

The bounds are computed with the model in eval mode (`lipnets.propagation`); the clean
term runs the model as it is (its mode is the caller's). The gradient is that of the
piecewise-smooth function the bounds are (Note [Differentiable bounds]).

# Note [Certified training schedules]

$\varepsilon$ is 0 for ``warmup`` epochs, then grows linearly to its target over
``ramp`` epochs and stays there; $\beta$ and $\kappa$ move linearly from their start to
their end values over the same ramp (Zhang et al. 2020, Sec. 4). The time is a float
(``epoch + step / steps_per_epoch``), so the values change at every step, as in the
paper; `CertifiedSchedule` gives the three values at a time and `CertifiedSchedule.apply`
sets them on a loss.

Training over a ball takes one propagation per step; call the loop inside
`lipnets.graph.reuse_traces` so that the model is traced once, not at every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipnets._checks import check_choice, check_real, check_tensor
from lipnets.functional.margins import check_scores, class_indices, is_binary
from lipnets.propagation import crown_ibp_bounds, interval_bounds
from lipnets.propagation.lirpa import check_norm

__all__ = [
    "CertifiedSchedule",
    "CrownIBPLoss",
    "IBPLoss",
    "ScheduleValues",
    "certified_cross_entropy",
    "linear_ramp",
    "worst_case_logits",
]

_REDUCTIONS = ("none", "mean", "sum")


def _check_unit(value: object, name: str) -> float:
    return check_real(value, name, low=0.0, high=1.0)


def _check_eps(value: object) -> float:
    return check_real(value, "eps", low=0.0) + 0.0  # -0.0 -> 0.0


def _labels(model: nn.Module, x: Tensor, target: object, grad: bool) -> tuple[Tensor, Tensor]:
    """The model's logits on ``x`` (N, C), with autograd if ``grad``, and the class indices
    (N,) of ``target``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    x = check_tensor(x, "input", floating=True)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        logits = model(x)
    if not isinstance(logits, Tensor):
        raise TypeError(f"the model must return a tensor of logits, got {type(logits).__name__}")
    check_scores(logits)
    if is_binary(logits):
        raise ValueError(
            "certified cross-entropy needs multiclass logits of shape (N, C) with C >= 2, "
            f"got {tuple(logits.shape)}"
        )
    if logits.shape[0] != x.shape[0]:
        raise ValueError(
            f"the model must map N inputs to N rows of logits, got input shape "
            f"{tuple(x.shape)} and output shape {tuple(logits.shape)}"
        )
    target = check_tensor(target, "target")
    if target.ndim == 0 or target.shape[0] != x.shape[0]:
        raise ValueError(
            f"target must have one entry per sample: {x.shape[0]} inputs but target of shape "
            f"{tuple(target.shape)}"
        )
    return logits, class_indices(target, logits.shape[1]).to(logits.device)


def _worst_case(
    model: nn.Module, x: Tensor, labels: Tensor, classes: int, eps: float, q: float, beta: float
) -> Tensor:
    """Worst-case logits (N, C) from the labels (Note [Certified cross-entropy])."""
    eye = torch.eye(classes, dtype=x.dtype, device=x.device)
    spec = eye[labels].unsqueeze(1) - eye.unsqueeze(0)  # rows e_y - e_j (row y is 0)
    lower: Tensor | None = None
    if beta > 0:
        bound = crown_ibp_bounds(model, x, eps, norm=q, spec=spec, differentiable=True).lower
        lower = bound if beta == 1 else beta * bound
    if beta < 1:
        bound = interval_bounds(model, x, eps, norm=q, spec=spec, differentiable=True).lower
        lower = (1 - beta) * bound if lower is None else lower + (1 - beta) * bound
    assert lower is not None
    own = F.one_hot(labels, classes).bool()
    return torch.where(own, torch.zeros_like(lower), -lower)


def worst_case_logits(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    eps: float,
    *,
    norm: float | str = math.inf,
    beta: float = 1.0,
) -> Tensor:
    r"""The logits $z_j = -\underline m_j$ of the worst case over each ball, differentiable.

    $\underline m_j$ is $\beta$ times the CROWN-IBP lower bound of the margin $f_y - f_j$
    over the ball plus $1 - \beta$ times the IBP one, and $z_y = 0$ (Note [Certified
    cross-entropy]). Every $z_j - z_y$ bounds $f_j(x) - f_y(x)$ from above on the ball.

    Args:
        model: a multiclass classifier built from the operations `crown_bounds`
            supports, returning logits $(N, C)$.
        x: the centres of the balls, a floating-point batch with the model's dtype.
        target: class indices $(N,)$ or one-hot rows (Note [Label conventions]).
        eps: the radius, a number $\ge 0$.
        norm: ``float("inf")`` (default) or ``2``, or ``"inf"``, ``"linf"``, ``"l2"``.
        beta: the weight $\beta \in [0, 1]$ of CROWN-IBP (0: IBP alone).

    Returns:
        A tensor $(N, C)$ in the dtype of ``x``, differentiable in the parameters.

    Raises:
        TypeError: for a model that is not a module, inputs that are not a
            floating-point tensor, or dtypes that differ.
        ValueError: for binary scores, labels out of range or of another length, a
            negative or non-finite ``eps``, ``beta`` outside $[0, 1]$ or an unknown
            ``norm``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lipnets.certify.training import worst_case_logits
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).double()
        >>> x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
        >>> z = worst_case_logits(model, x, y, 0.1)
        >>> f = model(x + 0.1 * (2 * torch.rand_like(x) - 1))  # a point of each ball
        >>> f_y = f.gather(1, y[:, None])
        >>> bool((f - f_y <= z + 1e-12).all())  # z_j - z_y >= f_j - f_y, with z_y = 0
        True
    """
    eps, beta, q = _check_eps(eps), _check_unit(beta, "beta"), check_norm(norm)
    logits, labels = _labels(model, x, target, grad=False)
    return _worst_case(model, x, labels, logits.shape[1], eps, q, beta)


def certified_cross_entropy(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    eps: float,
    *,
    norm: float | str = math.inf,
    beta: float = 1.0,
    kappa: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    r"""$\kappa\, \mathrm{CE}(f(x), y) + (1 - \kappa)\, \mathrm{CE}(-\underline m, y)$ per sample.

    The functional form of `CrownIBPLoss` (Note [Certified cross-entropy]); the
    arguments are those of `worst_case_logits`, with ``kappa`` $\in [0, 1]$ the weight
    of the clean cross-entropy and ``reduction`` ``"none"``, ``"mean"`` or ``"sum"``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import torch.nn.functional as F
        >>> from lipnets.certify.training import certified_cross_entropy
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).double()
        >>> x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
        >>> robust = certified_cross_entropy(model, x, y, 0.1)
        >>> clean = F.cross_entropy(model(x), y)
        >>> bool(robust >= clean)  # an upper bound of the loss anywhere in the balls
        True
        >>> bool(certified_cross_entropy(model, x, y, 0.1, kappa=1.0) == clean)
        True
    """
    eps, q = _check_eps(eps), check_norm(norm)
    beta, kappa = _check_unit(beta, "beta"), _check_unit(kappa, "kappa")
    reduction = str(check_choice(reduction, "reduction", _REDUCTIONS))
    logits, labels = _labels(model, x, target, grad=kappa > 0)
    values = logits.new_zeros(labels.shape)
    if kappa > 0:
        values = kappa * F.cross_entropy(logits, labels, reduction="none")
    if kappa < 1:
        z = _worst_case(model, x, labels, logits.shape[1], eps, q, beta)
        values = values + (1 - kappa) * F.cross_entropy(z, labels, reduction="none")
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


class CrownIBPLoss(nn.Module):
    r"""The CROWN-IBP loss of Zhang et al. (2020): cross-entropy of worst-case margins.

    Per sample $\kappa\, \mathrm{CE}(f(x), y) + (1 - \kappa)\, \mathrm{CE}(-\underline m,
    y)$ with $\underline m = \beta\, \underline m^{\text{CROWN-IBP}} + (1 - \beta)\,
    \underline m^{\text{IBP}}$ the lower bounds of the margins $f_y - f_j$ over the
    ball of radius ``eps`` (Note [Certified cross-entropy]). The bounds are those of
    `lipnets.propagation.crown_ibp_bounds` and `lipnets.propagation.interval_bounds`,
    differentiable in the model's parameters. Unlike the losses of `lipnets.losses`
    it reads the model: it is called as ``loss(model, input, target)``.

    ``eps``, ``beta`` and ``kappa`` are attributes that a `CertifiedSchedule` sets at
    every step; they are checked again when the loss is called.

    Args:
        eps: the radius $\varepsilon \ge 0$ of the balls.
        norm: ``float("inf")`` (default) or ``2`` (or ``"inf"``, ``"linf"``, ``"l2"``).
        beta: the weight $\beta \in [0, 1]$ of the CROWN-IBP bounds.
        kappa: the weight $\kappa \in [0, 1]$ of the clean cross-entropy.
        reduction: ``"none"`` (one value per sample), ``"mean"`` or ``"sum"``.

    Raises:
        ValueError: if an argument is out of range (the message names it, the allowed
            values and the value received).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lipnets.certify import CrownIBPLoss
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> loss = CrownIBPLoss(eps=0.1)
        >>> value = loss(model, x, y)
        >>> value.backward()  # gradients through the bounds
        >>> model[0].weight.grad.shape
        torch.Size([16, 4])

    References:
        Zhang, H., Chen, H., Xiao, C., Gowal, S., Stanforth, R., Li, B., Boning, D. &
        Hsieh, C.-J. (2020). Towards stable and efficient training of verifiably robust
        neural networks. *ICLR*.
    """

    def __init__(
        self,
        eps: float,
        *,
        norm: float | str = math.inf,
        beta: float = 1.0,
        kappa: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.eps = _check_eps(eps)
        self.norm = check_norm(norm)
        self.beta = _check_unit(beta, "beta")
        self.kappa = _check_unit(kappa, "kappa")
        self.reduction = str(check_choice(reduction, "reduction", _REDUCTIONS))

    def forward(self, model: nn.Module, input: Tensor, target: Tensor) -> Tensor:
        """Return the loss of ``model`` on ``input`` against ``target`` labels.

        Args:
            model: a multiclass classifier (logits $(N, C)$).
            input: a floating-point batch with the model's dtype.
            target: class indices or one-hot rows (Note [Label conventions]).

        Returns:
            Shape $(N,)$ for ``reduction="none"``, else a 0-dim tensor.
        """
        return certified_cross_entropy(
            model, input, target, self.eps, norm=self.norm, beta=self.beta,
            kappa=self.kappa, reduction=self.reduction,
        )  # fmt: skip

    def extra_repr(self) -> str:
        norm = "inf" if self.norm == math.inf else "2"
        return (
            f"eps={self.eps:g}, norm={norm}, beta={self.beta:g}, kappa={self.kappa:g}, "
            f"reduction={self.reduction!r}"
        )


class IBPLoss(CrownIBPLoss):
    r"""The IBP loss of Gowal et al. (2018): `CrownIBPLoss` with $\beta = 0$.

    Per sample $\kappa\, \mathrm{CE}(f(x), y) + (1 - \kappa)\, \mathrm{CE}(-\underline
    m^{\text{IBP}}, y)$, the margins bounded by `lipnets.propagation.interval_bounds`
    (with the specification folded into the last affine layer, as Gowal et al. do).

    Args:
        eps: the radius $\varepsilon \ge 0$ of the balls.
        norm: ``float("inf")`` (default) or ``2``.
        kappa: the weight $\kappa \in [0, 1]$ of the clean cross-entropy.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lipnets.certify import CrownIBPLoss, IBPLoss
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> bool(IBPLoss(0.1)(model, x, y) == CrownIBPLoss(0.1, beta=0.0)(model, x, y))
        True

    References:
        Gowal, S. et al. (2018). On the effectiveness of interval bound propagation for
        training verifiably robust models. arXiv:1810.12715.
    """

    def __init__(
        self,
        eps: float,
        *,
        norm: float | str = math.inf,
        kappa: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(eps, norm=norm, beta=0.0, kappa=kappa, reduction=reduction)


# ---------------------------------------------------------------- schedules


def linear_ramp(t: float, *, start: float, end: float, begin: float, length: float) -> float:
    """``start`` until time ``begin``, then linearly to ``end`` over ``length``, then ``end``.

    ``length = 0`` is a step at ``begin``. Used by `CertifiedSchedule` (Note [Certified
    training schedules]).

    Examples:
        >>> [linear_ramp(t, start=1.0, end=0.0, begin=2, length=4) for t in (0, 2, 3, 6, 9)]
        [1.0, 1.0, 0.75, 0.0, 0.0]
    """
    t = check_real(t, "t")
    begin = check_real(begin, "begin")
    length = check_real(length, "length", low=0.0)
    start, end = check_real(start, "start"), check_real(end, "end")
    if length == 0:
        return start if t < begin else end
    p = min(max((t - begin) / length, 0.0), 1.0)
    return end if p == 1.0 else start + (end - start) * p


class ScheduleValues(NamedTuple):
    """The radius and the two weights of `CrownIBPLoss` at one time."""

    eps: float
    beta: float
    kappa: float


@dataclass(frozen=True)
class CertifiedSchedule:
    r"""The ε ramp and the β and κ schedules of certified training (Zhang et al. 2020).

    Note [Certified training schedules]: $\varepsilon$ is 0 for ``warmup`` epochs, then
    rises linearly to ``eps`` over ``ramp`` epochs; $\beta$ goes from ``beta_start`` to
    ``beta_end`` and $\kappa$ from ``kappa_start`` to ``kappa_end`` over the same ramp.

    Attributes:
        eps: the target radius $\ge 0$.
        warmup: epochs of clean training ($\varepsilon = 0$) before the ramp, $\ge 0$.
        ramp: epochs of the ramp, $\ge 0$ (0: the target from the end of the warmup).
        beta_start, beta_end: $\beta$ before and after the ramp, in $[0, 1]$.
        kappa_start, kappa_end: $\kappa$ before and after the ramp, in $[0, 1]$.

    Raises:
        ValueError: for a value out of range (the message names the field).

    Examples:
        >>> from lipnets.certify import CertifiedSchedule, CrownIBPLoss
        >>> schedule = CertifiedSchedule(eps=0.1, warmup=2, ramp=4, kappa_end=0.5)
        >>> schedule(0.0)
        ScheduleValues(eps=0.0, beta=1.0, kappa=1.0)
        >>> schedule(4.0)
        ScheduleValues(eps=0.05, beta=0.5, kappa=0.75)
        >>> schedule(10.0)
        ScheduleValues(eps=0.1, beta=0.0, kappa=0.5)
        >>> loss = CrownIBPLoss(eps=0.1)
        >>> schedule.apply(loss, 4.0).eps
        0.05
    """

    eps: float
    warmup: float = 0.0
    ramp: float = 0.0
    beta_start: float = 1.0
    beta_end: float = 0.0
    kappa_start: float = 1.0
    kappa_end: float = 0.0

    def __post_init__(self) -> None:
        _check_eps(self.eps)
        check_real(self.warmup, "warmup", low=0.0)
        check_real(self.ramp, "ramp", low=0.0)
        for name in ("beta_start", "beta_end", "kappa_start", "kappa_end"):
            _check_unit(getattr(self, name), name)

    def __call__(self, t: float) -> ScheduleValues:
        """The values at time ``t`` (in epochs, a float: ``epoch + step / steps``)."""
        at = {"begin": self.warmup, "length": self.ramp}
        return ScheduleValues(
            eps=linear_ramp(t, start=0.0, end=self.eps, **at),
            beta=linear_ramp(t, start=self.beta_start, end=self.beta_end, **at),
            kappa=linear_ramp(t, start=self.kappa_start, end=self.kappa_end, **at),
        )

    def apply(self, loss: CrownIBPLoss, t: float) -> CrownIBPLoss:
        """Set ``loss.eps``, ``loss.beta`` and ``loss.kappa`` to the values at ``t``;
        an `IBPLoss` keeps $\\beta = 0$. Returns the loss."""
        if not isinstance(loss, CrownIBPLoss):
            raise TypeError(f"loss must be a CrownIBPLoss or an IBPLoss, got {type(loss).__name__}")
        values = self(t)
        loss.eps, loss.kappa = values.eps, values.kappa
        if not isinstance(loss, IBPLoss):
            loss.beta = values.beta
        return loss
