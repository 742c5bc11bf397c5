"""Sound Lipschitz bound rules for torch's convolution modules.

The bias of a convolution is a translation, so the bound is the operator norm of the
linear part, computed by
[`conv2d_spectral_norm_bound`][lipnets.functional.conv_norms.conv2d_spectral_norm_bound]
with the module's own stride, padding, dilation, groups and padding mode. With an input
shape the bound is for that spatial size (exact for circular padding); without one it
holds for every size. Transposed convolutions are bounded as adjoints of convolutions
(Note [Transposed convolution bound]).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lipnets.bounds.registry import pair, register_bound
from lipnets.errors import UnboundedModuleError
from lipnets.functional.conv_norms import conv2d_spectral_norm_bound
from lipnets.functional.norms import spectral_norm_bound

__all__: list[str] = []


def _spatial_size(module: nn.Module, input_shape: torch.Size | None, n: int):
    if input_shape is None:
        return None
    if len(input_shape) < n + 1:
        raise ValueError(
            f"{type(module).__name__} needs an input shape of rank >= {n + 1} "
            f"(channels and {n} spatial dims), got {tuple(input_shape)}"
        )
    return tuple(int(s) for s in input_shape[-n:])


@register_bound(nn.Conv2d)
def _conv2d(module: nn.Conv2d, input_shape: torch.Size | None) -> torch.Tensor:
    return conv2d_spectral_norm_bound(
        module.weight,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=module.groups,
        padding_mode=module.padding_mode,
        input_size=_spatial_size(module, input_shape, 2),
    )


@register_bound(nn.Conv1d)
def _conv1d(module: nn.Conv1d, input_shape: torch.Size | None) -> torch.Tensor:
    # A 1-D convolution is the 2-D one with a kernel of height 1 on inputs of height 1.
    weight = module.weight
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError("weight is an uninitialised lazy parameter: run one forward pass first")
    padding = module.padding
    if not isinstance(padding, str):
        padding = (0, pair(padding, 1)[0])
    size = _spatial_size(module, input_shape, 1)
    return conv2d_spectral_norm_bound(
        weight.unsqueeze(2),
        stride=(1, pair(module.stride, 1)[0]),
        padding=padding,
        dilation=(1, pair(module.dilation, 1)[0]),
        groups=module.groups,
        padding_mode=module.padding_mode,
        input_size=None if size is None else (1, size[0]),
    )


# Note [Transposed convolution bound]
# ConvTranspose with weight W (in, out / groups, k...), stride s, padding p, dilation d,
# groups g and output padding q maps an input of size n to one of size
# N = (n - 1) s - 2 p + d (k - 1) + 1 + q. It is the adjoint of the convolution C_N:
# F.conv(y, W, stride=s, padding=p, dilation=d, groups=g) on inputs of size N (W read as a
# convolution kernel with out_channels = in: the same tensor), restricted to its first n
# outputs: T = C_N^T E with E the embedding of the input among C_N's outputs (all of them
# when q < s). An operator and its adjoint have the same norm and E is an isometry, so
# ||T|| <= ||C_N||. Zero padding makes ||C_N|| nondecreasing in N (the outputs of C_N are the
# first outputs of C_{N+1} on the input padded by a zero), so the bound at the largest
# output padding a call can use, max(q, s - 1) (``output_size=`` picks q <= s - 1), holds for
# every call on inputs of size n; without a size the every-size bound of C holds. Below
# 2^20 matrix entries lipnets builds the matrices densely (the convolution of the identity
# basis) and takes the larger of the exact norms of C_N at q = s - 1 (every output_size=
# call) and of E^T C_N at the module's own q when q >= s (exact for that call); above, the
# machinery of conv2d_spectral_norm_bound at N = n_min + max(q, s - 1).


def _conv_transpose(module: nn.Module, input_shape: torch.Size | None, n: int) -> torch.Tensor:
    weight = module.weight
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError("weight is an uninitialised lazy parameter: run one forward pass first")
    if module.padding_mode != "zeros":
        raise UnboundedModuleError(
            f"{type(module).__name__}(padding_mode={module.padding_mode!r}) has no bound rule "
            "(torch supports only zero padding for transposed convolutions)"
        )
    stride, padding = pair(module.stride, n), pair(module.padding, n)
    dilation, extra = pair(module.dilation, n), pair(module.output_padding, n)
    spatial = _spatial_size(module, input_shape, n)
    size = None
    if spatial is not None:
        size = tuple(
            (m - 1) * s - 2 * p + d * (k - 1) + 1 + max(q, s - 1)
            for m, s, p, d, k, q in zip(
                spatial, stride, padding, dilation, weight.shape[2:], extra, strict=True
            )
        )
    if size is not None:
        entries = weight.shape[0] * weight.shape[1] * module.groups * math.prod(size) ** 2
        if entries <= _DENSE_ENTRIES:  # small: exact norms from the dense matrices
            assert spatial is not None
            every = tuple(
                m + s - 1 - max(q, s - 1) for m, s, q in zip(size, stride, extra, strict=True)
            )
            bound = _dense_conv_norm(weight, stride, padding, dilation, module.groups, every)
            if any(q > s - 1 for s, q in zip(stride, extra, strict=True)):
                own = tuple(
                    m - max(q, s - 1) + q for m, s, q in zip(size, stride, extra, strict=True)
                )
                crop = _dense_conv_norm(
                    weight, stride, padding, dilation, module.groups, own, spatial
                )
                bound = torch.maximum(bound, crop)
            return bound
    if n == 1:  # the 1-D convolution is the 2-D one with a kernel of height 1
        weight = weight.unsqueeze(2)
        stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
        size = None if size is None else (1, *size)
    return conv2d_spectral_norm_bound(
        weight,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=module.groups,
        padding_mode="zeros",
        input_size=size,
    )


_DENSE_ENTRIES = 2**20
"""Bound on (outputs x inputs) of C_N below which its dense matrix is built and solved."""


def _dense_conv_norm(weight, stride, padding, dilation, groups, size, crop=None):
    """||C_N|| (or ||E^T C_N||: its first ``crop`` outputs) from the dense float64 matrix
    (Note [Transposed convolution bound])."""
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight contains NaN or infinite entries; no Lipschitz bound exists")
    channels = w.shape[1] * groups
    count = channels * math.prod(size)
    basis = torch.eye(count, dtype=torch.float64).reshape(count, channels, *size)
    conv = (F.conv1d, F.conv2d)[len(size) - 1]
    out = conv(basis, w, None, stride, padding, dilation, groups)
    if crop is not None:
        out = out[(slice(None), slice(None), *(slice(0, c) for c in crop))]
    return spectral_norm_bound(out.reshape(count, -1), name="transposed convolution operator")


@register_bound(nn.ConvTranspose1d)
def _conv_transpose1d(module: nn.ConvTranspose1d, input_shape: torch.Size | None):
    """Note [Transposed convolution bound]."""
    return _conv_transpose(module, input_shape, 1)


@register_bound(nn.ConvTranspose2d)
def _conv_transpose2d(module: nn.ConvTranspose2d, input_shape: torch.Size | None):
    """Note [Transposed convolution bound]."""
    return _conv_transpose(module, input_shape, 2)
