r"""Orthogonalisation maths: Björck–Bowie iterations and the Cayley transform.

All functions take and return plain tensors; the parametrizations in
`lipnets.parametrizations.orthogonal` call them. "Orthogonal" for a rectangular
$m \times n$ matrix means orthonormal columns when $m \ge n$ and orthonormal
rows when $m < n$: every singular value is 1.

# Note [Bjorck pre-scaling]

The order-1 Björck step $X \leftarrow X\,(3I - X^\top X)/2$ acts on each
eigenvalue $\lambda = \sigma^2$ of $A = X^\top X$ as
$h(\lambda) = \lambda (3 - \lambda)^2 / 4$. For every $\lambda \in (0, 3)$ the
iterates converge to 1, quadratically once close: with $\lambda = 1 + e$,
$h(\lambda) - 1 = -\tfrac34 e^2 + \tfrac14 e^3$. The order-2 step
$X \leftarrow X\,(I - E/2 + 3E^2/8)$, $E = A - I$ (the second-order Taylor
polynomial of $A^{-1/2}$), converges cubically, for every $\lambda \in (0, 2.2]$
(checked on a fine grid in tests/test_orthogonal_linear.py).

Convergence therefore needs a *guaranteed* upper bound on $\lambda_{\max}(A)$,
not an estimate. lipnets uses the max absolute row sum $\|A\|_\infty$, which
bounds the spectral radius of any matrix, and costs nothing because the first
Gram matrix is needed anyway. If $\|A\|_\infty$ is at most the order's cap
(2.5 for order 1, 2.0 for order 2, both with a margin below the limit for
rounding) the matrix is used as it is; otherwise it is scaled by
$\sqrt{\text{cap} / \|A\|_\infty}$. Scaling only when needed matters: for a
weight already close to orthogonal, $\|A\|_\infty$ exceeds $\lambda_{\max}$ by
roughly $\sqrt{n}$ times the deviation, and scaling down by it would cost
iterations (the power-of-two scaling used by Frobenius pre-scaling costs more).

The Gram matrix is always formed on the smaller side ($n \times n$ for a tall
$m \times n$ matrix), so each step costs two products with the big matrix.

A stack of matrices (shape $(\dots, m, n)$) is orthogonalised with one
sequence of batched products. Each matrix gets its own pre-scaling, so the
convergence argument holds matrix by matrix, and the stopping rule below is
applied to the largest residual of the stack, so every matrix ends at least as
accurate as it would alone.

# Note [Bjorck stopping rule]

Each step computes $A = X^\top X$ anyway, so the residual
$d = \|A - I\|_F \ge \|A - I\|_2$ is free. When $d \le$ `tol`, one more step is
taken and the loop stops without forming the next Gram matrix: in exact
arithmetic that last step leaves every $|\lambda - 1| \le \tfrac34 d^2 +
\tfrac14 d^3$ (order 1) or about $\tfrac58 d^3$ (order 2). With the default
`tol = 1e-3` the singular values are within $4 \times 10^{-7}$ of 1 before
rounding, which is the float32 floor for layers of a few thousand units. The
realised weight's bound is measured in float64 afterwards in any case
(`lipschitz_bound` of the layers), so this rule decides speed, not soundness.

# Note [Bjorck retraction gradient]

At an orthogonal $Q$ the derivative of the polar factor $W \mapsto Q$ is the
projection onto the tangent space of the Stiefel manifold,
$G \mapsto G - Q\,\mathrm{sym}(Q^\top G)$ (for a tall $Q$; transpose for a wide
one), which costs two matrix products instead of back-propagating through
every iteration. `bjorck_retraction` uses it, and is exact whenever its input
is orthogonal. `BjorckOrthogonal` makes that so in training: it writes the
polar factor back into the raw parameter (the polar factor of the polar factor
is itself), so the loss value is unchanged and the gradient the optimiser sees
is the exact gradient at the value the parameter now holds. The next optimiser
step moves the raw weight only a little off the manifold, and one to three
iterations bring it back.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from lipnets._checks import check_bjorck_options, check_tensor
from lipnets.errors import LipnetsWarning

__all__ = ["bjorck", "bjorck_retraction", "cayley", "orthogonality_error"]

# Largest guaranteed bound on lambda_max(X^T X) used without scaling, per order
# (Note [Bjorck pre-scaling]); one per order in lipnets._checks.BJORCK_ORDERS, the
# orders check_bjorck_options accepts (tests/test_checks.py checks they agree).
_CAPS = {1: 2.5, 2: 2.0}


def _check_matrix(w: Tensor, name: str) -> None:
    check_tensor(w, name, floating=True)
    if w.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions, got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(w.shape)}")


def _bjorck_tall(
    x: Tensor, order: int, tol: float, iterations: int | None, max_iterations: int, name: str
) -> Tensor:
    """Björck iterations on a stack of tall matrices; autograd follows the ops."""
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    a = x.mT @ x
    # ||A||_inf >= lambda_max(A), per matrix (Note [Bjorck pre-scaling]).
    bound = a.abs().sum(dim=-1).amax(dim=-1)[..., None, None]
    if not bool(torch.isfinite(bound).all()):
        raise ValueError(f"{name} has NaN or infinite entries; cannot orthogonalise it")
    if bool((bound == 0).any()):
        raise ValueError(f"{name} has an all-zero matrix; it has no orthogonal polar factor")
    cap = _CAPS[order]
    scale = torch.where(bound > cap, cap / bound, torch.ones_like(bound))
    x = x * scale.sqrt()
    a = a * scale
    steps = iterations if iterations is not None else max_iterations
    residual = math.inf
    for step in range(steps):
        e = a - eye
        if iterations is None:
            residual = float(torch.linalg.matrix_norm(e.detach()).max())
            if not math.isfinite(residual):
                raise ValueError(f"{name}: Björck iteration produced NaN or infinite values")
        if order == 1:
            x = x - 0.5 * (x @ e)
        else:
            x = x @ (eye - 0.5 * e + 0.375 * (e @ e))
        if residual <= tol or step == steps - 1:
            break
        a = x.mT @ x
    if iterations is None and residual > tol:
        warnings.warn(
            f"{name}: Björck iteration did not converge in {max_iterations} iterations "
            f"(largest ||X^T X - I||_F = {residual:.3g} > tol = {tol:g}); the kernel is not "
            "orthogonal, which lipschitz_bound() reports. Is a raw matrix rank-deficient?",
            LipnetsWarning,
            stacklevel=4,
        )
    return x


def bjorck(
    w: Tensor,
    *,
    order: int = 1,
    tol: float = 1e-3,
    iterations: int | None = None,
    max_iterations: int = 64,
    name: str = "weight",
) -> Tensor:
    r"""Orthogonal polar factor of a matrix by Björck–Bowie iterations.

    Returns the (semi-)orthogonal matrix nearest to `w` in Frobenius norm: for
    $w = U \Sigma V^\top$ it is $U V^\top$. The matrix is pre-scaled by a
    guaranteed bound on its spectral norm when needed, so the iteration always
    converges for a full-rank input (Note [Bjorck pre-scaling]); it stops by
    the rule in Note [Bjorck stopping rule]. Gradients flow through the
    iterations by autograd.

    Args:
        w: an $m \times n$ floating-point matrix of full rank, or a stack of
            them (shape $(\dots, m, n)$), each orthogonalised on its own.
        order: 1 (quadratic convergence, two matrix products per step) or 2
            (cubic convergence, three products per step).
        tol: stop once $\|X^\top X - I\|_F \le$ `tol`, after one last step.
        iterations: run exactly this many steps instead (no convergence test).
        max_iterations: give up (with a `LipnetsWarning`) after this many steps.
        name: how to name the matrix in errors and warnings.

    Returns:
        A tensor of the shape and dtype of `w`, with orthonormal columns if
        $m \ge n$ and orthonormal rows otherwise (per matrix of a stack).

    Raises:
        ValueError: for a tensor with fewer than 2 dimensions, an empty one, an
            all-zero or non-finite matrix, or a bad option.

    Examples:
        >>> w = torch.randn(6, 4, dtype=torch.float64)
        >>> q = bjorck(w)
        >>> bool(torch.allclose(q.mT @ q, torch.eye(4, dtype=torch.float64), atol=1e-6))
        True

    References:
        Björck, Å. & Bowie, C. (1971). An iterative algorithm for computing the
        best estimate of an orthogonal matrix. *SIAM Journal on Numerical
        Analysis*, 8(2), 358-364.
    """
    _check_matrix(w, name)
    check_bjorck_options(order, tol, iterations, max_iterations)
    if w.shape[-2] >= w.shape[-1]:
        return _bjorck_tall(w, order, tol, iterations, max_iterations, name)
    return _bjorck_tall(w.mT, order, tol, iterations, max_iterations, name).mT


class _BjorckRetraction(torch.autograd.Function):
    """Polar factor with the tangent-projection backward (Note [Bjorck retraction gradient])."""

    @staticmethod
    def forward(ctx, w, order, tol, iterations, max_iterations, name):  # type: ignore[override]
        q = bjorck(
            w,
            order=order,
            tol=tol,
            iterations=iterations,
            max_iterations=max_iterations,
            name=name,
        )
        ctx.save_for_backward(q)
        return q

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (q,) = ctx.saved_tensors
        tall = q.shape[-2] >= q.shape[-1]
        if not tall:
            q, grad = q.mT, grad.mT
        m = q.mT @ grad
        out = grad - q @ (0.5 * (m + m.mT))
        return (out if tall else out.mT), None, None, None, None, None


def bjorck_retraction(
    w: Tensor,
    *,
    order: int = 1,
    tol: float = 1e-3,
    iterations: int | None = None,
    max_iterations: int = 64,
    name: str = "weight",
) -> Tensor:
    r"""`bjorck` with a two-product backward that is exact at orthogonal inputs.

    The forward pass is `bjorck` without an autograd graph. The backward pass
    is the derivative of the polar factor at an orthogonal point, the tangent
    projection $G \mapsto G - Q\,\mathrm{sym}(Q^\top G)$ (Note [Bjorck
    retraction gradient]). It is the exact gradient when `w` is orthogonal and
    an $O(\|w - Q\|)$ approximation otherwise; `BjorckOrthogonal` only calls it
    on a raw weight it keeps orthogonal. Arguments are those of `bjorck`.

    Examples:
        >>> q0 = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64))[0]
        >>> w = q0.clone().requires_grad_()
        >>> bjorck_retraction(w).sum().backward()
        >>> g = torch.ones(5, 3, dtype=torch.float64)
        >>> tangent = g - q0 @ (0.5 * (q0.mT @ g + g.mT @ q0))
        >>> bool(torch.allclose(w.grad, tangent))
        True
    """
    _check_matrix(w, name)
    check_bjorck_options(order, tol, iterations, max_iterations)
    return _BjorckRetraction.apply(w, order, tol, iterations, max_iterations, name)


def cayley(a: Tensor, out_features: int, in_features: int) -> Tensor:
    r"""Orthogonal matrix from the Cayley transform of a skew-symmetric matrix.

    With $S$ the skew-symmetric matrix built from the strict upper triangle of
    the square matrix `a` ($S = T - T^\top$, $T = \mathrm{triu}(a, 1)$), the
    Cayley transform $Q = (I - S/2)^{-1}(I + S/2)$ is orthogonal with
    determinant 1. The result is the leading `out_features` × `in_features`
    block of $Q$, found with a single linear solve against the leading columns:
    orthonormal columns when `out_features >= in_features`, orthonormal rows
    otherwise (the transpose of the tall case).

    The solve is well conditioned: the eigenvalues of $S$ are imaginary, so
    every singular value of $I - S/2$ is at least 1.

    Args:
        a: a square matrix of size `max(out_features, in_features)`; only its
            strict upper triangle is used.
        out_features: rows of the result.
        in_features: columns of the result.

    Examples:
        >>> a = torch.randn(5, 5, dtype=torch.float64)
        >>> q = cayley(a, 5, 3)
        >>> bool(torch.allclose(q.mT @ q, torch.eye(3, dtype=torch.float64)))
        True

    References:
        Cayley, A. (1846). Sur quelques propriétés des déterminants gauches.
        *Journal für die reine und angewandte Mathematik*, 32, 119-123.
        Trockman, A. & Kolter, J. Z. (2021). Orthogonalizing convolutional
        layers with the Cayley transform. *ICLR*.
    """
    n, k = max(out_features, in_features), min(out_features, in_features)
    _check_matrix(a, "a")
    if a.shape != (n, n):
        raise ValueError(
            f"a must be ({n}, {n}) for a {out_features} x {in_features} result, "
            f"got {tuple(a.shape)}"
        )
    upper = torch.triu(a, diagonal=1)
    half = 0.5 * (upper - upper.mT)
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    q = torch.linalg.solve(eye - half, (eye + half)[:, :k])
    return q if out_features >= in_features else q.mT


def orthogonality_error(w: Tensor, *, name: str = "w") -> Tensor:
    r"""How far a matrix is from (semi-)orthogonal: $\max_i |\sigma_i(w) - 1|$.

    The singular values are computed in float64 (complex128 for a complex
    matrix) from the matrix as it is, so the value describes the realised
    weight, rounding included. A stack of matrices (shape $(\dots, m, n)$,
    e.g. the per-frequency matrices of a circular convolution) gives the
    largest value over the stack: unitary matrices give 0.

    Returns:
        A 0-dim float64 tensor on the CPU, detached.

    Raises:
        TypeError: if `w` is not a floating-point or complex tensor.
        ValueError: if it has fewer than 2 dimensions, is empty or not finite.

    Examples:
        >>> orthogonality_error(torch.diag(torch.tensor([1.0, 0.5])))
        tensor(0.5000, dtype=torch.float64)
    """
    check_tensor(w, name, floating=True, allow_complex=True)
    if w.ndim < 2 or w.numel() == 0:
        raise ValueError(f"{name} must be a non-empty (stack of) matrices, got {tuple(w.shape)}")
    w = w.detach()
    w = w.to(torch.complex128) if w.is_complex() else w.to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} contains NaN or infinite entries")
    return (torch.linalg.svdvals(w) - 1).abs().max().cpu()
