r"""Propagation of softmax, softmin, log_softmax and ``F.normalize``: maps of whole fibres.

# Note [Softmax intervals]

Along its dim, $\operatorname{softmax}_i(z) = 1 / (1 + \sum_{j \ne i} e^{z_j - z_i})$ is
increasing in $z_i$ and decreasing in every other $z_j$, so over a box $[l, u]$ of the
fibre its exact range is $[\sigma(l_i - \operatorname{lse}_{j \ne i} u_j),\ \sigma(u_i -
\operatorname{lse}_{j \ne i} l_j)]$ (with $\sigma$ the logistic function and lse the
log-sum-exp; over no $j$ it is $-\infty$, and the entry is the constant 1). Softmin is
softmax of $-z$, over the box $[-u, -l]$; log_softmax is the logarithm of softmax, an
increasing map, so its range is the logarithm of that one ($\log \sigma$ evaluated as
``logsigmoid``). Each end is reached by one point of the box, so IBP is exact per entry.
For CROWN the op keeps these constant lines (slope 0, the intercepts the interval ends),
which are valid on the whole box; CROWN tightens the box of the softmax's input first
(Note [Elementwise operations in the backward pass] in `lipnets.propagation.propagator`).
``slope`` is the op's Lipschitz constant for `local_lipschitz`: $\frac12$ for softmax and
softmin, $\sqrt n$ for log_softmax on fibres of $n$ entries (Note [Softmax Jacobian] in
`lipnets.functional.activation_slopes`).

# Note [Normalisation intervals]

``F.normalize`` (p = 2, Note [Normalisation] in `lipnets.graph.normalize_map`) maps entry
$i$ of a fibre $v$ to $v_i / \max(\|v\|, \varepsilon)$. Over a box $[l, u]$ of the fibre,
$\|v\|$ lies in $[r, R]$ with $r = \|(\max(l_j, -u_j, 0))_j\|$ (the distance of the box
from 0) and $R = \|(\max(|l_j|, |u_j|))_j\|$; so with $d = \max(r, \varepsilon)$ and $D =
\max(R, \varepsilon)$, $v_i / \max(\|v\|, \varepsilon)$ is at least $l_i / D$ when $l_i
\ge 0$ and $l_i / d$ otherwise, at most $u_i / d$ when $u_i \ge 0$ and $u_i / D$
otherwise, and always in $[-1, 1]$. CROWN keeps these constant lines, as for softmax.
`local_lipschitz` reads the op's constant on the box, $1 / \max(r, \varepsilon)$, largest
over the fibres (``local_slope``); $r$ is shrunk by a few ulps and the quotient rounded
up, so the computed constant is above the exact one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from lipnets.errors import UnboundedModuleError
from lipnets.functional import activation_slopes as AS
from lipnets.graph.normalize_map import normalize_args
from lipnets.propagation.linear_maps import _resolve, map_rule, per_sample_dim
from lipnets.propagation.ops_base import Elementwise, Relaxation

if TYPE_CHECKING:
    from lipnets.propagation.builder import Builder

__all__ = ["Normalize", "Softmax"]


class Softmax(Elementwise):
    """Softmax (``sign=1``), softmin (``sign=-1``) or log_softmax (``log=True``) along a
    per-sample dim (Note [Softmax intervals])."""

    kind = "softmax"

    def __init__(self, shape: torch.Size, dim: int, sign: int, log: bool) -> None:
        super().__init__([shape], shape)
        self.dim, self.sign, self.log = dim, sign, log  # dim counts the batch
        n = int(shape[dim - 1])
        self.slope = AS.log_softmax_constant(n) if log else (AS.SOFTMAX_CONSTANT if n > 1 else 0.0)

    def function(self, x: Tensor) -> Tensor:
        fn = F.log_softmax if self.log else F.softmax
        return fn(self.sign * x, dim=self.dim)

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        lo, up = lows[0], ups[0]
        if self.sign < 0:
            lo, up = -up, -lo
        low, high = _others(lo, up, self.dim)
        end = F.logsigmoid if self.log else torch.sigmoid
        return end(lo - low), end(up - high)

    def relaxation(self, lower: Tensor, upper: Tensor, variant: int = 0) -> Relaxation:
        lo, up = self.interval([lower], [upper])
        zero = torch.zeros_like(lo)
        return zero, lo, zero, up


class Normalize(Elementwise):
    """``F.normalize(x, p=2, dim=dims, eps=eps)`` (Note [Normalisation intervals])."""

    kind = "normalize"

    def __init__(self, shape: torch.Size, dims: tuple[int, ...], eps: float) -> None:
        super().__init__([shape], shape)
        self.dims, self.eps = dims, eps  # dims count the batch
        self.slope = math.nextafter(1.0 / eps, math.inf)

    def function(self, x: Tensor) -> Tensor:
        return F.normalize(x, p=2.0, dim=self.dims, eps=self.eps)

    def _norms(self, lo: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
        """(max(r, eps), max(R, eps)) per fibre, kept as size-1 dims."""
        near = torch.maximum(torch.maximum(lo, -up), torch.zeros_like(lo))
        far = torch.maximum(lo.abs(), up.abs())
        r = torch.linalg.vector_norm(near, dim=self.dims, keepdim=True)
        big = torch.linalg.vector_norm(far, dim=self.dims, keepdim=True)
        shrink = 1 - 8 * torch.finfo(lo.dtype).eps  # below the exact norm despite rounding
        return (r * shrink).clamp_min(self.eps), (big / shrink).clamp_min(self.eps)

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        lo, up = lows[0], ups[0]
        near, far = self._norms(lo, up)
        low = torch.where(lo >= 0, lo / far, lo / near).clamp(-1.0, 1.0)
        high = torch.where(up >= 0, up / near, up / far).clamp(-1.0, 1.0)
        return low, high

    def relaxation(self, lower: Tensor, upper: Tensor, variant: int = 0) -> Relaxation:
        lo, up = self.interval([lower], [upper])
        zero = torch.zeros_like(lo)
        return zero, lo, zero, up

    def local_slope(self, lower: Tensor, upper: Tensor) -> Tensor:
        near, _ = self._norms(lower, upper)
        worst = near.reshape(near.shape[0], -1).amin(1)
        return torch.nextafter(1.0 / worst, torch.full_like(worst, math.inf))


def _others(lo: Tensor, up: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """(lse over j != i of up_j, lse over j != i of lo_j) for every entry i along dim."""
    u, l_ = torch.movedim(up, dim, -1), torch.movedim(lo, dim, -1)
    n = u.shape[-1]
    diag = torch.eye(n, dtype=torch.bool, device=u.device)
    inf = torch.tensor(-torch.inf, dtype=u.dtype, device=u.device)
    of_up = torch.where(diag, inf, u.unsqueeze(-2)).logsumexp(-1)
    of_lo = torch.where(diag, inf, l_.unsqueeze(-2)).logsumexp(-1)
    return torch.movedim(of_up, -1, dim), torch.movedim(of_lo, -1, dim)


def _softmax(b: Builder, node: fx.Node, sign: int, log: bool) -> int:
    dim = b.const(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None))
    if dim is None:
        raise b.no_rule(node, "it has no dim (torch's implicit choice is deprecated): pass dim=")
    position = 3 if node.target in (F.softmax, F.softmin, F.log_softmax) else 2
    dtype = node.kwargs.get("dtype", node.args[position] if len(node.args) > position else None)
    if b.const(dtype) is not None:
        raise b.no_rule(node, "it casts with dtype=")
    d = per_sample_dim(b, node, dim)
    source: Any = node.args[0] if node.args else node.kwargs["input"]
    src = b.materialize(source, node)
    per_sample = b.nodes[src].shape
    return b.add(Softmax(per_sample, d, sign, log), [src], per_sample, b.where(node))


@map_rule("softmax")
def _softmax_rule(b: Builder, node: fx.Node) -> int:
    return _softmax(b, node, 1, False)


@map_rule("softmin")
def _softmin_rule(b: Builder, node: fx.Node) -> int:
    return _softmax(b, node, -1, False)


@map_rule("log_softmax")
def _log_softmax_rule(b: Builder, node: fx.Node) -> int:
    return _softmax(b, node, 1, True)


@map_rule("normalize")
def _normalize_rule(b: Builder, node: fx.Node) -> int:
    source: Any = node.args[0] if node.args else node.kwargs["input"]
    shape = b.value[source].shape
    try:
        dims, eps, _ = normalize_args(node, _resolve(b), shape)
    except UnboundedModuleError as exc:
        raise b.no_rule(node, str(exc).split(": ", 1)[-1]) from exc
    src = b.materialize(source, node)
    per_sample = b.nodes[src].shape
    return b.add(Normalize(per_sample, dims, eps), [src], per_sample, b.where(node))
