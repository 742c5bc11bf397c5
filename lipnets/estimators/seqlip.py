r"""SeqLip: AutoLip refined for sequential networks (Scaman & Virmaux 2018).

A sequential network $f = M_K \circ \rho_{K-1} \circ M_{K-1} \circ \dots \circ
\rho_1 \circ M_1$ (affine $M_i$, element-wise activations $\rho_i$ whose
derivatives lie in $[0, 1]$) has Jacobians $M_K D_{K-1} M_{K-1} \cdots D_1
M_1$ with diagonal $D_i$ in $[0, 1]$. With the thin SVDs $M_i = U_i \Sigma_i
V_i^\top$ and $\tilde\Sigma_1 = \Sigma_1$, $\tilde\Sigma_K = \Sigma_K$,
$\tilde\Sigma_i = \Sigma_i^{1/2}$ otherwise, the Jacobian splits into $K - 1$
factors and

$$L(f) \le \prod_{i=1}^{K-1} \max_{\sigma \in [0, 1]^{n_i}}
\big\|\tilde\Sigma_{i+1} V_{i+1}^\top \operatorname{diag}(\sigma)\, U_i
\tilde\Sigma_i\big\|_2 ,$$

which AutoLip's $\prod_i \|M_i\|$ can exceed by a large factor when the
singular vectors of consecutive layers are not aligned. The norm is convex in
$\sigma$, so each maximum is reached at a vertex $\sigma \in \{0, 1\}^{n_i}$.

# Note [SeqLip maximisation]

For a layer of at most `exact_width` activations every vertex is evaluated
(batched float64 SVDs), which gives the maximum exactly. Wider layers use the
greedy search of the paper: start from $\sigma = 1$, and while flipping one
coordinate increases the norm, make the best such flip. The norm of each
candidate is an SVD of $A \operatorname{diag}(\sigma) B$ updated by the
rank-one term of the flipped coordinate. Greedy search finds a local maximum,
which can be below the true one, so the greedy value is an **estimate**: the
paper's SeqLip, not a certificate. The exact variant is an upper bound in
exact arithmetic, but it is still computed from float64 SVDs without
rounding guarantees, and lipnets keeps it on the estimate side too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lipnets._state import realised_weights
from lipnets.estimators._affine import is_affine, linear_matrix
from lipnets.estimators.power import (
    _check_count,
    _check_input_shape,
    _default_dtype_device,
    _eval_mode,
)
from lipnets.graph import trace

__all__ = ["seqlip"]

_MAX_EXACT = 20

_UNIT_SLOPE = (
    nn.ReLU,
    nn.ReLU6,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Softsign,
)


def _unit_slope(module: nn.Module) -> bool:
    """Element-wise, with derivatives in [0, 1] (the hypothesis of SeqLip)."""
    if type(module) in _UNIT_SLOPE:
        if isinstance(module, nn.Hardtanh):
            return module.min_val <= module.max_val
        return True
    if type(module) is nn.LeakyReLU:
        return 0.0 <= module.negative_slope <= 1.0
    if type(module) is nn.ELU:
        return 0.0 <= module.alpha <= 1.0
    if type(module) is nn.CELU:
        return 0.0 < module.alpha <= 1.0
    if type(module) is nn.PReLU:
        w = module.weight.detach()
        return bool(((w >= 0) & (w <= 1)).all())
    return False


def _flatten(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The elements a plain ``nn.Sequential`` runs, in order, nested ones expanded.

    Only ``nn.Sequential`` itself is expanded (a subclass may override
    ``forward``, e.g. with a skip connection); ``_modules`` is iterated rather
    than ``named_children()``, which would skip a module used twice.
    """
    if type(model) is not nn.Sequential:
        return [("", model)]
    out: list[tuple[str, nn.Module]] = []
    for name, child in model._modules.items():
        if child is None:
            continue
        if type(child) is nn.Sequential:
            out.extend((f"{name}.{sub}" if sub else name, m) for sub, m in _flatten(child))
        else:
            out.append((name, child))
    return out


@dataclass
class _Block:
    """Consecutive affine modules (``linear``) or consecutive activations."""

    linear: bool
    modules: list[nn.Module]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    def __call__(self, x: Tensor) -> Tensor:
        for m in self.modules:
            x = m(x)
        return x


