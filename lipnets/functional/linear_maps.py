r"""Operator norms of torch's structured linear maps: interpolation, padding, unfold, cumsum, diff.

Each function returns a sound upper bound on the $\ell_2 \to \ell_2$ norm of one of torch's
linear maps (per channel, per sample: the maps act on each channel alike, so that is the
norm of the whole map), computed from the map's arguments and its input's spatial size,
rounded up. The op table (`lipnets.graph.ops`) turns them into the constants of its
``"map"`` and ``"pad"`` entries; `lipnets.propagation` builds the same 1-D operators
(`interpolation_operator`, `cumsum_operator`, `diff_operator`) for bound propagation.

# Note [Separable interpolation]

``F.interpolate`` computes, for each spatial dim $d$, source positions and weights that
depend only on that dim's input size $n_d$, output size $m_d$, scale and the mode's options,
and writes output $(o_1, \dots, o_k) = \sum_{i} \prod_d w_d(o_d, i_d)\, x_{i_1 \dots i_k}$ (also
with ``antialias``, which torch applies as one separable pass per dim). So the map is the
Kronecker product $M_1 \otimes \cdots \otimes M_k$ of 1-D operators, whose singular values
are the products of theirs: its norm is $\prod_d \|M_d\|$. lipnets builds each $M_d$ with
torch itself, interpolating the identity basis along dim $d$ with every other spatial dim of
size 2 at scale 1 (or size 2), where every mode is the identity (not size 1: there torch's
antialiased kernels are not the identity), and reading index 0 of those dims; it takes the exact
spectral norm (Note [Sound spectral norm in float64] in `lipnets.functional.norms`); an
operator above $2^{22}$ entries is bounded by Schur's test, $\|M\|^2 \le \max_i \sum_j
|M_{ij}| \cdot \max_j \sum_i |M_{ij}|$. Torch computes source positions in the input's
accumulation type (float32 for float32, float16 and bfloat16 inputs, float64 for float64), so
both operators are built and the larger norm is kept. ``nearest`` and ``nearest-exact``
give 0/1 operators with one 1 per row, whose norm is exactly $\sqrt{c}$ with $c$ the largest
number of outputs that copy one input entry (counted on integer codes).

No bound holds for every input size: torch computes nearest source indices as
``floorf(dst * scale)`` and linear weights from positions in float32, whose rounding makes
the copy counts grow with the size (scale 2 on $2^{25} + 7$ entries copies one entry 7 times,
scale 5 on $3 \cdot 10^6$ entries 6 times). Interpolation bounds need the input size.

# Note [Padding copies]

Reflect, replicate and circular padding copy entries: the pad operator $P$ is a 0/1 matrix
with one 1 per row, $P^\top P$ is diagonal with the number of copies of each entry, and
$\|P\| = \sqrt{\max_j c_j}$ exactly. Each dim is padded independently, so the count of an
entry is the product of its 1-D counts and the largest count the product of the 1-D
maxima. With the size given the 1-D counts come from ``F.pad`` itself on integer codes.
For every size at once (non-negative pads $p_l, p_r$), per dim: replicate copies an edge
entry $p + 1$ times and, when $n = 1$, $1 + p_l + p_r$ times, the worst; reflect (torch
needs $p < n$) copies entries $1..p_l$ once to the left and $n - 1 - p_r .. n - 2$ once to
the right, so at most $1 + [p_l > 0] + [p_r > 0]$ copies, reached at $n = \max(p_l, p_r) + 2$
where the ranges overlap; circular (torch needs $p \le n$) copies $n - p_l .. n - 1$ and
$0 .. p_r - 1$, at most $1 + [p_l > 0] + [p_r > 0]$ copies, reached at $n = \max(p_l, p_r)$.
Constant padding copies nothing: norm 1.

# Note [Unfold and fold]

``F.unfold`` writes, per channel, kernel tap $t$ and patch $l$ the entry $x[l s + t d - p]$ of
each dim (zero outside the input). Every output entry is one input entry or zero, so the
map is a 0/1 matrix with at most one 1 per row, of norm $\sqrt{c}$ with $c$ the largest
number of (patch, tap) pairs that read one entry; dims are independent, so $c = \prod_d c_d$.
With the size given, $c_d$ is counted exactly. For every size: the taps reading $j$ satisfy
$t d \equiv j + p \pmod s$; $t d \bmod s$ repeats with period $s / g$, $g = \gcd(d, s)$, and
meets each residue of its class once per period, so at most $\lceil k g / s \rceil$ taps read
$j$, and an interior entry of a long enough input with the right residue is read by all of
them. ``F.fold`` sums patches into an output of ``output_size``: it is the adjoint of the
unfold with the same arguments on an input of that size, so its norm is the same, known
without any input size.

# Note [Cumulative sums and differences]

``cumsum`` along a dim of size $n$ applies the lower-triangular matrix of ones $L_n$ to every
fibre. $L_n^{-1} = I - S$ (with $S$ the shift down), and $(L_n L_n^\top)^{-1} = (I - S)^\top (I
- S)$ is tridiagonal with diagonal $(2, \dots, 2, 1)$ and off-diagonals $-1$, whose eigenvalues
are $4 \sin^2 \frac{(2 j - 1) \pi}{2 (2 n + 1)}$, $j = 1..n$. So $\|L_n\| = 1 / (2 \sin \frac{\pi}{2
(2 n + 1)})$ (exact; about $2 (2 n + 1) / \pi$): it grows with $n$, and the size is needed.

``diff`` of order 1 on $m$ points is $D_m$ ($(m - 1) \times m$, rows $e_{i+1} - e_i$); $D_m
D_m^\top$ is tridiagonal $(-1, 2, -1)$ of size $m - 1$ with eigenvalues $2 - 2 \cos (j \pi / m)$,
so $\|D_m\| = 2 \cos (\pi / (2 m)) < 2$. Order $r$ is $D_{m - r + 1} \cdots D_m$, of norm at most
$\prod_{i < r} 2 \cos(\pi / (2 (m - i))) < 2^r$. ``prepend`` and ``append`` constants lengthen
the sequence to $m = n + n_p + n_a$ points; the input's entries are a column selection of it, so
the linear part has norm at most that of $D^{(r)}_m$ (the constants are a translation). With
the size given lipnets takes the exact norm of the operator torch computes (from the
identity basis) when it has at most $2^{22}$ entries, else the product; for every size,
$2^r$. Order 0 is the identity (torch then ignores ``prepend`` and ``append``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lipnets.functional.norms import spectral_norm_bound

__all__ = [
    "copies_norm",
    "cumsum_norm_bound",
    "cumsum_operator",
    "diff_norm_bound",
    "diff_operator",
    "interpolation_norm_bound",
    "interpolation_operator",
    "nearest_copies",
    "pad_copies",
    "unfold_cover",
]

_EPS64 = torch.finfo(torch.float64).eps
DENSE_LIMIT = 2**22
"""Largest 1-D operator (entries) whose exact spectral norm is computed (Note [Separable
interpolation]); larger ones get Schur's test."""
SCHUR_LIMIT = 2**30
"""Largest 1-D operator (entries) lipnets builds at all."""
_NEAREST = ("nearest", "nearest-exact")
_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear", "area")
_MODES += ("lanczos",)


