"""The graph front end: one tracer, one op table, one trust policy, one faithfulness policy.

Every entry point that reads a model (`lipschitz_bound`, AutoLip, IBP/CROWN and
local bounds, certification, reports, `to_vanilla`) goes through this package:
[`trace`][lipnets.graph.trace] returns a checked, reusable
[`TracedGraph`][lipnets.graph.TracedGraph]; `classify` says what each op of it
is (`lipnets.graph.ops`); `trusted_owner` says when a module is a leaf whose
own rule is trusted (Note [Trust policy] in `lipnets.graph.policy`); the
faithfulness checks are Note [Graph faithfulness] in `lipnets.graph.faithful`.
A soundness rule written here holds for every consumer.

This package imports no rule registry: `lipnets.bounds` and
`lipnets.propagation` register their "who provides a rule for this class"
functions with `register_rule_provider`.
"""

from lipnets.graph.faithful import compare, flat_nodes, flat_tensors
from lipnets.graph.ops import (
    META_ATTRS,
    META_METHODS,
    OpSpec,
    classify,
    first_operand,
    operand,
)
from lipnets.graph.policy import (
    check_finite,
    check_model,
    hooks_of,
    method_owner,
    module_kind,
    register_rule_provider,
    replaced_on_instance,
    rule_decorator,
    rule_owner,
    trusted,
    trusted_owner,
    unwrap,
)
from lipnets.graph.trace import (
    TracedGraph,
    check_input_shape,
    reuse_traces,
    reusing,
    trace,
    trace_count,
    user_name,
)

__all__ = [
    "META_ATTRS",
    "META_METHODS",
    "OpSpec",
    "TracedGraph",
    "check_finite",
    "check_input_shape",
    "check_model",
    "classify",
    "compare",
    "first_operand",
    "operand",
    "flat_nodes",
    "flat_tensors",
    "hooks_of",
    "method_owner",
    "module_kind",
    "register_rule_provider",
    "replaced_on_instance",
    "reuse_traces",
    "reusing",
    "rule_decorator",
    "rule_owner",
    "trace",
    "trace_count",
    "trusted",
    "trusted_owner",
    "unwrap",
    "user_name",
]
