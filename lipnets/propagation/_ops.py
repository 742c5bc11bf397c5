"""The operations of a propagation graph, in one namespace.

Each idea has its module: `lipnets.propagation.ops_base` (the `Op` contract,
`Elementwise` and `ReLU`), `lipnets.propagation.ops_affine` (single-input
affine operations, Note [Interval rules]), `lipnets.propagation.ops_structural`
(`Gather`, `LinearCombination`, `Reduce`), `lipnets.propagation.ops_compare`
(comparator layers and `sorting_network`) and
`lipnets.propagation.ops_elementwise` (tanh, sigmoid, GELU, SiLU, and
LeakyReLU's `LeakyCombination`). The graph builder, the rules and the
propagation read them all from here as ``_ops.X``.
"""

from lipnets.propagation.ops_affine import (
    Affine,
    BatchNorm,
    CircularConv,
    Conv,
    Linear,
    ModuleLinear,
)
from lipnets.propagation.ops_base import (
    Coeffs,
    Elementwise,
    Op,
    Relaxation,
    ReLU,
    _bias_term,
    _rows,
    relu_relaxation,
)
from lipnets.propagation.ops_compare import (
    Compare,
    Difference,
    _with,
    sorting_network,
)
from lipnets.propagation.ops_elementwise import (
    GELU,
    LeakyCombination,
    Sigmoid,
    SiLU,
    SShaped,
    Tanh,
    Unimodal,
)
from lipnets.propagation.ops_structural import (
    Gather,
    LinearCombination,
    Reduce,
)

# Re-exported: every name of the operation modules that the package reads as ``_ops.X``.
__all__ = [
    "Affine",
    "BatchNorm",
    "CircularConv",
    "Conv",
    "Linear",
    "ModuleLinear",
    "Coeffs",
    "Elementwise",
    "Op",
    "Relaxation",
    "ReLU",
    "_bias_term",
    "_rows",
    "relu_relaxation",
    "Compare",
    "Difference",
    "_with",
    "sorting_network",
    "GELU",
    "LeakyCombination",
    "Sigmoid",
    "SiLU",
    "SShaped",
    "Tanh",
    "Unimodal",
    "Gather",
    "LinearCombination",
    "Reduce",
]
