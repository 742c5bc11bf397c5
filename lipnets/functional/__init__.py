"""Pure tensor maths with no state: activations, orthogonalisation, sound norm bounds."""

from lipnets.functional.activations import full_sort, group_sort, max_min
from lipnets.functional.norms import spectral_norm_bound
from lipnets.functional.orthogonal import bjorck, bjorck_retraction, cayley, orthogonality_error

__all__ = [
    "bjorck",
    "bjorck_retraction",
    "cayley",
    "full_sort",
    "group_sort",
    "max_min",
    "orthogonality_error",
    "spectral_norm_bound",
]
