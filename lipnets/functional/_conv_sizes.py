r"""Spectral-norm bounds of a 2-D convolution at a given input size, and of its pads.

Helpers of `lipnets.functional.conv_norms.conv2d_spectral_norm_bound`, one per padding
mode: the circular convolution on a torus that contains the padded layer, the output
section, the repeat count of circular padding and the copy count of reflect and replicate
padding. The symbol, its polyphase form and the certified grid maximum and supremum are in
`lipnets.functional._conv_symbol` (Note [Convolution symbol], Note [Polyphase form of a
strided convolution], Note [Bound for every input size], Note [Certified largest
eigenvalue]).

# Note [Zero padding at a given size]

On an input of size $N$ with pads $(p_t, p_b)$, stride $s$ and dilated kernel size $K$,
output $i$ reads $x[s i + p - p_t]$, $0 \le p < K$, with $x = 0$ outside $[0, N)$.
Embed $x$ with zeros in a torus of size $N' \ge N + \max(p_t, p_b)$, $N' > N + p_t + p_b - K$,
$s \mid N'$. Every index read lies in $[-p_t, N + p_b)$; those outside $[0, N)$ land, mod
$N'$, in the zero part $[N, N')$, and the outputs $s i$ are distinct mod $N'$. So the
zero-padded convolution is a restriction (a subset of outputs) of the strided circular
convolution on the $N'$ torus composed with an isometric embedding: its norm is at most
that circular convolution's norm, which is computed exactly (Note [Convolution symbol],
Note [Polyphase form of a strided convolution]) and is at most the every-size bound.

# Note [Output section at a given size]

A second bound ignores the input's edges instead of wrapping them: with $T$ the
convolution on $\ell_2(\mathbb{Z}^2)$ and $R$ the restriction to the $N_{out}$ outputs, the layer is
$A = R D_s T E$ with $E$ the embedding of the input, so $A A^\top = R D_s T E E^\top
T^\top D_s^\top R^\top \preceq R D_s T T^\top D_s^\top R^\top =: M$. $M$ is block
Toeplitz: block $(i, i')$ is $C_{s (i - i')}$, $C_\Delta = \sum_p W_p W_{p + \Delta}^\top$.
When every output window lies inside the input (no padding) $E E^\top$ acts as the
identity on the range of $T^\top D_s^\top R^\top$ and $\lambda_{\max}(M) = \|A\|^2$
exactly; otherwise it is an upper bound. Its size is $c_{out} \cdot$ (number of outputs),
so lipnets uses it (``eigvalsh``, slack as in Note [Certified largest eigenvalue] with
$m$ multiplied by the number of nonzero blocks per row) when that is at most 512, and
keeps the smaller of it and the torus bound. It makes small "valid" convolutions exact,
where the torus bound can be twice the norm.

# Note [Circular padding at a given size]

Torch's circular padding (pads $\le N$) makes output $i$ read $x[(s i + p - p_t) \bmod N]$:
outputs at positions $s i \bmod N$, $i < N_{out}$, of the circular convolution on the $N$
torus (shifted by $p_t$, a unitary). If $s \mid N$ these are outputs $i \bmod (N / s)$ of the
strided circular convolution, whose norm is exact by the polyphase form; otherwise they are
outputs of the stride-1 circular convolution. An output selection in which each position
appears at most $r$ times has norm $\sqrt{r}$ (columns of a 0/1 matrix with one 1 per
row); in 2-D the selection is a Kronecker product, so the factor is $\sqrt{r_1 r_2}$. With
$p_t + p_b \le K - 1$ and $s \mid N$ (e.g. odd $k$, padding $(k - 1) / 2$, or
``padding="same"``) every position appears once and all $N / s$ appear: the bound is the
exact norm. Without an input size: with $e = p_t + p_b - K + 1 \le 0$ no position ever
repeats ($s (N_{out} - 1) \le N + e - 1 < N$); otherwise $r \le 2$ for $N \ge e$ (all
positions lie in $[0, 2N)$) and $r = 2$ is reached (take $s \mid N$), and sizes $N < e$ are
enumerated. The base operator is then bounded by the stride-1 symbol's supremum, which
dominates every stride-1 circular convolution and every polyphase one (for $s \nmid N$ the
polyphase bound alone fails: kernel $[1, 1]$, stride 2, circular padding 1, $N = 3$ gives
$y = (x_2 + x_0, x_1 + x_2)$, norm $\sqrt 3 > \sqrt 2$).

# Note [Reflect and replicate padding]

Reflect and replicate padding copy input entries: the pad operator $P$ is a 0/1 matrix with
one 1 per row, so $P^\top P$ is diagonal with the number of copies of each entry, and
$\|P\|_2 = \sqrt{\max_j c_j}$ exactly. The 2-D pad is the Kronecker product of the 1-D ones
(norm: the product), followed by a "valid" convolution (Note [Zero padding at a given size]
with no pads, and Note [Output section at a given size]), so the bound is the product.
The counts are taken from ``F.pad`` itself on ``arange(N)``. Without an input size the
worst size is taken: replicate copies an edge entry $p + 1$ times (all $1 + p_t + p_b$
times when $N = 1$); reflect copies an entry at most 3 times, and for
$N > p_t + p_b + 1$ the two reflected ranges are disjoint, so the counts no longer change:
enumerating $N \le p_t + p_b + K + 4$ is exhaustive. Both are bounded for every size, so
no input size is required. Circular padding wider than a pure restriction is handled in
Note [Circular padding at a given size].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lipnets.functional._conv_symbol import _EPS64, _grid_or_sup, _reduced_kernel, _sup_lambda

# Note [Output section at a given size]: largest section solved densely.
_SECTION_MAX = 512


def _out_len(n: int, pad: tuple[int, int], kd: int, s: int) -> int:
    return (n + pad[0] + pad[1] - kd) // s + 1


def _roundup(n: int, s: int) -> int:
    return -(-n // s) * s


def _zeros_case(v, strides, dilations, pads, kd, size) -> float:
    # Stride-1 dimensions keep the undilated kernel in the every-size bound: same supremum.
    d_sup = tuple(d if s > 1 else 1 for d, s in zip(dilations, strides, strict=True))
    v_sup = _reduced_kernel(v, strides, d_sup)
    if size is None:
        return _sup_lambda(v_sup)
    grid = tuple(
        _roundup(max(n + max(p), n + p[0] + p[1] - k + 1), s) // s
        for n, p, k, s in zip(size, pads, kd, strides, strict=True)
    )
    lam = _grid_or_sup(_reduced_kernel(v, strides, dilations), grid, v_sup)
    out = tuple(_out_len(*args) for args in zip(size, pads, kd, strides, strict=True))
    return _with_section(lam, _reduced_kernel(v, (1, 1), dilations), strides, out)


def _valid_case(v, strides, dilations, pads, kd, size) -> float:
    """The "valid" convolution on the padded input (reflect, replicate)."""
    d_sup = tuple(d if s > 1 else 1 for d, s in zip(dilations, strides, strict=True))
    v_sup = _reduced_kernel(v, strides, d_sup)
    if size is None:
        return _sup_lambda(v_sup)
    grid = tuple(
        _roundup(n + p[0] + p[1], s) // s for n, p, s in zip(size, pads, strides, strict=True)
    )
    lam = _grid_or_sup(_reduced_kernel(v, strides, dilations), grid, v_sup)
    out = tuple(_out_len(*args) for args in zip(size, pads, kd, strides, strict=True))
    return _with_section(lam, _reduced_kernel(v, (1, 1), dilations), strides, out)


def _circular_case(v, strides, dilations, pads, kd, size) -> tuple[float, int]:
    if size is None:
        repeat = math.prod(_worst_repeats(strides[i], pads[i], kd[i]) for i in range(2))
        return _sup_lambda(_reduced_kernel(v, (1, 1), (1, 1))), repeat
    eff = tuple(s if n % s == 0 else 1 for n, s in zip(size, strides, strict=True))
    grid = tuple(n // e for n, e in zip(size, eff, strict=True))
    d_sup = tuple(d if e > 1 else 1 for d, e in zip(dilations, eff, strict=True))
    lam = _grid_or_sup(_reduced_kernel(v, eff, dilations), grid, _reduced_kernel(v, eff, d_sup))
    repeat = math.prod(_repeats(size[i], strides[i], pads[i], kd[i]) for i in range(2))
    return lam, repeat


def _repeats(n: int, s: int, pad: tuple[int, int], kd: int) -> int:
    """Most times one circular output position is read (Note [Circular padding at a given size])."""
    ho = _out_len(n, pad, kd, s)
    if ho < 1:
        return 0
    return int(torch.bincount((s * torch.arange(ho)) % n).max())


def _worst_repeats(s: int, pad: tuple[int, int], kd: int) -> int:
    e = pad[0] + pad[1] - kd + 1
    if e <= 0:
        return 1
    n_min = max(1, pad[0], pad[1], kd - pad[0] - pad[1])
    return max(2, *(_repeats(n, s, pad, kd) for n in range(n_min, max(n_min, e) + 2 * s + 2)))


def _pad_copies(mode: str, pad: tuple[int, int], kd: int, n: int | None) -> int:
    """Largest number of copies of one entry made by a 1-D pad (Note [Reflect and replicate
    padding]): the squared norm of the pad operator. Worst over sizes when ``n`` is None."""
    if pad == (0, 0):
        return 1
    if n is not None:
        idx = torch.arange(n, dtype=torch.float64).reshape(1, 1, n)
        return int(torch.bincount(F.pad(idx, pad, mode=mode).long().flatten()).max())
    n_min = max(1, kd - pad[0] - pad[1], max(pad) + 1 if mode == "reflect" else 1)
    top = max(n_min, pad[0] + pad[1] + kd + 4)
    return max(_pad_copies(mode, pad, kd, n) for n in range(n_min, top + 1))


def _section_lambda(v: torch.Tensor, stride: tuple[int, int], out: tuple[int, int]) -> float:
    """$\\lambda_{\\max}$ of the output-side section (Note [Output section at a given size]).

    ``v`` is the dilated kernel (groups, out, in, K1, K2); ``out`` the output size.
    """
    g, co, _, k1, k2 = v.shape
    (s1, s2), (h, w) = stride, out
    r1, r2 = min(h - 1, (k1 - 1) // s1), min(w - 1, (k2 - 1) // s2)
    blocks = v.new_zeros(g, 2 * h - 1, 2 * w - 1, co, co)
    for e1 in range(-r1, r1 + 1):
        for e2 in range(-r2, r2 + 1):
            d1, d2 = s1 * e1, s2 * e2  # C_delta = sum_p W_p W_{p + delta}^T
            x = v[..., max(-d1, 0) : k1 - max(d1, 0), max(-d2, 0) : k2 - max(d2, 0)]
            y = v[..., max(d1, 0) : k1 + min(d1, 0), max(d2, 0) : k2 + min(d2, 0)]
            blocks[:, e1 + h - 1, e2 + w - 1] = x.reshape(g, co, -1) @ y.reshape(g, co, -1).mT
    i1 = torch.arange(h)
    i2 = torch.arange(w)
    e1 = (i1[:, None] - i1[None, :] + h - 1)[:, None, :, None]
    e2 = (i2[:, None] - i2[None, :] + w - 1)[None, :, None, :]
    full = blocks[:, e1, e2]  # (g, h, w, h', w', co, co')
    full = full.permute(0, 1, 2, 5, 3, 4, 6).reshape(g, h * w * co, h * w * co)
    lam = max(0.0, float(torch.linalg.eigvalsh(full)[:, -1].max()))
    side = h * w * co
    s_abs = v.abs().sum(dim=(-2, -1))
    m = (v.shape[2] * k1 * k2 + 10) * (2 * r1 + 1) * (2 * r2 + 1)
    err = 10.0 * m * _EPS64 * float((s_abs * s_abs).sum(dim=(1, 2)).max())
    return (lam * (1.0 + 20 * side * _EPS64) + err) * (1.0 + 8 * _EPS64)


def _with_section(
    lam: float, v: torch.Tensor, stride: tuple[int, int], out: tuple[int, int]
) -> float:
    if v.shape[1] * out[0] * out[1] <= _SECTION_MAX:
        return min(lam, _section_lambda(v, stride, out))
    return lam
