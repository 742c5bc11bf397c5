"""The fx tracer of the front end: leaves by the trust policy, safe for other threads.

# Note [Tracing and threads]

``torch.fx.Tracer.trace`` patches ``torch.nn.Module.__call__`` and
``__getattr__`` for the whole process while it runs, so a forward pass in
another thread would otherwise be recorded into this trace (and fail with
"module is not installed as a submodule"). The tracer here answers calls
from any thread but its own by running the module as usual, and one lock
keeps two traces from patching the same methods at once (their patches would
be undone in the wrong order).

The tracer also records where each op was written (fx's stack traces), so
that the source of every function that produced an op, and the ``forward`` of
every module traced into, can be checked (Note [Graph faithfulness] in
`lipnets.graph.faithful`).
"""

from __future__ import annotations

import ast
import functools
import inspect
import linecache
import math
import os
import re
import sysconfig
import threading
from collections.abc import Callable

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

import lipnets
import lipnets.functional as LF
from lipnets.errors import UntraceableModelError
from lipnets.functional import activations as activations_module
from lipnets.graph.forms import form_of
from lipnets.graph.ops import TRACED_TORCH_MODULES

__all__ = ["TRACE_LOCK", "Tracer", "functions_run", "mutation_in", "trace_graph"]

TRACE_LOCK = threading.RLock()
"""Held while a trace patches torch.nn.Module (Note [Tracing and threads])."""

_SKIPPED_DIRS = tuple(
    os.path.normcase(os.path.realpath(d)) + os.sep
    for d in {
        os.path.dirname(torch.__file__),
        os.path.dirname(lipnets.__file__),
        sysconfig.get_paths()["stdlib"],
        sysconfig.get_paths()["platstdlib"],
    }
)


class Tracer(fx.Tracer):
    """fx tracer whose leaves are the modules ``is_leaf`` trusts (and torch.nn's own)."""

    def __init__(self, is_leaf: Callable[[nn.Module], bool]) -> None:
        super().__init__(autowrap_modules=(math, activations_module, LF))
        self.is_leaf = is_leaf
        self.thread = threading.get_ident()
        self.stack: list[tuple[str, str]] = []
        self.failed_in: list[tuple[str, str]] | None = None
        self.traced: list[nn.Module] = []
        self.record_stack_traces = True  # where each op was written (Note [Graph faithfulness])

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Trusted modules, and torch.nn's own classes (not a user's subclass of them, nor
        a user class that parametrize wrapped: its class lives in torch.nn.utils)."""
        if self.is_leaf(m):
            return True
        cls = type(m)
        if parametrize.is_parametrized(m) and cls.__name__.startswith("Parametrized"):
            cls = cls.__bases__[0]
        torch_class = cls.__module__.startswith(("torch.nn.", "torch.ao.nn."))
        return torch_class and not isinstance(m, nn.Sequential) and cls not in TRACED_TORCH_MODULES

    def call_module(self, m, forward, args, kwargs):  # type: ignore[override]
        if threading.get_ident() != self.thread:  # another thread's forward: run it
            return forward(*args, **kwargs)
        self.stack.append((self.path_of_module(m), type(m).__name__))
        if not self.is_leaf_module(m, self.stack[-1][0]):
            self.traced.append(m)
            # torch's table, or a registered class's form (Note [Traced forms])
            form = TRACED_TORCH_MODULES.get(type(m)) or form_of(m)
            if form is not None:
                forward = functools.partial(form, m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.stack)
            raise
        finally:
            self.stack.pop()

    def getattr(self, attr, attr_val, parameter_proxy_cache):  # type: ignore[override]
        if threading.get_ident() != self.thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def trace_module(self, root: nn.Module) -> fx.Graph:
        with TRACE_LOCK:
            return self.trace(root)


def trace_graph(
    root: nn.Module, is_leaf: Callable[[nn.Module], bool], name: str
) -> tuple[fx.GraphModule, Tracer]:
    """Trace ``root`` (``nn.Sequential(model)``: one placeholder, the model called with
    its defaulted arguments as Python constants) into a GraphModule."""
    if getattr(parametrize, "_cache_enabled", 0) and any(
        parametrize.is_parametrized(m) for m in root.modules()
    ):
        # Inside cached(), reading a parametrized tensor returns (and stores) a cached value:
        # the trace would freeze a weight, or leave its proxy in torch's global cache.
        raise UntraceableModelError(
            "lipnets cannot trace a model with parametrizations while "
            "torch.nn.utils.parametrize.cached() is active (the trace would read cached "
            "weights instead of the parametrizations); call lipnets outside that context"
        )
    tracer = Tracer(is_leaf)
    try:
        graph = tracer.trace_module(root)
    except Exception as exc:
        path = [p for p in tracer.failed_in or [] if p[0] not in ("", "0")]
        where = f"{_user(path[-1][0])} ({path[-1][1]})" if path else f"the model ({name})"
        if isinstance(exc, NameError) and "not installed as a submodule" in str(exc):
            raise UntraceableModelError(
                f"the forward of {where} calls a module that is not one of the model's "
                "submodules (held in a global, a closure or a plain list or dict), whose "
                "weights torch.fx cannot read from the model; make it a submodule "
                "(`self.f = f`, or an nn.ModuleList / nn.ModuleDict)"
            ) from exc
        raise UntraceableModelError(
            f"torch.fx could not trace {where}: {type(exc).__name__}: {exc}. Give that module a "
            "`lipschitz_bound(self, input_shape=None)` method returning a sound bound, so that "
            "lipnets treats it as a leaf instead of tracing into it"
        ) from exc
    return fx.GraphModule(tracer.root, graph), tracer


def _user(qualname: str) -> str:
    return qualname.removeprefix("0.")


_FRAME = re.compile(r'File "(?P<file>.+?)", line (?P<line>\d+), in (?P<name>\S+)')


def functions_run(gm: fx.GraphModule, traced: list[nn.Module]) -> list[tuple[str, int, str]]:
    """(file, line, name) of the Python functions the trace ran: the ``forward`` of every
    module traced into, and each function on the stack when an op was recorded (helpers,
    decorators), torch's, lipnets' and the standard library's own code aside."""
    found: dict[tuple[str, int, str], None] = {}
    for module in traced:
        forward = type(module).forward
        code = getattr(inspect.unwrap(forward), "__code__", None)
        if code is not None:
            found[(code.co_filename, code.co_firstlineno, code.co_name)] = None
    for node in gm.graph.nodes:
        for match in _FRAME.finditer(node.stack_trace or ""):
            found[(match["file"], int(match["line"]), match["name"])] = None
    return [f for f in found if not _skipped(f[0])]


