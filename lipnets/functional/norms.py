"""Sound upper bounds on operator norms, computed in float64.

# Note [Sound spectral norm in float64]

The spectral norm $\\sigma_{\\max}(W)$ of a realised weight is computed from its
singular values in float64. Casting a float32/float16/bfloat16 weight to
float64 is exact, and LAPACK's SVD is backward stable: the computed values are
the exact singular values of $W + E$ with $\\|E\\|_2 \\le p(m, n)\\,
\\varepsilon_{64} \\|W\\|_2$ for a modest $p$. By Weyl's inequality the true
$\\sigma_{\\max}$ is then at most $\\hat\\sigma (1 + p\\,\\varepsilon_{64})$ (to
first order). lipnets takes $p = 10 \\max(m, n)$, the project's tolerance rule
``10 * n * eps``, and returns $\\hat\\sigma (1 + 10 \\max(m, n)\\,
\\varepsilon_{64})$: a slack below $10^{-11}$ for any realistic layer, so a bound
from this function equals the exact norm to far better than $10^{-6}$.
"""

from __future__ import annotations

import torch

from lipnets._checks import check_tensor

__all__ = ["spectral_norm_bound"]

_EPS64 = torch.finfo(torch.float64).eps


def spectral_norm_bound(matrix: torch.Tensor, *, name: str = "matrix") -> torch.Tensor:
    """Sound upper bound on the spectral norm of a matrix, computed in float64.

    The value is the largest singular value computed in float64 times
    $1 + 10 \\max(m, n)\\,\\varepsilon_{64}$, which covers the rounding error of
    the SVD (see Note [Sound spectral norm in float64] in this module).

    Args:
        matrix: a real or complex matrix of any dtype and device, or a stack
            of them (shape $(\\dots, m, n)$, e.g. the per-frequency matrices of
            a circular convolution): the bound is then the largest over the
            stack. Complex matrices are computed in complex128, with the same
            argument and slack.
        name: how to name the tensor in error messages (e.g. ``"fc.weight"``).

    Returns:
        A 0-dim float64 tensor on the CPU, detached from autograd.

    Raises:
        TypeError: if ``matrix`` is not a floating-point or complex tensor.
        ValueError: if it has fewer than 2 dimensions, is uninitialised (lazy),
            or holds NaN or infinite entries.

    Examples:
        >>> import torch
        >>> from lipnets.functional import spectral_norm_bound
        >>> w = torch.diag(torch.tensor([3.0, 1.0]))
        >>> bound = spectral_norm_bound(w)
        >>> bool(3.0 <= bound <= 3.0 * (1 + 1e-12))
        True
    """
    if isinstance(matrix, torch.nn.parameter.UninitializedParameter):
        raise ValueError(f"{name} is an uninitialised lazy parameter: run one forward pass first")
    check_tensor(matrix, name, floating=True, allow_complex=True)
    if matrix.ndim < 2:
        raise ValueError(
            f"{name} must be a matrix or a stack of matrices (..., m, n), "
            f"got shape {tuple(matrix.shape)}"
        )
    w = matrix.detach()
    w = w.to(torch.complex128) if w.is_complex() else w.to(torch.float64)
    if w.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} contains NaN or infinite entries; no Lipschitz bound exists")
    sigma = torch.linalg.svdvals(w)[..., 0].max().cpu()
    return sigma * (1.0 + 10.0 * max(w.shape[-2:]) * _EPS64)