def _up(value: float, ulps: int = 16) -> float:
    """``value`` times ``1 + ulps * eps`` and then the next float: room for a few roundings."""
    if value <= 0 or not math.isfinite(value):
        return value
    return math.nextafter(value * (1.0 + ulps * _EPS64), math.inf)


def copies_norm(count: int) -> float:
    r"""$\sqrt{c}$ rounded up: the norm of a 0/1 matrix with at most one 1 per row and at
    most ``count`` ones per column (its Gram matrix is diagonal, entries at most ``count``)."""
    root = math.sqrt(count)
    return root if Fraction(root) ** 2 >= count else math.nextafter(root, math.inf)  # exactly


# -- interpolation (Note [Separable interpolation]) ----------------------------------------


_DUMMY = 2
"""Size of the other spatial dims when one dim's operator is built: torch's antialiased
kernels do not reduce to the identity on dims of size 1 (they do on size 2 with scale 1)."""


def _axis_kwargs(params: dict[str, Any], d: int, k: int) -> dict[str, Any]:
    """F.interpolate's arguments for the operator along spatial dim ``d`` alone."""
    size, scale = params.get("size"), params.get("scale_factor")
    kwargs = {
        "mode": params.get("mode", "nearest"),
        "align_corners": params.get("align_corners"),
        "recompute_scale_factor": params.get("recompute_scale_factor"),
        "antialias": bool(params.get("antialias", False)),
    }
    if size is not None:
        sizes = tuple(size) if isinstance(size, (list, tuple)) else (size,) * k
        kwargs["size"] = tuple(int(sizes[d]) if i == d else _DUMMY for i in range(k))
    else:
        scales = tuple(scale) if isinstance(scale, (list, tuple)) else (scale,) * k
        kwargs["scale_factor"] = tuple(float(scales[d]) if i == d else 1.0 for i in range(k))
    return kwargs


