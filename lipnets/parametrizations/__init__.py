"""Parametrizations for torch.nn.utils.parametrize, with their frozen presets."""

from lipnets.parametrizations.bcop import BCOPOrthogonal
from lipnets.parametrizations.orthogonal import (
    BJORCK_DEFAULT,
    BJORCK_EXPORT,
    BjorckConfig,
    BjorckOrthogonal,
    CayleyOrthogonal,
)

__all__ = [
    "BJORCK_DEFAULT",
    "BJORCK_EXPORT",
    "BCOPOrthogonal",
    "BjorckConfig",
    "BjorckOrthogonal",
    "CayleyOrthogonal",
]
