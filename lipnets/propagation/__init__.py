"""Bound propagation: IBP and CROWN over the traced graph, and local Lipschitz bounds.

`interval_bounds` and `crown_bounds` bound a model's outputs (or linear
functions of them) over an l-infinity or l2 ball around each input;
`local_lipschitz` bounds the l2 Lipschitz constant on such a ball, using the
activation patterns the propagated bounds fix. Everything here is a sound
bound (in exact arithmetic: Note [Floating-point rounding] in
`lipnets.propagation.lirpa`), computed from the weights the model has now.
"""

from lipnets.propagation import ops_grafted as _ops_grafted  # noqa: F401  (GraftedReLU's rule)
from lipnets.propagation import rules as _rules  # noqa: F401  (registers the module rules)
from lipnets.propagation.crown_ibp import crown_ibp_bounds
from lipnets.propagation.lirpa import Bounds, crown_bounds, interval_bounds
from lipnets.propagation.local import local_lipschitz
from lipnets.propagation.rules import register_propagation

__all__ = [
    "Bounds",
    "crown_bounds",
    "crown_ibp_bounds",
    "interval_bounds",
    "local_lipschitz",
    "register_propagation",
]
