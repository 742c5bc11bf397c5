"""Certified robustness from sound bounds: radii, certified accuracy, CROWN certificates.

Certified training (`lipnets.certify.training`: `CrownIBPLoss`, `IBPLoss`,
`CertifiedSchedule`) minimises a loss of the same bounds that certify.

A certificate here is only ever derived from a *bound*: a sound upper bound on a
Lipschitz constant (from `lipnets.bounds`; Note [Certified radius] in
`lipnets.certify.lipschitz`) or sound lower bounds of the margins over a ball (from
`lipnets.propagation`; Note [CROWN certificates] in `lipnets.certify.crown`), never
from an estimate and never from an assumed constant.
"""

from lipnets.certify.crown import certify_crown
from lipnets.certify.lipschitz import certified_accuracy, certified_radius
from lipnets.certify.training import (
    CertifiedSchedule,
    CrownIBPLoss,
    IBPLoss,
    certified_cross_entropy,
    worst_case_logits,
)
from lipnets.certify.wasserstein import wasserstein_estimate

__all__ = [
    "CertifiedSchedule",
    "CrownIBPLoss",
    "IBPLoss",
    "certified_accuracy",
    "certified_cross_entropy",
    "certified_radius",
    "certify_crown",
    "wasserstein_estimate",
    "worst_case_logits",
]
