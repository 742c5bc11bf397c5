r"""Sound spectral-norm bounds for 2-D convolutions, as torch's ``nn.Conv2d`` computes them.

[`conv2d_spectral_norm_bound`][lipnets.functional.conv_norms.conv2d_spectral_norm_bound]
bounds the $\ell_2 \to \ell_2$ norm of ``x -> F.conv2d(pad(x), weight, None, stride, 0,
dilation, groups)`` for every padding torch offers, from the realised weight, in float64.
The notes below are the proofs; tests/test_conv_bound.py checks each against the dense
operator's SVD.

# Note [Convolution symbol]

Write the (dilated) kernel as taps $W_{p} \in \mathbb{R}^{c_{out} \times c_{in}}$,
$p = (p_1, p_2)$. On $\ell_2(\mathbb{Z}^2)$ the stride-1 convolution (a correlation, as in
torch) is unitarily equivalent, by the Fourier transform, to multiplication by the symbol
$K(\omega) = \sum_p W_p e^{-i p \cdot \omega}$, so its norm is
$\sup_{\omega \in [0, 2\pi)^2} \sigma_{\max}(K(\omega))$. The circular convolution on an
$N_1 \times N_2$ torus is block-diagonalised by the 2-D DFT (Sedghi, Gupta & Long 2019):
its singular values are those of $K(2\pi j_1 / N_1, 2\pi j_2 / N_2)$, and its norm is the
largest over the grid. A translation of the kernel multiplies $K$ by a phase, so leading
zero taps never matter. Groups make the operator block-diagonal: its norm is the largest
over the groups. Dilation by $d$ is the kernel with $d - 1$ zeros between taps; with stride
1 its symbol is $K(d\,\omega)$, which has the same supremum as $K$.

# Note [Polyphase form of a strided convolution]

With stride $s$ (per dimension), $y[m] = \sum_p W_p\, x[s m + p]$. Writing
$p = s a + r$ with $0 \le r < s$ gives $y[m] = \sum_r \sum_a V_r[a]\, x_r[m + a]$ where
$V_r[a] = W_{s a + r}$ and $x_r[n] = x[s n + r]$. The map $x \mapsto (x_r)_r$ is unitary
(a permutation of coordinates) on $\ell_2(\mathbb{Z}^2)$, and on an $N_1 \times N_2$ torus
when $s_i \mid N_i$. So a strided convolution is a stride-1 convolution with
$s_1 s_2 c_{in}$ input channels and taps $V$ of size $\lceil K_i / s_i \rceil$; its
per-frequency matrix is the $c_{out} \times (s_1 s_2 c_{in})$ matrix of the $s_1 s_2$ aliased
frequencies of $K$ scaled by $1 / \sqrt{s_1 s_2}$ (the Fourier form of the same identity).
Phases that receive no tap (e.g. dilation 2 with stride 2) are dropped: zero columns.

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

# Note [Bound for every input size]

Every case above is bounded by $\Lambda^{1/2}$, $\Lambda = \sup_\omega
\lambda_{\max}(G(\omega))$, $G = K K^H$ of the symbol in use (polyphase for zero, reflect and
replicate padding; stride 1 for circular padding). $G$ is a Hermitian trigonometric polynomial with
integer frequencies $|\Delta_i| \le n_i$ (the reduced kernel size minus one). Let
$\omega^\star$ maximise $\lambda_{\max}(G)$ and $v$ be a unit top eigenvector there;
$g(\omega) = v^H G(\omega) v$ satisfies $0 \le g \le \Lambda$, $g(\omega^\star) = \Lambda$,
$\nabla g(\omega^\star) = 0$. On an $M_1 \times M_2$ grid the nearest point is
$\omega^\star + \delta$ with $|\delta_i| \le \pi / M_i$. Along the segment,
$\varphi(\tau) = g(\omega^\star + \tau \delta) - \Lambda/2$ is a trigonometric sum with real
frequencies in $[-\rho, \rho]$, $\rho = \pi (n_1 / M_1 + n_2 / M_2)$, bounded by $\Lambda / 2$;
Bernstein's inequality for functions of exponential type $\rho$ gives
$|\varphi''| \le \rho^2 \Lambda / 2$. By Taylor's theorem with $\varphi'(0) = 0$,
$\max_{\text{grid}} \lambda_{\max}(G) \ge g(\omega^\star + \delta) \ge \Lambda (1 - \rho^2 / 4)$,
so $\Lambda \le \max_{\text{grid}} \lambda_{\max}(G) / (1 - \rho^2 / 4)$. lipnets picks
$M_i$ so that $\rho \le 0.2$ (norm slack $\le 0.5\%$), coarsening up to $\rho = 1.2$ when a
layer would otherwise cost more than about $10^{11}$ flops (e.g. 512 channels), and uses
conjugate symmetry ($G(-\omega) = \overline{G(\omega)}$) to sample half the grid.

# Note [Certified largest eigenvalue]

Per frequency, $G(\omega_j) = \sum_\Delta B_\Delta e^{-i \Delta \cdot \omega_j}$ with the
real autocorrelation blocks $B_\Delta = \sum_{p - p' = \Delta} V_p V_{p'}^\top$ (computed
once by float64 matrix products, on the smaller channel side) and twiddles from exact
integer phase reduction. With $S = \sum_p |V_p|$ (entrywise), every computed entry is within
$\gamma_m (S S^\top)_{ab}$ of the exact one, $m = c\,P Q + n_\Delta + 10$, so
$\|\hat G - G\|_2 \le \gamma_m \|S\|_F^2$; lipnets adds $10\, m\, \varepsilon_{64}
\|S\|_F^2$. The largest eigenvalue of $\hat G$ is then bounded by (a) ``eigvalsh`` for
small sides ($\le 16$), which is backward stable: $\hat\lambda (1 + 20 c\,
\varepsilon_{64})$; or (b) for larger sides, a Cholesky factorisation of $\mu I - \hat G$
with $\mu = \theta (1 + \tau)$, $\theta$ the largest estimate so far (block power
iteration with a Rayleigh-Ritz step; it need not be accurate). If the factorisation
succeeds in floating point, $R^H R = \mu I - \hat G + E$ with $\|E\|_2 \le \gamma_{c+1}
\operatorname{tr}(\mu I - \hat G) / (1 - \gamma_{c+1})$ (Demmel's bound; Higham,
*Accuracy and Stability of Numerical Algorithms*, Thm 10.5 and its proof) and
$R^H R \succeq 0$, so $\lambda_{\max}(\hat G) \le \mu + 2 c\, \gamma_{c+1} (\mu +
\|\hat G - G\|_2)$. Only the first batch is estimated up front; a matrix that fails is
estimated and retried, twice with $\tau = 2^{-16}$, then with $\tau$ times 16 up to 1, then
by ``eigvalsh``. Both routes are covered by the factor $1 + 10 c (c + 1)
\varepsilon_{64}$. Both read only the lower triangle, so $\hat G$ is the Hermitian matrix
that triangle defines, whose entries obey the bound above. Most frequencies cost one
Cholesky factorisation, a fraction of an eigendecomposition: 512-channel layers take
seconds, not minutes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lipnets._checks import check_choice, check_int, check_int_pair, check_tensor

__all__ = ["conv2d_spectral_norm_bound"]

_EPS64 = torch.finfo(torch.float64).eps
_PADDING_MODES = ("zeros", "circular", "reflect", "replicate")

# Note [Bound for every input size]: grid radius target and the cost cap.
_SUP_RADIUS = 0.2
_SUP_RADIUS_MAX = 1.2
_COST_BUDGET = 1.0e11  # frequencies x groups x side^3
# Note [Certified largest eigenvalue]: sides up to this use eigvalsh directly.
_DIRECT_EIG_MAX = 16
_SUBSPACE_ITERS = 10
_SUBSPACE_BLOCK = 8
_CHUNK_BYTES = 1 << 26
# Note [Output section at a given size]: largest section solved densely.
_SECTION_MAX = 512


def conv2d_spectral_norm_bound(
    weight: torch.Tensor,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    input_size: Sequence[int] | None = None,
) -> torch.Tensor:
    r"""Sound upper bound on the $\ell_2 \to \ell_2$ norm of a 2-D convolution.

    The operator is ``x -> F.conv2d(pad(x), weight, None, stride, 0, dilation, groups)``
    with ``pad`` exactly as ``nn.Conv2d(padding=padding, padding_mode=padding_mode)``
    applies it; the bias is a translation and plays no part. All arithmetic is float64 with
    rounding slack (Note [Certified largest eigenvalue] in this module).

    * Circular padding with ``input_size`` given: the exact norm (Sedghi et al. 2019, one
      $c_{out} \times s_1 s_2 c_{in}$ matrix per frequency for stride $s$; Note [Circular
      padding at a given size]) whenever the padded convolution is the circular one, e.g.
      odd $k$ with padding $(k - 1)/2$ or ``"same"``, and the stride divides the size.
    * Zero padding with ``input_size``: the norm of a circular convolution on a slightly
      larger torus that contains it (Note [Zero padding at a given size]), or, when that
      is smaller, of the layer without the input's edges (exact for small "valid"
      convolutions; Note [Output section at a given size]).
    * Without ``input_size`` the bound holds for every input size: the supremum of the
      symbol over all frequencies, certified on a grid (Note [Bound for every input size]).
    * Reflect and replicate padding multiply by the exact norm of the pad operator (Note
      [Reflect and replicate padding]); circular padding that repeats outputs by the
      square root of the repeat count.

    Args:
        weight: the kernel, shape ``(out_channels, in_channels / groups, kh, kw)``.
        stride: an int or a pair of positive ints.
        padding: an int or a pair of non-negative ints, ``"same"`` or ``"valid"``.
        dilation: an int or a pair of positive ints.
        groups: a positive int dividing ``out_channels``.
        padding_mode: ``"zeros"``, ``"circular"``, ``"reflect"`` or ``"replicate"``.
        input_size: the spatial input size ``(H, W)``, or ``None`` for a bound valid for
            every size.

    Returns:
        A 0-dim float64 tensor on the CPU, detached from autograd.

    Raises:
        TypeError: if ``weight`` is not a floating-point tensor, or an integer argument
            is not an int.
        ValueError: if ``weight`` is not 4-D, is uninitialised, or holds NaN or infinite
            entries; if an argument is out of range (an unknown ``padding_mode``,
            ``padding="same"`` with a stride, ``groups`` not dividing ``out_channels``); or
            if ``input_size`` is too small for the kernel or the padding mode.

    Example:
        >>> import torch
        >>> from lipnets.functional.conv_norms import conv2d_spectral_norm_bound
        >>> w = torch.zeros(1, 1, 3, 3)
        >>> w[0, 0, 1, :] = torch.tensor([1.0, 2.0, 1.0])  # symbol 2 + 2 cos(w2), max 4 at 0
        >>> exact = conv2d_spectral_norm_bound(
        ...     w, padding=1, padding_mode="circular", input_size=(8, 8)
        ... )
        >>> bool(4.0 <= exact <= 4.0 * (1 + 1e-9))
        True
        >>> every_size = conv2d_spectral_norm_bound(w, padding=1)  # any H, W, zero padding
        >>> bool(4.0 <= every_size <= 4.0 * 1.01)
        True

    References:
        H. Sedghi, V. Gupta, P. M. Long. *The Singular Values of Convolutional Layers*.
        ICLR 2019.

        B. Delattre, Q. Barthélemy, A. Allauzen. *Spectral Norm of Convolutional Layers
        with Circular and Zero Paddings*. arXiv:2402.00240, 2024.
    """
    w = _check_weight(weight)
    strides = check_int_pair(stride, "stride", 1)
    dilations = check_int_pair(dilation, "dilation", 1)
    groups = check_int(groups, "groups")
    if w.shape[0] % groups:
        raise ValueError(
            f"groups must divide out_channels = weight.shape[0] = {w.shape[0]}, got {groups}"
        )
    check_choice(padding_mode, "padding_mode", _PADDING_MODES)
    kernel = (int(w.shape[2]), int(w.shape[3]))
    pads = _pads(padding, kernel, dilations, strides)
    kd = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilations, strict=True))
    size = None if input_size is None else check_int_pair(input_size, "input_size", 1)
    if size is not None:
        _check_size(size, pads, kd, strides, padding_mode)
    if w.numel() == 0 or not bool(w.any()):
        return torch.zeros((), dtype=torch.float64)
    v = w.reshape(groups, w.shape[0] // groups, w.shape[1], *kernel)

    if padding_mode == "zeros":
        lam, repeat = _zeros_case(v, strides, dilations, pads, kd, size), 1
    elif padding_mode == "circular":
        lam, repeat = _circular_case(v, strides, dilations, pads, kd, size)
    else:
        lam = _valid_case(v, strides, dilations, pads, kd, size)
        repeat = math.prod(
            _pad_copies(padding_mode, pads[i], kd[i], None if size is None else size[i])
            for i in range(2)
        )
    bound = math.sqrt(lam * repeat) * (1.0 + 64 * _EPS64)
    return torch.tensor(bound, dtype=torch.float64)


# --- arguments -------------------------------------------------------------------------------


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    if isinstance(weight, torch.nn.parameter.UninitializedParameter):
        raise ValueError("weight is an uninitialised lazy parameter: run one forward pass first")
    check_tensor(weight, "weight", floating=True)
    if weight.ndim != 4:
        raise ValueError(
            "weight must be 4-D (out_channels, in_channels / groups, kh, kw), "
            f"got shape {tuple(weight.shape)}"
        )
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight contains NaN or infinite entries; no Lipschitz bound exists")
    return w


def _pads(
    padding: object, kernel: tuple[int, int], dilation: tuple[int, int], stride: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Per-dimension (before, after) pads, as nn.Conv2d applies them."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(
                    f"padding='same' needs stride 1 (as in torch), got stride={stride}"
                )
            total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
            before = [t // 2 for t in total]  # torch puts the odd extra pad after
            return (before[0], total[0] - before[0]), (before[1], total[1] - before[1])
        raise ValueError(
            f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}"
        )
    ph, pw = check_int_pair(padding, "padding", 0)
    return (ph, ph), (pw, pw)


def _out_len(n: int, pad: tuple[int, int], kd: int, s: int) -> int:
    return (n + pad[0] + pad[1] - kd) // s + 1


def _check_size(size, pads, kd, strides, mode) -> None:
    for i, dim in enumerate(("H", "W")):
        n, (pt, pb) = size[i], pads[i]
        if n + pt + pb < kd[i]:
            raise ValueError(
                f"input_size {dim}={n} is too small: padded size {n + pt + pb} is below the "
                f"dilated kernel size {kd[i]}"
            )
        if mode == "circular" and max(pt, pb) > n:
            raise ValueError(
                f"circular padding {(pt, pb)} exceeds input_size {dim}={n} (torch refuses it)"
            )
        if mode == "reflect" and max(pt, pb) >= n:
            raise ValueError(
                f"reflect padding {(pt, pb)} must be < input_size {dim}={n} (torch refuses it)"
            )


# --- kernels ---------------------------------------------------------------------------------


def _reduced_kernel(
    v: torch.Tensor, stride: tuple[int, int], dilation: tuple[int, int]
) -> torch.Tensor:
    """Dilated, polyphase-reduced kernel (Note [Polyphase form of a strided convolution]).

    ``v`` is (groups, out, in, kh, kw); the result is (groups, out, in', P, Q) with the
    phases that receive no tap dropped and leading or trailing all-zero taps trimmed.
    """
    g, co, ci, kh, kw = v.shape
    (d1, d2), (s1, s2) = dilation, stride
    k1, k2 = d1 * (kh - 1) + 1, d2 * (kw - 1) + 1
    a1, a2 = -(-k1 // s1), -(-k2 // s2)
    full = v.new_zeros(g, co, ci, a1 * s1, a2 * s2)
    full[..., :k1:d1, :k2:d2] = v
    taps = torch.zeros(a1 * s1, a2 * s2, dtype=torch.bool)
    taps[:k1:d1, :k2:d2] = True
    full = full.reshape(g, co, ci, a1, s1, a2, s2).permute(0, 1, 2, 4, 6, 3, 5)
    taps = taps.reshape(a1, s1, a2, s2).permute(1, 3, 0, 2).reshape(s1 * s2, a1, a2)
    full = full.reshape(g, co, ci * s1 * s2, a1, a2)
    phase = taps.any(dim=(1, 2)).repeat(ci)  # channel index is c * s1 * s2 + phase
    full = full[:, :, phase]
    rows = taps.any(dim=(0, 2)).nonzero().flatten()
    cols = taps.any(dim=(0, 1)).nonzero().flatten()
    return full[..., int(rows[0]) : int(rows[-1]) + 1, int(cols[0]) : int(cols[-1]) + 1]


def _side_cost(v: torch.Tensor) -> float:
    """Cost of one frequency: groups x (smaller channel side)^3."""
    return float(v.shape[0] * min(v.shape[1], v.shape[2]) ** 3)


def _n_freqs(grid: tuple[int, int]) -> int:
    return grid[0] * (grid[1] // 2 + 1)


def _sup_lambda(v: torch.Tensor) -> float:
    """Certified $\\sup_\\omega \\lambda_{\\max}(G(\\omega))$.

    See Note [Bound for every input size].
    """
    grid, rho = _sup_grid(v)
    return _grid_lambda(v, grid) / (1.0 - rho * rho / 4.0)


def _sup_grid(v: torch.Tensor) -> tuple[tuple[int, int], float]:
    n1, n2 = v.shape[-2] - 1, v.shape[-1] - 1
    radius = _SUP_RADIUS
    while True:
        grid = tuple(max(1, math.ceil(2 * math.pi * n / radius)) if n else 1 for n in (n1, n2))
        if _n_freqs(grid) * _side_cost(v) <= _COST_BUDGET or radius >= _SUP_RADIUS_MAX:
            break
        radius = min(radius * 1.25, _SUP_RADIUS_MAX)
    rho = math.pi * (n1 / grid[0] + n2 / grid[1]) * (1.0 + 8 * _EPS64)
    return grid, rho


def _grid_or_sup(v_grid: torch.Tensor, grid: tuple[int, int], v_sup: torch.Tensor) -> float:
    """The exact grid maximum when affordable, else the every-size bound (which dominates it)."""
    sup_grid, _ = _sup_grid(v_sup)
    budget = max(_COST_BUDGET, _n_freqs(sup_grid) * _side_cost(v_sup))
    if _n_freqs(grid) * _side_cost(v_grid) <= budget:
        return _grid_lambda(v_grid, grid)
    return _sup_lambda(v_sup)


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


# --- per-frequency maxima ----------------------------------------------------------------------


def _grid_lambda(v: torch.Tensor, grid: tuple[int, int]) -> float:
    """Certified upper bound on $\\max_j \\lambda_{\\max}(G(\\omega_j))$ over a DFT grid.

    ``v`` is (groups, out, in, P, Q); ``grid`` is (M1, M2): frequencies $2\\pi j_i / M_i$.
    See Note [Certified largest eigenvalue].
    """
    if v.shape[1] > v.shape[2]:
        v = v.transpose(1, 2)  # K^T has the same singular values; Gram on the smaller side
    g, a, b, p_taps, q_taps = v.shape
    deltas: list[tuple[int, int]] = []
    blocks: list[torch.Tensor] = []
    for d1 in range(p_taps):
        for d2 in range(-(q_taps - 1), q_taps):
            if d1 == 0 and d2 < 0:
                continue
            x = v[..., d1:, max(d2, 0) : q_taps + min(d2, 0)].reshape(g, a, -1)
            y = v[..., : p_taps - d1, max(-d2, 0) : q_taps - max(d2, 0)].reshape(g, a, -1)
            blk = x @ y.transpose(1, 2)  # B_delta = sum_{p - p' = delta} V_p V_p'^T
            deltas.append((d1, d2))
            blocks.append(blk)
            if (d1, d2) != (0, 0):
                deltas.append((-d1, -d2))
                blocks.append(blk.transpose(1, 2))
    b_flat = torch.stack(blocks).reshape(len(blocks), -1)
    d = torch.tensor(deltas, dtype=torch.int64)
    s_abs = v.abs().sum(dim=(-2, -1))  # (g, a, b)
    err_g = 10.0 * (b * p_taps * q_taps + len(deltas) + 10) * _EPS64
    err_g *= float((s_abs * s_abs).sum(dim=(1, 2)).max())

    m1, m2 = grid
    j1, j2 = torch.meshgrid(torch.arange(m1), torch.arange(m2 // 2 + 1), indexing="ij")
    freqs = torch.stack([j1.flatten(), j2.flatten()], dim=1)
    per_chunk = max(1, _CHUNK_BYTES // (16 * g * a * a))
    gen = torch.Generator().manual_seed(0)
    lo, top = 0.0, 0.0
    for start in range(0, freqs.shape[0], per_chunk):
        f = freqs[start : start + per_chunk]
        # Exact integer phase reduction, then one rounding per twiddle.
        frac = ((f[:, :1] * d[:, 0]) % m1).double() / m1 + ((f[:, 1:] * d[:, 1]) % m2).double() / m2
        angle = (2 * math.pi) * frac
        # Only the lower triangle is read below (eigvalsh, Cholesky): no symmetrisation.
        gram = torch.complex(torch.cos(angle) @ b_flat, -(torch.sin(angle) @ b_flat))
        gram = gram.reshape(-1, a, a)
        chunk_top, lo = _top_eigenvalue(gram, lo, gen)
        top = max(top, chunk_top)
    return (top + err_g) * (1.0 + 10.0 * a * (a + 1) * _EPS64)


def _top_eigenvalue(gram: torch.Tensor, lo: float, gen: torch.Generator) -> tuple[float, float]:
    """Bound on the largest eigenvalue in a batch of Hermitian matrices, before slack.

    Returns ``(bound, lo)`` where ``lo`` is the running estimate used to pick the Cholesky
    shift (Note [Certified largest eigenvalue]).
    """
    n, a, _ = gram.shape
    if a <= _DIRECT_EIG_MAX:
        lam = max(0.0, float(torch.linalg.eigvalsh(gram)[:, -1].max()))
        return lam * (1.0 + 20 * a * _EPS64), max(lo, lam)
    if lo == 0.0:  # the first batch: estimate every matrix to set the shift
        lo = float(_subspace_top(gram, _SUBSPACE_ITERS, gen).max())
    tiny = float(gram.diagonal(dim1=1, dim2=2).real.abs().amax()) * 1e-12 + 1e-300
    pending = torch.arange(n)
    tau, bound, rounds = 2.0**-16, 0.0, 0
    while True:
        mu = lo * (1.0 + tau) + tiny
        shifted = -gram[pending]
        shifted.diagonal(dim1=1, dim2=2).add_(mu)
        ok = torch.linalg.cholesky_ex(shifted).info == 0
        if bool(ok.any()):
            bound = max(bound, mu)
        pending = pending[~ok]
        if pending.numel() == 0:
            return bound, lo
        if tau >= 1.0:  # only if the estimates are off by a factor of 2
            lam = max(0.0, float(torch.linalg.eigvalsh(gram[pending])[:, -1].max()))
            return max(bound, lam * (1.0 + 20 * a * _EPS64)), max(lo, lam)
        # Estimate only the matrices that failed; the shift grows after two refinements.
        iters = _SUBSPACE_ITERS * (1 if rounds == 0 else 4)
        lo = max(lo, float(_subspace_top(gram[pending], iters, gen).max()))
        rounds += 1
        tau = tau if rounds <= 2 else 16.0 * tau


def _subspace_top(gram: torch.Tensor, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Largest Ritz value of block power iteration (an estimate, not a bound)."""
    n, a, _ = gram.shape
    shape = (n, a, min(_SUBSPACE_BLOCK, a))
    x = torch.complex(
        torch.randn(shape, generator=gen, dtype=torch.float64),
        torch.randn(shape, generator=gen, dtype=torch.float64),
    )
    for _ in range(iters):
        x = torch.linalg.qr(gram @ x).Q
    return torch.linalg.eigvalsh(x.mH @ (gram @ x))[:, -1]
