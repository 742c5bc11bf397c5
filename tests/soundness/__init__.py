"""Red-team soundness suite (issue 15).

`constructions` holds a table of named models built to slip past lipnets'
trust and faithfulness policies (subclasses, hooks, instance-replaced methods,
merges with broadcasting constants, input-dependent fills, in-place updates,
NaN parameters, wrong shapes) plus honest positive controls.
`test_entry_points` runs every construction through every entry point that
reads a model, each with one strict checker: a refusal must be a typed
`lipnets.errors.LipnetsError`; anything returned must be sound against an
independent measurement (float64 Jacobians and difference quotients, sampled
balls, `pgd_l2` attacks, exported outputs).
"""
