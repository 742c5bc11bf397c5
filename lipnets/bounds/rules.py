"""Sound Lipschitz bound rules for torch.nn built-in modules.

Every rule here is a proof written as code: each constant is the supremum of
the module's local slope (or an upper bound on it), computed from the module's
current parameters. ``Conv1d`` and ``Conv2d`` have their rules in
`lipnets.bounds.conv`. Modules not listed (``GELU``, ``LayerNorm``, ...) have no
rule and make [`lipschitz_bound`][lipnets.bounds.lipschitz_bound] raise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lipnets.bounds.registry import pair, register_bound
from lipnets.errors import ShapeRequiredError, UnboundedModuleError
from lipnets.functional.norms import spectral_norm_bound

__all__: list[str] = []

_EPS64 = torch.finfo(torch.float64).eps


@register_bound(nn.Linear)
def _linear(module: nn.Linear, input_shape: torch.Size | None) -> torch.Tensor:
    # The bias is a translation; the weight's spectral norm is exact (float64 SVD
    # plus the rounding slack of Note [Sound spectral norm in float64]).
    return spectral_norm_bound(module.weight, name="weight")


# Elementwise maps whose derivative lies in [-1, 1] everywhere it exists, and
# which are continuous (so the derivative bound is a Lipschitz bound).
@register_bound(
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Tanh,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.Softshrink,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
)
def _one(module: nn.Module, input_shape: torch.Size | None) -> float:
    return 1.0


@register_bound(nn.CELU)
def _celu(module: nn.CELU, input_shape: torch.Size | None) -> float:
    # d/dx alpha (e^(x/alpha) - 1) = e^(x/alpha) <= 1 for x < 0 only when alpha > 0.
    if float(module.alpha) <= 0:
        raise UnboundedModuleError(f"CELU(alpha={module.alpha}) is not Lipschitz for alpha <= 0")
    return 1.0


# nn.Softplus has no rule: torch switches to the identity above `threshold`,
# which leaves a jump of log1p(exp(-threshold)) / beta, so it is not Lipschitz.


@register_bound(nn.LeakyReLU)
def _leaky_relu(module: nn.LeakyReLU, input_shape: torch.Size | None) -> float:
    # Slopes 1 and negative_slope.
    return max(1.0, abs(float(module.negative_slope)))


@register_bound(nn.ELU)
def _elu(module: nn.ELU, input_shape: torch.Size | None) -> float:
    # d/dx alpha (e^x - 1) = alpha e^x, whose modulus tends to |alpha| as x -> 0-.
    return max(1.0, abs(float(module.alpha)))


@register_bound(nn.Sigmoid)
def _sigmoid(module: nn.Sigmoid, input_shape: torch.Size | None) -> float:
    # sigma' = sigma (1 - sigma) <= 1/4, reached at 0.
    return 0.25


@register_bound(nn.Hardsigmoid)
def _hardsigmoid(module: nn.Hardsigmoid, input_shape: torch.Size | None) -> float:
    return 1.0 / 6.0


@register_bound(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
def _dropout(module: nn.Dropout, input_shape: torch.Size | None) -> float:
    # Identity in eval mode. In training mode each draw of the mask is a
    # diagonal map with entries 0 or 1 / (1 - p).
    if not module.training:
        return 1.0
    p = float(module.p)
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _bn_bound(module: nn.modules.batchnorm._BatchNorm, input_shape: torch.Size | None):
    if module.training or module.running_var is None:
        raise UnboundedModuleError(
            f"{type(module).__name__} normalises by batch statistics in training mode (or "
            "without running statistics), which is not a Lipschitz map of one input; call "
            "model.eval() and keep track_running_stats=True"
        )
    # Eval mode: y_c = gamma_c (x_c - mu_c) / sqrt(var_c + eps) + beta_c.
    scale = 1.0 / torch.sqrt(module.running_var.detach().double() + float(module.eps))
    if module.affine and module.weight is not None:
        scale = scale * module.weight.detach().double().abs()
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"{type(module).__name__} has NaN or infinite statistics or weights")
    return scale.max().cpu() * (1.0 + 8 * _EPS64) if scale.numel() else 0.0


register_bound(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)(_bn_bound)


# ---------------------------------------------------------------------------
# Pooling.
#
# Note [Pooling bounds]
# Max pooling: |max_w(x) - max_w(x')| <= ||x_w - x'_w||_2 for every window w, so
# ||pool(x) - pool(x')||^2 <= sum_w ||x_w - x'_w||^2 <= c ||x - x'||^2, where c is
# the largest number of windows that contain one input position. Per dimension
# c_d <= min(k, ceil(((k - 1) d + 1) / s)) (window span over stride, and never
# more than the k taps). Overlapping windows (s < k) give c > 1, and the bound
# sqrt(c) is reached: [1, 2, 1, 2, 1] with k=2, s=1 has ratio > 1.
#
# Average pooling is linear and separable: the divisor of every window is a
# product of per-dimension counts, so the operator is a Kronecker product of
# 1-D operators and its norm the product of theirs. With the input size known
# lipnets builds each 1-D operator from torch's own pooling and takes its exact
# spectral norm. For every size at once it uses the Schur bound
# ||A|| <= sqrt(max row sum * max column sum) per dimension: rows sum to <= 1,
# and a column meets at most ceil(k / s) windows, each of weight 1/k when every
# window is divided by k (no clipping), else at most 1.
# ---------------------------------------------------------------------------


_NDIMS = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
}


def _ndims(module: nn.Module) -> int:
    return next(n for cls, n in _NDIMS.items() if isinstance(module, cls))


def _spatial(input_shape: torch.Size | None, n: int) -> tuple[int, ...] | None:
    if input_shape is None:
        return None
    if len(input_shape) < n + 1:
        raise ValueError(
            f"pooling over {n} dims needs an input of rank >= {n + 1}, got {tuple(input_shape)}"
        )
    return tuple(int(s) for s in input_shape[-n:])


def _max_pool(module: nn.Module, input_shape: torch.Size | None):
    n = _ndims(module)
    if module.return_indices:
        raise UnboundedModuleError(f"{type(module).__name__}(return_indices=True) returns indices")
    k = pair(module.kernel_size, n)
    s = pair(module.stride if module.stride is not None else module.kernel_size, n)
    d = pair(module.dilation, n)
    cover = 1
    for kk, ss, dd in zip(k, s, d, strict=True):
        cover *= min(kk, math.ceil(((kk - 1) * dd + 1) / ss))
    return math.sqrt(cover)


def _avg_pool_1d_operator(
    size: int, k: int, s: int, p: int, ceil_mode: bool, include_pad: bool, summed: bool
):
    """Dense 1-D average (or sum) pooling operator for an input of ``size``, float64."""
    eye = torch.eye(size, dtype=torch.float64).reshape(size, 1, size, 1)
    out = F.avg_pool2d(
        eye,
        (k, 1),
        (s, 1),
        (p, 0),
        ceil_mode=ceil_mode,
        count_include_pad=include_pad,
        divisor_override=1 if summed else None,
    )
    return out.reshape(size, -1).T  # (outputs, inputs)


def _avg_pool(module: nn.Module, input_shape: torch.Size | None):
    n = _ndims(module)
    k = pair(module.kernel_size, n)
    s = pair(module.stride if module.stride else module.kernel_size, n)
    p = pair(module.padding, n)
    override = getattr(module, "divisor_override", None)
    ceil_mode, include_pad = bool(module.ceil_mode), bool(module.count_include_pad)
    sizes = _spatial(input_shape, n)
    bound = 1.0 / override * math.prod(k) if override else 1.0
    for dim in range(n):
        kk, ss, pp = k[dim], s[dim], p[dim]
        if sizes is not None:
            op = _avg_pool_1d_operator(
                sizes[dim], kk, ss, pp, ceil_mode, include_pad, bool(override)
            )
            factor = float(spectral_norm_bound(op, name="pooling operator"))
            bound *= factor / kk if override else factor
            continue
        full_windows = not ceil_mode and (include_pad or pp == 0)
        col = math.ceil(kk / ss) * (1.0 / kk if full_windows or override else 1.0)
        row = 1.0  # each window's weights sum to at most 1 (1/k each when summed and rescaled)
        bound *= math.sqrt(row * col)
    return bound


def _adaptive_windows(size: int, out: int) -> list[tuple[int, int]]:
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def _adaptive_pool(module: nn.Module, input_shape: torch.Size | None):
    is_max = isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d))
    n = _ndims(module)
    if is_max and module.return_indices:
        raise UnboundedModuleError(f"{type(module).__name__}(return_indices=True) returns indices")
    out = module.output_size
    out = (out,) * n if isinstance(out, int) else tuple(out)
    sizes = _spatial(input_shape, n)
    if sizes is None:
        if all(o == 1 for o in out):
            return 1.0  # global pooling: a mean or a max over each channel, both <= 1
        raise ShapeRequiredError(
            f"{type(module).__name__}(output_size={module.output_size}) has a Lipschitz constant "
            "that depends on the input size (it can exceed 1 when it upsamples); pass "
            "input_shape to lipschitz_bound"
        )
    bound = 1.0
    for size, o in zip(sizes, out, strict=True):
        o = size if o is None else o
        windows = _adaptive_windows(size, o)
        if is_max:
            cover = max(sum(a <= j < b for a, b in windows) for j in range(size))
            bound *= math.sqrt(cover)
        else:
            op = torch.zeros(o, size, dtype=torch.float64)
            for i, (a, b) in enumerate(windows):
                op[i, a:b] = 1.0 / (b - a)
            bound *= float(spectral_norm_bound(op, name="pooling operator"))
    return bound


register_bound(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)(_max_pool)
register_bound(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)(_avg_pool)
register_bound(
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)(_adaptive_pool)
