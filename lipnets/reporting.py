"""Deprecated alias of `lipnets.reports`, kept so that existing imports keep working.

``from lipnets.reporting import report`` still works; new code imports from
`lipnets.reports` (or uses ``lipnets.report`` and ``lipnets.certification_report``).
The objects are the same; nothing here warns, because ``import lipnets`` imports
this module.
"""

from lipnets import reports as _reports
from lipnets.reports import *  # noqa: F403 - the alias re-exports the whole public API

__all__ = list(_reports.__all__)
