r"""Orthogonal linear layers: `BjorckLinear` and `CayleyLinear`.

Both are `nn.Linear` subclasses whose `weight` is a registered parametrization
(`torch.nn.utils.parametrize`), so optimisers, `state_dict`, `.to()` and
`torch.compile` treat them like any linear layer. Their weight has every
singular value 1 up to float rounding: orthonormal columns when
`out_features >= in_features` (the layer preserves norms), orthonormal rows
otherwise. Their `lipschitz_bound` is computed from the weight as realised,
in float64, so it is slightly above 1 rather than a nominal 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lipnets._checks import check_instance, check_int
from lipnets.functional.norms import spectral_norm_bound
from lipnets.functional.orthogonal import orthogonality_error
from lipnets.parametrizations.orthogonal import (
    BJORCK_DEFAULT,
    BjorckConfig,
    BjorckOrthogonal,
    CayleyOrthogonal,
    WeightConfig,
)

__all__ = ["BjorckLinear", "CayleyLinear"]


def _check_features(in_features: int, out_features: int) -> None:
    check_int(in_features, "in_features")
    check_int(out_features, "out_features")


class _OrthogonalLinear(nn.Linear):
    """What both orthogonal linear layers share: bound, error, export."""

    def lipschitz_bound(self, input_shape: Sequence[int] | None = None) -> Tensor:
        """Sound l2 → l2 bound: the realised weight's spectral norm, in float64.

        The weight is computed as the layer uses it (no cache) and its largest
        singular value is bounded by `lipnets.functional.spectral_norm_bound`.
        It does not depend on `input_shape`.

        Returns:
            A 0-dim float64 tensor, slightly above 1 (by the rounding of the
            weight), never a nominal 1.
        """
        with torch.no_grad():
            return spectral_norm_bound(self.weight, name=f"{type(self).__name__}.weight")

    def orthogonality_error(self) -> Tensor:
        r"""$\max_i |\sigma_i(W) - 1|$ of the realised weight, in float64."""
        with torch.no_grad():
            return orthogonality_error(self.weight)

    def to_vanilla(self) -> nn.Linear:
        """A plain `nn.Linear` holding the realised weight and the bias.

        The weight is computed now from the raw parameters (so it is correct
        right after `load_state_dict`, without a forward pass) and copied.
        """
        with torch.no_grad():
            weight = self.weight.detach().clone()
            linear = nn.Linear(
                self.in_features,
                self.out_features,
                bias=self.bias is not None,
                device=weight.device,
                dtype=weight.dtype,
            )
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(self.parametrizations.weight.original.requires_grad)
        if self.bias is not None:
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear.train(self.training)


def _reset_bias(layer: nn.Linear) -> None:
    """torch's default bias initialisation (a function, not a method: the trust policy
    lets a subclass of nn.Linear define only methods no forward calls)."""
    if layer.bias is not None:
        bound = 1 / math.sqrt(layer.in_features)
        nn.init.uniform_(layer.bias, -bound, bound)


class BjorckLinear(_OrthogonalLinear):
    r"""`nn.Linear` with an orthogonal weight from Björck–Bowie iterations.

    The weight is the orthogonal polar factor of a raw parameter (the
    orthogonal matrix nearest to it), computed by
    `lipnets.functional.bjorck` with the options of `config`. With
    `out_features >= in_features` the columns are orthonormal and the layer
    preserves norms ($\|Wx\| = \|x\|$, gradient norm preserving); otherwise the
    rows are orthonormal. In training the raw weight is kept on the orthogonal
    manifold, so one to three iterations per step suffice (Note [Bjorck
    reprojection] in `lipnets.parametrizations.orthogonal`).

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: whether to learn an additive bias.
        config: a `lipnets.parametrizations.BjorckConfig` preset
            (`BJORCK_DEFAULT` for training, `BJORCK_EXPORT` for a weight
            rounded from float64 iterations).
        device: as for `nn.Linear`.
        dtype: as for `nn.Linear`.

    Examples:
        >>> layer = BjorckLinear(16, 32, bias=False)
        >>> x = torch.randn(4, 16)
        >>> bool(torch.allclose(layer(x).norm(dim=1), x.norm(dim=1), rtol=1e-5))
        True
        >>> bool(abs(layer.lipschitz_bound() - 1) <= 1e-5)  # measured, may be just below 1
        True

    References:
        Björck, Å. & Bowie, C. (1971). An iterative algorithm for computing the
        best estimate of an orthogonal matrix. *SIAM J. Numer. Anal.* 8(2).
        Anil, C., Lucas, J. & Grosse, R. (2019). Sorting out Lipschitz function
        approximation. *ICML*.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        config: BjorckConfig = BJORCK_DEFAULT,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_features(in_features, out_features)
        check_instance(config, "config", BjorckConfig)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        parametrize.register_parametrization(
            self, "weight", BjorckOrthogonal(config, name="BjorckLinear.weight")
        )
        self.reset_parameters()

    config = WeightConfig()

    def reset_parameters(self) -> None:
        """Raw weight: a random (semi-)orthogonal matrix; bias as in `nn.Linear`."""
        if not parametrize.is_parametrized(self, "weight"):
            return super().reset_parameters()  # called by nn.Linear.__init__
        nn.init.orthogonal_(self.parametrizations.weight.original)
        _reset_bias(self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, order={self.config.order}, tol={self.config.tol:g}"


class CayleyLinear(_OrthogonalLinear):
    r"""`nn.Linear` with an orthogonal weight from the Cayley transform.

    The raw parameter is a square matrix $A$ of size
    $n = \max(\text{in}, \text{out})$; the weight is the leading
    `out_features` × `in_features` block of $(I - S/2)^{-1}(I + S/2)$, with
    $S$ the skew-symmetric matrix from the strict upper triangle of $A$
    (`lipnets.functional.cayley`). Orthonormal columns when
    `out_features >= in_features`, rows otherwise. The raw matrix starts with
    i.i.d. $N(0, 1/n)$ entries, which gives a well-mixed orthogonal matrix
    whose Cayley solve is well conditioned.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: whether to learn an additive bias.
        device: as for `nn.Linear`.
        dtype: as for `nn.Linear`.

    Examples:
        >>> layer = CayleyLinear(8, 3)
        >>> w = layer.weight
        >>> bool(torch.allclose(w @ w.mT, torch.eye(3), atol=1e-5))
        True
        >>> bool(abs(layer.lipschitz_bound() - 1) <= 1e-5)  # measured, may be just below 1
        True

    References:
        Trockman, A. & Kolter, J. Z. (2021). Orthogonalizing convolutional
        layers with the Cayley transform. *ICLR*.
        Lezcano-Casado, M. (2019). Trivializations for gradient-based
        optimization on manifolds. *NeurIPS* (geotorch).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_features(in_features, out_features)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        n = max(in_features, out_features)
        # The raw parameter is square; parametrize allows the shape change with unsafe=True.
        self.weight = nn.Parameter(torch.empty(n, n, device=device, dtype=dtype))
        parametrize.register_parametrization(
            self, "weight", CayleyOrthogonal(out_features, in_features), unsafe=True
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Raw matrix: i.i.d. $N(0, 1/n)$; bias as in `nn.Linear`."""
        if not parametrize.is_parametrized(self, "weight"):
            return super().reset_parameters()  # called by nn.Linear.__init__
        raw = self.parametrizations.weight.original
        nn.init.normal_(raw, std=1 / math.sqrt(raw.shape[0]))
        _reset_bias(self)
