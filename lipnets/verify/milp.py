r"""Exact verification of ReLU networks by mixed-integer linear programming (MILP).

`milp_verify` computes, for each sample of a batch, the exact minimum of
every classification margin $f_y - f_j$ ($j \ne y$) over the l-infinity ball
around the sample (optionally intersected with an input domain box such as
$[0, 1]$ for images), by solving one MILP per margin with
`scipy.optimize.milp` (HiGHS). It is slow (worst case exponential in the
number of unstable ReLUs) and exact: the reference that incomplete verifiers
(CROWN) and branch and bound are checked against, and the exact robust
accuracy of small models. The program is built on the propagation graph
(Note [MILP encoding of a propagation graph] in `lipnets.verify.encoding`),
so every model that `crown_bounds` reads and whose only nonlinearities are
ReLUs, LeakyReLUs, MaxMin/GroupSort/FullSort, ``torch.maximum``/``minimum``
and max pooling is covered, convolutions and residual connections included.

# Note [What exact means]

The MILP's minimum is the exact minimum of the margin over the box in exact
arithmetic (Note [MILP encoding of a propagation graph]). HiGHS solves it in
float64 with tolerances: constraints hold to about $10^{-7}$ (primal
feasibility), a binary may sit $10^{-6}$ away from 0 or 1 (integrality; in
a big-M row this lets a ReLU output move by $10^{-6} u$), and the search
stops when its proven lower bound (the *dual bound*) is within $10^{-6}$ of
the best solution (the relative gap is set to 0). So "exact" means: the
optimum up to these tolerances, scaled by the magnitudes of the weights and
bounds. lipnets never reports more than it knows:

* **falsified**: some point $x'$ of the box, a MILP minimiser clipped into
  the box (and into the closed ball in the dtype of ``x``), has
  ``model(x')[y] <= model(x')[j]`` for some $j \ne y$ in a plain forward
  pass of the model (a tie counts: the prediction is not robustly $y$).
  That is a fact about the model, whatever the solver's tolerances.
* **verified**: every margin's dual bound is $>$ ``tol`` (default
  $10^{-6}$). A minimum margin in $(0, \mathrm{tol}]$ is *not* called
  verified.
* **unknown**, with a reason: the time or node limit was reached first; the minimum
  margin is within ``tol`` of 0 but no forward pass confirms a
  counterexample; or the MILP found a negative minimum that the forward pass
  does not confirm (numerical trouble, never claimed as a counterexample).

A test that compares another verifier with this one should use cases whose
minimum margin is well away from 0 (the cases of ``tests/verify/cases.py``
are decided with ``tol`` $= 10^{-4}$), where both answers are determined.

# Note [Deciding without the exact minimum]

Proving that a minimum is exact can take far more branch-and-bound nodes than
deciding its sign: HiGHS must close the gap between its best point and its
bound. With ``all_margins=False`` each margin's program gets one more row,
$f_y(x) - f_j(x) \le \mathrm{tol}$, and still minimises the margin: if the
program is infeasible, no point of the box has a margin $\le$ ``tol``, so the
margin is proven $>$ ``tol`` (its ``lower`` is reported as ``tol``, its
``margins`` entry NaN); if it is feasible, its minimum is the exact minimum
of the margin (the row removes only points above ``tol``). Every node whose
relaxation is above ``tol`` is pruned at once, as an objective cutoff would.
Margins CROWN already proves $>$ ``tol`` are not solved, the others are
solved from the smallest CROWN bound up, and a confirmed counterexample ends
the sample.

# Note [Input domain]

``domain=(lo, hi)`` restricts the inputs to the box $lo \le x \le hi$ (floats
or tensors broadcastable to ``x``): the problem is then the minimum over
$B_\infty(x_0, \varepsilon) \cap [lo, hi]$, as for images whose pixels lie in
$[0, 1]$. Every sample must lie in the domain. The pre-activation bounds are
those of the whole ball (Note [Pre-activation bounds for big-M] in
`lipnets.verify.encoding`). A verifier compared with `milp_verify` on such a
case must use the same domain.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lipnets._checks import check_int, check_real
from lipnets.functional.margins import binary_signs, check_scores, class_indices, is_binary
from lipnets.graph import trace
from lipnets.propagation.checks import check_args, check_norm, session
from lipnets.propagation.graph import build
from lipnets.verify.status import Statuses

__all__ = ["MILPResult", "milp_verify"]


@dataclass(frozen=True)
class MILPResult(Statuses):
    """What `milp_verify` found for each sample of a batch (Note [What exact means]).

    Margins are indexed by class: column $j$ is the margin $f_y - f_j$, NaN in
    the label's column (and for a margin not solved); a binary classifier
    (one score) has one column, the margin $s f$.
    """

    status: tuple[str, ...]
    """Per sample: ``"verified"``, ``"falsified"`` or ``"unknown"``."""
    margins: Tensor
    """(N, C) float64: the MILP's minimum of each margin over the box (its best solution;
    NaN where none was found or the margin was not solved)."""
    lower: Tensor
    """(N, C) float64: a proven lower bound of each minimum: the solver's dual bound; with
    ``all_margins=False``, CROWN's bound for a margin it proves and ``tol`` for one proven
    above ``tol`` (Note [Deciding without the exact minimum]); ``-inf`` for a margin left
    unsolved (a limit, or a sample already falsified)."""
    crown: Tensor
    """(N, C) float64: CROWN's lower bound of each minimum over the ball (the incomplete
    answer; its pre-activation bounds are the big-M constants)."""
    counterexample: Tensor
    """Like ``x``: for a falsified sample, the point of the box where a forward pass of the
    model confirms a margin ``<= 0``; NaN for the other samples."""
    reason: tuple[str, ...]
    """Per sample: why it is unknown, ``""`` when it is decided."""
    time: Tensor
    """(N,) float64: seconds spent on each sample (graph, bounds and solves)."""
    nodes: Tensor
    """(N,) int64: branch-and-bound nodes HiGHS explored, over the sample's solves."""
    binaries: Tensor
    """(N,) int64: binary variables of the sample's program (its unstable ReLUs)."""

    @property
    def min_margin(self) -> Tensor:
        """(N,) float64: the smallest solved margin of each sample (NaN if none was)."""
        smallest = self.margins.nan_to_num(nan=math.inf).amin(dim=1)
        return smallest.where(~torch.isnan(self.margins).all(dim=1), math.nan)


