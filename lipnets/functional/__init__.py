"""Pure tensor maths with no state: activations and sound norm bounds."""

from lipnets.functional.activations import full_sort, group_sort, max_min
from lipnets.functional.norms import spectral_norm_bound

__all__ = ["full_sort", "group_sort", "max_min", "spectral_norm_bound"]
