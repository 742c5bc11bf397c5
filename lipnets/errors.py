"""Typed errors and warnings raised by lipnets.

Each error subclasses the built-in exception a torch user would catch for the
same mistake (``ValueError`` for bad values, ``TypeError`` for unsupported
types), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "ArgumentTypeError",
    "ExportError",
    "InvalidModelError",
    "LipnetsError",
    "LipnetsWarning",
    "NonFiniteError",
    "ShapeRequiredError",
    "UnboundedModuleError",
    "UntraceableModelError",
]


class LipnetsError(Exception):
    """Base class of every error lipnets raises on purpose."""


class LipnetsWarning(UserWarning):
    """Base class of lipnets' warnings."""


class ArgumentTypeError(LipnetsError, TypeError, ValueError):
    """An argument has a type lipnets does not accept (a bool or a float for an int...).

    A ``TypeError``, and a ``ValueError`` too: before the validators were
    gathered in one place some raised one and some the other for such
    arguments, so both ``except`` clauses keep working.
    """


class UnboundedModuleError(LipnetsError, TypeError):
    """A module or graph operation has no sound Lipschitz bound rule.

    lipnets never assumes a constant for a part it cannot bound. The message
    names the part (its qualified module name and class, or its graph node) so
    that a rule can be registered with
    [`register_bound`][lipnets.bounds.register_bound] or a
    `lipschitz_bound(input_shape=None)` method added to the module.
    """


class UntraceableModelError(UnboundedModuleError):
    """torch.fx could not trace a model, so its graph cannot be composed.

    The message names the innermost module being traced when tracing failed:
    giving that module a `lipschitz_bound(input_shape=None)` method makes it a
    leaf that lipnets does not trace into.
    """


class ShapeRequiredError(LipnetsError, ValueError):
    """A bound depends on tensor shapes, but no ``input_shape`` was given."""


class NonFiniteError(LipnetsError, ValueError):
    """A parameter or buffer holds NaN or infinite values, so no finite bound exists.

    The message names the tensor (``"features.0.weight holds NaN values"``).
    """


class ExportError(LipnetsError, TypeError):
    """`to_vanilla` cannot export a module without changing the function it computes.

    The message names the module and why (a ``forward`` of its own under an inherited
    ``to_vanilla()``, or hooks).
    """


class InvalidModelError(LipnetsError, ValueError):
    """A model does not fit what an entry point needs: it fails on the given input shape,
    it mixes the samples of a batch, or it has no final linear layer for a last-layer
    certificate. The message names the model and what it needs."""
