"""Traced forms: the functions fx records in place of a module's ``forward``.

# Note [Traced forms]

Some modules compute a function lipnets has rules for, but their ``forward`` is
written in a way torch.fx cannot trace: deel-torchlip's ``GroupSort`` branches on
``input.shape[dim]``, its ``MaxMin`` on ``len(input.shape)``. A *traced form* is a
function ``form(module, *args)`` that computes exactly the same function from
the module's attributes with ops of the op table (`lipnets.graph.ops`); the
tracer records it instead of ``forward`` (torch's own classes have their table,
``TRACED_TORCH_MODULES``). Every consumer then bounds and propagates the ops of
the form, so a form needs no rule of its own.

A form is written for one class's ``forward``, so the trust policy (Note [Trust
policy] in `lipnets.graph.policy`) decides when it applies: the class that
registered it, or a subclass that defines no methods of its own; hooks and
methods replaced on the instance are refused for every module anyway. Whenever
an input shape is known, the eager check of Note [Graph faithfulness] compares
the graph (with the form) against the model (with its own ``forward``), and the
tests of each form compare it with the peer's module bit for bit.

Forms for other libraries' classes live in `lipnets.interop`, one module per
library, imported the first time `trace` meets a class of that library
(`load_peers`): lipnets imports no peer library that the user's model does not
use. `register_peer` adds a library to that table. A form replicates the code of
one version of its library: `register_checked_form` registers it only while the
source text of the functions it replicates is the one it was checked against
(`source_digest`), and otherwise warns and lets the tracer follow ``forward`` (a
trace that fails, or a graph that the eager check compares with the model).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import textwrap
import threading
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from lipnets.errors import LipnetsWarning
from lipnets.graph import policy

__all__ = [
    "form_of",
    "load_peers",
    "register_checked_form",
    "register_peer",
    "register_traced_form",
    "source_digest",
]

_FORMS: dict[type, Callable[..., Any]] = {}
_PEERS: dict[str, str] = {
    "deel.torchlip": "lipnets.interop.torchlip",
    "orthogonium": "lipnets.interop.orthogonium",
}
"""A library's top-level module path -> the lipnets module holding its forms."""
_LOADED: set[str] = set()
_SEEN: set[type] = set()
_LOCK = threading.Lock()


def register_traced_form(cls: type[nn.Module], form: Callable[..., Any]) -> None:
    """Record ``form(module, *args)`` in place of ``cls.forward`` when tracing (Note [Traced
    forms]); the form must compute exactly what ``cls.forward`` computes.

    Args:
        cls: an ``nn.Module`` subclass.
        form: a function of the module and ``forward``'s arguments, written with ops that
            the op table classifies.

    Raises:
        TypeError: if ``cls`` is not an ``nn.Module`` subclass or ``form`` is not callable.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_traced_form() takes an nn.Module subclass, got {cls!r}")
    if not callable(form):
        raise TypeError(f"register_traced_form() takes a callable form, got {form!r}")
    with policy._LOCK:
        _FORMS[cls] = form
        policy._VERSION[0] += 1  # a cached trace may have followed forward instead


def source_digest(*functions: Callable[..., Any]) -> str | None:
    """The sha256 of the source text of ``functions`` (None when one cannot be read)."""
    try:
        text = "\n".join(textwrap.dedent(inspect.getsource(f)) for f in functions)
    except (OSError, TypeError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def register_checked_form(
    cls: type[nn.Module],
    form: Callable[..., Any],
    replicates: tuple[Callable[..., Any], ...],
    digest: str,
) -> bool:
    """`register_traced_form` when the source of ``replicates`` (the peer's ``forward`` and
    the functions it calls) still has ``digest``, the one the form was checked against;
    otherwise warn and register nothing (Note [Traced forms]). Returns whether it did."""
    found = source_digest(*replicates)
    if found != digest:
        warnings.warn(
            f"lipnets has no traced form for {cls.__module__}.{cls.__qualname__}: its code "
            "differs from the version lipnets' form was checked against (another release?), "
            "so lipnets traces its forward as written",
            LipnetsWarning,
            stacklevel=2,
        )
        return False
    register_traced_form(cls, form)
    return True


def form_of(module: nn.Module) -> Callable[..., Any] | None:
    """The traced form that stands for ``module.forward``, when the trust policy lets it."""
    cls = type(module)
    owner = next((base for base in cls.__mro__ if base in _FORMS), None)
    if owner is None or not policy.trusted(module, owner):
        return None
    return _FORMS[owner]


def register_peer(package: str, module: str) -> None:
    """Import ``module`` (which registers forms or rules) the first time `trace` meets a
    class defined in ``package`` or one of its submodules (Note [Traced forms]).

    Examples:
        >>> from lipnets.graph.forms import register_peer
        >>> register_peer("orthogonium", "lipnets.interop.orthogonium")  # already listed
    """
    if not (isinstance(package, str) and package and isinstance(module, str) and module):
        raise TypeError(
            f"register_peer() takes two non-empty module paths, got {package!r}, {module!r}"
        )
    with _LOCK:
        _PEERS[package] = module
        _SEEN.clear()


def load_peers(model: nn.Module) -> None:
    """Import the `lipnets.interop` module of every peer library a class of ``model`` comes
    from, once per process (Note [Traced forms])."""
    for module in model.modules():
        cls = type(module)
        if cls in _SEEN:
            continue
        for base in cls.__mro__:
            name = base.__module__
            for package, target in list(_PEERS.items()):
                if (name == package or name.startswith(package + ".")) and target not in _LOADED:
                    importlib.import_module(target)
                    with _LOCK:
                        _LOADED.add(target)
        with _LOCK:
            _SEEN.add(cls)
