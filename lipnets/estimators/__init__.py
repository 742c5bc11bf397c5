"""Estimates of Lipschitz constants: lower bounds and empirical values that check bounds.

Nothing here is a bound. An *estimate* is a value the true Lipschitz constant is at
least (up to float rounding), or an approximation built on such values:
`power_iteration` and `jacobian_norm` evaluate $\\|Av\\| / \\|v\\|$ at the vector they
end on, `lower_bound` re-evaluates its best ratio or Jacobian norm at the points it
returns, and `autolip` and `seqlip` (Scaman & Virmaux 2018) compose per-layer power
iterations or SVDs and a combinatorial search. Estimates check the sound bounds of
`lipnets.bounds`; they never feed a certificate. `autolip` borrows the graph walk of
`lipnets.bounds` (only the leaf values differ); nothing in `lipnets.bounds` or
`lipnets.certify` imports this package.

`pgd_l2` (in `attack`) is an estimate of another kind: an $\\ell_2$ projected-gradient
attack that searches each input's ball for the lowest classification margin, to falsify
certified radii (a negative margin is a witness); it never proves robustness.
"""

from lipnets.estimators.attack import pgd_l2
from lipnets.estimators.autolip import autolip
from lipnets.estimators.lower import LowerBound, lower_bound
from lipnets.estimators.power import jacobian_norm, power_iteration
from lipnets.estimators.seqlip import seqlip

__all__ = [
    "LowerBound",
    "autolip",
    "jacobian_norm",
    "lower_bound",
    "pgd_l2",
    "power_iteration",
    "seqlip",
]
