r"""Empirical lower bounds on a model's $\ell_2 \to \ell_2$ Lipschitz constant.

`lower_bound` searches for inputs where the model is steep, by gradient
ascent from the data points, and reports the steepest slope it has *seen*:

- **pairs**: $\|f(x) - f(y)\| / \|x - y\|$ over pairs $(x, y)$ that start at
  a data point and at a small perturbation of it (several gap scales);
- **Jacobians**: $\|J_f(p)\, v\| / \|v\|$ at points $p$ that start at the
  data points, with $v$ from power iteration on $J^\top J$ (forward and
  reverse mode, `torch.func.jvp` / `torch.func.vjp`).

The value returned is computed once more, exactly at the returned pair or at
the returned point and direction, so it is a slope the model really has (up to
float rounding), never an extrapolation. It is therefore a lower bound of the
true Lipschitz constant: an *estimate* that checks sound bounds
(`lipnets.lipschitz_bound`) and never certifies anything (DESIGN.md, "Two
numbers, never mixed").
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

# Plain-torch utility (imports torch only); not a bound.
from lipnets._progress import progress_bar
from lipnets._state import frozen_copy
from lipnets.errors import InvalidModelError

__all__ = ["LowerBound", "lower_bound"]


@dataclass(frozen=True)
class LowerBound:
    """A slope of a model, witnessed by the points where it was measured.

    Attributes:
        value: 0-dim float64 tensor, the slope re-evaluated at the witness.
        x: first point, shape ``(1, ...)`` (one sample with its batch dimension).
        y: second point of the pair, same shape as ``x``; for ``kind ==
            "jacobian"`` it equals ``x``, marking a Jacobian-norm point.
        kind: ``"pair"`` (``value == ||f(y) - f(x)|| / ||y - x||``) or
            ``"jacobian"`` (``value == ||J_f(x) direction||``).
        direction: for ``kind == "jacobian"``, the unit input direction, shape
            as ``x``; ``None`` for a pair.
    """

    value: Tensor
    x: Tensor
    y: Tensor
    kind: Literal["pair", "jacobian"]
    direction: Tensor | None = None

    def __float__(self) -> float:
        return float(self.value)


def lower_bound(
    model: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    steps: int = 100,
    lr: float = 0.01,
    restarts: int = 4,
    power_iterations: int = 10,
    dtype: torch.dtype | None = torch.float64,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> LowerBound:
    r"""Empirical Lipschitz constant of `model` near the data `x`: a true lower bound.

    Two searches run from the data points, each for `steps` Adam steps:

    1. pairs $(u, y)$ with $u$ starting at a data point and $y = u + d$, with
       `restarts` gap scales $\|d\| / \|x_i\| \in [10^{-3}, 1]$; the ratio
       $\|f(y) - f(u)\| / \|y - u\|$ is maximised over $u$, the direction of $d$
       and its length;
    2. points $p$ starting at the data points (and, for further restarts, at
       perturbations of them), where $\|J_f(p)\, v\|$ is maximised: $v$ by power
       iteration on $J^\top J$, $p$ by gradient ascent (which does not move on
       piecewise-linear networks, whose Jacobian is piecewise constant).

    The best pair and the best (point, direction) seen are evaluated once more
    (in float64 for the norms) and the larger value is returned with its
    witness. The model is taken to act on each sample of a batch separately
    (no batch statistics; it is evaluated in ``eval()`` mode).

    Args:
        model: an ``nn.Module`` or a function mapping a batch ``(N, ...)`` to a
            floating-point batch ``(N, ...)``.
        x: data points, a floating-point batch ``(B, ...)`` with ``B >= 1``.
        steps: Adam steps of each search (``0`` evaluates the starting points).
        lr: Adam learning rate, in units of the data's root-mean-square entry
            for moves of points and of the log-gap for pair lengths.
        restarts: starts per data point (gap scales for pairs, perturbation
            scales for Jacobian points).
        power_iterations: power iterations before the Jacobian ascent and to
            refine its best points (one more runs after each ascent step).
        dtype: ``torch.float64`` evaluates a float64 copy of `model` whose
            parametrized weights are frozen at the values they realise now (the
            same function, with less rounding); ``None`` evaluates `model`
            itself in the dtype of `x`. A plain function is called on `x`
            converted to `dtype`.
        generator: random generator for the starting directions (its device
            is used to draw them); the global generator if ``None``.
        progress: show a `tqdm` progress bar (needs `tqdm` installed).

    Returns:
        A frozen `LowerBound`: ``value`` (0-dim float64) and the witness.

    Raises:
        TypeError: if `model` is not callable, `x` is not a floating-point
            tensor, or the model's output is not a floating-point tensor.
        ValueError: if `x` has no batch dimension (``x.ndim < 2``) or an empty
            batch, an argument is out of range, the model fails on `x` (its
            error is chained) or returns a different batch size, or no finite
            slope was found.
        ImportError: if ``progress=True`` and `tqdm` is not installed.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import lipnets
        >>> from lipnets.estimators.lower import lower_bound
        >>> g = torch.Generator().manual_seed(0)
        >>> f = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> est = lower_bound(f, torch.randn(8, 8, generator=g), steps=20, generator=g)
        >>> bool(0 < est.value <= lipnets.lipschitz_bound(f))
        True
        >>> est.kind in ("pair", "jacobian"), tuple(est.x.shape)
        (True, (1, 8))
    """
    _check_args(model, x, steps, lr, restarts, power_iterations, dtype)
    bar = progress_bar(progress, 2 * steps, "lower_bound")
    saved_modes = []
    if dtype is None:
        fn: Callable[[Tensor], Tensor] = model
        if isinstance(model, nn.Module):
            saved_modes = [(m, m.training) for m in model.modules()]
            model.eval()
        data = x.detach()
    else:
        fn = _float64_copy(model, dtype) if isinstance(model, nn.Module) else model
        data = x.detach().to(dtype)
    try:
        _check_output(fn, data)
        with torch.enable_grad():
            pair = _pair_search(fn, data, steps, lr, restarts, generator, bar)
            jac = _jacobian_search(fn, data, steps, lr, restarts, power_iterations, generator, bar)
            # Refine the Jacobian at the best pair's points too.
            points = torch.cat([jac[0][:1], pair[0][:1], pair[1][:1]])
            starts = torch.cat([jac[1][:1], _randn_like(points[1:], generator)])
            refined = _power_iteration(fn, points, starts, max(power_iterations, 1))
            candidates = [
                _exact_pair(fn, pair[0][:1], pair[1][:1]),
                _exact_jacobian(fn, jac[0][:1], jac[1][:1]),
            ]
            for i in range(points.shape[0]):
                candidates.append(_exact_jacobian(fn, points[i : i + 1], refined[i : i + 1]))
    finally:
        for module, mode in saved_modes:
            module.training = mode
        if bar is not None:
            bar.close()
    finite = [c for c in candidates if torch.isfinite(c.value)]
    if not finite:
        raise ValueError("lower_bound found no finite slope: the model's outputs are not finite")
    return max(finite, key=lambda c: float(c.value))


def _check_args(model, x, steps, lr, restarts, power_iterations, dtype) -> None:
    if not callable(model):
        raise TypeError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(
            f"x must be a batch of shape (B, ...) with ndim >= 2, got shape {tuple(x.shape)}; "
            "use x.unsqueeze(0) for a single sample"
        )
    if x.shape[0] < 1 or x[0].numel() < 1:
        raise ValueError(f"x must hold at least one non-empty sample, got shape {tuple(x.shape)}")
    for name, value, low in (
        ("steps", steps, 0),
        ("restarts", restarts, 1),
        ("power_iterations", power_iterations, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not (0 < lr < math.inf):
        raise ValueError(f"lr must be a finite float > 0, got {lr!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")


def _float64_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` in eval mode and `dtype`, computing the function `model` computes.

    Parametrized weights are frozen at the value they realise in eval mode
    before the cast: casting the raw parameters would recompute, say, an
    orthogonalisation in float64, a different weight from the one in use.
    """
    try:
        clone = frozen_copy(model)
    except Exception as exc:
        raise ValueError(
            f"lower_bound could not copy {type(model).__name__} to evaluate it in {dtype}; "
            "pass dtype=None to evaluate the model itself"
        ) from exc
    complex_dtype = torch.complex128 if dtype == torch.float64 else None

    def cast(t: Tensor) -> Tensor:
        if t.is_floating_point():
            return t.to(dtype)
        if t.is_complex() and complex_dtype is not None:
            return t.to(complex_dtype)
        return t

    clone._apply(cast)
    return clone


