r"""The symbol of a 2-D convolution and its certified supremum over all frequencies.

Helpers of `lipnets.functional.conv_norms.conv2d_spectral_norm_bound`: the dilated,
polyphase-reduced kernel, the certified largest eigenvalue of $G = K K^H$ over a DFT grid,
and the bound for every input size that the grid certifies. The bounds at a given input
size, which use these, are in `lipnets.functional._conv_sizes`.

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

# Note [Bound for every input size]

Every case of `lipnets.functional._conv_sizes` is bounded by $\Lambda^{1/2}$,
$\Lambda = \sup_\omega
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

import torch

_EPS64 = torch.finfo(torch.float64).eps

# Note [Bound for every input size]: grid radius target and the cost cap.
_SUP_RADIUS = 0.2
_SUP_RADIUS_MAX = 1.2
_COST_BUDGET = 1.0e11  # frequencies x groups x side^3
# Note [Certified largest eigenvalue]: sides up to this use eigvalsh directly.
_DIRECT_EIG_MAX = 16
_SUBSPACE_ITERS = 10
_SUBSPACE_BLOCK = 8
_CHUNK_BYTES = 1 << 26


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
