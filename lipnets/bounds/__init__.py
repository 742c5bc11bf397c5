"""Sound Lipschitz bounds: per-module rules and their composition over the graph.

Everything here is a *bound*: a sound upper bound computed from the weights a
model has now, which certificates may rely on. Estimates (lower bounds) live
in `lipnets.estimators` and never feed this package.
"""

from lipnets.bounds import conv as _conv  # noqa: F401  (registers the convolution rules)
from lipnets.bounds import pool_rules as _pool_rules  # noqa: F401  (LPPool, pixel shuffles)
from lipnets.bounds import rules as _rules  # noqa: F401  (registers the built-in rules)
from lipnets.bounds.compose import (
    Composition,
    LeafBound,
    LeafValue,
    compose,
    last_linear,
    lipschitz_bound,
    own_bound,
    up,
)
from lipnets.bounds.registry import bound_rule, find_rule, register_bound
from lipnets.errors import ShapeRequiredError, UnboundedModuleError, UntraceableModelError

__all__ = [
    "Composition",
    "LeafBound",
    "LeafValue",
    "ShapeRequiredError",
    "UnboundedModuleError",
    "UntraceableModelError",
    "bound_rule",
    "compose",
    "find_rule",
    "last_linear",
    "lipschitz_bound",
    "own_bound",
    "register_bound",
    "up",
]
