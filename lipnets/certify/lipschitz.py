r"""Certified radii and certified accuracy from a sound Lipschitz bound.

# Note [Certified radius]

Let $f$ be a classifier and $m(x) = f_y(x) - \max_{j \ne y} f_j(x)$ the margin
of its true class against *every* other class. If $m(x) > 0$ and each margin
$f_y - f_j$ is $K$-Lipschitz in $\ell_2$, then no perturbation $\delta$ with
$\|\delta\|_2 < m(x) / K$ changes the prediction: $f_y - f_j$ can drop by at
most $K \|\delta\|_2$. Which $K$ is valid depends on what is known about $f$:

- ``mode="vector"``: $f$ is $L$-Lipschitz as a map $\mathbb{R}^d \to
  \mathbb{R}^C$ (what [`lipschitz_bound`][lipnets.bounds.lipschitz_bound]
  gives). $f_y - f_j = (e_y - e_j)^\top f$ and $\|e_y - e_j\|_2 = \sqrt2$, so
  $K = \sqrt2 L$.
- ``mode="per_logit"``: only each logit is known to be $L$-Lipschitz (the
  "disjoint neurons" situation of PITFALLS row 3). Then $K = 2L$; using
  $\sqrt2$ here would over-state the radius.
- ``mode="last_layer"``: $f = W g + b$ with $g$ $L$-Lipschitz. Then
  $f_y - f_j = (w_y - w_j)^\top g + \text{const}$ is $\|w_y - w_j\|_2 L$-Lipschitz
  and the radius is $\min_{j \ne y} (f_y - f_j) / (\|w_y - w_j\|_2 L)$, a
  minimum over every class. Since $\|w_y - w_j\| = \|(e_y - e_j)^\top W\| \le
  \sqrt2 \|W\|_2$, it is never smaller than the vector radius of the same
  model with $L \|W\|_2$.

For one score per sample (binary: the sign is the class) the margin is
$s f(x)$ and $K = L$ in every mode ($\|w\| L$ with ``last_layer``).

A tie ($m = 0$) or a wrong prediction ($m < 0$) gets radius 0: nothing is
certified. Radii are computed in float64 from the scores the model returned;
the margins themselves carry the rounding of the model's forward pass, so run
the model in float64 to certify points whose margin is within float32 rounding
of 0.

$\ell_\infty$ radii follow from $\|\delta\|_2 \le \sqrt d \|\delta\|_\infty$:
the $\ell_\infty$ radius is the $\ell_2$ radius divided by $\sqrt d$, $d$ the
number of input entries per sample.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lipnets._progress import progress_bar
from lipnets._state import eval_mode, restored_buffers
from lipnets.bounds import compose, last_linear
from lipnets.errors import InvalidModelError, UnboundedModuleError
from lipnets.functional.margins import check_scores, class_indices, is_binary, margin
from lipnets.graph import module_kind, trace, trusted, unwrap

__all__ = ["certified_accuracy", "certified_radius"]

_MODES = ("vector", "per_logit", "last_layer")


def _check_norm(norm: object) -> float:
    if isinstance(norm, str):
        norm = {"2": 2.0, "l2": 2.0, "inf": math.inf, "linf": math.inf}.get(norm.lower(), norm)
    if (
        isinstance(norm, bool)
        or not isinstance(norm, numbers.Real)
        or float(norm)
        not in (
            2.0,
            math.inf,
        )
    ):
        raise ValueError(f"norm must be 2 or float('inf'), got {norm!r}")
    return float(norm)


def _check_mode(mode: object) -> str:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, _MODES))}, got {mode!r}")
    return str(mode)


def check_lipschitz(lipschitz: object, n: int) -> Tensor:
    """A positive bound, 0-dim or one per sample, as a float64 CPU tensor."""
    if isinstance(lipschitz, bool):
        raise TypeError("lipschitz must be a number or a tensor, got a bool")
    if isinstance(lipschitz, numbers.Real):
        value = torch.tensor(float(lipschitz), dtype=torch.float64)
    elif isinstance(lipschitz, Tensor):
        if lipschitz.is_complex() or lipschitz.dtype == torch.bool:
            raise TypeError(f"lipschitz must be real, got dtype {lipschitz.dtype}")
        value = lipschitz.detach().to("cpu", torch.float64)
        if value.ndim > 1 or (value.ndim == 1 and value.shape[0] != n):
            raise ValueError(
                f"lipschitz must be a scalar or hold one value per sample ({n}), "
                f"got shape {tuple(value.shape)}"
            )
    else:
        raise TypeError(f"lipschitz must be a number or a tensor, got {type(lipschitz).__name__}")
    if bool(torch.isnan(value).any()) or bool((value <= 0).any()):
        raise ValueError(
            "lipschitz must be a positive Lipschitz bound (from lipnets.lipschitz_bound), "
            f"got {value.tolist()}"
        )
    return value


def _last_layer_weight(last_layer: object) -> Tensor:
    if isinstance(last_layer, nn.Linear):
        if not trusted(last_layer, nn.Linear):
            raise UnboundedModuleError(
                f"last_layer ({module_kind(last_layer)}) may not compute W x + b with its "
                "weight: its class defines its own forward (or a method forward calls), a "
                "method is replaced on the instance, or a hook is attached (Note [Trust "
                'policy] in lipnets.graph.policy); use mode="vector"'
            )
        weight = last_layer.weight  # the realised weight of a parametrized layer
    elif isinstance(last_layer, Tensor):
        weight = last_layer
    else:
        raise TypeError(
            'mode="last_layer" needs last_layer=: the final nn.Linear (or its weight, '
            f"shape (classes, features)), got {type(last_layer).__name__}"
        )
    if weight.ndim != 2:
        raise ValueError(
            "the last layer's weight must have shape (classes, features), "
            f"got {tuple(weight.shape)}"
        )
    weight = weight.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("the last layer's weight contains NaN or infinite values")
    return weight


def certified_radius(
    logits: Tensor,
    labels: Tensor,
    lipschitz: float | Tensor,
    *,
    norm: float | str = 2,
    mode: str = "vector",
    last_layer: nn.Linear | Tensor | None = None,
    input_dim: int | None = None,
) -> Tensor:
    r"""Certified radius of each sample: no perturbation inside it changes the prediction.

    See Note [Certified radius] in this module for the three modes. The margin
    is taken against every other class, ties and misclassified samples get 0,
    and the radius is invariant to adding a constant to every logit.

    Args:
        logits: model outputs of shape ``(N, C)``, or one score per sample
            (``(N,)`` or ``(N, 1)``) for a binary classifier.
        labels: class indices or one-hot rows; binary labels 1 / 0 / -1 (see
            Note [Label conventions] in `lipnets.functional.margins`).
        lipschitz: a sound $\ell_2$ Lipschitz bound of the model (``vector``,
            ``per_logit``) or of everything before its last layer
            (``last_layer``); a number, a 0-dim tensor, or one value per sample.
        norm: ``2`` or ``float("inf")`` (also ``"inf"``): the norm of the radius.
        mode: ``"vector"`` (divide the margin by $\sqrt2 L$), ``"per_logit"``
            ($2L$) or ``"last_layer"`` ($\|w_y - w_j\| L$ for each class $j$).
        last_layer: with ``mode="last_layer"``, the final ``nn.Linear`` (a
            `BjorckLinear` reads its realised weight) or its weight matrix.
        input_dim: entries per input sample; required for ``norm=inf``.

    Returns:
        A float64 tensor of shape ``(N,)`` on the CPU, ``>= 0``.

    Raises:
        TypeError: on scores that are not floating point or a bad ``last_layer``.
        ValueError: on NaN scores, labels out of range or of another length, a
            non-positive or NaN ``lipschitz``, an unknown ``mode`` or ``norm``,
            or ``norm=inf`` without ``input_dim``.

    Examples:
        >>> import torch
        >>> from lipnets.certify import certified_radius
        >>> logits = torch.tensor([[2.0, 0.5, 1.0], [1.0, 1.0, 0.0]])
        >>> r = certified_radius(logits, torch.tensor([0, 0]), lipschitz=1.0)
        >>> bool(torch.isclose(r[0], torch.tensor(1 / 2**0.5, dtype=torch.float64)))
        True
        >>> r[1].item()  # a tie certifies nothing
        0.0
        >>> bool(torch.equal(certified_radius(logits + 7.0, torch.tensor([0, 0]), 1.0), r))
        True

    References:
        Tsuzuku, Sato & Sugiyama, "Lipschitz-Margin Training: Scalable
        Certification of Perturbation Invariance for Deep Neural Networks",
        NeurIPS 2018.
    """
    norm = _check_norm(norm)
    mode = _check_mode(mode)
    scores = check_scores(logits).detach()
    n = scores.shape[0]
    bound = check_lipschitz(lipschitz, n)
    if norm == math.inf:
        if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
            raise ValueError(
                "norm=inf needs input_dim=, the number of input entries per sample "
                f"(the l-inf radius is the l2 radius / sqrt(input_dim)), got {input_dim!r}"
            )
    scores64 = scores.to("cpu", torch.float64)
    labels = labels.detach().cpu() if isinstance(labels, Tensor) else labels
    if mode == "last_layer":
        if last_layer is None:
            raise TypeError(
                'mode="last_layer" needs last_layer=: the final nn.Linear or its weight'
            )
        radius = _last_layer_radius(scores64, labels, bound, _last_layer_weight(last_layer))
    else:
        if last_layer is not None:
            raise ValueError(f'last_layer= is only used with mode="last_layer", not {mode!r}')
        if is_binary(scores64):
            divisor = 1.0
        else:
            divisor = math.sqrt(2.0) if mode == "vector" else 2.0
        radius = margin(scores64, labels) / (divisor * bound)
    radius = radius.clamp(min=0.0)
    if norm == math.inf:
        radius = radius / math.sqrt(input_dim)
    return radius


def _last_layer_radius(scores: Tensor, labels: Any, bound: Tensor, weight: Tensor) -> Tensor:
    classes = 1 if is_binary(scores) else scores.shape[1]
    if weight.shape[0] != classes:
        raise ValueError(
            f"the last layer has {weight.shape[0]} outputs but the scores have {classes}"
        )
    if is_binary(scores):
        row = torch.linalg.vector_norm(weight[0])
        m = margin(scores, labels)
        if float(row) == 0.0:  # a constant score: the sign never changes
            return torch.where(m > 0, math.inf, 0.0).to(torch.float64)
        return m / (row * bound)
    margin(scores, labels)  # validates labels and NaN scores
    y = class_indices(labels, classes)
    gaps = scores.gather(1, y[:, None]) - scores  # (N, C): f_y - f_j
    diff = weight[y][:, None, :] - weight[None, :, :]  # (N, C, H): w_y - w_j
    scale = torch.linalg.vector_norm(diff, dim=2)
    if bound.ndim == 1:
        scale = scale * bound[:, None]
    else:
        scale = scale * bound
    # A pair with w_y = w_j has a constant gap: it never flips if positive, never certifies if not.
    per_class = torch.where(
        scale > 0,
        gaps / torch.where(scale > 0, scale, 1.0),
        torch.where(gaps > 0, math.inf, 0.0).to(torch.float64),
    )
    per_class = per_class.scatter(1, y[:, None], math.inf)
    return per_class.amin(dim=1)


def _batches(
    inputs: Tensor | Iterable[Any], labels: Tensor | None, batch_size: int
) -> Iterable[tuple[Tensor, Tensor]]:
    if isinstance(inputs, Tensor):
        if labels is None:
            raise ValueError("labels are required when inputs is a tensor")
        if not isinstance(labels, Tensor) or labels.ndim == 0 or labels.shape[0] != inputs.shape[0]:
            got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(
                f"inputs and labels must have the same length: {inputs.shape[0]} inputs, "
                f"labels {got}"
            )
        for start in range(0, inputs.shape[0], batch_size):
            yield inputs[start : start + batch_size], labels[start : start + batch_size]
        return
    if labels is not None:
        raise ValueError(
            "labels must be None when inputs is an iterable of (inputs, labels) batches "
            "such as a DataLoader"
        )
    for batch in inputs:
        if not isinstance(batch, Sequence) or len(batch) < 2:
            raise TypeError(
                "each batch must be an (inputs, labels) pair, as a DataLoader over a "
                f"labelled dataset yields, got {type(batch).__name__}"
            )
        yield batch[0], batch[1]


def _check_eps(eps: object) -> list[float]:
    values = list(eps) if isinstance(eps, (Sequence, Tensor)) else [eps]
    if not values:
        raise ValueError("eps must hold at least one radius")
    out = []
    for value in values:
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"eps must be a number or a sequence of numbers, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"eps must be finite and >= 0, got {value!r}")
        out.append(float(value))
    return out


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer; ``None`` if it has neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


def certified_accuracy(
    model: nn.Module,
    inputs: Tensor | Iterable[Any],
    labels: Tensor | None = None,
    eps: float | Sequence[float] = 0.0,
    *,
    lipschitz: float | Tensor | None = None,
    norm: float | str = 2,
    mode: str = "vector",
    batch_size: int = 256,
    progress: bool = False,
) -> dict[float, float]:
    r"""Fraction of samples whose certified radius exceeds each ``eps``.

    The Lipschitz bound is computed here with
    [`lipschitz_bound`][lipnets.bounds.lipschitz_bound] on the model in eval
    mode (for ``mode="last_layer"``, on everything but the final ``nn.Linear``
    of an ``nn.Sequential``) unless ``lipschitz=`` is passed; a model without
    a sound bound is refused, never assumed 1-Lipschitz. A sample counts at
    ``eps`` when it is classified correctly with radius ``> eps``, so ``eps=0``
    gives the clean accuracy with ties counted as errors.

    Args:
        model: the classifier; it runs in eval mode (each submodule's mode is
            restored afterwards).
        inputs: a tensor of inputs with ``labels``, or an iterable of
            ``(inputs, labels)`` batches such as a ``DataLoader`` (then
            ``labels=None``). Batches move to the model's device.
        labels: class indices, one-hot rows or binary labels (see
            Note [Label conventions] in `lipnets.functional.margins`).
        eps: one radius or a sequence of radii, each finite and ``>= 0``.
        lipschitz: a sound bound to use instead of computing one (keyword only);
            with ``mode="last_layer"`` the bound of everything before the last layer.
        norm: ``2`` or ``float("inf")``; ``eps`` is measured in this norm.
        mode: ``"vector"``, ``"per_logit"`` or ``"last_layer"``, as in
            `certified_radius`.
        batch_size: samples per forward pass when ``inputs`` is a tensor.
        progress: show a `tqdm` progress bar over batches.

    Returns:
        ``{eps: accuracy}`` in the order given, accuracies in ``[0, 1]``.

    Raises:
        UnboundedModuleError: if the model has no sound bound (and none is given).
        ValueError: on mismatched lengths, labels out of range, a negative
            ``eps``, an empty dataset, or ``mode="last_layer"`` on a model that is
            not an ``nn.Sequential`` ending in an ``nn.Linear``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import lipnets
        >>> from lipnets.certify import certified_accuracy
        >>> model = nn.Sequential(lipnets.BjorckLinear(4, 8), lipnets.MaxMin(), nn.Linear(8, 3))
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> acc = certified_accuracy(model, x, y, [0.0, 0.1, 1.0])
        >>> acc[0.0] >= acc[0.1] >= acc[1.0]
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    mode = _check_mode(mode)
    norm = _check_norm(norm)
    radii = _check_eps(eps)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    core = unwrap(model)
    traced = trace(core)  # the one front end: trust and faithfulness policies
    last_layer = None
    if mode == "last_layer":
        found = last_linear(traced)
        if found is None:
            raise InvalidModelError(
                'mode="last_layer" needs a model whose output is the output of a final '
                "nn.Linear that lipnets trusts (no forward of its own, no hook; Note [Trust "
                f"policy]), got {module_kind(core)}"
            )
        last_layer = found[0]
    device = model_device(core)
    batches = _batches(inputs, labels, batch_size)
    bar = progress_bar(progress, _batch_count(inputs, batch_size), "certified_accuracy")
    counts = [0] * len(radii)
    total = 0
    given = None
    bounds: dict[tuple[int, ...], Tensor] = {}
    if lipschitz is not None:
        if isinstance(lipschitz, Tensor) and lipschitz.numel() != 1:
            raise ValueError(
                "certified_accuracy takes one Lipschitz bound for the model, "
                f"got a tensor of shape {tuple(lipschitz.shape)}"
            )
        given = check_lipschitz(
            lipschitz.reshape(()) if isinstance(lipschitz, Tensor) else lipschitz, 1
        )
    with eval_mode(core), torch.no_grad():
        for x, y in batches:
            if not isinstance(x, Tensor):
                raise TypeError(f"inputs must be tensors, got {type(x).__name__}")
            if device is not None:
                x = x.to(device)
            if given is None:
                # A bound may depend on the input size (convolutions): one per sample shape.
                shape = (1, *x.shape[1:])
                if shape not in bounds:
                    composition = compose(traced, shape)
                    body = composition.body if mode == "last_layer" else None
                    bounds[shape] = composition.bound if body is None else body
                bound = bounds[shape]
            else:
                bound = given
            with restored_buffers(core):  # every batch scored by the state the bound saw
                scores = model(x)
            r = certified_radius(
                scores,
                y,
                bound,
                norm=norm,
                mode=mode,
                last_layer=last_layer,
                input_dim=x[0].numel() if norm == math.inf else None,
            )
            for k, radius in enumerate(radii):
                counts[k] += int((r > radius).sum())
            total += x.shape[0]
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if total == 0:
        raise ValueError("no samples: inputs is empty")
    return {radius: count / total for radius, count in zip(radii, counts, strict=True)}


def _batch_count(inputs: Any, batch_size: int) -> int | None:
    if isinstance(inputs, Tensor):
        return math.ceil(inputs.shape[0] / batch_size)
    return len(inputs) if hasattr(inputs, "__len__") else None
