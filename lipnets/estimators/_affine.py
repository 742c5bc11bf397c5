"""Recognising affine maps, and forming the dense matrix of their linear part.

Shared by `autolip` (which power-iterates affine leaves and takes the known
constant of every other leaf) and `seqlip` (which needs the matrices).

# Note [Affinity probe]

A map $f$ is affine iff $f(a) + f(b) = f(a + b) + f(0)$ and
$f(a) + f(-a) = 2 f(0)$ for all $a, b$. lipnets checks both identities on a
few random probes at two scales, to a tolerance of $10^3$ machine epsilons of
the module's dtype (at most 0.05) relative to the size of the terms. Every
non-affine layer lipnets bounds fails the second identity by an amount of the
order of its output (ReLU gives $|a|$, MaxPool and GroupSort give a spread of
values, norm pooling gives $2\\|a\\|$), so the probe separates them with a
wide margin; an affine layer evaluated in float32 passes with a margin of
about a thousand. A wrong answer here can only change an estimate, never a
bound.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

_PROBES = 3


def _tolerance(dtype: torch.dtype) -> float:
    return min(1e3 * torch.finfo(dtype).eps, 0.05)


def _apply(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    out = fn(x)
    if not isinstance(out, Tensor) or not out.is_floating_point():
        raise TypeError("an affinity probe needs a map that returns a floating-point tensor")
    return out.detach().to(torch.float64)


@torch.no_grad()
def is_affine(
    fn: Callable[[Tensor], Tensor],
    input_shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> bool:
    """Whether `fn` is affine on inputs of `input_shape` (Note [Affinity probe])."""
    tol = _tolerance(dtype)
    zero = torch.zeros(input_shape, dtype=dtype, device=device)
    f0 = _apply(fn, zero)
    for i in range(_PROBES):
        scale = 10.0 ** (2 * (i % 2))  # probe at scales 1 and 100
        a = scale * torch.randn(input_shape, generator=generator, dtype=dtype, device=device)
        b = scale * torch.randn(input_shape, generator=generator, dtype=dtype, device=device)
        fa, fb, fab, fna = (_apply(fn, t) for t in (a, b, a + b, -a))
        if fa.shape != f0.shape:
            return False
        size = sum(float(torch.linalg.vector_norm(t)) for t in (fa, fb, fab, fna, f0))
        additive = float(torch.linalg.vector_norm(fa + fb - fab - f0))
        odd = float(torch.linalg.vector_norm(fa + fna - 2 * f0))
        if not (additive <= tol * size and odd <= tol * size):
            return False
    return True


@torch.no_grad()
def linear_matrix(
    fn: Callable[[Tensor], Tensor],
    input_shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
    chunk: int = 256,
) -> Tensor:
    """The float64 matrix of the linear part of an affine `fn` on one sample.

    Column $j$ is ``fn(e_j) - fn(0)`` for the unit vectors of a sample of shape
    ``input_shape[1:]`` (``input_shape[0]`` must be 1), evaluated in batches of
    `chunk` samples, so `fn` must treat the samples of a batch independently.
    """
    sample = input_shape[1:]
    n = 1
    for d in sample:
        n *= d
    f0 = _apply(fn, torch.zeros(input_shape, dtype=dtype, device=device)).reshape(-1)
    columns = []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        basis = torch.zeros(stop - start, n, dtype=dtype, device=device)
        basis[:, start:stop] = torch.eye(stop - start, dtype=dtype, device=device)
        out = _apply(fn, basis.reshape(stop - start, *sample)).reshape(stop - start, -1)
        columns.append((out - f0).T.cpu())
    return torch.cat(columns, dim=1)