def _check_params(params: dict[str, Any], k: int) -> None:
    mode = params.get("mode", "nearest")
    if mode not in _MODES:
        raise ValueError(f"interpolation mode must be one of {_MODES}, got {mode!r}")
    if k < 1:
        raise ValueError("interpolation needs at least one spatial dimension")
    if (params.get("size") is None) == (params.get("scale_factor") is None):
        raise ValueError("give exactly one of size and scale_factor")


def _along(values: Tensor, n: int, d: int, k: int) -> Tensor:
    """(B, n) values placed along spatial dim ``d`` at index 0 of the others: (B, 1, ...)."""
    shape = [_DUMMY] * k
    shape[d] = n
    out = values.new_zeros((values.shape[0], 1, *shape))
    index = [slice(None), 0] + [0] * k
    index[2 + d] = slice(None)
    out[tuple(index)] = values
    return out


def _read(out: Tensor, d: int, k: int) -> Tensor:
    """The outputs along dim ``d`` at index 0 of the other spatial dims: (B, m)."""
    index = [slice(None), 0] + [0] * k
    index[2 + d] = slice(None)
    return out[tuple(index)]


def _axis_columns(
    n: int, d: int, k: int, params: dict[str, Any], dtype: torch.dtype, start: int, stop: int
) -> Tensor:
    """Columns ``start:stop`` of the 1-D operator along dim ``d``: shape (stop - start, m)."""
    count = stop - start
    basis = torch.zeros((count, n), dtype=dtype)
    basis[torch.arange(count), torch.arange(start, stop)] = 1.0
    out = F.interpolate(_along(basis, n, d, k), **_axis_kwargs(params, d, k))
    return _read(out, d, k)


def interpolation_operator(
    sizes: Sequence[int], d: int, params: dict[str, Any], dtype: torch.dtype = torch.float64
) -> Tensor:
    """The dense 1-D operator $M_d$ (output size, input size) of ``F.interpolate`` along
    spatial dim ``d`` of an input of spatial size ``sizes``, built by torch in ``dtype``
    (Note [Separable interpolation]). ``params`` holds F.interpolate's keyword arguments."""
    k = len(sizes)
    _check_params(params, k)
    n = int(sizes[d])
    return _axis_columns(n, d, k, params, dtype, 0, n).T.contiguous()


def nearest_copies(sizes: Sequence[int], d: int, params: dict[str, Any]) -> int:
    """The most outputs that copy one input entry along dim ``d`` (nearest modes), counted
    on integer codes in float64 and float32 (exact below $2^{24}$)."""
    k = len(sizes)
    _check_params(params, k)
    n = int(sizes[d])
    most = 0
    for dtype in (torch.float64, torch.float32):
        if dtype == torch.float32 and n >= 2**24:
            continue
        codes = _along(torch.arange(n, dtype=dtype).reshape(1, n), n, d, k)
        out = _read(F.interpolate(codes, **_axis_kwargs(params, d, k)), d, k).reshape(-1).long()
        if out.numel():
            most = max(most, int(torch.bincount(out, minlength=n).max()))
    return most


