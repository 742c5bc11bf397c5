"""The arguments and constants of the op table's structured linear maps.

``F.interpolate``, ``F.unfold``, ``F.fold``, ``cumsum``, ``diff`` (kind ``"map"``) and
``F.pad`` (kind ``"pad"``) read their constant arguments here, once, for every consumer:
the `MapBound` of each (the Lipschitz fold of `lipnets.bounds`) and the propagation
builder (`lipnets.propagation`), which builds the same operators. The maths and proofs
are in `lipnets.functional.linear_maps` (Note [Separable interpolation], Note [Padding
copies], Note [Unfold and fold], Note [Cumulative sums and differences]).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from lipnets.errors import ShapeRequiredError, UnboundedModuleError
from lipnets.functional import linear_maps as LM

__all__ = [
    "cumsum_bound",
    "diff_args",
    "diff_bound",
    "fold_args",
    "fold_bound",
    "interpolate_args",
    "interpolate_bound",
    "map_dim",
    "pad_args",
    "pad_bound",
    "unfold_args",
    "unfold_bound",
]

Resolve = Callable[[Any], Any]


def _name(node: fx.Node) -> str:
    """Where the node is, for messages (`lipnets.graph.trace.op_where`)."""
    from lipnets.graph.trace import op_where  # (trace imports the op table, which imports this)

    return op_where(node)


def _refuse(node: fx.Node, why: str) -> UnboundedModuleError:
    return UnboundedModuleError(f"{_name(node)} has no bound rule: {why}")


def _bind(node: fx.Node, fn: Callable, resolve: Resolve) -> dict[str, Any]:
    """The node's arguments by name (defaults filled in), every one but the input resolved."""
    try:
        bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
    except TypeError as exc:
        raise _refuse(node, f"its arguments do not match {fn.__name__}: {exc}") from exc
    bound.apply_defaults()
    first = next(iter(bound.arguments))
    return {k: v if k == first else resolve(v) for k, v in bound.arguments.items()}


def _spatial(node: fx.Node, shape: torch.Size | None, count: int | None, what: str):
    if shape is None:
        raise ShapeRequiredError(
            f"{_name(node)}: {what}; pass input_shape, e.g. "
            "lipschitz_bound(model, input_shape=(1, *input_size))"
        )
    if count is not None and len(shape) < count:
        raise _refuse(node, f"its input has shape {tuple(shape)}, expected {count} spatial dims")
    return tuple(int(s) for s in shape[-count:]) if count else tuple(int(s) for s in shape)


def _values_error(node: fx.Node, exc: ValueError) -> UnboundedModuleError:
    return _refuse(node, str(exc))


# -- interpolation -----------------------------------------------------------------------


def interpolate_args(node: fx.Node, resolve: Resolve) -> dict[str, Any]:
    """F.interpolate's keyword arguments of the node (Note [Separable interpolation])."""
    args = _bind(node, F.interpolate, resolve)
    args.pop(next(iter(args)))
    for key in ("size", "scale_factor"):
        if isinstance(args[key], torch.Tensor):
            args[key] = args[key].tolist()
    return args


def interpolate_bound(node: fx.Node, resolve: Resolve, shape: torch.Size | None) -> float:
    """Note [Separable interpolation]: the product of the 1-D operators' exact norms."""
    params = interpolate_args(node, resolve)
    if shape is not None and len(shape) < 3:
        raise _refuse(node, f"it interpolates an input of shape {tuple(shape)} (needs N, C, ...)")
    sizes = _spatial(
        node,
        shape,
        None,
        "torch computes interpolation indices and weights in float32, so no constant holds "
        "for every input size (Note [Separable interpolation])",
    )[2:]
    try:
        return LM.interpolation_norm_bound(sizes, params)
    except (ValueError, RuntimeError) as exc:
        raise _refuse(node, str(exc)) from exc


# -- padding -------------------------------------------------------------------------------


def pad_args(node: fx.Node, resolve: Resolve) -> tuple[list[int], str]:
    """(pad, mode) of an ``F.pad`` node."""
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    pad, mode = resolve(pad), resolve(mode)
    if isinstance(pad, torch.Tensor):
        pad = pad.tolist()
    if not isinstance(pad, (list, tuple)) or not all(isinstance(p, int) for p in pad):
        raise _refuse(node, f"its pad {pad!r} is not a sequence of ints")
    if not isinstance(mode, str):
        raise _refuse(node, f"its mode {mode!r} is not a string")
    return [int(p) for p in pad], mode


def pad_bound(node: fx.Node, resolve: Resolve, shape: torch.Size | None) -> float:
    """Note [Padding copies]: sqrt of the largest copy count (1 for constant padding)."""
    pad, mode = pad_args(node, resolve)
    if mode == "constant":
        return 1.0
    sizes = None
    if shape is not None:
        dims = len(pad) // 2
        if len(shape) < dims:
            raise _refuse(node, f"it pads {dims} dims of an input of shape {tuple(shape)}")
        sizes = tuple(int(s) for s in shape[len(shape) - dims :])
    try:
        copies = LM.pad_copies(mode, pad, sizes)
    except ValueError as exc:
        if shape is None and "negative" in str(exc):
            raise ShapeRequiredError(f"{_name(node)}: {exc}") from exc
        raise _values_error(node, exc) from exc
    return float(LM.copies_norm(copies))