def milp_verify(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    norm: float | str = math.inf,
    domain: tuple[float | Tensor, float | Tensor] | None = None,
    time_limit: float | None = None,
    node_limit: int | None = None,
    tol: float = 1e-6,
    all_margins: bool = True,
    tighten: bool = True,
) -> MILPResult:
    r"""Exact robustness of each sample over an l-infinity ball, by MILP (HiGHS).

    For each sample $(x_0, y)$ and each class $j \ne y$, minimises $f_y(x) -
    f_j(x)$ over $\{x : \|x - x_0\|_\infty \le \varepsilon\}$ (intersected with
    ``domain``) exactly: the network's ReLUs are big-M constraints built from
    CROWN's pre-activation bounds, one binary per unstable ReLU (Note [MILP
    encoding of a propagation graph] in `lipnets.verify.encoding`). Each
    sample ends ``"verified"``, ``"falsified"`` (with a counterexample a
    forward pass confirms) or ``"unknown"`` (Note [What exact means] for the
    tolerance policy). Needs scipy.

    The model runs in eval mode (each submodule's mode is restored
    afterwards); no parameter or buffer changes.

    Args:
        model: a classifier built from the operations that
            [`crown_bounds`][lipnets.propagation.crown_bounds] supports, whose
            nonlinearities are ReLU, LeakyReLU, MaxMin, GroupSort, FullSort,
            ``torch.maximum``/``minimum`` or max pooling; returning scores
            ``(N, C)`` or one score per sample.
        x: the centres, a floating-point batch ``(N, ...)`` with the model's
            dtype (float64 recommended).
        y: labels: class indices or one-hot rows, or binary labels (Note
            [Label conventions] in `lipnets.functional.margins`).
        eps: the radius, a number $\ge 0$ or a tensor of shape ``(N,)``.
        norm: ``float("inf")`` (or ``"inf"``, ``"linf"``); an l2 ball is not
            a polyhedron (its exact problem is a mixed-integer quadratic
            program) and is refused.
        domain: optional ``(lo, hi)``, the input box (Note [Input domain]).
        time_limit: optional seconds per sample (all its margins together);
            a sample not decided in time is ``"unknown"``.
        node_limit: optional branch-and-bound nodes per margin (HiGHS's
            ``node_limit``): a budget that, unlike time, gives the same
            answer on every machine.
        tol: a sample is verified when every margin's proven lower bound
            exceeds ``tol`` ($\ge 0$).
        all_margins: with True (default) every margin's exact minimum is
            computed. With False a sample stops as soon as it is decided:
            margins CROWN already proves $>$ ``tol`` are not solved (their
            ``lower`` is CROWN's bound, ``margins`` NaN), the others are
            solved from the smallest CROWN bound up, and the first confirmed
            counterexample ends the sample; each remaining margin's program
            gets the row margin $\le$ ``tol`` (Note [Deciding without the exact
            minimum]). Use it for robust accuracy.
        tighten: with True (default), the bounds of each ReLU input after the
            first unstable layer are tightened by linear programs (Note
            [Pre-activation bounds for big-M] in `lipnets.verify.encoding`):
            two LPs per unstable entry, then fewer and smaller big-M constants.

    Returns:
        A `MILPResult`.

    Raises:
        TypeError: if ``model`` is not a module or ``x`` not a floating-point
            tensor of the model's dtype, or the labels are not a tensor.
        ValueError: for an l2 ``norm``, a negative ``eps``, labels out of
            range, a sample outside ``domain``, or a bad ``time_limit``,
            ``node_limit`` or ``tol``.
        InvalidModelError: for a nonlinearity other than the ReLU family
            (tanh, sigmoid, GELU, softmax...): the message names its node.
        ImportError: without scipy.

    Examples:
        A linear classifier is exactly verified up to its distance to the
        boundary, $1/2$ in l-infinity for the scores $(x_1, x_2)$ at
        $(1, 0)$, and falsified beyond, with a counterexample:

        >>> import torch
        >>> from lipnets.verify import milp_verify
        >>> model = torch.nn.Linear(2, 2, bias=False).double()
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2))
        >>> x, y = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([0])
        >>> milp_verify(model, x, y, 0.4).status, milp_verify(model, x, y, 0.6).status
        (('verified',), ('falsified',))
        >>> round(milp_verify(model, x, y, 0.4).margins[0, 1].item(), 6)  # 1 - 2 * 0.4
        0.2
        >>> cex = milp_verify(model, x, y, 0.6).counterexample
        >>> bool(model(cex)[0, 0] <= model(cex)[0, 1])
        True

    References:
        Tjeng, V., Xiao, K. & Tedrake, R. (2019). Evaluating robustness of
        neural networks with mixed integer programming. *ICLR*.
    """
    q = check_norm(norm)
    if q != math.inf:
        raise ValueError(
            "milp_verify handles norm=float('inf') only: an l2 ball is not a polyhedron (its "
            f"exact problem is a mixed-integer quadratic program), got norm={norm!r}"
        )
    x, radius = check_args(model, x, eps)
    limit = None if time_limit is None else check_real(time_limit, "time_limit", low=0.0,
                                                      low_open=True)  # fmt: skip
    nodes = None if node_limit is None else check_int(node_limit, "node_limit", minimum=0)
    tol = check_real(tol, "tol", low=0.0)
    for name, flag in (("all_margins", all_margins), ("tighten", tighten)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    box_lo, box_hi = _box(x, radius, domain)
    try:
        from lipnets.verify.solve import solve_sample
    except ImportError as error:  # scipy (and numpy) are optional dependencies
        raise ImportError("milp_verify needs scipy (pip install scipy)") from error
    traced = trace(model)  # the front end's policies first, before any forward pass
    n = x.shape[0]
    with session(model):
        scores = model(x)
        if not isinstance(scores, Tensor):
            raise TypeError(f"the model must return a tensor, got {type(scores).__name__}")
        check_scores(scores)
        spec, columns = _spec(scores, y, n)
        results = []
        for s in range(n):
            start = time.perf_counter()
            xs, rs = x[s : s + 1], radius[s : s + 1]
            graph = build(traced, xs, rs, q)
            results.append(
                solve_sample(
                    model, graph, xs, rs, box_lo[s : s + 1], box_hi[s : s + 1], spec[s],
                    columns[s], limit=limit, node_limit=nodes, tol=tol, all_margins=all_margins,
                    tighten=tighten, start=start,
                )
            )  # fmt: skip
    classes = 1 if is_binary(scores) else scores.shape[1]
    return _collect(results, x, classes)


def _box(x: Tensor, radius: Tensor, domain: object) -> tuple[Tensor, Tensor]:
    """The box [x - eps, x + eps] intersected with the domain, or a clear error."""
    r = radius.reshape(-1, *([1] * (x.ndim - 1)))
    lo, hi = x - r, x + r
    if domain is None:
        return lo, hi
    if not isinstance(domain, (tuple, list)) or len(domain) != 2:
        raise TypeError(f"domain must be a pair (lo, hi) or None, got {domain!r}")
    ends = []
    for name, end in zip(("lo", "hi"), domain, strict=True):
        if isinstance(end, numbers.Real) and not isinstance(end, bool):
            end = torch.tensor(float(end), dtype=x.dtype, device=x.device)
        if not isinstance(end, Tensor) or end.is_complex():
            raise TypeError(f"domain {name} must be a real number or tensor, got {end!r}")
        try:
            end = torch.broadcast_to(end.to(dtype=x.dtype, device=x.device), x.shape)
        except RuntimeError as error:
            raise ValueError(
                f"domain {name} of shape {tuple(end.shape)} does not broadcast to x's shape "
                f"{tuple(x.shape)}"
            ) from error
        if bool(torch.isnan(end).any()):
            raise ValueError(f"domain {name} contains NaN")
        ends.append(end)
    d_lo, d_hi = ends
    if bool((d_lo > d_hi).any()):
        raise ValueError("domain must have lo <= hi everywhere")
    if bool(((x < d_lo) | (x > d_hi)).any()):
        raise ValueError("every sample of x must lie in the domain (lo <= x <= hi)")
    return torch.maximum(lo, d_lo), torch.minimum(hi, d_hi)


def _spec(scores: Tensor, labels: object, n: int) -> tuple[Tensor, list[list[int]]]:
    """Margin rows (N, R, M) and, per sample, the result column of each row."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    labels = labels.detach().to(scores.device)
    if labels.ndim == 0 or labels.shape[0] != n:
        raise ValueError(
            f"labels must have one entry per sample: {n} samples but labels of shape "
            f"{tuple(labels.shape)}"
        )
    if is_binary(scores):
        signs = binary_signs(labels).to(torch.float64)
        return signs.reshape(n, 1, 1), [[0] for _ in range(n)]
    c = scores.shape[1]
    true = class_indices(labels, c)
    eye = torch.eye(c, dtype=torch.float64)
    rows, columns = [], []
    for s in range(n):
        others = [j for j in range(c) if j != int(true[s])]
        rows.append(eye[int(true[s])] - eye[others])
        columns.append(others)
    return torch.stack(rows), columns


def _collect(results: list, x: Tensor, classes: int) -> MILPResult:
    n = len(results)
    margins = torch.full((n, classes), math.nan, dtype=torch.float64)
    lower = torch.full((n, classes), math.nan, dtype=torch.float64)
    crown = torch.full((n, classes), math.nan, dtype=torch.float64)
    cex = torch.full_like(x, math.nan)
    for s, r in enumerate(results):
        for j, (m, lo) in r.margins.items():
            margins[s, j], lower[s, j] = m, lo
        for j, value in r.crown.items():
            crown[s, j] = value
        if r.counterexample is not None:
            cex[s] = r.counterexample.reshape(x.shape[1:]).to(x)
    return MILPResult(
        status=tuple(r.status for r in results),
        margins=margins.to(x.device),
        lower=lower.to(x.device),
        crown=crown.to(x.device),
        counterexample=cex,
        reason=tuple(r.reason for r in results),
        time=torch.tensor([r.time for r in results], dtype=torch.float64),
        nodes=torch.tensor([r.nodes for r in results], dtype=torch.int64),
        binaries=torch.tensor([r.binaries for r in results], dtype=torch.int64),
    )