def _axis_norm(n: int, d: int, k: int, params: dict[str, Any]) -> float:
    width = _axis_columns(n, d, k, params, torch.float64, 0, 1).shape[1]  # the output size
    entries = n * width
    if entries > SCHUR_LIMIT:
        raise ValueError(
            f"an interpolation operator of {n} x {width} entries is too large to bound "
            f"(at most {SCHUR_LIMIT})"
        )
    best = 0.0
    for dtype in (torch.float32, torch.float64):
        if entries <= DENSE_LIMIT:
            matrix = _axis_columns(n, d, k, params, dtype, 0, n).T
            best = max(best, float(spectral_norm_bound(matrix, name="interpolation operator")))
            continue
        rows = torch.zeros(width, dtype=torch.float64)
        cols = torch.zeros(n, dtype=torch.float64)
        step = max(1, DENSE_LIMIT // width)
        for start in range(0, n, step):
            stop = min(n, start + step)
            block = _axis_columns(n, d, k, params, dtype, start, stop).double().abs()
            rows += block.sum(0)
            cols[start:stop] = block.sum(1)
        schur = math.sqrt(float(rows.max()) * float(cols.max()))
        best = max(best, _up(schur, 4 * (n + width)))
    return best


def interpolation_norm_bound(sizes: Sequence[int], params: dict[str, Any]) -> float:
    r"""Sound bound on the norm of ``F.interpolate(x, **params)`` for inputs of spatial size
    ``sizes`` (Note [Separable interpolation]): the product of the 1-D norms.

    Raises:
        ValueError: for an unknown mode, both or neither of ``size`` and ``scale_factor``,
            or an operator too large to build.
    """
    k = len(sizes)
    _check_params(params, k)
    total = 1.0
    for d in range(k):
        n = int(sizes[d])
        if n == 0:
            return 0.0
        if params.get("mode", "nearest") in _NEAREST:
            factor = copies_norm(nearest_copies(sizes, d, params))
        else:
            factor = _axis_norm(n, d, k, params)
        total = _up(total * factor, 2)
    return total


# -- padding (Note [Padding copies]) ----------------------------------------------------


def pad_copies(mode: str, pad: Sequence[int], sizes: Sequence[int] | None) -> int:
    """The most copies of one entry made by ``F.pad(x, pad, mode)`` on trailing dims of
    size ``sizes`` (the last ``len(pad) // 2`` dims, last dim first in ``pad`` as in
    ``F.pad``), or for every size when ``sizes`` is None (Note [Padding copies]).

    Raises:
        ValueError: for an unknown mode, an odd-length ``pad``, or negative pads without
            sizes.
    """
    if mode == "constant":
        return 1
    if mode not in ("reflect", "replicate", "circular"):
        raise ValueError(
            f"pad mode must be 'constant', 'reflect', 'replicate' or 'circular', got {mode!r}"
        )
    pads = [int(p) for p in pad]
    if len(pads) % 2:
        raise ValueError(f"pad must have an even length, got {tuple(pads)}")
    dims = len(pads) // 2
    total = 1
    for i in range(dims):
        left, right = pads[2 * i], pads[2 * i + 1]
        if sizes is not None:
            n = int(sizes[len(sizes) - 1 - i])
            codes = torch.arange(n, dtype=torch.float64).reshape(1, 1, n)
            out = F.pad(codes, (left, right), mode=mode).reshape(-1).long()
            total *= int(torch.bincount(out, minlength=max(n, 1)).max()) if out.numel() else 0
            continue
        if left < 0 or right < 0:
            raise ValueError(
                f"negative pads {(left, right)} (cropping) need the input size to count copies"
            )
        if mode == "replicate":
            total *= 1 + left + right
        else:
            total *= 1 + (left > 0) + (right > 0)
    return total


# -- unfold and fold (Note [Unfold and fold]) -----------------------------------------------


def _pairs(value: int | Sequence[int], name: str) -> tuple[int, int]:
    out = (int(value),) * 2 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) == 1:
        out = out * 2
    if len(out) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value!r}")
    return out  # type: ignore[return-value]


