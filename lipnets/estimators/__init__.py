"""Estimates of Lipschitz constants: lower bounds and empirical values that check bounds.

Nothing here is a bound. An *estimate* is a value the true Lipschitz constant is at
least (up to float rounding): `power_iteration` and `jacobian_norm` evaluate
$\\|Av\\| / \\|v\\|$ at the vector they end on, and `lower_bound` re-evaluates its
best ratio or Jacobian norm at the points it returns. Estimates check the sound
bounds of `lipnets.bounds`; they never feed a certificate, and this package never
imports `lipnets.bounds`.
"""

from lipnets.estimators.lower import LowerBound, lower_bound
from lipnets.estimators.power import jacobian_norm, power_iteration

__all__ = ["LowerBound", "jacobian_norm", "lower_bound", "power_iteration"]
