r"""Power-iteration and Jacobian-norm *estimates* of operator norms.

Everything here is an **estimate** (DESIGN.md, "Two numbers, never mixed"): a
lower bound in exact arithmetic, used to check the sound bounds of
`lipnets.bounds`, never to certify. Only torch and `lipnets.functional` are
used; nothing here reads a bound.

# Note [Power iteration returns a realised norm]

Power iteration on $A^\top A$ converges to the top right singular vector $v$
of $A$. Intermediate quantities such as $\|A^\top A v\| / \|A v\|$ may
overshoot under rounding and are not what is returned: the value returned is
$\|A v\| / \|v\|$ for the final vector $v$, computed in float64 from the
output of the map itself. For any vector this is at most
$\sigma_{\max}(A)$ in exact arithmetic, so the estimate is a lower bound up to
the rounding of one evaluation of the map.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lipnets._state import eval_mode as _eval_mode
from lipnets._state import realised_weights as _realised_weights

__all__ = ["jacobian_norm", "power_iteration"]

_DENSE_LIMIT = 2**22


def _check_count(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_tol(tol: object) -> None:
    if (
        isinstance(tol, bool)
        or not isinstance(tol, (int, float))
        or not math.isfinite(tol)
        or tol < 0
    ):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")


def _check_input_shape(input_shape: object) -> tuple[int, ...]:
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise ValueError(
            "input_shape must be a sequence of positive ints with a batch dimension of 1, "
            f"e.g. (1, 3, 32, 32), got {input_shape!r}"
        )
    shape = tuple(input_shape)
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"input_shape must hold positive ints only, got {input_shape!r}")
    if len(shape) < 2 or shape[0] != 1:
        raise ValueError(
            "input_shape must start with a batch dimension of 1 and have at least 2 "
            f"dimensions, e.g. (1, 3, 32, 32), got {input_shape!r}"
        )
    return shape


def _default_dtype_device(op: object) -> tuple[torch.dtype, torch.device]:
    if isinstance(op, nn.Module):
        for tensor in (*op.parameters(), *op.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype, tensor.device
    return torch.get_default_dtype(), torch.device("cpu")


def _check_output(out: object, name: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} must return a tensor, got {type(out).__name__}")
    if not out.is_floating_point():
        raise TypeError(f"{name} must return a floating-point tensor, got dtype {out.dtype}")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} returned NaN or infinite values; no norm can be estimated")
    return out


def _norm64(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t.detach().to(torch.float64))


def power_iteration(
    op: nn.Module | Callable[[Tensor], Tensor],
    input_shape: Sequence[int],
    *,
    iters: int = 100,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Estimate $\sigma_{\max}$ of a linear (or affine) map by power iteration.

    Iterates $v \leftarrow A^\top A v / \|A^\top A v\|$ where $A$ is the linear
    part of `op` on inputs of shape `input_shape`: $Av$ is `op(v) - op(0)` (a
    bias is ignored) and $A^\top u$ is a vector-Jacobian product through
    autograd, taken on a graph built once at $0$. Any op autograd can
    differentiate works: convolutions with any padding, stride, dilation or
    groups, lipnets layers, plain functions. It stops when the relative change
    of the estimate is below `tol`, or after `iters` iterations.

    A module runs in eval mode (each submodule's mode is restored afterwards),
    parametrized weights are computed once, on a private frozen copy (Note
    [Realised weights] in `lipnets._state`), and no parameter receives a
    gradient.

    This is an **estimate**: the value returned is $\|Av\| / \|v\|$ for the
    final vector $v$ (Note [Power iteration returns a realised norm]), a lower
    bound on $\sigma_{\max}(A)$ up to the rounding of one evaluation of `op`.
    Its accuracy depends on the gap between the two largest singular values.
    Never use it as a certificate.

    Args:
        op: an ``nn.Module`` or a callable, linear or affine in its input.
        input_shape: the input's shape, with a batch dimension of 1, e.g.
            ``(1, 3, 32, 32)``.
        iters: maximal number of iterations (int >= 1).
        tol: stop once $|\hat\sigma_k - \hat\sigma_{k-1}| \le$ `tol`
            $\hat\sigma_k$ (a number >= 0; 0 runs all `iters`).
        generator: random generator for the starting vector (on `device`).
        dtype: floating dtype of the input; default: that of the module's
            first floating parameter or buffer, else torch's default dtype.
        device: device of the input; default: that of the module's first
            floating parameter or buffer, else the CPU.

    Returns:
        A 0-dim float64 CPU tensor, detached from autograd.

    Raises:
        ValueError: if `input_shape` is not a sequence of positive ints starting
            with a batch dimension of 1, if `iters` or `tol` is out of range,
            or if `op` produces NaN or infinite values.
        TypeError: if `dtype` is not a floating dtype, or `op` does not return
            a floating-point tensor.
        RuntimeError: if the output of `op` does not depend on its input
            through autograd.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> layer = nn.Linear(4, 3)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.diag(torch.tensor([2.0, 1.0, 0.5]))
        ...                            @ torch.eye(3, 4))
        >>> sigma = power_iteration(layer, (1, 4), generator=torch.Generator().manual_seed(0))
        >>> bool(abs(sigma - 2.0) < 1e-4 and sigma <= 2.0 * (1 + 1e-6))
        True
    """
    shape = _check_input_shape(input_shape)
    _check_count("iters", iters, 1)
    _check_tol(tol)
    default_dtype, default_device = _default_dtype_device(op)
    dtype = default_dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    device = default_device if device is None else torch.device(device)

    with _eval_mode(op), _realised_weights(op) as op, torch.enable_grad():
        zero = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
        out = _check_output(op(zero), "op")
        if not out.requires_grad:
            raise RuntimeError(
                "the output of op does not depend on its input through autograd "
                "(was it computed under torch.no_grad or detached?)"
            )
        offset = out.detach()

        def matvec(v: Tensor) -> Tensor:
            with torch.no_grad():
                av = _check_output(op(v), "op") - offset
            return av

        def rmatvec(u: Tensor) -> Tensor:
            (atu,) = torch.autograd.grad(out, zero, u, retain_graph=True, allow_unused=True)
            if atu is None:
                return torch.zeros_like(zero)
            return atu.detach()

        v = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        v = v / torch.linalg.vector_norm(v)
        sigma = torch.zeros((), dtype=torch.float64)
        for _ in range(iters):
            av = matvec(v)
            new = _norm64(av) / _norm64(v)
            done = bool(abs(new - sigma) <= tol * new)
            sigma = new
            if done or new == 0:
                break
            w = rmatvec(av)
            if not bool(torch.isfinite(w).all()):
                raise ValueError("the adjoint of op produced NaN or infinite values")
            norm = torch.linalg.vector_norm(w)
            if norm == 0:
                break
            v = w / norm
    return sigma.detach().cpu()


