"""Certified robustness from sound bounds: radii and certified accuracy.

A certificate here is only ever derived from a *bound* (a sound upper bound on a
Lipschitz constant, from `lipnets.bounds`), never from an estimate and never from
an assumed constant. See Note [Certified radius] in `lipnets.certify.lipschitz`.
"""

from lipnets.certify.lipschitz import certified_accuracy, certified_radius

__all__ = ["certified_accuracy", "certified_radius"]
