"""Sound Lipschitz bound rules for torch's convolution modules.

The bias of a convolution is a translation, so the bound is the operator norm of the
linear part, computed by
[`conv2d_spectral_norm_bound`][lipnets.functional.conv_norms.conv2d_spectral_norm_bound]
with the module's own stride, padding, dilation, groups and padding mode. With an input
shape the bound is for that spatial size (exact for circular padding); without one it
holds for every size.
"""

from __future__ import annotations

import torch
from torch import nn

from lipnets.bounds.registry import pair, register_bound
from lipnets.functional.conv_norms import conv2d_spectral_norm_bound

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