def _skipped(filename: str) -> bool:
    if filename.startswith("<frozen"):
        return True
    if filename.startswith("<"):
        return False
    path = os.path.normcase(os.path.realpath(filename))
    return path.startswith(_SKIPPED_DIRS)


_TREES: dict[str, ast.Module | None] = {}
_SCANS: dict[tuple[str, int, str], str | None] = {}


def mutation_in(functions: list[tuple[str, int, str]]) -> tuple[str, str] | None:
    """The first function whose source writes state or updates in place, as (function,
    construct); ``construct`` is the offending statement, or a sentence saying the source
    cannot be read."""
    for function in functions:
        if function not in _SCANS:
            _SCANS[function] = _scan(*function)
        found = _SCANS[function]
        if found is not None:
            return function[2], found
    return None


def _tree(filename: str) -> ast.Module | None:
    if filename not in _TREES:
        lines = linecache.getlines(filename)
        try:
            _TREES[filename] = ast.parse("".join(lines)) if lines else None
        except SyntaxError:
            _TREES[filename] = None
    return _TREES[filename]


def _scan(filename: str, line: int, name: str) -> str | None:
    tree = _tree(filename)
    if tree is None:
        return "code whose source cannot be read"
    if name == "<lambda>":
        return None  # a lambda's body is one expression: no assignment statement fits in it
    # The innermost function around the line (its definition line for a forward).
    best = None
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([n.lineno, *(d.lineno for d in n.decorator_list)])
            if start <= line <= (n.end_lineno or n.lineno):
                if best is None or n.lineno >= best.lineno:
                    best = n
    if best is None:
        return None  # module-level code (a lambda at top level): statements cannot hide there
    for n in ast.walk(best):
        bad = isinstance(n, ast.AugAssign) or (
            isinstance(n, (ast.Assign, ast.AnnAssign))
            and any(
                isinstance(t, (ast.Attribute, ast.Subscript))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            )
        )
        if bad:
            return f"`{ast.unparse(n)}`"
    return None