# -- unfold and fold -----------------------------------------------------------------------


def unfold_args(node: fx.Node, resolve: Resolve) -> dict[str, Any]:
    """F.unfold's keyword arguments (kernel_size, dilation, padding, stride)."""
    args = _bind(node, F.unfold, resolve)
    args.pop(next(iter(args)))
    return args


def fold_args(node: fx.Node, resolve: Resolve) -> dict[str, Any]:
    """F.fold's keyword arguments (output_size, kernel_size, dilation, padding, stride)."""
    args = _bind(node, F.fold, resolve)
    args.pop(next(iter(args)))
    return args


def unfold_bound(node: fx.Node, resolve: Resolve, shape: torch.Size | None) -> float:
    """Note [Unfold and fold]: sqrt of the largest number of (patch, tap) pairs per entry."""
    args = unfold_args(node, resolve)
    sizes = None if shape is None else _spatial(node, shape, 2, "")
    try:
        return float(LM.copies_norm(LM.unfold_cover(**args, sizes=sizes)))
    except ValueError as exc:
        raise _values_error(node, exc) from exc


def fold_bound(node: fx.Node, resolve: Resolve, shape: torch.Size | None) -> float:
    """Note [Unfold and fold]: the adjoint of the unfold on ``output_size``, same norm."""
    args = fold_args(node, resolve)
    sizes = args.pop("output_size")
    sizes = (sizes, sizes) if isinstance(sizes, int) else tuple(sizes)
    try:
        return float(LM.copies_norm(LM.unfold_cover(**args, sizes=sizes)))
    except ValueError as exc:
        raise _values_error(node, exc) from exc


# -- cumsum and diff -----------------------------------------------------------------------


def map_dim(node: fx.Node, dim: Any, shape: torch.Size | None) -> int | None:
    """The dim a cumsum or diff runs along, as a non-negative index when the shape is
    known (else as given); refuses the batch dimension (it would mix the samples)."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise _refuse(node, f"its dim {dim!r} is not an int")
    if shape is not None:
        if not -len(shape) <= dim < len(shape):
            raise _refuse(node, f"dim {dim} is out of range for shape {tuple(shape)}")
        dim %= len(shape)
    if dim == 0:
        raise _refuse(node, "it runs along dim 0, the batch: it mixes the samples")
    return dim


def cumsum_bound(node: fx.Node, resolve: Resolve, shape: torch.Size | None) -> float:
    """Note [Cumulative sums and differences]: $\\|L_n\\|$ with $n$ the size along dim."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dim = map_dim(node, resolve(dim), shape)
    if shape is None:
        raise ShapeRequiredError(
            f"{_name(node)}: the norm of a cumulative sum grows with the length "
            "(Note [Cumulative sums and differences]); pass input_shape, e.g. "
            "lipschitz_bound(model, input_shape=(1, *input_size))"
        )
    assert dim is not None
    return LM.cumsum_norm_bound(int(shape[dim]))


def diff_args(node: fx.Node, resolve: Resolve) -> tuple[int, Any, Any, Any]:
    """(order, dim, prepend, append) of a ``torch.diff`` node (values resolved)."""
    names = ("n", "dim", "prepend", "append")
    defaults = (1, -1, None, None)
    values = [
        resolve(node.kwargs.get(k, node.args[i + 1] if len(node.args) > i + 1 else d))
        for i, (k, d) in enumerate(zip(names, defaults, strict=True))
    ]
    order = values[0]
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise _refuse(node, f"its order n={order!r} is not a non-negative int")
    return order, values[1], values[2], values[3]


def _extra(node: fx.Node, value: Any, dim: int | None, shape: torch.Size | None) -> int:
    if value is None:
        return 0
    if not isinstance(value, torch.Tensor):
        raise _refuse(node, f"prepend/append of type {type(value).__name__}")
    if shape is None or dim is None:
        return -1  # unknown: only the size-free bound applies
    if value.ndim != len(shape):
        raise _refuse(node, "prepend/append must have the input's number of dims")
    return int(value.shape[dim])


def diff_bound(node: fx.Node, resolve: Resolve, shape: torch.Size | None) -> float:
    """Note [Cumulative sums and differences]: exact with the shape, else $2^r$."""
    order, dim, prepend, append = diff_args(node, resolve)
    dim = map_dim(node, dim, shape)
    before, after = _extra(node, prepend, dim, shape), _extra(node, append, dim, shape)
    if shape is None or dim is None:
        return LM.diff_norm_bound(None, order)
    return LM.diff_norm_bound(int(shape[dim]), order, before, after)