def _per_sample(model: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def f(xi: Tensor) -> Tensor:
        return model(xi.unsqueeze(0)).reshape(-1)

    return f


def _dense_norms(model: Callable[[Tensor], Tensor], x: Tensor, chunk_size: int | None) -> Tensor:
    f = _per_sample(model)
    try:
        with torch.no_grad():  # torch.func ignores an outer no_grad for its own inputs
            jac = torch.func.vmap(torch.func.jacrev(f), chunk_size=chunk_size)(x)
    except (RuntimeError, NotImplementedError):
        # e.g. an autograd.Function without functorch support: plain autograd, point by point
        jac = torch.stack(
            [torch.autograd.functional.jacobian(f, xi).detach() for xi in x.unbind(0)]
        )
    jac = jac.detach().to(torch.float64).reshape(x.shape[0], -1, x[0].numel())
    if not bool(torch.isfinite(jac).all()):
        raise ValueError("the Jacobian of model holds NaN or infinite values")
    return torch.linalg.matrix_norm(jac, ord=2)


def _power_norm(
    model: Callable[[Tensor], Tensor],
    xi: Tensor,
    iters: int,
    tol: float,
    generator: torch.Generator | None,
) -> Tensor:
    """Power iteration on J^T J at one point, J v by double-vjp on a graph built once."""
    with torch.enable_grad():
        x = xi.unsqueeze(0).detach().requires_grad_(True)
        out = model(x)
        if not out.requires_grad:
            return torch.zeros((), dtype=torch.float64)
        dummy = torch.zeros_like(out, requires_grad=True)
        (jt_dummy,) = torch.autograd.grad(out, x, dummy, create_graph=True, allow_unused=True)
        if jt_dummy is None:
            return torch.zeros((), dtype=torch.float64)
        if not jt_dummy.requires_grad:
            raise RuntimeError(
                "the backward pass of model is not differentiable, so the Jacobian-vector "
                "products of the power path cannot be formed; use a larger dense_limit"
            )

        def matvec(v: Tensor) -> Tensor:
            (jv,) = torch.autograd.grad(jt_dummy, dummy, v, retain_graph=True, allow_unused=True)
            return torch.zeros_like(out) if jv is None else jv.detach()

        def rmatvec(u: Tensor) -> Tensor:
            (jtu,) = torch.autograd.grad(out, x, u, retain_graph=True)
            return jtu.detach()

        v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        v = v / torch.linalg.vector_norm(v)
        sigma = torch.zeros((), dtype=torch.float64)
        for _ in range(iters):
            jv = matvec(v)
            if not bool(torch.isfinite(jv).all()):
                raise ValueError("the Jacobian of model produced NaN or infinite values")
            new = _norm64(jv) / _norm64(v)
            done = bool(abs(new - sigma) <= tol * new)
            sigma = new
            if done or new == 0:
                break
            w = rmatvec(jv)
            if not bool(torch.isfinite(w).all()):
                raise ValueError("the Jacobian of model produced NaN or infinite values")
            norm = torch.linalg.vector_norm(w)
            if norm == 0:
                break
            v = w / norm
    return sigma


def jacobian_norm(
    model: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    iters: int = 100,
    tol: float = 1e-6,
    chunk_size: int | None = None,
    dense_limit: int = _DENSE_LIMIT,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Spectral norm of the Jacobian of the per-sample map at each point of `x`.

    For each sample $x_i$ this is $\|J f(x_i)\|_2$ with $f$ the map
    ``t -> model(t.unsqueeze(0))``, a local slope of the model and so an
    **estimate** (a lower bound) of its Lipschitz constant, never a
    certificate. When the Jacobian is small (input size times output size of
    one sample at most `dense_limit` entries) it is formed densely with
    ``torch.func`` (``vmap`` of ``jacrev``) and its exact 2-norm is computed in
    float64. Larger Jacobians are never formed: power iteration on
    $J^\top J$ at each point, with $J^\top u$ by autograd and $Jv$ by
    differentiating that vector-Jacobian product (double backward), returning
    $\|Jv\|/\|v\|$ at the final vector (Note [Power iteration returns a
    realised norm]).

    A module runs in eval mode (BatchNorm uses its running statistics, Dropout
    is off); each submodule's mode is restored afterwards. No parameter
    receives a gradient.

    Args:
        model: an ``nn.Module`` or a callable mapping a batch to a batch.
        x: a floating-point batch of points, shape $(B, \dots)$.
        iters: maximal power iterations per point (power path only).
        tol: relative-change stopping tolerance (power path only).
        chunk_size: points per ``vmap`` chunk on the dense path (``None``: all
            at once); bounds its memory to ``chunk_size`` Jacobians.
        dense_limit: largest Jacobian (in entries) formed densely; 0 forces
            the power path.
        generator: random generator for the power path's starting vectors.

    Returns:
        A float64 CPU tensor of shape $(B,)$, detached from autograd.

    Raises:
        TypeError: if `x` is not a floating-point tensor or `model` does not
            return a floating-point tensor.
        ValueError: if `x` has no batch dimension (fewer than 2 dimensions),
            if an argument is out of range, or if `x`, the output or the
            Jacobian hold NaN or infinite values.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> x = torch.randn(5, 3)
        >>> norms = jacobian_norm(model, x)
        >>> norms.shape, norms.dtype
        (torch.Size([5]), torch.float64)
        >>> power = jacobian_norm(model, x, dense_limit=0, iters=500, tol=0.0)
        >>> bool(torch.allclose(norms, power, rtol=1e-4))
        True
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor, got {got}")
    if x.ndim < 2:
        raise ValueError(
            f"x must be a batch of shape (B, ...) with at least 2 dimensions, "
            f"got shape {tuple(x.shape)}"
        )
    _check_count("iters", iters, 1)
    _check_tol(tol)
    _check_count("dense_limit", dense_limit, 0)
    if chunk_size is not None:
        _check_count("chunk_size", chunk_size, 1)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or infinite values")
    x = x.detach()
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)

    with _eval_mode(model), _realised_weights(model) as model:
        with torch.no_grad():
            out = _check_output(model(x[:1]), "model")
        entries = x[0].numel() * out.numel()
        if entries <= dense_limit:
            norms = _dense_norms(model, x, chunk_size)
        else:
            norms = torch.stack(
                [_power_norm(model, xi, iters, tol, generator) for xi in x.unbind(0)]
            )
    return norms.detach().to(torch.float64).cpu()