def _axis_cover(n: int | None, k: int, d: int, p: int, s: int) -> int:
    if k < 1 or d < 1 or s < 1 or p < 0:
        raise ValueError(
            f"unfold needs kernel_size, dilation and stride >= 1 and padding >= 0, got "
            f"kernel {k}, dilation {d}, padding {p}, stride {s}"
        )
    if n is None:
        return min(k, -(-k * math.gcd(d, s) // s))
    patches = (n + 2 * p - d * (k - 1) - 1) // s + 1
    if patches < 1 or n < 1:
        return 0
    idx = (torch.arange(patches)[:, None] * s + torch.arange(k)[None, :] * d - p).reshape(-1)
    idx = idx[(idx >= 0) & (idx < n)]
    return int(torch.bincount(idx, minlength=n).max()) if idx.numel() else 0


def unfold_cover(
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    stride: int | Sequence[int] = 1,
    sizes: Sequence[int] | None = None,
) -> int:
    """The most (patch, tap) pairs of ``F.unfold`` that read one entry of an input of
    spatial size ``sizes`` (H, W), or of any size when None (Note [Unfold and fold]): the
    squared norm of both ``F.unfold`` and ``F.fold``."""
    ks, ds = _pairs(kernel_size, "kernel_size"), _pairs(dilation, "dilation")
    ps, ss = _pairs(padding, "padding"), _pairs(stride, "stride")
    total = 1
    for i in range(2):
        n = None if sizes is None else int(sizes[i])
        total *= _axis_cover(n, ks[i], ds[i], ps[i], ss[i])
    return total


# -- cumsum and diff (Note [Cumulative sums and differences]) -------------------------------


def cumsum_norm_bound(n: int) -> float:
    """$\\|L_n\\| = 1 / (2 \\sin(\\pi / (2 (2 n + 1))))$, rounded up (Note [Cumulative sums
    and differences])."""
    if n <= 0:
        return 0.0
    return _up(1.0 / (2.0 * math.sin(math.pi / (2.0 * (2 * n + 1)))), 16)


def cumsum_operator(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The (n, n) lower-triangular matrix of ones that ``cumsum`` applies along a dim."""
    return torch.tril(torch.ones((n, n), dtype=dtype))


def diff_operator(
    n: int, order: int, before: int = 0, after: int = 0, dtype: torch.dtype = torch.float64
) -> Tensor:
    """The matrix (outputs, n) of the linear part of ``torch.diff`` of order ``order`` along
    a dim of size ``n`` with ``before`` prepended and ``after`` appended entries, built by
    torch from the identity basis."""
    eye = torch.eye(n, dtype=dtype)
    pre = torch.zeros((n, before), dtype=dtype) if before else None
    post = torch.zeros((n, after), dtype=dtype) if after else None
    return torch.diff(eye, n=order, dim=1, prepend=pre, append=post).T.contiguous()


def diff_norm_bound(n: int | None, order: int, before: int = 0, after: int = 0) -> float:
    """Sound bound on the norm of the linear part of ``torch.diff`` (Note [Cumulative sums
    and differences]): exact for small sizes, a product of first-difference norms for
    large ones, $2^r$ without a size."""
    if order < 0:
        raise ValueError(f"diff order must be >= 0, got {order}")
    if order == 0:
        return 1.0
    if n is None:
        return float(2**order)
    m = n + before + after
    if m <= order or n == 0:
        return 0.0
    if n * (m - order) <= DENSE_LIMIT:
        matrix = diff_operator(n, order, before, after)
        return float(spectral_norm_bound(matrix, name="diff operator"))
    total = 1.0
    for i in range(order):
        total = _up(total * 2.0 * math.cos(math.pi / (2.0 * (m - i))), 8)
    return min(total, float(2**order))
