r"""Certificates from bound propagation: CROWN (or IBP) bounds of the classification margins.

# Note [CROWN certificates]

A sample $(x_0, y)$ is certified at radius $\varepsilon$ when no point of the
closed ball $B = \{x : \|x - x_0\| \le \varepsilon\}$ (l2 or l-infinity)
changes the prediction. For a multiclass model with scores $f$, lipnets bounds
the $C - 1$ margins $f_y - f_j$, $j \ne y$, *directly*: they are the rows of
the specification $C = (e_y - e_j)^\top_{j \ne y}$ passed to
[`crown_bounds`][lipnets.propagation.crown_bounds], which returns a lower
bound $\underline{m}_j \le \min_{x \in B} (f_y(x) - f_j(x))$. If every
$\underline{m}_j > 0$, then $f_y > f_j$ on all of $B$ for every $j \ne y$: the
prediction is $y$, without a tie, everywhere in the ball. For one score per
sample (binary, Note [Label conventions] in `lipnets.functional.margins`) the
single row is the label's sign $s$, and the condition is a lower bound of $s
f$ above 0.

Bounding the margin itself, rather than subtracting an upper bound of $f_j$
from a lower bound of $f_y$, keeps what the two scores share: on a linear
model $f = W x + b$ the bound is $f_y(x_0) - f_j(x_0) - \varepsilon \|w_y -
w_j\|_*$, which is exact, so a point is certified exactly when its distance to
the decision boundary exceeds $\varepsilon$; the difference of the separate
bounds would subtract $\varepsilon (\|w_y\|_* + \|w_j\|_*)$ instead.

A misclassified (or tied) point is never certified: the lower bound of a
margin over a ball that contains $x_0$ is at most the margin at $x_0$, and the
margin at $x_0$ is checked as well, so the answer does not depend on rounding
there. ``method="ibp"`` uses
[`interval_bounds`][lipnets.propagation.interval_bounds] instead; CROWN's
bounds are never looser than IBP's (Note [CROWN never looser than IBP] in
`lipnets.propagation.lirpa`), so every point IBP certifies, CROWN certifies.

These certificates rest on the network's activation pattern on the ball, not
on a global Lipschitz constant, and they are complementary to the Lipschitz
certificates of Note [Certified radius] in `lipnets.certify.lipschitz`: on a
gradient-norm-preserving network (Björck layers, MaxMin) the Lipschitz
certificate is nearly tight and CROWN, which relaxes every comparator whose
order is not fixed on the ball, certifies fewer points at large radii; on a
network with unconstrained weights, CROWN is often far tighter than a product
of layer norms. Both are sound: a point certified by either is certified.

**Soundness and rounding.** The certificate is sound in exact arithmetic. The
bounds are computed in the dtype of the inputs without outward rounding (Note
[Floating-point rounding] in `lipnets.propagation.lirpa`), so a margin bound
within rounding of 0 can be wrong by that much: certify in float64 (model and
inputs, e.g. a frozen ``model.double()`` copy).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from lipnets._checks import check_int
from lipnets._progress import progress_bar
from lipnets._state import eval_mode, restored_buffers
from lipnets.functional.margins import (
    check_scores,
    margin,
    margin_spec,
)
from lipnets.graph import reuse_traces, trace
from lipnets.propagation.lirpa import check_args, check_norm, crown_bounds, interval_bounds

__all__ = ["certify_crown"]

_METHODS = {
    "crown": crown_bounds,
    "ibp": interval_bounds,
    "alpha-crown": functools.partial(crown_bounds, optimize=True),
}


def certify_crown(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    norm: float | str = 2,
    method: str = "crown",
    batch_size: int = 256,
    progress: bool | None = None,
) -> Tensor:
    r"""Which samples are certified: no point of the $\varepsilon$-ball changes the prediction.

    The margins $f_y - f_j$ ($j \ne y$) are bounded from below over the ball
    by CROWN with the specification rows $e_y - e_j$ (Note [CROWN
    certificates] in this module); a sample is certified when every lower
    bound is $> 0$ and it is classified correctly. For one score per sample
    (binary), the lower bound of $s f$ must be $> 0$, $s = \pm 1$ the label's
    sign. The certificate is sound in exact arithmetic: run the model and the
    inputs in float64 (Note [Floating-point rounding] in
    `lipnets.propagation.lirpa`).

    The model runs in eval mode (each submodule's mode is restored
    afterwards); no parameter or buffer changes.

    Args:
        model: a classifier built from the operations that
            [`crown_bounds`][lipnets.propagation.crown_bounds] supports,
            returning scores of shape ``(N, C)`` or one score per sample,
            ``(N,)`` or ``(N, 1)``.
        x: the inputs, a floating-point batch ``(N, ...)`` with the model's
            dtype.
        y: labels: class indices or one-hot rows (multiclass), 1 / 0 / -1
            (binary); see Note [Label conventions] in
            `lipnets.functional.margins`.
        eps: the radius of the ball, a number $\ge 0$ or a tensor of shape
            ``(N,)`` (one radius per sample).
        norm: ``2`` (l2 ball) or ``float("inf")`` (l-infinity ball); the
            strings ``"l2"``, ``"inf"`` and ``"linf"`` are accepted.
        method: ``"crown"`` (default), ``"alpha-crown"`` (α-CROWN, 20 steps:
            slower, certifies a superset of CROWN's points; Note [α-CROWN] in
            `lipnets.propagation.alpha`) or ``"ibp"`` (interval bound
            propagation: faster, looser; it certifies a subset of CROWN's
            points). For complete verification, `lipnets.verify.verify`.
        batch_size: samples bounded per call (the model is traced once for all
            of them, `lipnets.graph.reuse_traces`); misclassified samples are
            never bounded, as no bound certifies them.
        progress: a `tqdm` progress bar over the batches; ``None`` (the
            default): when stderr is a terminal and there is more than one batch.

    Returns:
        A bool tensor of shape ``(N,)`` on the device of ``x``: ``True`` where
        the sample is certified.

    Raises:
        TypeError: if ``model`` is not a module, ``x`` is not a floating-point
            tensor or its dtype differs from the model's, or the model does not
            return floating-point scores.
        ValueError: for labels of another length or out of range, a negative,
            NaN or infinite ``eps`` (or one of the wrong shape), NaN or
            infinite inputs, scores of an unsupported shape, or an unknown
            ``norm`` or ``method``.
        UnboundedModuleError: if an operation of the model has no propagation
            rule (the message names it).

    Examples:
        A linear classifier whose decision boundary is at distance
        $1/\sqrt2 \approx 0.707$ from the input: CROWN certifies radius 0.7
        but not 0.72 (it is exact on a linear model). IBP folds the margin
        into the last affine layer (Note [Specification folded into the last
        affine layer] in `lipnets.propagation.lirpa`), which is exact on this
        one-layer model too; bounding the two scores separately and subtracting
        ($1 - \varepsilon > \varepsilon$) would certify only radii below 0.5.

        >>> import torch
        >>> from lipnets.certify import certify_crown
        >>> model = torch.nn.Linear(2, 2, bias=False).double()
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2))
        >>> x, y = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([0])
        >>> certify_crown(model, x, y, 0.7).item(), certify_crown(model, x, y, 0.72).item()
        (True, False)
        >>> certify_crown(model, x, y, 0.7, method="ibp").item()
        True
        >>> certify_crown(model, x, y, 0.72, method="ibp").item()
        False

    References:
        Zhang, H., Weng, T.-W., Chen, P.-Y., Hsieh, C.-J. & Daniel, L. (2018).
        Efficient neural network robustness certification with general
        activation functions. *NeurIPS*.
    """
    if not isinstance(method, str) or method.lower() not in _METHODS:
        raise ValueError(f"method must be 'crown', 'alpha-crown' or 'ibp', got {method!r}")
    bounds_of = _METHODS[method.lower()]
    q = check_norm(norm)
    batch_size = check_int(batch_size, "batch_size")
    x, radius = check_args(model, x, eps)
    trace(model)  # the front end's policies first (hooks, NaN weights), before any forward
    n = x.shape[0]
    with eval_mode(model), torch.no_grad(), restored_buffers(model):
        scores = model(x)  # the state the bounds see (Note [State restored] in lipnets._state)
    if not isinstance(scores, Tensor):
        raise TypeError(f"the model must return a tensor of scores, got {type(scores).__name__}")
    check_scores(scores)
    if scores.shape[0] != n:
        raise ValueError(
            f"the model must map N inputs to N rows of scores, got input shape "
            f"{tuple(x.shape)} and output shape {tuple(scores.shape)}"
        )
    if not isinstance(y, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(y).__name__}")
    y = y.detach().to(scores.device)
    correct = margin(scores, y) > 0  # validates the labels (length, range) and the scores
    spec = margin_spec(scores, y, x.dtype)
    certified = torch.zeros(n, dtype=torch.bool, device=x.device)
    todo = correct.nonzero().squeeze(1).to(x.device)
    batches = todo.split(batch_size) if todo.numel() else ()
    one = progress is None and len(batches) <= 1  # nothing to show progress over
    bar = progress_bar(False if one else progress, len(batches), "certify_crown")
    try:
        with reuse_traces():  # one trace and one graph per batch shape for all batches
            for part in batches:
                lower = bounds_of(
                    model, x[part], radius[part], norm=q, spec=spec[part.to(spec.device)]
                ).lower
                certified[part] = (lower > 0).all(dim=1).to(x.device)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return certified
