"""The arguments of bound propagation, checked once, and the evaluation session.

`interval_bounds`, `crown_bounds` (`lipnets.propagation.lirpa`),
`local_lipschitz` and the certification functions all read a model, a batch,
a radius, a norm and an optional specification the same way, with the same
errors; `session` is the context they evaluate the model in.

# Note [Differentiable bounds]

Bounds are functions of the model's parameters too: certified training
(`lipnets.certify.training`) minimises a loss of the lower bounds of the
margins, so it needs their gradients with respect to the parameters, through
the same propagation code that certifies. ``session(model, grad=True)`` keeps
autograd on (the model is still evaluated in eval mode), and the propagation
ops then hold the model's realised weights as they are, still connected to
the parameters (``module.weight`` of a parametrized layer is recomputed from
the raw parameters with its graph): weights, biases, constant coefficients and
measured kernels are taken by `lipnets.propagation.ops_affine.held`, which
detaches them only without autograd, and the adjoints that autograd computes
(convolutions with string or non-zero padding, pooling:
`lipnets.propagation.ops_affine.vjp`) are built with ``create_graph``, so they
are differentiable in their coefficients and weights. Without ``grad``
everything runs under ``torch.no_grad()`` on detached tensors, as before. The
two modes compute the same operations with the same kernels, so the bounds are
equal to the bit: where a kernel's path depends on whether an operand requires
grad (``torch.matmul`` of a stride-0 batch), the op picks it explicitly
(`lipnets.propagation.ops_affine.rows_matmul`). Only what never carries a
parameter is computed without autograd in both modes: the model's own values
on the batch (the builder's
concrete pass over input-dependent nodes), the codes of index operations, and
the faithfulness checks of the graph against the model
(`lipnets.propagation.graph`). The input ``x``, the radius and the
specification are detached: the gradients are with respect to the parameters.
Piecewise-linear relaxations (a ReLU's slopes switch when its interval's ends
change sign, intersections pick one bound) make the bounds piecewise smooth in
the parameters: the gradient is exact away from the switching points, which
is what `torch.autograd.gradcheck` checks in float64 on a tiny model
(tests/certify/test_certified_training.py).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lipnets._state import eval_mode, restored_buffers

__all__ = ["check_args", "check_batch", "check_norm", "check_spec", "session"]

_NORMS = {2: 2.0, "2": 2.0, "l2": 2.0, math.inf: math.inf, "inf": math.inf, "linf": math.inf}


def check_norm(norm: object) -> float:
    """2.0 or math.inf from the accepted spellings of ``norm``."""
    key: object = norm
    if isinstance(norm, str):
        key = norm.lower()
    elif isinstance(norm, numbers.Real) and not isinstance(norm, bool):
        key = float(norm)
        key = 2 if key == 2.0 else key
    if isinstance(key, (str, int, float)) and key in _NORMS:
        return _NORMS[key]
    raise ValueError(f"norm must be 2 or float('inf') (or 'l2', 'inf', 'linf'), got {norm!r}")


def check_batch(model: object, x: object) -> None:
    """A module and a non-empty floating-point batch (N, ...), or a clear error."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor, got {got}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(
            f"x must be a non-empty batch of shape (N, ...) with at least 2 dimensions, "
            f"got shape {tuple(x.shape)}"
        )


def check_args(model: object, x: object, eps: object) -> tuple[Tensor, Tensor]:
    """Check the model and batch; return x (detached) and eps as an (N,) tensor of x's dtype."""
    check_batch(model, x)
    assert isinstance(x, Tensor)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or infinite values")
    n = x.shape[0]
    if isinstance(eps, Tensor):
        if eps.ndim > 1 or (eps.ndim == 1 and eps.shape[0] != n) or eps.is_complex():
            raise ValueError(
                f"eps must be a float or a real tensor of shape () or ({n},), "
                f"got shape {tuple(eps.shape)}"
            )
        radius = eps.detach().to(dtype=x.dtype, device=x.device).expand(n)
    elif isinstance(eps, numbers.Real) and not isinstance(eps, bool):
        radius = torch.full((n,), float(eps), dtype=x.dtype, device=x.device)
    else:
        raise TypeError(f"eps must be a float or a tensor, got {type(eps).__name__}")
    if not bool(torch.isfinite(radius).all()) or bool((radius < 0).any()):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and t.dtype != x.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the model's {name} has dtype {t.dtype}; cast one of "
                "them (float64 is recommended for certification)"
            )
    return x.detach(), radius.contiguous()


def check_spec(spec: object, n: int, m: int, dtype: torch.dtype, device) -> Tensor:
    """The spec as an (N, R, M) tensor of the given dtype."""
    if not isinstance(spec, Tensor) or not (spec.is_floating_point() or spec.dtype == torch.bool):
        got = f"dtype {spec.dtype}" if isinstance(spec, Tensor) else type(spec).__name__
        raise TypeError(f"spec must be a real tensor, got {got}")
    if spec.ndim not in (2, 3) or spec.shape[-1] != m or (spec.ndim == 3 and spec.shape[0] != n):
        raise ValueError(
            f"spec must have shape (R, {m}) or ({n}, R, {m}) for {m} outputs per sample, "
            f"got {tuple(spec.shape)}"
        )
    spec = spec.detach().to(dtype=dtype, device=device)
    if not bool(torch.isfinite(spec).all()):
        raise ValueError("spec contains NaN or infinite values")
    return spec.expand(n, *spec.shape[-2:]) if spec.ndim == 2 else spec


@contextmanager
def session(model: nn.Module, *, grad: bool = False) -> Iterator[None]:
    """Eval mode, each submodule's mode and every buffer restored after; no autograd unless
    ``grad`` (Note [Differentiable bounds]).

    With ``grad=True`` the caller's autograd mode is kept: inside ``torch.no_grad()`` the
    bounds are computed the same way and are simply not differentiable.
    """
    with eval_mode(model), restored_buffers(model):
        if grad:
            yield
        else:
            with torch.no_grad():
                yield
