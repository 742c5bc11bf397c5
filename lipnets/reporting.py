"""Deprecated alias of `lipnets.reports`, kept so that existing imports keep working.

``from lipnets.reporting import report`` still works; new code imports from
`lipnets.reports` (or uses ``lipnets.report`` and ``lipnets.certification_report``).
The objects are the same; nothing here warns, because ``import lipnets`` imports
this module.
"""

from lipnets.reports import (
    CertificationReport,
    CertificationRow,
    GuaranteeReport,
    LayerReport,
    certification_report,
    report,
)

__all__ = [
    "CertificationReport",
    "CertificationRow",
    "GuaranteeReport",
    "LayerReport",
    "certification_report",
    "report",
]
