r"""Label conventions and classification margins, shared by certificates, losses and attacks.

# Note [Label conventions]

Two kinds of classifier output are understood, and the kind is read from the
shape of the scores alone, never from the values of a batch:

- **multiclass**: scores of shape $(N, C)$ with $C \ge 2$. Labels are class
  indices (an integer tensor of shape $(N,)$ with values in $[0, C)$) or
  one-hot rows of shape $(N, C)$ whose entries are in $\{0, 1\}$ or
  $\{-1, 1\}$ with exactly one $1$ per row.
- **binary**: one score per sample, shape $(N,)$ or $(N, 1)$; the predicted
  class is the sign of the score. A label is *positive* when it equals $1$
  and *negative* when it equals $0$ or $-1$ (bool labels: ``True`` is
  positive). The mapping is per value, so ``0/1`` and ``±1`` labels mean the
  same thing in every batch; a batch mixing ``0`` and ``-1`` is refused as
  almost certainly a bug.

The **margin** of a sample is $f_y - \max_{j \ne y} f_j$ (multiclass, over
*all* other classes, not a runner-up picked in advance) or $s \cdot f$ with
$s = \pm 1$ the label's sign (binary). It is positive exactly when the
prediction is correct without a tie.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lipnets._checks import check_tensor

__all__ = ["binary_signs", "check_scores", "class_indices", "is_binary", "margin", "margin_spec"]


def check_scores(scores: object) -> Tensor:
    """``scores`` if it is a floating-point tensor of shape ``(N, C)``, ``(N,)`` or ``(N, 1)``.

    The shapes of Note [Label conventions], with ``N >= 1``; anything else raises
    a ``TypeError`` (not a floating-point tensor) or a ``ValueError`` (shape).
    """
    scores = check_tensor(scores, "scores", floating=True)
    if scores.ndim not in (1, 2) or scores.shape[0] == 0:
        raise ValueError(
            "scores must have shape (N, C) (multiclass) or (N,) / (N, 1) (binary) with N >= 1, "
            f"got {tuple(scores.shape)}"
        )
    return scores


def is_binary(scores: Tensor) -> bool:
    """True for one score per sample, shape ``(N,)`` or ``(N, 1)``: a binary classifier."""
    scores = check_scores(scores)
    return scores.ndim == 1 or scores.shape[1] == 1


def _check_labels(labels: object, n: int) -> Tensor:
    labels = check_tensor(labels, "labels")
    if labels.ndim == 0 or labels.shape[0] != n:
        raise ValueError(
            f"labels must have one entry per sample: {n} scores but labels of shape "
            f"{tuple(labels.shape)}"
        )
    if labels.is_complex():
        raise TypeError(f"labels must be real, got dtype {labels.dtype}")
    if labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
        raise ValueError("labels contain NaN or infinite values")
    return labels


def class_indices(labels: Tensor, num_classes: int) -> Tensor:
    """Class indices of shape ``(N,)`` from class indices or one-hot rows.

    Args:
        labels: an integer tensor of shape ``(N,)`` with values in
            ``[0, num_classes)``, or one-hot rows of shape ``(N, num_classes)``
            with entries in {0, 1} or {-1, 1} and exactly one 1 per row.
        num_classes: the number of classes $C \\ge 2$.

    Raises:
        ValueError: on a label out of range, a row that is not one-hot, or a
            floating-point index that is not a whole number.
    """
    if labels.ndim == 1:
        if labels.is_floating_point():
            if not bool((labels == labels.round()).all()):
                raise ValueError("class-index labels must be whole numbers")
        elif labels.dtype == torch.bool:
            raise TypeError(
                "bool labels are binary labels; multiclass labels are class indices or one-hot rows"
            )
        indices = labels.long()
        bad = (indices < 0) | (indices >= num_classes)
        if bool(bad.any()):
            value = labels[bad][0].item()
            raise ValueError(
                f"label {value} is out of range for {num_classes} classes "
                f"(expected class indices in [0, {num_classes - 1}])"
            )
        return indices
    if labels.ndim == 2 and labels.shape[1] == num_classes:
        ones = labels == 1
        rest = (labels == 0) | (labels == -1)
        if not bool((ones | rest).all()) or not bool((ones.sum(dim=1) == 1).all()):
            raise ValueError(
                "one-hot labels must have exactly one 1 per row and 0 (or -1) elsewhere"
            )
        return ones.long().argmax(dim=1)
    raise ValueError(
        f"multiclass labels must be class indices of shape ({labels.shape[0]},) or one-hot rows "
        f"of shape ({labels.shape[0]}, {num_classes}), got {tuple(labels.shape)}"
    )


def binary_signs(labels: Tensor) -> Tensor:
    """Signs ``±1`` of shape ``(N,)`` from binary labels: 1 is positive, 0 or -1 negative.

    Raises:
        ValueError: on any other value, or a batch that mixes 0 and -1.
    """
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(f"binary labels must have shape (N,) or (N, 1), got {tuple(labels.shape)}")
    if labels.dtype == torch.bool:
        return labels.double() * 2 - 1
    positive = labels == 1
    zero = labels == 0
    minus = labels == -1
    if not bool((positive | zero | minus).all()):
        value = labels[~(positive | zero | minus)][0].item()
        raise ValueError(f"binary labels must be 1 (positive) or 0 / -1 (negative), got {value}")
    if bool(zero.any()) and bool(minus.any()):
        raise ValueError(
            "binary labels mix 0 and -1: use either 0/1 or -1/+1 labels (1 is positive)"
        )
    return positive.double() * 2 - 1


def margin(scores: Tensor, labels: Tensor) -> Tensor:
    r"""Classification margin of each sample (see Note [Label conventions]).

    Multiclass: $f_y - \max_{j \ne y} f_j$, over every other class. Binary:
    $s \cdot f$ with $s = \pm 1$ the sign of the label. The margin is
    positive exactly when the sample is classified correctly without a tie,
    zero at a tie. It is differentiable in ``scores``.

    Args:
        scores: logits of shape ``(N, C)``, or one score per sample of shape
            ``(N,)`` or ``(N, 1)``.
        labels: class indices, one-hot rows, or binary labels (1 / 0 / -1).

    Returns:
        A tensor of shape ``(N,)`` with the dtype of ``scores``.

    Raises:
        TypeError: if ``scores`` is not a floating-point tensor.
        ValueError: on mismatched lengths, labels out of range, or NaN scores.

    Examples:
        >>> import torch
        >>> from lipnets.functional import margin
        >>> margin(torch.tensor([[3.0, 1.0, 2.5], [1.0, 1.0, 0.0]]), torch.tensor([0, 0])).tolist()
        [0.5, 0.0]
    """
    scores = check_scores(scores)
    labels = _check_labels(labels, scores.shape[0])
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN: the model's output is not a number")
    if is_binary(scores):
        signs = binary_signs(labels).to(scores.device, scores.dtype)
        return signs * scores.reshape(-1)
    indices = class_indices(labels, scores.shape[1]).to(scores.device)
    true = scores.gather(1, indices[:, None])[:, 0]
    others = scores.scatter(1, indices[:, None], float("-inf"))
    return true - others.amax(dim=1)


def margin_spec(scores: Tensor, labels: Tensor, dtype: torch.dtype) -> Tensor:
    """The rows $C$ (N, R, M) whose products $C f$ with the scores are the margins.

    Multiclass scores (N, C): the $C - 1$ rows $e_y - e_j$, $j \ne y$, in the order
    of $j$; binary scores: one row, the label's sign $s$ (the margin $s f$). The
    labels are read as in Note [Label conventions]; ``dtype`` is the rows' dtype.
    """
    n = scores.shape[0]
    device = scores.device
    if is_binary(scores):
        signs = binary_signs(labels).to(device=device, dtype=dtype)
        return signs.reshape(n, 1, 1)
    classes = scores.shape[1]
    true = class_indices(labels, classes).to(device)
    eye = torch.eye(classes, dtype=dtype, device=device)
    every = torch.arange(classes, device=device).expand(n, classes)
    others = every[every != true[:, None]].reshape(n, classes - 1)
    return eye[true].unsqueeze(1) - eye[others]  # rows e_y - e_j, j != y
