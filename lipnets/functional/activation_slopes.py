r"""Lipschitz constants of torch's smooth activations and of the softmax family.

The op table (`lipnets.graph.ops`) reads these constants for its ``"elementwise"`` entries
(GELU, SiLU, Mish, Hardswish, SELU, CELU) and its ``"map"`` entries (softmax, softmin,
log_softmax, logsumexp). Each is the supremum of the derivative's norm, which for a
continuous, piecewise differentiable map on a convex domain is its Lipschitz constant;
each is written with at least 12 significant digits and rounded *up* in its last digit,
and tests/functional/test_activation_slopes.py finds each supremum again by Newton's
method in float64 and by autograd on a dense grid.

# Note [Maximal slopes of activations]

* GELU, $f(x) = x \Phi(x)$: $f'(x) = \Phi(x) + x \varphi(x)$ and $f''(x) = \varphi(x) (2 - x^2)$,
  so $f'$ has its extrema at $\pm\sqrt 2$ only; $f'(x) + f'(-x) = 1$ (as $f(x) - f(-x) = x$),
  so $\sup |f'| = f'(\sqrt 2) = \frac12 (1 + \operatorname{erf} 1) + \frac{1}{e \sqrt\pi}
  = 1.12890414518\ldots$ (the minimum is $1 - f'(\sqrt 2) = -0.1289\ldots$).
* GELU with ``approximate="tanh"``, $f(x) = \frac x2 (1 + \tanh(\sqrt{2/\pi} (x + 0.044715
  x^3)))$: again $f(x) - f(-x) = x$, so $f'(x) + f'(-x) = 1$ and $\sup |f'| = \max f'$,
  reached at the one positive root $x^* = 1.41850\ldots$ of $f''$: $1.12899306866\ldots$.
* SiLU, $f(x) = x \sigma(x)$: $f'(x) = \sigma(x) (1 + x (1 - \sigma(x)))$ and $f''(x) = \sigma'(x)
  (2 - x \tanh(x / 2))$. $x \tanh(x/2)$ is even and increasing on $x > 0$ from 0 to $\infty$,
  so $f''$ vanishes at $\pm x^*$ only, $x^* \tanh(x^*/2) = 2$, $x^* = 2.39935728\ldots$;
  $f(x) - f(-x) = x$ gives $\sup |f'| = f'(x^*) = 1.09983932013\ldots$.
* Mish, $f(x) = x \tanh(\operatorname{softplus}(x))$: $f'$ rises from 0 (at $-\infty$) to a
  minimum $-0.1125\ldots$ at $x = -2.2564\ldots$, a maximum $1.08849816125\ldots$ at $x =
  1.49057\ldots$, and decreases to 1 (at $+\infty$), so $\sup |f'| = 1.08849816125\ldots$.
* Hardswish, $f(x) = x \operatorname{relu6}(x + 3) / 6$: 0 below $-3$, $x (x + 3) / 6$ on $[-3,
  3]$ (slope $(2 x + 3) / 6 \in [-\frac12, \frac32]$), the identity above 3; continuous, so
  $\frac32$.
* SELU, $\lambda x$ for $x > 0$ and $\lambda \alpha (e^x - 1)$ below, continuous, slopes
  $\lambda$ and $\lambda \alpha e^x < \lambda \alpha$ with torch's $\lambda = 1.0507\ldots$,
  $\alpha = 1.6733\ldots > 1$: the constant is $\lambda \alpha = 1.75809934085\ldots$.
* CELU, $x$ for $x > 0$ and $\alpha (e^{x / \alpha} - 1)$ below: slope $e^{x/\alpha} < 1$ for
  $\alpha > 0$, so 1; for $\alpha < 0$ the slope $e^{x / \alpha}$ grows without bound as $x \to
  -\infty$ (refused), and $\alpha = 0$ divides by zero (refused).

Softplus is not here: torch returns $x$ above ``threshold``, leaving a jump of
$\log(1 + e^{-\beta t}) / \beta$ there, so torch's softplus is not Lipschitz.

# Note [Softmax Jacobian]

Softmax acts on each fibre along ``dim`` independently, so its constant is that of one
fibre of size $n$. With $p = \operatorname{softmax}(z)$, the Jacobian is $J = \operatorname{diag}(p)
- p p^\top$, symmetric positive semidefinite, and for a unit $v$, $v^\top J v = \sum_i p_i
v_i^2 - (\sum_i p_i v_i)^2$ is the variance of $v$ under the distribution $p$. By
Popoviciu's inequality it is at most $(\max_i v_i - \min_i v_i)^2 / 4 \le 2 (v_{\max}^2 +
v_{\min}^2) / 4 \le \frac12$, so $\|J\| \le \frac12$ everywhere and softmax is
$\frac12$-Lipschitz, for every $n \ge 2$ (approached at $p = (\frac12, \frac12, 0, \ldots)$,
$v = (1, -1, 0, \ldots)/\sqrt 2$); a fibre of size 1 is the constant 1. Softmin is softmax of
$-z$: the same constant.

log_softmax has Jacobian $M = I - \mathbf 1 p^\top$. $\|M x\|^2 = \|x\|^2 - 2 (p \cdot x)(\mathbf 1
\cdot x) + n (p \cdot x)^2$ is convex in $p$, so its supremum over the simplex is at a vertex,
$p = e_k$; there $M^\top M$ acts on $\operatorname{span}(e_k, \mathbf 1 - e_k)$ as
$\begin{pmatrix} n - 1 & -\sqrt{n - 1} \\ -\sqrt{n - 1} & 1 \end{pmatrix}$ (and as the identity
on the rest), with eigenvalues $n$ and 0. So the constant is $\sqrt n$, approached as one
logit dominates; it grows with the fibre, and the size is needed.

logsumexp over the dims $D$ has gradient $p$ (the softmax over the joint fibre) and $\|p\|_2
\le \|p\|_1 = 1$: constant 1 (approached as one logit dominates), whatever the size.
"""

