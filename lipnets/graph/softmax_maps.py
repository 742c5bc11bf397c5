"""The constants of the softmax family in the op table (Note [Softmax Jacobian] in
`lipnets.functional.activation_slopes`): ``softmax``, ``softmin``, ``log_softmax`` and
``logsumexp``, as `MapBound` functions of their node."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from lipnets.errors import ShapeRequiredError
from lipnets.functional import activation_slopes as AS
from lipnets.graph.linear_maps import _name, _refuse, map_dim

__all__ = ["logsumexp_bound", "log_softmax_bound", "softmax_bound"]

Resolve = Callable[[Any], Any]


def _dim(node: fx.Node, resolve: Resolve, shape: torch.Size | None) -> int | None:
    """The softmax dim (refusing None, torch's deprecated implicit choice, and the batch)."""
    dim = resolve(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None))
    if dim is None:
        raise _refuse(node, "it has no dim (torch's implicit choice is deprecated): pass dim=")
    return map_dim(node, dim, shape)


def softmax_bound(node: fx.Node, resolve: Resolve, shape: torch.Size | None) -> float:
    """1/2, or 0 along a dim of size 1 (Note [Softmax Jacobian])."""
    dim = _dim(node, resolve, shape)
    if shape is not None and dim is not None and int(shape[dim]) <= 1:
        return 0.0
    return AS.SOFTMAX_CONSTANT


def log_softmax_bound(node: fx.Node, resolve: Resolve, shape: torch.Size | None) -> float:
    """The square root of the size along dim (Note [Softmax Jacobian])."""
    dim = _dim(node, resolve, shape)
    if shape is None or dim is None:
        raise ShapeRequiredError(
            f"{_name(node)}: the constant of log_softmax is the square root of the size along "
            "its dim (Note [Softmax Jacobian]); pass input_shape, e.g. "
            "lipschitz_bound(model, input_shape=(1, *input_size))"
        )
    return AS.log_softmax_constant(int(shape[dim]))


def logsumexp_bound(node: fx.Node, resolve: Resolve, shape: torch.Size | None) -> float:
    """1 over any dims but the batch (Note [Softmax Jacobian])."""
    dims = resolve(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None))
    if dims is None or (isinstance(dims, (tuple, list)) and not dims):
        raise _refuse(node, "it reduces over every dim, the batch included: it mixes the samples")
    for d in dims if isinstance(dims, (tuple, list)) else (dims,):
        map_dim(node, d, shape)
    return AS.LOGSUMEXP_CONSTANT
