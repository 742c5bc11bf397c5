r"""Recognising affine layers, and forming the dense matrix of their linear part.

Shared by `autolip` (which power-iterates affine leaves and takes the known
constant of every other leaf) and `seqlip` (which needs the matrices).

# Note [Affinity probe]

A layer counts as affine when its type is one that computes an affine map
(`AFFINE_MODULES`: linear and convolution layers, eval-mode BatchNorm,
average pooling, padding, reshapes, lipnets' orthogonal layers...) *and* a
numerical probe agrees in the mode it runs in. The type comes first because
no finite probe can tell an affine map from one that bends far from the
probes ($x + 49\,\mathrm{relu}(x - 10^3)$ passes any probe of moderate
size); the probe then catches the modes in which such a type is not affine
(BatchNorm in training mode mixes the samples of a batch). The probe checks
$f(a) + f(b) = f(a + b) + f(0)$ and $f(a) + f(-a) = 2 f(0)$ on a few random
inputs at two scales, to $10^3$ machine epsilons of the dtype (at most 0.05)
relative to the size of the terms. Any other module is not affine here:
AutoLip keeps its sound constant and SeqLip refuses it. A wrong answer here
can only change an estimate, never a bound.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lipnets.graph import trusted
from lipnets.nn import CayleyConv2d, FrequencyConv2d, InvertibleDownsample

_PROBES = 3

AFFINE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,  # BjorckLinear and CayleyLinear are subclasses
    nn.modules.conv._ConvNd,  # Conv1d/2d/3d, ConvTranspose*, BCOPConv2d
    nn.modules.batchnorm._BatchNorm,  # affine in eval mode (the probe checks the mode)
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ChannelShuffle,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
    nn.CircularPad1d,
    nn.CircularPad2d,
    nn.CircularPad3d,
    CayleyConv2d,
    FrequencyConv2d,
    InvertibleDownsample,
)
"""Module types that compute an affine map of their input (Note [Affinity probe])."""


def _tolerance(dtype: torch.dtype) -> float:
    return min(1e3 * torch.finfo(dtype).eps, 0.05)


def _apply(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    out = fn(x)
    if not isinstance(out, Tensor) or not out.is_floating_point():
        raise TypeError("an affinity probe needs a map that returns a floating-point tensor")
    return out.detach().to(torch.float64)


@torch.no_grad()
def is_affine(
    module: nn.Module,
    input_shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> bool:
    """Whether `module` is affine on inputs of `input_shape` (Note [Affinity probe])."""
    # The forward in effect must be that of a known affine class of torch.nn or lipnets,
    # and the module must be trusted with it (Note [Trust policy] in lipnets.graph.policy).
    owner = next(
        (
            c
            for c in type(module).__mro__
            if c.__module__.startswith(("torch.nn.", "lipnets."))
            and c.__module__ != "torch.nn.utils.parametrize"  # parametrize's own subclass
        ),
        None,
    )
    if owner is None or not issubclass(owner, AFFINE_MODULES) or not trusted(module, owner):
        return False
    tol = _tolerance(dtype)
    zero = torch.zeros(input_shape, dtype=dtype, device=device)
    f0 = _apply(module, zero)
    for i in range(_PROBES):
        scale = 10.0 ** (2 * (i % 2))  # probe at scales 1 and 100
        a = scale * torch.randn(input_shape, generator=generator, dtype=dtype, device=device)
        b = scale * torch.randn(input_shape, generator=generator, dtype=dtype, device=device)
        fa, fb, fab, fna = (_apply(module, t) for t in (a, b, a + b, -a))
        if fa.shape != f0.shape:
            return False
        size = sum(float(torch.linalg.vector_norm(t)) for t in (fa, fb, fab, fna, f0))
        additive = float(torch.linalg.vector_norm(fa + fb - fab - f0))
        odd = float(torch.linalg.vector_norm(fa + fna - 2 * f0))
        if not (additive <= tol * size and odd <= tol * size):
            return False
    return True


@torch.no_grad()
def linear_matrix(
    fn: Callable[[Tensor], Tensor],
    input_shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
    chunk: int = 256,
) -> Tensor:
    """The float64 matrix of the linear part of an affine `fn` on one sample.

    Column $j$ is ``fn(e_j) - fn(0)`` for the unit vectors of a sample of shape
    ``input_shape[1:]`` (``input_shape[0]`` must be 1), evaluated in batches of
    `chunk` samples, so `fn` must treat the samples of a batch independently.
    """
    sample = input_shape[1:]
    n = 1
    for d in sample:
        n *= d
    f0 = _apply(fn, torch.zeros(input_shape, dtype=dtype, device=device)).reshape(-1)
    columns = []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        basis = torch.zeros(stop - start, n, dtype=dtype, device=device)
        basis[:, start:stop] = torch.eye(stop - start, dtype=dtype, device=device)
        out = _apply(fn, basis.reshape(stop - start, *sample)).reshape(stop - start, -1)
        columns.append((out - f0).T.cpu())
    return torch.cat(columns, dim=1)
