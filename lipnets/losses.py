r"""Losses for Lipschitz classifiers and Wasserstein critics.

Every loss here is a torch-style module: it is built with its options and a
``reduction`` (``"none"``, ``"mean"`` or ``"sum"``), and called as
``loss(input, target)``. ``input`` holds the scores of a model and ``target``
the labels, read as in Note [Label conventions] of
`lipnets.functional.margins`:

- **multiclass** scores have shape $(N, C)$ with $C \ge 2$, and the labels are
  class indices or one-hot rows (entries in {0, 1} or {-1, 1});
- **binary** scores have shape $(N,)$ or $(N, 1)$ (one score per sample, the
  prediction is its sign), and a label is positive when it equals 1 and
  negative when it equals 0 or -1 (bool labels: ``True`` is positive).

The kind is read from the shape of the scores only, so ``0/1`` and ``±1``
labels give the same loss in every batch.

**Per-sample values never depend on the rest of the batch.** No loss uses a
batch statistic (the share of positives in a batch, a batch mean, a
temperature fitted to the batch): with ``reduction="none"`` the value of a
sample is the value it has alone, ``"mean"`` is the mean of those values and
``"sum"`` their sum. So the mean over a batch is the size-weighted mean over
any split of it into chunks, and gradient accumulation or data parallelism
gives the same result as one large batch. Where a formula needs a population
constant (the share of positives in `KRLoss`), it is an argument, fixed when
the loss is built.

Losses are computed in the dtype of ``input`` and are differentiable in it.
Labels are parsed by `lipnets.functional.margin`,
`lipnets.functional.class_indices` and `lipnets.functional.binary_signs`,
which raise a ``ValueError`` on labels out of range, rows that are not
one-hot, binary labels other than 1 / 0 / -1, and a batch mixing 0 and -1.

Certified training losses read the model rather than its scores: `lipnets.certify.CrownIBPLoss`
and `lipnets.certify.IBPLoss` (Note [Certified cross-entropy] in `lipnets.certify.training`)
take the cross-entropy of the worst-case margins over norm balls, bounded by the propagation
code that certifies, and are called as ``loss(model, input, target)``; they follow the
conventions above (``reduction``, per-sample values independent of the batch).

`lipnets.certify.wasserstein_estimate` turns a critic trained with `KRLoss`
into a certified *lower* bound on the Wasserstein-1 distance between two
samples; it lives in `lipnets.certify` and stays importable from here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipnets._checks import check_choice, check_probability, check_real, check_tensor
from lipnets.certify.wasserstein import wasserstein_estimate
from lipnets.functional.margins import binary_signs, class_indices, is_binary, margin

__all__ = [
    "HKRLoss",
    "KRLoss",
    "LipschitzCrossEntropyLoss",
    "MulticlassHingeLoss",
    "wasserstein_estimate",
]

_REDUCTIONS = ("none", "mean", "sum")


# ---------------------------------------------------------------- helpers


def _check_reduction(reduction: object) -> str:
    return str(check_choice(reduction, "reduction", _REDUCTIONS))


def _reduce(values: Tensor, reduction: str) -> Tensor:
    # Checked again here: the attribute may have been changed after construction.
    reduction = _check_reduction(reduction)
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def _parse(input: Tensor, target: object) -> tuple[bool, Tensor]:
    """Read scores and labels as in Note [Label conventions].

    Returns ``(True, signs)`` for binary scores, with signs ±1 of shape
    ``(N,)`` in the dtype of ``input``, or ``(False, indices)`` for multiclass
    scores, with int64 class indices of shape ``(N,)``; both on the device of
    ``input``. The label values are parsed by `binary_signs` and
    `class_indices`; this function only checks that there is one label per
    sample and that the scores are numbers.
    """
    binary = is_binary(input)  # checks the type, dtype and shape of the scores
    target = check_tensor(target, "target")
    n = input.shape[0]
    if target.ndim == 0 or target.shape[0] != n:
        raise ValueError(
            f"target must have one entry per sample: {n} scores but target of shape "
            f"{tuple(target.shape)}"
        )
    if bool(torch.isnan(input).any()):
        raise ValueError("scores contain NaN: the model's output is not a number")
    if binary:
        return True, binary_signs(target).to(input.device, input.dtype)
    return False, class_indices(target, input.shape[1]).to(input.device)


def _hinge(input: Tensor, target: Tensor, margin_: float) -> Tensor:
    return F.relu(margin_ - margin(input, target))


def _kantorovich(input: Tensor, target: Tensor, positive_fraction: float) -> Tensor:
    binary, labels = _parse(input, target)
    if binary:
        scores = input.reshape(-1)
        # -f / p for positives, +f / (1 - p) for negatives.
        weight = torch.where(
            labels > 0,
            torch.full_like(scores, -1.0 / positive_fraction),
            torch.full_like(scores, 1.0 / (1.0 - positive_fraction)),
        )
        return weight * scores
    num_classes = input.shape[1]
    true = input.gather(1, labels[:, None])[:, 0]
    mean_others = (input.sum(dim=1) - true) / (num_classes - 1)
    return mean_others - true


# ---------------------------------------------------------------- losses


class MulticlassHingeLoss(nn.Module):
    r"""Hinge loss on the classification margin: $\max(0, \mu - m)$ per sample.

    The margin $m$ is `lipnets.functional.margin`: $f_y - \max_{j \ne y} f_j$
    for multiclass scores (the true class against the best other class, the
    Crammer–Singer form), or $s f$ with $s = \pm 1$ the sign of the label for
    binary scores. The loss of a sample is zero exactly when $m \ge \mu$.

    **Certification.** If $f$ is $L$-Lipschitz as a map into $\mathbb{R}^C$
    (l2 norms) then every $f_y - f_j$ is $\sqrt{2} L$-Lipschitz, so a sample
    whose loss is zero keeps its prediction under every l2 perturbation of
    norm less than $\mu / (\sqrt{2} L)$ (binary scores: $\mu / L$). Training a
    1-Lipschitz network with this loss therefore asks for certified radius
    $\mu / \sqrt{2}$ on the training set.

    Args:
        margin: the target margin $\mu > 0$.
        reduction: ``"none"`` (one value per sample, shape $(N,)$),
            ``"mean"`` or ``"sum"``.

    Raises:
        ValueError: if ``margin`` is not a finite number $> 0$ or
            ``reduction`` is not one of the three names.

    Examples:
        >>> import torch
        >>> loss = MulticlassHingeLoss(margin=1.0, reduction="none")
        >>> scores = torch.tensor([[3.0, 1.0, 0.5], [1.0, 1.5, 0.0]])
        >>> loss(scores, torch.tensor([0, 0])).tolist()  # margins 2.0 and -0.5
        [0.0, 1.5]
        >>> binary = torch.tensor([2.0, -0.5])
        >>> loss(binary, torch.tensor([1, 0])).tolist()  # margins 2.0 and 0.5
        [0.0, 0.5]
        >>> loss(binary, torch.tensor([1, -1])).tolist()  # the same labels
        [0.0, 0.5]

    References:
        Crammer, K. & Singer, Y. (2001). On the algorithmic implementation of
        multiclass kernel-based vector machines. *JMLR* 2.
        Anil, C., Lucas, J. & Grosse, R. (2019). Sorting out Lipschitz function
        approximation. *ICML*.
    """

    def __init__(self, margin: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        self.margin = check_real(margin, "margin", low=0.0, low_open=True)
        self.reduction = _check_reduction(reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Return the hinge loss of ``input`` scores against ``target`` labels.

        Args:
            input: scores of shape $(N, C)$, $(N,)$ or $(N, 1)$.
            target: labels as in Note [Label conventions].

        Returns:
            Shape $(N,)$ for ``reduction="none"``, else a 0-dim tensor, in the
            dtype of ``input``.

        Raises:
            TypeError: if ``input`` is not a floating-point tensor.
            ValueError: on mismatched lengths, invalid labels or NaN scores.
        """
        return _reduce(_hinge(input, target, self.margin), self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin:g}, reduction={self.reduction!r}"


