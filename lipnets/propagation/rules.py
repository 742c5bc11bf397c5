r"""The registry of propagation rules for module types, and the rules of torch.nn and lipnets.

A rule turns one module node of a traced graph into propagation ops
(`lipnets.propagation._ops`); it is registered for a class with
`register_propagation`, exactly as a Lipschitz rule is with ``register_bound``,
and it serves a module only when the trust policy trusts the module with it
(Note [Trust policy] in `lipnets.graph.policy`: the class that registered the
rule also provides the ``forward`` in effect, nothing is replaced on the
instance, no hook). lipnets' own layers register here like any user layer.

# Note [Comparators as ReLUs]

A comparator on a pair $(a, b)$ writes $\min(a, b)$ and $\max(a, b)$, and
$\min(a, b) = a - \mathrm{relu}(a - b)$, $\max(a, b) = b + \mathrm{relu}(a -
b)$. So one comparator layer (disjoint pairs) is a `Difference`, a `ReLU` and
a `Compare` node, and bound propagation needs no rule but the ReLU's (``torch.maximum``,
``torch.minimum`` and max pooling are comparators too: Note [Maxima as comparators] in
`lipnets.propagation.nonlinear`). MaxMin
is one layer with the pair $(2i + 1, 2i)$ (the max goes first: Note [MaxMin
ties] in `lipnets.functional.activations`); GroupSort sorts each contiguous
group of ``group_size`` channels ascending with Batcher's merge-exchange
network (`lipnets.propagation._ops.sorting_network`: 1, 3, 6 and 10 layers
for groups of 2, 4, 8 and 16); FullSort is GroupSort with one group. Every
rewrite is checked against the model's own output (Note [Graph checked on the
balls] in `lipnets.propagation.graph`).

# Note [Circular convolution kernels]

`CayleyConv2d` and `FrequencyConv2d` multiply each frequency of the 2-D FFT
of ``space_to_depth(x, s)`` by a matrix and add a bias, so their linear part
commutes with circular shifts of the folded input: it is the circular
convolution with its own impulse responses. lipnets measures them (one
impulse per folded channel, at position (0, 0)), giving a kernel $K$ of shape
$(m, n, H/s, W/s)$, applies the layer as that convolution (by FFT) and checks
the result against the layer on the input batch; a mismatch raises. $|K|$ then
gives $|W|$ exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import fx, nn

from lipnets.functional.reshape import depth_to_space
from lipnets.graph import register_rule_provider, rule_decorator, trusted_owner
from lipnets.nn import (
    BCOPConv2d,
    BjorckLinear,
    CayleyConv2d,
    CayleyLinear,
    FrequencyConv2d,
    FullSort,
    GroupSort,
    InvertibleDownsample,
    MaxMin,
)
from lipnets.propagation import _ops

if TYPE_CHECKING:
    from lipnets.propagation.builder import Builder, Lazy

__all__ = ["PropagationRule", "propagation_rule", "register_propagation"]

PropagationRule = Callable[["Builder", fx.Node, nn.Module, fx.Node], "int | Lazy"]
"""A rule maps (builder, the module's graph node, the module, its input node) to the index
of the propagation node holding the module's output (or a lazy index operation)."""

_RULES: dict[type[nn.Module], PropagationRule] = {}
_R = TypeVar("_R", bound=PropagationRule)


def register_propagation(*module_types: type[nn.Module]) -> Callable[[_R], _R]:
    """Register a propagation rule for one or more module types (see the module docs).

    Raises:
        TypeError: if no type is given or one is not an ``nn.Module`` subclass.
    """
    return rule_decorator("register_propagation", _RULES, module_types)


def _owner(cls: type) -> type | None:
    return next((base for base in cls.__mro__ if base in _RULES), None)


register_rule_provider("propagation", _owner)


def propagation_rule(module: nn.Module) -> PropagationRule | None:
    """The rule for ``module`` when the trust policy trusts it with one, else None."""
    owner = trusted_owner(module, "propagation")
    return _RULES.get(owner) if owner is not None else None


@register_propagation(nn.ReLU)
def _relu(b: Builder, node: fx.Node, module: nn.Module, source: fx.Node) -> int:
    return b.relu(node, source)


@register_propagation(nn.Tanh)
def _tanh(b: Builder, node: fx.Node, module: nn.Module, source: fx.Node) -> int:
    return b.elementwise(node, source, "tanh")


@register_propagation(nn.Sigmoid)
def _sigmoid(b: Builder, node: fx.Node, module: nn.Module, source: fx.Node) -> int:
    return b.elementwise(node, source, "sigmoid")


@register_propagation(nn.LeakyReLU)
def _leaky_relu(b: Builder, node: fx.Node, module: Any, source: fx.Node) -> int:
    return b.elementwise(node, source, "leaky_relu", {"negative_slope": module.negative_slope})


@register_propagation(
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
def _max_pool(b: Builder, node: fx.Node, module: nn.Module, source: fx.Node) -> int:
    return b.max_pool(node, source, module)


@register_propagation(MaxMin)
def _maxmin(b: Builder, node: fx.Node, module: Any, source: fx.Node) -> int | Lazy:
    return b.comparators(node, source, "maxmin", None, module.dim)


@register_propagation(GroupSort)
def _groupsort(b: Builder, node: fx.Node, module: Any, source: fx.Node) -> int | Lazy:
    return b.comparators(node, source, "groupsort", module.group_size, module.dim)


@register_propagation(FullSort)
def _fullsort(b: Builder, node: fx.Node, module: Any, source: fx.Node) -> int | Lazy:
    return b.comparators(node, source, "fullsort", None, module.dim)


@register_propagation(nn.Linear, BjorckLinear, CayleyLinear)
def _linear(b: Builder, node: fx.Node, module: Any, source: fx.Node) -> int:
    return b.affine(
        node, source, lambda i, o: _ops.Linear(i, o, module, module.weight, module.bias)
    )


@register_propagation(nn.Conv1d, nn.Conv2d, nn.Conv3d, BCOPConv2d)
def _conv(b: Builder, node: fx.Node, module: Any, source: fx.Node) -> int:
    """The convolution with its realised kernel (also the stand-in of an ``F.convNd`` call,
    Note [Functional convolutions]). Its input must be batched, (B, C, *spatial): lipnets
    reads the first dimension as the batch, and torch reads an input of one dimension less
    as one unbatched sample."""
    weight, bias = module.weight, module.bias

    def make(in_shape: torch.Size, out_shape: torch.Size) -> _ops.Conv:
        if len(in_shape) != weight.ndim - 1:
            raise b.no_rule(
                node,
                f"its input has {len(in_shape) + 1} dimensions, but a convolution with a "
                f"{weight.ndim}-D kernel propagates batched inputs of {weight.ndim} (an "
                "unbatched input's first dimension would be read as the batch)",
            )
        return _ops.Conv(in_shape, out_shape, module, weight, bias)

    return b.affine(node, source, make)


@register_propagation(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batch_norm(b: Builder, node: fx.Node, module: Any, source: fx.Node) -> int:
    bn: nn.modules.batchnorm._BatchNorm = module
    if bn.training or not bn.track_running_stats or bn.running_mean is None:
        raise b.no_rule(
            node, "it normalises with batch statistics (use eval mode with running stats)"
        )
    assert bn.running_var is not None
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return b.affine(node, source, lambda i, o: _ops.BatchNorm(i, o, module, scale, shift))


@register_propagation(CayleyConv2d, FrequencyConv2d)
def _circular_conv(b: Builder, node: fx.Node, module: Any, source: fx.Node) -> int:
    """Note [Circular convolution kernels]."""
    src = b.materialize(source, node)
    shape = b.nodes[src].shape
    s = int(module.stride)
    channels, height, width = shape
    n = channels * s * s
    dtype, device = b.x.dtype, b.x.device
    folded = torch.zeros((n, n, height // s, width // s), dtype=dtype, device=device)
    folded[torch.arange(n), torch.arange(n), 0, 0] = 1
    impulses = depth_to_space(folded, s) if s > 1 else folded
    # Measured under the caller's autograd mode: differentiable bounds keep the kernel's
    # graph to the layer's parameters (Note [Differentiable bounds] in
    # lipnets.propagation.checks).
    zero = module(torch.zeros((1, *shape), dtype=dtype, device=device))
    kernel = (module(impulses) - zero).transpose(0, 1).contiguous()
    out_shape = b.value[node].shape[1:]
    op = _ops.CircularConv(shape, out_shape, module, kernel, getattr(module, "bias", None), s)
    with torch.no_grad():
        got, want = op.apply(b.value[source]), b.value[node]
    tol = math.sqrt(torch.finfo(dtype).eps) * (1 + float(want.abs().max()))
    if got.shape != want.shape or not bool(((got - want).abs() <= tol).all()):
        raise b.no_rule(
            node,
            "it does not act as the circular convolution of its impulse responses "
            "(Note [Circular convolution kernels])",
        )
    return b.add(op, [src], out_shape, b.where(node))


@register_propagation(
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
    InvertibleDownsample,
)  # fmt: skip
def _index_module(b: Builder, node: fx.Node, module: nn.Module, source: fx.Node) -> Lazy:
    """Modules that only move entries (Note [Index operations]); dropout is the identity
    in the eval mode propagation runs in."""
    return b.index_op(node)


@register_propagation(
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d,
    nn.ConstantPad2d, nn.ConstantPad3d,
)  # fmt: skip
def _monotone_module(b: Builder, node: fx.Node, module: Any, source: fx.Node) -> int:
    """Linear maps with non-negative weights, applied by the module itself."""
    divisor = getattr(module, "divisor_override", None)
    if divisor is not None and divisor <= 0:
        raise b.no_rule(node, f"divisor_override={divisor} makes its weights negative")
    return b.affine(
        node, source, lambda i, o: _ops.ModuleLinear(i, o, module, b.x.dtype, b.x.device)
    )
