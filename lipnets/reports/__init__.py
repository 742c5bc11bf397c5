r"""Reports that put sound numbers next to the estimates that check them.

Two reports, one traced graph each (DESIGN.md, "Layout"):

- [`report`][lipnets.reports.guarantee.report] (``lipnets.report``): a
  model's sound Lipschitz bound, per leaf and composed over the graph, next to
  AutoLip, SeqLip and gradient-ascent lower bounds
  (`lipnets.reports.guarantee`);
- [`certification_report`][lipnets.reports.certification.certification_report]
  (``lipnets.certification_report``): the fractions certified by the Lipschitz
  bound and by CROWN next to the fraction an attack cannot break
  (`lipnets.reports.certification`).

Both are frozen dataclasses whose ``str()`` is a terminal table
(`lipnets.reports.render`). The package is ``reports`` (plural) because
``lipnets.report`` is the function.
"""

from lipnets.reports.certification import (
    CertificationReport,
    CertificationRow,
    certification_report,
)
from lipnets.reports.guarantee import GuaranteeReport, LayerReport, report

__all__ = [
    "CertificationReport",
    "CertificationRow",
    "GuaranteeReport",
    "LayerReport",
    "certification_report",
    "report",
]