class KRLoss(nn.Module):
    r"""Kantorovich–Rubinstein loss: the negated dual objective of Wasserstein-1.

    For a critic $f$ and two distributions $P$ (positives, label 1) and $Q$
    (negatives, label 0 or -1), Kantorovich–Rubinstein duality gives
    $W_1(P, Q) = \sup_{\mathrm{Lip}(f) \le 1} \mathbb{E}_P f - \mathbb{E}_Q f$.
    Minimising this loss over a 1-Lipschitz critic maximises that objective:
    the critic learns to score $P$ high and $Q$ low.

    **Binary scores.** The value of a sample is $-f / p$ for a positive and
    $+f / (1 - p)$ for a negative, with $p$ = ``positive_fraction``. Over a
    batch whose share of positives is $p$ the mean is exactly
    $\operatorname{mean}_Q f - \operatorname{mean}_P f$; over batches drawn
    from a mixture with that share it is an unbiased estimate of
    $\mathbb{E}_Q f - \mathbb{E}_P f$. $p$ is a constant of the loss, never the
    share measured in a batch, so that per-sample values do not depend on
    the batch: set it to the share of positives in your data or sampler.

    **Multiclass scores** $(N, C)$: the value of a sample is
    $-(f_y - \frac{1}{C - 1} \sum_{j \ne y} f_j)$, one-vs-rest: each output
    $f_c$ is a critic between class $c$ and the other classes.
    ``positive_fraction`` is not used.

    After training, `lipnets.certify.wasserstein_estimate` turns the critic
    into a lower bound on $W_1$.

    Args:
        reduction: ``"none"`` (one value per sample, shape $(N,)$),
            ``"mean"`` or ``"sum"``.
        positive_fraction: the share $p \in (0, 1)$ of positives the binary
            weights assume.

    Raises:
        ValueError: if ``positive_fraction`` is not in $(0, 1)$ or
            ``reduction`` is not one of the three names.

    Examples:
        >>> import torch
        >>> scores = torch.tensor([2.0, 1.0, -1.0, 0.0])
        >>> labels = torch.tensor([1, 1, 0, 0])  # half positives
        >>> float(KRLoss()(scores, labels))
        -2.0
        >>> float(scores[labels == 0].mean() - scores[labels == 1].mean())
        -2.0

    References:
        Arjovsky, M., Chintala, S. & Bottou, L. (2017). Wasserstein generative
        adversarial networks. *ICML*.
        Anil, C., Lucas, J. & Grosse, R. (2019). Sorting out Lipschitz function
        approximation. *ICML*.
    """

    def __init__(self, reduction: str = "mean", positive_fraction: float = 0.5) -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)
        self.positive_fraction = check_probability(positive_fraction, "positive_fraction")

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Return the Kantorovich–Rubinstein loss of ``input`` against ``target``.

        Args:
            input: critic scores of shape $(N,)$ or $(N, 1)$, or $(N, C)$.
            target: labels as in Note [Label conventions].

        Returns:
            Shape $(N,)$ for ``reduction="none"``, else a 0-dim tensor, in the
            dtype of ``input``.

        Raises:
            TypeError: if ``input`` is not a floating-point tensor.
            ValueError: on mismatched lengths, invalid labels or NaN scores.
        """
        return _reduce(_kantorovich(input, target, self.positive_fraction), self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, positive_fraction={self.positive_fraction:g}"


class HKRLoss(nn.Module):
    r"""Hinge-regularised Kantorovich–Rubinstein loss: $\mathrm{KR} + \alpha \cdot \mathrm{hinge}$.

    Per sample, the value of `KRLoss` plus ``alpha`` times the value of
    `MulticlassHingeLoss` with the same ``margin``, for binary and multiclass
    scores alike. The KR term pushes the two classes apart (it measures them
    with a Wasserstein critic), the hinge term makes the classifier correct
    with margin $\mu$, hence certifiably robust at radius $\mu / (\sqrt{2} L)$
    (binary: $\mu / L$) on samples where it is zero. ``alpha = 0`` is
    `KRLoss`; large ``alpha`` approaches the hinge loss alone.

    Args:
        alpha: weight $\alpha \ge 0$ of the hinge term.
        margin: the hinge margin $\mu > 0$.
        reduction: ``"none"`` (one value per sample, shape $(N,)$),
            ``"mean"`` or ``"sum"``.
        positive_fraction: the share of positives the binary KR term assumes
            (see `KRLoss`).

    Raises:
        ValueError: if ``alpha < 0``, ``margin <= 0``, ``positive_fraction``
            is not in $(0, 1)$, or ``reduction`` is not one of the three
            names.

    Examples:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> scores, labels = torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 2, 1, 0])
        >>> hkr = HKRLoss(alpha=10.0, margin=0.5)
        >>> kr, hinge = KRLoss(), MulticlassHingeLoss(margin=0.5)
        >>> total = kr(scores, labels) + 10 * hinge(scores, labels)
        >>> bool(torch.isclose(hkr(scores, labels), total))
        True

    References:
        Serrurier, M., Mamalet, F., González-Sanz, A., Boissin, T., Loubes,
        J.-M. & del Barrio, E. (2021). Achieving robustness in classification
        using optimal transport with hinge regularization. *CVPR*.
    """

    def __init__(
        self,
        alpha: float = 10.0,
        margin: float = 1.0,
        reduction: str = "mean",
        positive_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        self.alpha = check_real(alpha, "alpha", low=0.0)
        self.margin = check_real(margin, "margin", low=0.0, low_open=True)
        self.reduction = _check_reduction(reduction)
        self.positive_fraction = check_probability(positive_fraction, "positive_fraction")

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Return the HKR loss of ``input`` scores against ``target`` labels.

        Args:
            input: scores of shape $(N, C)$, $(N,)$ or $(N, 1)$.
            target: labels as in Note [Label conventions].

        Returns:
            Shape $(N,)$ for ``reduction="none"``, else a 0-dim tensor, in the
            dtype of ``input``.

        Raises:
            TypeError: if ``input`` is not a floating-point tensor.
            ValueError: on mismatched lengths, invalid labels or NaN scores.
        """
        values = _kantorovich(input, target, self.positive_fraction)
        if self.alpha != 0:
            values = values + self.alpha * _hinge(input, target, self.margin)
        return _reduce(values, self.reduction)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha:g}, margin={self.margin:g}, reduction={self.reduction!r}, "
            f"positive_fraction={self.positive_fraction:g}"
        )


