r"""Orthogonal parametrizations for `torch.nn.utils.parametrize`, with presets.

`BjorckOrthogonal` maps a raw matrix to its orthogonal polar factor;
`CayleyOrthogonal` maps a raw square matrix to the leading block of the Cayley
transform of its skew-symmetric part. Both compute in float32 or better, even
under autocast, and hold no buffers: averaging the raw parameters (an EMA,
SWA, DDP) gives raw parameters whose image is still orthogonal.

# Note [Bjorck reprojection]

In training mode, when gradients are on and the raw weight is a leaf
`nn.Parameter` that requires them, `BjorckOrthogonal` writes the polar factor
it computed back into the raw parameter (under `torch.no_grad`, before
autograd needs it) and differentiates with `bjorck_retraction`. The polar
factor of an orthogonal matrix is itself, so the function is unchanged; the
raw weight stays on the orthogonal manifold up to one optimiser step, and the
next forward needs one to three iterations instead of tens. In this mode an
optimiser step followed by the write-back is a retraction onto the manifold,
and the gradient is exact at the parameter's value (Note [Bjorck retraction
gradient] in `lipnets.functional.orthogonal`). Weight decay shrinks the raw
weight, which the pre-scaling undoes, so the singular values cannot collapse.

In eval mode, under `torch.no_grad`, or when the raw weight is not a leaf
parameter (for instance under `torch.func.functional_call`), nothing is
written: eval mode is deterministic, and gradients, if needed, flow through
the iterations by autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lipnets._checks import check_bjorck_options, check_choice, check_instance
from lipnets.functional.orthogonal import bjorck, bjorck_retraction, cayley

__all__ = [
    "BJORCK_DEFAULT",
    "BJORCK_EXPORT",
    "BjorckConfig",
    "BjorckOrthogonal",
    "CayleyOrthogonal",
    "WeightConfig",
    "compute_dtype",
    "polar",
]


@dataclass(frozen=True)
class BjorckConfig:
    """Options of the Björck orthogonalisation, a frozen preset.

    Use a named preset (`BJORCK_DEFAULT`, `BJORCK_EXPORT`) or derive one with
    `dataclasses.replace(BJORCK_DEFAULT, order=2)`.

    Attributes:
        order: 1 (two matrix products per step, quadratic convergence) or 2
            (three products per step, cubic convergence).
        tol: stop once $\\|X^\\top X - I\\|_F \\le$ `tol`, after one more step
            (Note [Bjorck stopping rule]).
        iterations: run exactly this many steps instead of testing convergence.
        max_iterations: stop there, with a warning, if `tol` is not reached.
        dtype: the least precise dtype to compute in (float32 by default; the
            raw weight's dtype is used when it is more precise).
        reproject: write the polar factor back into the raw parameter in
            training (Note [Bjorck reprojection]).
    """

    order: int = 1
    tol: float = 1e-3
    iterations: int | None = None
    max_iterations: int = 64
    dtype: torch.dtype = torch.float32
    reproject: bool = True

    def __post_init__(self) -> None:
        check_bjorck_options(self.order, self.tol, self.iterations, self.max_iterations)
        check_choice(self.dtype, "dtype", (torch.float32, torch.float64))


#: Training preset: order 1, tol 1e-3, float32, reprojection on.
BJORCK_DEFAULT = BjorckConfig()
#: Export preset: float64 iterations to tol 1e-6, so the exported float32 weight
#: is the correctly rounded polar factor.
BJORCK_EXPORT = BjorckConfig(tol=1e-6, dtype=torch.float64)


class WeightConfig:
    """`layer.config`: the `BjorckConfig` of the layer's `weight` parametrization.

    A data descriptor shared by the Björck-based layers (`BjorckLinear`,
    `BCOPConv2d`): reading it returns the preset in use, assigning a preset
    switches the parametrization to it.
    """

    def __get__(self, layer: nn.Module | None, owner: type | None = None) -> BjorckConfig:
        if layer is None:
            return self  # type: ignore[return-value]
        return layer.parametrizations.weight[0].config

    def __set__(self, layer: nn.Module, value: BjorckConfig) -> None:
        check_instance(value, "config", BjorckConfig)
        layer.parametrizations.weight[0].config = value


def compute_dtype(raw: Tensor, least: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype to orthogonalise `raw` in: its own or `least`, whichever is more precise."""
    return torch.promote_types(raw.dtype, least)


def polar(raw: Tensor, config: BjorckConfig, *, training: bool, name: str) -> Tensor:
    """The polar factor(s) of `raw`, as a parametrization computes them.

    Picks the path of Note [Bjorck reprojection]: in training, with gradients
    on and `raw` a leaf `nn.Parameter` that requires them, `bjorck_retraction`
    plus a write-back into `raw`; with gradients on otherwise, `bjorck` with
    autograd through the iterations; without gradients, `bjorck` under
    `torch.no_grad`. Autocast is disabled and the result has the dtype
    `compute_dtype(raw, config.dtype)`. `raw` may be a stack of matrices.
    """
    options = {
        "order": config.order,
        "tol": config.tol,
        "iterations": config.iterations,
        "max_iterations": config.max_iterations,
        "name": name,
    }
    x = raw.to(compute_dtype(raw, config.dtype))
    with torch.autocast(raw.device.type, enabled=False):
        if not (torch.is_grad_enabled() and raw.requires_grad):
            with torch.no_grad():
                return bjorck(x, **options)
        if config.reproject and training and isinstance(raw, nn.Parameter):
            q = bjorck_retraction(x, **options)
            with torch.no_grad():
                raw.copy_(q)
            return q
        return bjorck(x, **options)


class BjorckOrthogonal(nn.Module):
    r"""Parametrization mapping a raw matrix to its orthogonal polar factor.

    Register it with `torch.nn.utils.parametrize.register_parametrization`, as
    `lipnets.nn.BjorckLinear` does. `right_inverse` is the identity, which is a
    right inverse on orthogonal matrices: assigning an orthogonal matrix to the
    parametrized weight stores it as the raw weight.

    Args:
        config: a `BjorckConfig` preset.
        name: how to name the weight in errors and warnings.

    Examples:
        >>> from torch.nn.utils import parametrize
        >>> layer = nn.Linear(4, 6)
        >>> _ = parametrize.register_parametrization(layer, "weight", BjorckOrthogonal())
        >>> w = layer.weight
        >>> bool(torch.allclose(w.mT @ w, torch.eye(4), atol=1e-5))
        True
    """

    def __init__(self, config: BjorckConfig = BJORCK_DEFAULT, *, name: str = "weight") -> None:
        super().__init__()
        check_instance(config, "config", BjorckConfig)
        self.config = config
        self.name = name

    def forward(self, raw: Tensor) -> Tensor:
        return polar(raw, self.config, training=self.training, name=self.name).to(raw.dtype)

    def right_inverse(self, weight: Tensor) -> Tensor:
        return weight

    def extra_repr(self) -> str:
        return repr(self.config)


class CayleyOrthogonal(nn.Module):
    r"""Parametrization: raw square matrix → leading block of a Cayley transform.

    The raw parameter is a square matrix of size `max(out_features,
    in_features)`; only its strict upper triangle is used (see
    `lipnets.functional.cayley`). Weight decay pulls it to zero, whose image
    is the leading block of the identity: orthogonal, never collapsed. There
    is no base buffer (geotorch's orthogonal parametrization keeps one, which
    an EMA of buffers would average into a non-orthogonal matrix).

    Args:
        out_features: rows of the weight.
        in_features: columns of the weight.
        dtype: the least precise dtype to compute in.

    Examples:
        >>> p = CayleyOrthogonal(6, 4)
        >>> w = p(torch.randn(6, 6))
        >>> bool(torch.allclose(w.mT @ w, torch.eye(4), atol=1e-5))
        True
    """

    def __init__(
        self, out_features: int, in_features: int, *, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features
        self.dtype = dtype

    def forward(self, raw: Tensor) -> Tensor:
        with torch.autocast(raw.device.type, enabled=False):
            a = raw.to(compute_dtype(raw, self.dtype))
            return cayley(a, self.out_features, self.in_features).to(raw.dtype)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, in_features={self.in_features}"
