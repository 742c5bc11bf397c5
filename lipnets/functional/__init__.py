"""Pure tensor maths with no state: activations, orthogonalisation, pooling, sound norm bounds."""

from lipnets.functional.activations import full_sort, group_sort, max_min
from lipnets.functional.margins import binary_signs, class_indices, margin, margin_spec
from lipnets.functional.norms import spectral_norm_bound
from lipnets.functional.orthogonal import bjorck, bjorck_retraction, cayley, orthogonality_error
from lipnets.functional.pooling import (
    l2_norm_pool2d,
    l2_norm_pool2d_lipschitz_bound,
    max_window_cover,
)

__all__ = [
    "binary_signs",
    "bjorck",
    "bjorck_retraction",
    "cayley",
    "class_indices",
    "full_sort",
    "group_sort",
    "l2_norm_pool2d",
    "l2_norm_pool2d_lipschitz_bound",
    "margin",
    "margin_spec",
    "max_min",
    "max_window_cover",
    "orthogonality_error",
    "spectral_norm_bound",
]
