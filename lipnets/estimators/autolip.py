r"""AutoLip: per-layer power iteration composed along the computational graph.

Scaman & Virmaux (2018, Algorithm 1) bound a network's Lipschitz constant by
walking its computational graph: each node's constant is built from its
parents' constants, the Lipschitz constants of the activation functions are
known, and the spectral norm of each affine layer is computed by power
iteration. lipnets runs that walk with the same graph composition as its sound
bound ([`lipschitz_bound`][lipnets.bounds.lipschitz_bound]: products along
chains, sums at additions, root of the sum of squares at concatenations) and
changes one thing: every leaf module of a type known to be affine, and found
affine on its input shape (Note [Affinity probe]), gets a power-iteration
estimate of the norm of its linear part instead of its sound bound. Leaves
that are not affine (activations, max and norm pooling, custom modules) keep
their known constant, as in the paper.

The result is an **estimate**, not a bound: power iteration approaches each
$\sigma_{\max}$ from below, so AutoLip can fall short of the sound composed
bound by up to the power-iteration tolerance per layer. It is what AutoLip
reports in the paper, and it upper-bounds the true Lipschitz constant only up
to that tolerance. It checks bounds; it never certifies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lipnets._state import realised_weights

# The graph walk is shared with the sound bound; only the leaf values differ,
# and nothing in lipnets.bounds reads these estimates.
from lipnets.bounds import bound_rule, compose, own_bound
from lipnets.estimators._affine import is_affine
from lipnets.estimators.power import (
    _check_count,
    _check_input_shape,
    _check_tol,
    _default_dtype_device,
    _eval_mode,
    power_iteration,
)
from lipnets.graph import module_kind

__all__ = ["autolip", "autolip_leaves"]


@dataclass(frozen=True)
class _Leaf:
    name: str
    kind: str
    value: Tensor
    affine: bool
    input_shape: tuple[int, ...]


def autolip(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    iters: int = 200,
    tol: float = 1e-7,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""AutoLip estimate of a model's $\ell_2 \to \ell_2$ Lipschitz constant.

    The product (along chains; sums at residual additions, and so on) of
    per-layer power-iteration norms, composed over the model's torch.fx graph
    exactly as [`lipschitz_bound`][lipnets.bounds.lipschitz_bound] composes
    sound bounds. Affine leaf modules (linear and convolution layers, lipnets'
    orthogonal layers, eval-mode BatchNorm, average pooling) get
    [`power_iteration`][lipnets.estimators.power_iteration] on their linear
    part at the input shape they receive; other leaves (activations, max
    pooling, custom modules with a ``lipschitz_bound`` method) get their
    known, sound constant.

    This is an **estimate built on power iteration**, as in the paper: each
    layer's norm is approached from below, so the value can be below a true
    upper bound by about `tol` per layer. Use
    [`lipschitz_bound`][lipnets.bounds.lipschitz_bound] for a certificate.

    Args:
        model: an ``nn.Module`` that torch.fx can trace (or that has a
            ``lipschitz_bound`` method). It is evaluated in eval mode; each
            submodule's mode is restored.
        input_shape: one sample's shape with a batch dimension of 1, e.g.
            ``(1, 3, 32, 32)``.
        iters: maximal power iterations per affine layer.
        tol: relative-change stopping tolerance of each power iteration.
        generator: random generator for the starting vectors and the affinity
            probes.

    Returns:
        A 0-dim float64 CPU tensor.

    Raises:
        TypeError: if `model` is not an ``nn.Module``, or a layer does not
            return a floating-point tensor.
        ValueError: if `input_shape` has no batch dimension of 1, if the model
            fails on inputs of that shape (its error is chained), or if an
            argument is out of range.
        UnboundedModuleError: if the graph holds a non-affine part with no
            known constant (as for `lipschitz_bound`).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import lipnets
        >>> from lipnets.estimators import autolip
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> f = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> product = (torch.linalg.matrix_norm(f[0].weight.double(), 2)
        ...            * torch.linalg.matrix_norm(f[2].weight.double(), 2))
        >>> bool(torch.isclose(autolip(f, (1, 8)), product, rtol=1e-5))
        True

    References:
        Scaman & Virmaux, "Lipschitz regularity of deep neural networks:
        analysis and efficient estimation", NeurIPS 2018 (Algorithm 1).
    """
    value, _ = autolip_leaves(model, input_shape, iters=iters, tol=tol, generator=generator)
    return value


def autolip_leaves(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    iters: int,
    tol: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, list[_Leaf]]:
    """The AutoLip estimate and, in graph order, the value each leaf module contributed.

    Each leaf record has ``name``, ``kind``, ``value`` (its power-iteration
    estimate when ``affine``, else its known constant) and ``input_shape``.
    The guarantee report ([`lipnets.report`][lipnets.reports.guarantee.report])
    reads them; [`autolip`][lipnets.estimators.autolip.autolip] returns the
    estimate alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    shape = _check_input_shape(input_shape)
    _check_count("iters", iters, 1)
    _check_tol(tol)
    dtype, device = _default_dtype_device(model)
    leaves: list[_Leaf] = []

    def leaf_value(module: nn.Module, leaf_shape: torch.Size | None, where: str) -> Tensor | None:
        """Power iteration for an affine leaf, the known (sound) constant for any other."""
        if leaf_shape is None:  # only when input_shape is None, which autolip never passes
            raise AssertionError("autolip composes with shapes")
        if bound_rule(module) is None:
            return None  # not a leaf: the composition traces into it (or raises, naming it)
        s = tuple(leaf_shape)
        with _eval_mode(module), realised_weights(module) as frozen:
            try:  # the layer's own failure on this shape, e.g. a mismatch
                with torch.no_grad():
                    frozen(torch.zeros(s, dtype=dtype, device=device))
            except RuntimeError as exc:
                raise ValueError(
                    f"{where} fails on inputs of shape {s}: {type(exc).__name__}: {exc}"
                ) from exc
            affine = (
                len(s) >= 2
                and s[0] == 1
                and is_affine(frozen, s, dtype=dtype, device=device, generator=generator)
            )
        if affine:
            value = power_iteration(
                module, s, iters=iters, tol=tol, generator=generator, dtype=dtype, device=device
            )
        else:
            value = own_bound(module, leaf_shape, where)
        name = where.split(" (", 1)[0] if " (" in where else ""
        name = "" if name == "the model" else name
        leaves.append(_Leaf(name, module_kind(module), value, affine, s))
        return value

    with _eval_mode(model):
        composition = compose(model, shape, leaf_value)
    return composition.bound, leaves
