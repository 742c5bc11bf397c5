"""Export to plain torch modules: `to_vanilla`.

A trained lipnets model computes its constrained weights from raw parameters
on every call. `to_vanilla` returns a copy in which each such layer is a plain
torch module holding the weight it realises, so inference costs what the
plain module costs and the copy loads without lipnets' parametrizations.

The protocol is one method: a module with a `to_vanilla()` method is replaced
by what that method returns (a plain module computing the same function);
lipnets layers define it, and user layers may too. A torch module carrying
other parametrizations (`torch.nn.utils.parametrize`, e.g. torch's or
geotorch's orthogonal ones) keeps the value each parametrization realises,
through `parametrize.remove_parametrizations(..., leave_parametrized=True)`.
Stateless lipnets activations (GroupSort, MaxMin, FullSort) have no torch
equivalent and are kept as they are.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils import parametrize

from lipnets._state import freeze_parametrizations
from lipnets.errors import ExportError
from lipnets.graph import check_finite, hooks_of, method_owner, module_kind, trusted

__all__ = ["freeze_parametrizations", "to_vanilla"]


def to_vanilla(model: nn.Module) -> nn.Module:
    """Copy of `model` built from plain torch modules, computing the same function.

    Each module with a `to_vanilla()` method (`BjorckLinear`, `CayleyLinear`,
    ...) becomes the plain module it returns, e.g. an `nn.Linear` holding the
    orthogonalised weight and the bias, under the same name. Weights are
    computed from the raw parameters at export time, so the result is right
    immediately after `load_state_dict`, with no forward pass in between.
    Training mode and `requires_grad` flags are kept; a module shared between
    two places stays shared. The original model is not modified.

    Args:
        model: any `nn.Module`.

    Returns:
        A new module (the same class as `model` unless `model` itself is
        exported).

    Raises:
        TypeError: if `model` is not an `nn.Module`.
        ExportError: if a module with a ``to_vanilla()`` method computes something
            else than the class that wrote it (a subclass with its own ``forward``, a
            method replaced on the instance) or has forward hooks (Note [Trust policy]
            in `lipnets.graph.policy`).

    Examples:
        >>> import torch, lipnets
        >>> net = nn.Sequential(lipnets.nn.BjorckLinear(4, 8), lipnets.MaxMin())
        >>> plain = lipnets.to_vanilla(net)
        >>> type(plain[0]).__name__
        'Linear'
        >>> x = torch.randn(3, 4)
        >>> bool(torch.equal(plain(x), net.eval()(x)))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        check_finite(tensor, name)  # NonFiniteError: nothing to export faithfully
    return _convert(copy.deepcopy(model), {})


def _convert(module: nn.Module, memo: dict[int, nn.Module], name: str = "") -> nn.Module:
    key = id(module)
    if key in memo:
        return memo[key]
    export = getattr(module, "to_vanilla", None)
    if callable(export):
        _check_exportable(module, name)
        new = export()
        if not isinstance(new, nn.Module):
            raise TypeError(
                f"{type(module).__name__}.to_vanilla() must return an nn.Module, "
                f"got {type(new).__name__}"
            )
    else:
        new = module
        if parametrize.is_parametrized(new):
            freeze_parametrizations(new)
    memo[key] = new
    for child_name, child in list(new._modules.items()):  # named_children() skips repeats
        if child is not None:
            setattr(new, child_name, _convert(child, memo, f"{name}.{child_name}".lstrip(".")))
    return new


def _check_exportable(module: nn.Module, name: str) -> None:
    """A ``to_vanilla()`` method is written for its class's forward: refuse a module whose
    forward differs (Note [Trust policy] in `lipnets.graph.policy`), or that has hooks,
    which the returned plain module would not carry."""
    owner = method_owner(type(module), "to_vanilla")
    where = f"{name or 'the model'} ({module_kind(module)})"
    if hooks_of(module):
        raise ExportError(
            f"{where} has forward hooks, which its plain replacement would not run; remove "
            "them before to_vanilla()"
        )
    if owner is None or not trusted(module, owner):
        raise ExportError(
            f"{where} computes something else than the class whose to_vanilla() it "
            "inherits: its class defines its own forward (or a method forward "
            "calls), or a method is replaced on the instance; give the class its own "
            "to_vanilla()"
        )