def _check_output(fn: Callable[[Tensor], Tensor], data: Tensor) -> None:
    try:
        with torch.no_grad():
            out = fn(data)
    except Exception as exc:
        raise ValueError(
            f"the model failed on x of shape {tuple(data.shape)} and dtype {data.dtype} "
            f"({type(exc).__name__}: {exc}); check that x matches the model's input shape"
        ) from exc
    if not isinstance(out, Tensor):
        raise TypeError(f"the model must return a Tensor, got {type(out).__name__}")
    if not out.is_floating_point():
        raise TypeError(
            f"the model's output must be floating point (a continuous function), got {out.dtype}"
        )
    if out.ndim < 1 or out.shape[0] != data.shape[0]:
        raise InvalidModelError(
            f"the model must map a batch of B samples to B outputs, got input shape "
            f"{tuple(data.shape)} and output shape {tuple(out.shape)}"
        )


def _randn_like(t: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else t.device
    return torch.randn(t.shape, generator=generator, dtype=t.dtype, device=device).to(t.device)


def _rows(values: Tensor, like: Tensor) -> Tensor:
    """`values` (N,) shaped to broadcast against `like` (N, ...)."""
    return values.reshape(-1, *[1] * (like.ndim - 1))


def _norms(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1)


def _scales(data: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample norm (zero norms replaced by a typical one) and rms entry."""
    norms = _norms(data)
    nonzero = norms[norms > 0]
    fallback = nonzero.mean() if nonzero.numel() else torch.ones((), dtype=norms.dtype)
    norms = torch.where(norms > 0, norms, fallback.to(norms.device))
    return norms, norms / math.sqrt(data[0].numel())


def _set_grads(params: list[Tensor], objective: Tensor) -> bool:
    """Gradients of -objective into `params` only (never into model parameters)."""
    if not objective.requires_grad:
        return False
    grads = torch.autograd.grad(-objective, params, allow_unused=True)
    for p, g in zip(params, grads, strict=True):
        p.grad = torch.zeros_like(p) if g is None else torch.nan_to_num(g, 0.0, 0.0, 0.0)
    return True


def _pair_search(fn, data, steps, lr, restarts, generator, bar) -> tuple[Tensor, Tensor]:
    """Best pair (u, y) found, rows sorted by decreasing ratio."""
    n = data.shape[0] * restarts
    x0 = data.repeat(restarts, *[1] * (data.ndim - 1))
    norms, rms = (s.repeat(restarts) for s in _scales(data))
    rel_gaps = torch.logspace(-3, 0, restarts, dtype=torch.float64) if restarts > 1 else None
    if rel_gaps is None:
        rel_gaps = torch.full((1,), 1e-2, dtype=torch.float64)
    log_gap = rel_gaps.log().repeat_interleave(data.shape[0]).to(data.dtype).to(data.device)
    min_log_gap = 0.5 * math.log(torch.finfo(data.dtype).eps)
    du = torch.zeros_like(x0, requires_grad=True)
    v = _randn_like(x0, generator).requires_grad_()
    log_gap.requires_grad_()
    params = [du, v, log_gap]
    opt = torch.optim.Adam(params, lr=lr)
    best = torch.full((n,), -math.inf, dtype=torch.float64, device=data.device)
    best_u, best_y = x0.clone(), x0.clone()
    for step in range(steps + 1):
        u = x0 + _rows(rms, x0) * du
        gap = log_gap.clamp_min(min_log_gap).exp() * norms
        y = u + _rows(gap, x0) * v / _rows(_norms(v).clamp_min(1e-30), v)
        out = fn(torch.cat([u, y])).flatten(1)
        num = (out[n:] - out[:n]).norm(dim=1)
        den = _norms(y - u)
        ratio = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
        with torch.no_grad():
            r64 = torch.nan_to_num(ratio.double(), nan=-math.inf)
            better = r64 > best
            best = torch.where(better, r64, best)
            best_u[better] = u.detach()[better]
            best_y[better] = y.detach()[better]
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        if _set_grads(params, torch.nan_to_num(ratio, 0.0, 0.0, 0.0).sum()):
            opt.step()
        if bar is not None:
            bar.update(1)
    order = best.argsort(descending=True)
    return best_u[order], best_y[order]


def _jvp(fn: Callable[[Tensor], Tensor], p: Tensor, v: Tensor) -> Tensor:
    """J_f(p) v by forward mode, without torch's internal deprecation warning.

    The first forward-mode call of a process makes torch script its own jvp
    decompositions, which warns that ``torch.jit.script`` is deprecated: a
    message about torch internals that a lipnets user can do nothing about.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
        return torch.func.jvp(fn, (p,), (v,))[1]


def _power_iteration(fn, p: Tensor, v: Tensor, iterations: int) -> Tensor:
    """`iterations` steps of v <- J^T J v / ||J^T J v|| per row, at fixed points `p`."""
    p = p.detach()
    v = v.detach()
    v = v / _rows(_norms(v).clamp_min(1e-30), v)
    for _ in range(iterations):
        jv = _jvp(fn, p, v)
        _, vjp_fn = torch.func.vjp(fn, p)
        (w,) = vjp_fn(jv.detach())
        w = w.detach()
        wn = _norms(w)
        ok = _rows((wn > 0) & torch.isfinite(wn), v)
        v = torch.where(ok, w / _rows(wn.clamp_min(1e-300), w), v)
    return v


def _jacobian_search(fn, data, steps, lr, restarts, power_iterations, generator, bar):
    """Best Jacobian points and their unit directions, rows sorted by decreasing norm."""
    n = data.shape[0] * restarts
    x0 = data.repeat(restarts, *[1] * (data.ndim - 1))
    _, rms = (s.repeat(restarts) for s in _scales(data))
    pert = torch.zeros(restarts, dtype=torch.float64)
    if restarts > 1:
        pert[1:] = torch.logspace(-2, 0, restarts - 1, dtype=torch.float64)
    pert = pert.repeat_interleave(data.shape[0]).to(data.dtype).to(data.device)
    p0 = x0 + _rows(pert * rms, x0) * _randn_like(x0, generator)
    dp = torch.zeros_like(x0, requires_grad=True)
    v = _power_iteration(fn, p0, _randn_like(x0, generator), power_iterations)
    opt = torch.optim.Adam([dp], lr=lr)
    best = torch.full((n,), -math.inf, dtype=torch.float64, device=data.device)
    best_p, best_v = p0.clone(), v.clone()
    for step in range(steps + 1):
        p = p0 + _rows(rms, x0) * dp
        jv = _jvp(fn, p, v)
        value = _norms(jv.flatten(1)) / _norms(v)
        with torch.no_grad():
            r64 = torch.nan_to_num(value.double(), nan=-math.inf)
            better = r64 > best
            best = torch.where(better, r64, best)
            best_p[better] = p.detach()[better]
            best_v[better] = v[better]
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        if _set_grads([dp], torch.nan_to_num(value, 0.0, 0.0, 0.0).sum()):
            opt.step()
        v = _power_iteration(fn, p0 + _rows(rms, x0) * dp.detach(), v, 1)
        if bar is not None:
            bar.update(1)
    order = best.argsort(descending=True)
    return best_p[order], best_v[order]


def _exact_pair(fn, u: Tensor, y: Tensor) -> LowerBound:
    with torch.no_grad():
        out = fn(torch.cat([u, y])).flatten(1).double()
        value = (out[1] - out[0]).norm() / (y.double() - u.double()).norm()
    return LowerBound(value=value.cpu(), x=u.clone(), y=y.clone(), kind="pair")


def _exact_jacobian(fn, p: Tensor, v: Tensor) -> LowerBound:
    jv = _jvp(fn, p, v)
    value = jv.detach().double().norm() / v.double().norm()
    return LowerBound(value=value.cpu(), x=p.clone(), y=p.clone(), kind="jacobian", direction=v)