from __future__ import annotations

from lipnets.functional.linear_maps import copies_norm

__all__ = [
    "CELU_SLOPE",
    "GELU_SLOPE",
    "GELU_TANH_SLOPE",
    "HARDSWISH_SLOPE",
    "LOGSUMEXP_CONSTANT",
    "MISH_SLOPE",
    "SELU_SLOPE",
    "SILU_SLOPE",
    "SOFTMAX_CONSTANT",
    "log_softmax_constant",
]

GELU_SLOPE = 1.1289041451852
"""$\\frac12 (1 + \\operatorname{erf} 1) + 1 / (e \\sqrt\\pi)$, rounded up (Note [Maximal slopes
of activations])."""
GELU_TANH_SLOPE = 1.1289930686588
"""GELU's tanh approximation at $x^* = 1.41850\\ldots$, rounded up."""
SILU_SLOPE = 1.0998393201289
"""SiLU at $x^* \\tanh(x^* / 2) = 2$, rounded up."""
MISH_SLOPE = 1.0884981612518
"""Mish at $x^* = 1.49057\\ldots$, rounded up."""
HARDSWISH_SLOPE = 1.5
"""Hardswish: $(2 x + 3) / 6$ at $x = 3$, exact."""
SELU_SLOPE = 1.7580993408474
"""torch's SELU scale times alpha, rounded up."""
CELU_SLOPE = 1.0
"""CELU with alpha > 0."""
SOFTMAX_CONSTANT = 0.5
"""Softmax and softmin over fibres of size >= 2 (Note [Softmax Jacobian]), exact."""
LOGSUMEXP_CONSTANT = 1.0
"""logsumexp (Note [Softmax Jacobian]), exact."""


def log_softmax_constant(n: int) -> float:
    r"""$\sqrt n$ rounded up: log_softmax over a fibre of size ``n`` (Note [Softmax
    Jacobian]); 0 for ``n <= 1`` (a fibre of size 1 maps to the constant 0)."""
    return copies_norm(n) if n > 1 else 0.0
