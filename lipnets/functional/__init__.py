"""Pure tensor maths with no state: activations, orthogonalisation, sound norm bounds."""

from lipnets.functional.activations import full_sort, group_sort, max_min
from lipnets.functional.margins import binary_signs, class_indices, margin
from lipnets.functional.norms import spectral_norm_bound
from lipnets.functional.orthogonal import bjorck, bjorck_retraction, cayley, orthogonality_error

__all__ = [
    "binary_signs",
    "bjorck",
    "bjorck_retraction",
    "cayley",
    "class_indices",
    "full_sort",
    "group_sort",
    "margin",
    "max_min",
    "orthogonality_error",
    "spectral_norm_bound",
]
