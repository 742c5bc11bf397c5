"""Functional convolutions as the torch.nn convolutions they compute.

# Note [Functional convolutions]

``F.conv1d``, ``F.conv2d`` and ``F.conv3d`` with a weight (and bias) that do not depend on
the input compute exactly what an ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` with
``padding_mode="zeros"`` and the same stride, padding, dilation and groups computes with
that weight. Such calls appear wherever a torch.nn convolution is traced into: a layer
parametrized with ``torch.nn.utils.parametrize`` that the trust policy traces into (its
``forward`` is torch.nn's, reading the realised weight: Note [Realised parametrizations] in
`lipnets.graph.realise`), a subclass that overrides ``forward``, or a user's ``forward``
that calls ``F.conv2d`` on a parameter. As for the pools of Note [Functional calls as
modules] (in `lipnets.graph.ops`), the module's rule serves both spellings; but a pool's
module holds no tensors and replaces the call at trace time, while a convolution's weight
is a value of the graph (a parameter, or a parametrized tensor realised for this call), so
`stand_in` builds the module when the graph is evaluated: of torch.nn's own class, holding
the call's values (the tensors themselves, so autograd reaches the parameters they came
from). Every consumer of the graph applies torch.nn's rule to it: the Lipschitz fold its
registered bound (`lipnets.bounds.conv`, for the input size the graph records) and bound
propagation its convolution op, which takes batched inputs only. A circular, reflect or
replicate ``nn.Conv2d`` traced into is ``F.pad`` followed by a zero-padding call: each is
bounded by its own rule, so the bound is the padding's constant times the convolution's
(sound, and looser than the module's exact circular rule).

The call's arguments are read by ``F.convNd``'s own signature (positional or keyword);
a weight that is not a floating-point tensor of rank $N + 2$, a bias that is not a
vector of the output channels, or channels that do not fit ``groups`` are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, fx, nn

from lipnets.errors import UnboundedModuleError

__all__ = ["CONV_FUNCTIONS", "stand_in"]

CONV_FUNCTIONS: dict[Callable[..., Any], type[nn.modules.conv._ConvNd]] = {
    F.conv1d: nn.Conv1d,
    F.conv2d: nn.Conv2d,
    F.conv3d: nn.Conv3d,
}
# torch documents conv1d/2d/3d(input, weight, bias=None, stride=1, padding=0, dilation=1,
# groups=1); the builtins carry no signature to read (tests/graph/test_conv_calls.py checks
# the stand-in against the call, positionally and by keyword)
_PARAMS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _arguments(node: fx.Node) -> dict[str, Any]:
    """The call's arguments by name (F.convNd is a builtin: its signature is fixed)."""
    if len(node.args) > len(_PARAMS):
        raise UnboundedModuleError(f"{node.target} called with too many arguments")
    named = dict(zip(_PARAMS, node.args, strict=False))
    for key, value in node.kwargs.items():
        if key not in _PARAMS or key in named:
            raise UnboundedModuleError(f"{node.target} called with an unknown argument {key!r}")
        named[key] = value
    return {**_DEFAULTS, **named}


def stand_in(node: fx.Node, resolve: Callable[[Any], Any], where: str) -> nn.Module:
    """The ``nn.ConvNd`` that the functional convolution at `node` computes (Note
    [Functional convolutions]). `resolve` gives the value of an input-independent argument;
    `where` names the node in errors."""
    cls = CONV_FUNCTIONS[node.target]  # type: ignore[index]
    args = _arguments(node)
    weight, bias = resolve(args["weight"]), resolve(args["bias"])
    rank = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[cls]
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.ndim != rank + 2:
        raise UnboundedModuleError(
            f"{where}: the weight of {cls.__name__[:-2].lower()}{rank}d must be a floating-point "
            f"tensor of rank {rank + 2}, got "
            f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}"
        )
    groups = resolve(args["groups"])
    stride, padding, dilation = (resolve(args[k]) for k in ("stride", "padding", "dilation"))
    out_channels, per_group = int(weight.shape[0]), int(weight.shape[1])
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise UnboundedModuleError(f"{where}: groups must be an int >= 1, got {groups!r}")
    if out_channels % groups:
        raise UnboundedModuleError(
            f"{where}: {out_channels} output channels do not split into groups={groups}"
        )
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (out_channels,)):
        raise UnboundedModuleError(
            f"{where}: the bias must be None or a tensor of shape ({out_channels},), got "
            f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}"
        )
    try:
        module = cls(
            per_group * groups, out_channels, tuple(weight.shape[2:]), stride=stride,
            padding=padding, dilation=dilation, groups=groups, bias=bias is not None,
            device="meta",
        )  # fmt: skip
    except (TypeError, ValueError, RuntimeError) as error:
        raise UnboundedModuleError(f"{where}: {error}") from None
    # The call's own tensors, as plain attributes (not copies, not Parameters).
    del module.weight, module.bias
    module.weight, module.bias = weight, bias
    return module