def _blocks(
    model: nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> list[_Block]:
    blocks: list[_Block] = []
    x = torch.zeros(shape, dtype=dtype, device=device)
    for name, module in _flatten(model):
        s = tuple(x.shape)
        where = f"{name} ({type(module).__name__})" if name else type(module).__name__
        try:
            with torch.no_grad():
                y = module(x)
        except Exception as exc:
            raise ValueError(
                f"{where} fails on inputs of shape {s} (from input_shape {shape}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(y, Tensor) or not y.is_floating_point():
            got = y.dtype if isinstance(y, Tensor) else type(y).__name__
            raise TypeError(f"{where} must return a floating-point tensor, got {got}")
        if _unit_slope(module):
            linear = False
        elif is_affine(module, s, dtype=dtype, device=device, generator=generator):
            linear = True
        else:
            raise ValueError(
                f"seqlip applies to sequential networks of affine layers and element-wise "
                f"activations with derivatives in [0, 1]; {where} is neither, or not one "
                "lipnets knows to be affine (use autolip)"
            )
        if blocks and blocks[-1].linear == linear:
            blocks[-1].modules.append(module)
            blocks[-1].output_shape = tuple(y.shape)
        else:
            blocks.append(_Block(linear, [module], s, tuple(y.shape)))
        x = y
    return blocks


def _vertex_max(a: Tensor, b: Tensor, chunk: int = 1024) -> Tensor:
    """max over sigma in {0, 1}^n of ||a diag(sigma) b||_2, every vertex."""
    n = a.shape[1]
    best = torch.zeros((), dtype=torch.float64)
    vertices = itertools.product((0.0, 1.0), repeat=n)
    while True:
        batch = list(itertools.islice(vertices, chunk))
        if not batch:
            return best
        sigma = torch.tensor(batch, dtype=torch.float64)
        mats = (a.unsqueeze(0) * sigma.unsqueeze(1)) @ b
        best = torch.maximum(best, torch.linalg.matrix_norm(mats, ord=2).max())


def _greedy_max(a: Tensor, b: Tensor, max_flips: int, chunk: int = 64) -> Tensor:
    """Greedy local search over vertices from sigma = 1 (Note [SeqLip maximisation])."""
    n = a.shape[1]
    sigma = torch.ones(n, dtype=torch.float64)
    current = a @ b
    best = torch.linalg.matrix_norm(current, ord=2)
    for _ in range(max_flips):
        # Flipping coordinate j adds (1 - 2 sigma_j) a_j b_j^T to the current matrix.
        signs = 1 - 2 * sigma
        norms = torch.cat(
            [
                torch.linalg.matrix_norm(
                    current
                    + (signs[j : j + chunk, None] * a.T[j : j + chunk]).unsqueeze(2)
                    * b[j : j + chunk].unsqueeze(1),
                    ord=2,
                )
                for j in range(0, n, chunk)
            ]
        )
        j = int(torch.argmax(norms))
        if not norms[j] > best * (1 + 1e-12):
            break
        best = norms[j]
        current = current + signs[j] * torch.outer(a[:, j], b[j])
        sigma[j] = 1 - sigma[j]
    return best


def seqlip(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    method: Literal["auto", "greedy", "exact"] = "auto",
    exact_width: int = 12,
    max_width: int = 1024,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""SeqLip estimate of the Lipschitz constant of a sequential network.

    For an ``nn.Sequential`` (nested plain ``nn.Sequential`` are flattened;
    a subclass is one element) of affine layers of known types (linear,
    convolution, eval-mode BatchNorm, average pooling, padding, flatten,
    lipnets' orthogonal layers; Note [Affinity probe]) and element-wise
    activations whose derivatives lie in $[0, 1]$ (ReLU, LeakyReLU with slope
    in $[0, 1]$, ReLU6, Hardtanh, Sigmoid, Tanh, Hardsigmoid, Softsign,
    ELU/CELU with $\alpha \le 1$, PReLU with weights in $[0, 1]$).
    Consecutive affine layers are merged into one matrix (formed densely,
    float64), consecutive activations into one; an activation before the
    first or after the last affine layer is dropped (it cannot raise the
    constant). See the module docs for the formula and Note
    [SeqLip maximisation].

    This is an **estimate built on SVDs and a combinatorial search**, as in
    the paper: the greedy variant can miss the maximum, so the value is not a
    certificate. Use [`lipschitz_bound`][lipnets.bounds.lipschitz_bound] for one.

    Args:
        model: the network; each element must act on the samples of a batch
            independently. It is evaluated in eval mode; each submodule's mode
            is restored.
        input_shape: one sample's shape with a batch dimension of 1, e.g.
            ``(1, 64)``.
        method: ``"exact"`` enumerates all $2^{n}$ activation patterns of every
            layer; ``"greedy"`` runs the paper's greedy search on every layer;
            ``"auto"`` enumerates layers of at most `exact_width` activations
            and runs the greedy search on wider ones.
        exact_width: widest layer enumerated by ``"auto"`` (at most 20;
            ``"exact"`` refuses layers wider than 20).
        max_width: largest input or output size (entries of one sample) of a
            dense affine block; wider networks raise rather than form huge
            matrices.
        generator: random generator for the affinity probes.

    Returns:
        A 0-dim float64 CPU tensor.

    Raises:
        TypeError: if `model` is not an ``nn.Module`` or a layer returns a
            non-floating tensor.
        ValueError: if `input_shape` has no batch dimension of 1, a layer
            fails on its input shape (its error is chained), an element is
            neither affine nor an activation with derivatives in $[0, 1]$ (for
            example GroupSort or a residual block: use `autolip`), a block is
            wider than `max_width`, or an argument is out of range.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lipnets.estimators import autolip, seqlip
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> f = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
        ...                   nn.Linear(16, 4))
        >>> bool(seqlip(f, (1, 8)) < autolip(f, (1, 8)))
        True

    References:
        Scaman & Virmaux, "Lipschitz regularity of deep neural networks:
        analysis and efficient estimation", NeurIPS 2018 (Section 6).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    shape = _check_input_shape(input_shape)
    if method not in ("auto", "greedy", "exact"):
        raise ValueError(f"method must be 'auto', 'greedy' or 'exact', got {method!r}")
    _check_count("exact_width", exact_width, 0)
    if exact_width > _MAX_EXACT:
        raise ValueError(
            f"exact_width must be at most {_MAX_EXACT} (2^{_MAX_EXACT} activation patterns "
            f"per layer), got {exact_width}"
        )
    _check_count("max_width", max_width, 1)
    dtype, device = _default_dtype_device(model)
    with _eval_mode(model):
        trace(model, shape)  # the front end's policies: hooks, replaced methods, NaN, in place
    with _eval_mode(model), realised_weights(model) as frozen:
        blocks = _blocks(frozen, shape, dtype, device, generator)
        for block in blocks:
            size = max(math.prod(block.input_shape[1:]), math.prod(block.output_shape[1:]))
            if size > max_width:
                raise ValueError(
                    f"seqlip forms each affine block densely; a layer with {size} entries "
                    f"per sample exceeds max_width={max_width} (raise it, or use autolip)"
                )
        # Blocks alternate between affine and activation. An activation first or
        # last is dropped: with derivatives in [0, 1] it cannot raise the constant
        # (||J D|| <= ||J||), so what remains alternates as M_1, D_1, ..., M_K.
        matrices = [
            linear_matrix(b, b.input_shape, dtype=dtype, device=device) for b in blocks if b.linear
        ]
    if not matrices:
        return torch.ones((), dtype=torch.float64)  # activations only (or nothing): <= 1
    if len(matrices) == 1:
        return torch.linalg.matrix_norm(matrices[0], ord=2)
    svds = [torch.linalg.svd(m, full_matrices=False) for m in matrices]
    k = len(svds)
    value = torch.ones((), dtype=torch.float64)
    for i in range(k - 1):
        u, s, _ = svds[i]
        _, s_next, vh_next = svds[i + 1]
        right = u * (s if i == 0 else s.sqrt())  # U_i Sigma~_i
        left = (s_next if i + 1 == k - 1 else s_next.sqrt()).unsqueeze(1) * vh_next
        width = left.shape[1]
        if method == "exact" or (method == "auto" and width <= exact_width):
            if width > _MAX_EXACT:
                raise ValueError(
                    f"method='exact' enumerates 2^{width} activation patterns; at most "
                    f"2^{_MAX_EXACT} are allowed (use method='auto' or 'greedy')"
                )
            factor = _vertex_max(left, right)
        else:
            factor = _greedy_max(left, right, max_flips=4 * width)
        value = value * factor
    return value