class LipschitzCrossEntropyLoss(nn.Module):
    r"""Cross-entropy with a margin offset and a temperature, for Lipschitz networks.

    Per sample
    $\tau \cdot \mathrm{CE}\big((f - \delta e_y) / \tau,\; y\big)$ with
    $\delta$ = ``offset``, $\tau$ = ``temperature`` and $e_y$ the one-hot
    vector of the label. A 1-Lipschitz network has bounded logits, so plain
    cross-entropy saturates far from zero; dividing by a small $\tau$ restores
    its gradient, multiplying by $\tau$ keeps the loss on the scale of the
    logits, and subtracting $\delta$ from the true logit asks for a margin of
    about $\delta$ (certified radius about $\delta / \sqrt{2}$ for a
    1-Lipschitz network). ``offset=0, temperature=1`` is
    `torch.nn.functional.cross_entropy`.

    Multiclass scores $(N, C)$ only.

    Args:
        offset: the margin offset $\delta \ge 0$.
        temperature: the temperature $\tau > 0$.
        reduction: ``"none"`` (one value per sample, shape $(N,)$),
            ``"mean"`` or ``"sum"``.

    Raises:
        ValueError: if ``offset < 0``, ``temperature <= 0`` or ``reduction``
            is not one of the three names.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> g = torch.Generator().manual_seed(0)
        >>> logits, labels = torch.randn(5, 4, generator=g), torch.tensor([0, 3, 1, 1, 2])
        >>> plain = LipschitzCrossEntropyLoss(offset=0.0, temperature=1.0)
        >>> bool(torch.isclose(plain(logits, labels), F.cross_entropy(logits, labels)))
        True

    References:
        Prach, B. & Lampert, C. H. (2022). Almost-orthogonal layers for
        efficient general-purpose Lipschitz networks. *ECCV*.
    """

    def __init__(
        self,
        offset: float = math.sqrt(2),
        temperature: float = 0.25,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.offset = check_real(offset, "offset", low=0.0)
        self.temperature = check_real(temperature, "temperature", low=0.0, low_open=True)
        self.reduction = _check_reduction(reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Return the offset, tempered cross-entropy of ``input`` logits.

        Args:
            input: logits of shape $(N, C)$ with $C \\ge 2$.
            target: class indices or one-hot rows (Note [Label conventions]).

        Returns:
            Shape $(N,)$ for ``reduction="none"``, else a 0-dim tensor, in the
            dtype of ``input``.

        Raises:
            TypeError: if ``input`` is not a floating-point tensor.
            ValueError: on binary scores, mismatched lengths, invalid labels
                or NaN scores.
        """
        if is_binary(input):
            raise ValueError(
                "LipschitzCrossEntropyLoss needs multiclass scores of shape (N, C) with C >= 2, "
                f"got {tuple(input.shape)}; use MulticlassHingeLoss or HKRLoss for binary scores"
            )
        _, indices = _parse(input, target)
        shifted = input
        if self.offset != 0:
            onehot = F.one_hot(indices, input.shape[1]).to(input.dtype)
            shifted = input - self.offset * onehot
        values = F.cross_entropy(shifted / self.temperature, indices, reduction="none")
        return _reduce(self.temperature * values, self.reduction)

    def extra_repr(self) -> str:
        return (
            f"offset={self.offset:g}, temperature={self.temperature:g}, "
            f"reduction={self.reduction!r}"
        )
