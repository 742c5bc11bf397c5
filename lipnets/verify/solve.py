r"""One sample of `milp_verify`: encode, solve each margin with HiGHS, decide honestly.

`solve_sample` builds the program of Note [MILP encoding of a propagation graph]
(`lipnets.verify.encoding`) for one sample, minimises each margin row with
`scipy.optimize.milp`, confirms every minimiser by a forward pass of the model,
and applies the policy of Note [What exact means] in `lipnets.verify.milp`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import Tensor, nn

from lipnets.propagation.graph import Graph
from lipnets.verify.encoding import check_relu_graph, encode, relu_bounds

__all__ = ["SampleResult", "solve_sample"]


@dataclass
class SampleResult:
    """The answer for one sample (gathered into a `MILPResult` by `lipnets.verify.milp`)."""

    status: str = "unknown"
    reason: str = ""
    margins: dict[int, tuple[float, float]] = field(default_factory=dict)
    """Result column -> (MILP minimum, proven lower bound)."""
    counterexample: Tensor | None = None
    crown: dict[int, float] = field(default_factory=dict)
    """Result column -> CROWN's lower bound of the margin."""
    above: set[int] = field(default_factory=set)
    """Columns proven > tol because no point has margin <= tol (``all_margins=False``)."""
    time: float = 0.0
    nodes: int = 0
    binaries: int = 0


