"""lipnets: Lipschitz-by-construction layers for PyTorch, with sound bounds.

The public API is curated here. A *bound* (from [`lipnets.bounds`][lipnets.bounds])
is a sound upper bound on a Lipschitz constant, computed from the weights a
model actually has; an *estimate* (from `lipnets.estimators`) is a lower bound
that only checks it.
"""

from lipnets import (
    bounds,
    certify,
    errors,
    estimators,
    export,
    functional,
    graft,
    losses,
    nn,
    parametrizations,
    propagation,
    reporting,
)
from lipnets._version import __version__
from lipnets.bounds import lipschitz_bound, register_bound
from lipnets.errors import ShapeRequiredError, UnboundedModuleError, UntraceableModelError
from lipnets.export import to_vanilla
from lipnets.nn import (
    BCOPConv2d,
    BjorckLinear,
    CayleyConv2d,
    CayleyLinear,
    FullSort,
    GraftedReLU,
    GroupSort,
    InvertibleDownsample,
    L2NormPool2d,
    MaxMin,
)
from lipnets.reports import (
    CertificationReport,
    GuaranteeReport,
    LayerReport,
    certification_report,
    report,
)

__all__ = [
    "BCOPConv2d",
    "BjorckLinear",
    "CayleyConv2d",
    "CayleyLinear",
    "CertificationReport",
    "FullSort",
    "GraftedReLU",
    "GroupSort",
    "GuaranteeReport",
    "InvertibleDownsample",
    "L2NormPool2d",
    "LayerReport",
    "MaxMin",
    "ShapeRequiredError",
    "UnboundedModuleError",
    "UntraceableModelError",
    "__version__",
    "bounds",
    "certification_report",
    "certify",
    "errors",
    "estimators",
    "export",
    "functional",
    "graft",
    "lipschitz_bound",
    "losses",
    "nn",
    "parametrizations",
    "propagation",
    "register_bound",
    "reporting",
    "report",
    "to_vanilla",
]
