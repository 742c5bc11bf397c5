r"""CROWN-IBP: interval bounds for the hidden nodes, one CROWN pass from the output.

# Note [CROWN-IBP]

CROWN (`lipnets.propagation.crown_bounds`) tightens the input of every relaxed node by
its own backward pass, which costs one pass per unstable entry. CROWN-IBP (Zhang et al.,
2020) relaxes every node on its *interval* bounds instead and runs a single backward
pass, from the output (or the rows of a specification): as sound as CROWN, a little
looser, and as cheap as a forward and a backward pass of the network, which is what
certified training needs at every step (`lipnets.certify.training`). The result is
intersected with the interval bounds, so it is never looser than `interval_bounds`.
"""

from __future__ import annotations

from torch import Tensor, nn

from lipnets.propagation.lirpa import Bounds, _bounds

__all__ = ["crown_ibp_bounds"]


def crown_ibp_bounds(
    model: nn.Module,
    x: Tensor,
    eps: float | Tensor,
    *,
    norm: float | str,
    spec: Tensor | None = None,
    differentiable: bool = False,
) -> Bounds:
    r"""Bounds of a model's outputs over norm balls by CROWN-IBP (Note [CROWN-IBP]).

    Every relaxed node (ReLU, comparator, smooth activation) is relaxed on its
    interval bounds (`interval_bounds`), and one backward pass bounds the outputs,
    or the rows of ``spec``; the result is intersected with the interval bounds.
    The arguments, the model's mode and the supported operations are those of
    `crown_bounds`.

    Args:
        model: an ``nn.Module`` built from the supported operations.
        x: the centres of the balls, a floating-point batch $(N, \dots)$.
        eps: the radius, a float $\ge 0$ or a tensor of shape $(N,)$.
        norm: ``2`` or ``float("inf")`` (or ``"l2"``, ``"inf"``, ``"linf"``).
        spec: an optional matrix $C$ of shape $(R, M)$ or $(N, R, M)$: bounds of
            $C f(x)$ then.
        differentiable: keep autograd on, so that the bounds are differentiable
            with respect to the model's parameters (certified training).

    Returns:
        `Bounds` ``(lower, upper)`` shaped like ``model(x)`` (or $(N, R)$ with a spec).

    Raises:
        TypeError, ValueError, UnboundedModuleError, UntraceableModelError: as
            `crown_bounds`.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lipnets.propagation import crown_bounds, crown_ibp_bounds, interval_bounds
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).double()
        >>> x = torch.randn(8, 4, dtype=torch.float64)
        >>> ibp = interval_bounds(model, x, 0.1, norm=float("inf"))
        >>> mixed = crown_ibp_bounds(model, x, 0.1, norm=float("inf"))
        >>> bool((mixed.upper - mixed.lower <= ibp.upper - ibp.lower).all())
        True

    References:
        Zhang, H. et al. (2020). Towards stable and efficient training of verifiably
        robust neural networks. *ICLR*.
    """
    return _bounds(model, x, eps, norm, spec, "crown-ibp", differentiable)