def _into_ball(point: Tensor, x: Tensor, r: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``point`` clamped into the box, then moved an ulp at a time towards ``x`` wherever
    rounding leaves ``|point - x| > r`` in the dtype (so it lies in the closed ball)."""
    point = torch.minimum(torch.maximum(point, lo), hi)
    for _ in range(4):
        out = (point - x).abs() > r
        if not bool(out.any()):
            break
        point = torch.where(out, torch.nextafter(point, x), point)
    return point


def _forward_margin(model: nn.Module, point: Tensor, spec: Tensor) -> float:
    """The smallest margin row of ``spec`` (R, M) at ``point`` in a plain forward pass."""
    scores = model(point).reshape(-1).to(torch.float64).cpu()
    return float((spec @ scores).min())


def solve_sample(
    model: nn.Module,
    graph: Graph,
    x: Tensor,
    radius: Tensor,
    box_lo: Tensor,
    box_hi: Tensor,
    spec: Tensor,
    columns: list[int],
    *,
    limit: float | None,
    node_limit: int | None,
    tol: float,
    all_margins: bool,
    tighten: bool,
    start: float,
) -> SampleResult:
    """Every margin row of ``spec`` (R, M) minimised over the box of one sample (batch 1)."""
    check_relu_graph(graph)
    result = SampleResult()
    r = radius.reshape(1, *([1] * (x.ndim - 1)))
    best: tuple[float, Tensor] | None = None  # (forward margin, point) of the best minimiser

    def consider(point: Tensor) -> None:
        nonlocal best
        point = _into_ball(point.to(x).reshape(x.shape), x, r, box_lo, box_hi)
        value = _forward_margin(model, point, spec)
        if best is None or value < best[0]:
            best = (value, point)

    consider(x)  # the centre is in the box
    if graph.output is None:  # constant scores: the margins are their values
        flat = graph.output_value.reshape(-1).to(torch.float64).cpu()
        for row, col in zip(spec, columns, strict=True):
            value = float(row @ flat)
            result.margins[col] = (value, value)
            result.crown[col] = value
        return _decide(result, best, tol, limit_hit=False, trouble="", start=start)
    lows, ups, crown = relu_bounds(graph, x, radius, spec.unsqueeze(0))
    assert crown is not None
    result.crown = {col: float(crown[i]) for i, col in enumerate(columns)}
    flat_lo = box_lo.reshape(-1).to(torch.float64).cpu().numpy()
    flat_hi = box_hi.reshape(-1).to(torch.float64).cpu().numpy()
    program, e_out, c_out = encode(graph, lows, ups, flat_lo, flat_hi, tighten)
    a, row_lo, row_hi = program.matrix()
    lb, ub, integral = program.bounds()
    result.binaries = program.binaries
    constraints = LinearConstraint(a, row_lo, row_hi) if a.shape[0] else None
    spec_np = spec.to(torch.float64).cpu().numpy()
    order = list(range(len(columns)))
    if not all_margins:
        order.sort(key=lambda i: crown[i])
    limit_hit, trouble = False, ""
    n0 = flat_lo.shape[0]
    for i in order:
        col = columns[i]
        if not all_margins and crown[i] > tol:  # proven by CROWN
            result.margins[col] = (math.nan, float(crown[i]))
            continue
        options: dict[str, float] = {"mip_rel_gap": 0.0}
        if node_limit is not None:
            options["node_limit"] = node_limit
        if limit is not None:
            left = limit - (time.perf_counter() - start)
            if left <= 0:
                limit_hit = True
                result.margins[col] = (math.nan, -math.inf)
                continue
            options["time_limit"] = left
        c = np.asarray(e_out.T @ spec_np[i]).reshape(-1)
        const = float(spec_np[i] @ c_out)
        rows = [] if constraints is None else [constraints]
        if not all_margins:  # Note [Deciding without the exact minimum] in lipnets.verify.milp
            rows.append(LinearConstraint(c.reshape(1, -1), -math.inf, tol - const))
        res = milp(
            c, integrality=integral, bounds=Bounds(lb, ub), constraints=rows, options=options
        )
        result.nodes += int(res.mip_node_count or 0)
        if not all_margins and res.status == 2:  # no point with margin <= tol
            result.margins[col] = (math.nan, tol)
            result.above.add(col)
            continue
        found = res.x is not None
        if found:
            consider(torch.from_numpy(np.asarray(res.x[:n0])))
        fun = float(res.fun) + const if found and res.fun is not None else math.nan
        dual = res.mip_dual_bound
        if res.status == 0:
            low = fun if dual is None or not math.isfinite(dual) else float(dual) + const
        elif res.status == 1:  # time or node limit
            limit_hit = True
            low = -math.inf if dual is None or not math.isfinite(dual) else float(dual) + const
        else:
            trouble = f"the solver stopped: {res.message}"
            low = -math.inf
        result.margins[col] = (fun, min(low, fun) if math.isfinite(fun) else low)
        if not all_margins and best is not None and best[0] <= 0:
            break
    for col in columns:
        result.margins.setdefault(col, (math.nan, -math.inf))
    return _decide(result, best, tol, limit_hit=limit_hit, trouble=trouble, start=start)


def _decide(
    result: SampleResult,
    best: tuple[float, Tensor] | None,
    tol: float,
    *,
    limit_hit: bool,
    trouble: str,
    start: float,
) -> SampleResult:
    """The policy of Note [What exact means] in `lipnets.verify.milp`."""
    minima = [m for m, _ in result.margins.values() if math.isfinite(m)]
    proven = [lo > tol or col in result.above for col, (_, lo) in result.margins.items()]
    if best is not None and best[0] <= 0:
        result.status = "falsified"
        result.counterexample = best[1]
    elif proven and all(proven):
        result.status = "verified"
    elif trouble:
        result.reason = trouble
    elif limit_hit:
        result.reason = "time or node limit reached"
    elif minima and min(minima) < -tol:
        forward = best[0] if best is not None else math.nan
        result.reason = (
            f"the MILP minimum {min(minima):.3g} is not confirmed by a forward pass of the model "
            f"at its minimiser (margin {forward:.3g}): numerical trouble"
        )
    else:
        value = min(minima) if minima else math.nan
        result.reason = f"the minimum margin {value:.3g} is within tol={tol:g} of 0"
    result.time = time.perf_counter() - start
    return result
