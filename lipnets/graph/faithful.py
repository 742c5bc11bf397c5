"""The one faithfulness policy: the traced graph must compute what the model computes.

# Note [Graph faithfulness]

torch.fx records ``h += r`` as an out-of-place ``add`` and ignores what Python
does besides tensor operations, so a traced graph can differ from the model
when a tensor is updated in place and read again through another name, or when
``forward`` keeps state. Every entry point goes through these checks (in
`lipnets.graph.trace`), and refuses with
[`UntraceableModelError`][lipnets.errors.UntraceableModelError]:

1. **In the graph**, an in-place op (``x.add_``, ``operator.iadd``,
   ``inplace=True``, ``nn.ReLU(inplace=True)``; only torch.nn's own classes'
   flags count) is accepted only on a *fresh* tensor (one an op just produced,
   or an unshared view of one) that nothing else reads.
2. **In the source** of every Python function the trace ran (``forward``, the
   helpers and decorators it calls, wherever they are written; torch's,
   lipnets' and the standard library's own code aside), augmented assignment
   and attribute or item writes are refused: they are what fx may record
   differently. Code whose source cannot be read is refused too. This holds
   with or without an input shape.
3. **In eager mode**, whenever an input is known (``input_shape``, or the batch
   of a propagation call): the model runs once under a `TorchFunctionMode` that
   records every in-place update wherever it is written (inside a graph leaf,
   only updates of the leaf's inputs count), and the count must equal the
   number of in-place updates the graph accepted; parameters, buffers and plain
   tensor or number attributes of every submodule must be unchanged
   (`StateSnapshot`, taken before tracing), but for the state of the
   parametrizations whose values the graph realises (Note [Realised
   parametrizations] in `lipnets.graph.realise`), which is saved before the run
   and restored after it; and the graph's output must equal
   the model's, per sample, to $\\sqrt{\\epsilon}$ of the dtype (`compare`).

Random inputs for these checks come from a private ``torch.Generator``; the
global RNG is never read or reset. Dropout layers in training mode are put in
eval mode for the comparison only (both runs would draw different masks).

What no check here can see: a forward that takes another path when traced
(``isinstance(h, Tensor)``, ``torch.fx.is_fx_tracing()``, ``try``/``except``
around tensor code), work done in another thread or with torch function modes
disabled, writes through setters such as ``h.real = ...``, and state kept in
private attributes or containers.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.overrides import TorchFunctionMode

from lipnets.errors import UntraceableModelError
from lipnets.graph.ops import classify, first_operand

__all__ = [
    "InPlaceAudit",
    "StateSnapshot",
    "check_inplace",
    "compare",
    "flat_nodes",
    "flat_tensors",
    "written",
]


def flat_tensors(value: Any) -> list[Tensor]:
    """The tensors in a (nested) tuple, list or dict."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flat_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flat_tensors(v)]
    return []


def flat_nodes(value: Any) -> list[fx.Node]:
    """The fx nodes in a (nested) argument structure."""
    found: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: found.append(n) or n)
    return found


class StateSnapshot:
    """Parameters, buffers and plain tensor or number attributes of every submodule (but
    those in ``skip``, by ``id``)."""

    def __init__(self, root: nn.Module, skip: frozenset[int] = frozenset()) -> None:
        self.items: list[tuple[str, Any, Any]] = []
        for prefix, module in root.named_modules():
            if id(module) in skip:  # a realised parametrization's state, restored after a run
                continue
            values = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            values += [
                (k, v)
                for k, v in vars(module).items()
                if not k.startswith("_") and isinstance(v, (Tensor, int, float))
            ]
            for key, value in values:
                copy = value.detach().clone() if isinstance(value, Tensor) else value
                label = f"{prefix}.{key}".removeprefix("0").removeprefix(".")
                self.items.append((label, (module, key, value), copy))

    def check(self, name: str) -> None:
        for where, (module, key, value), copy in self.items:
            now = getattr(module, key, None)
            changed = now is not value
            if isinstance(value, Tensor) and not changed:
                changed = now.shape != copy.shape or not torch.equal(now.detach(), copy)
            if changed:
                raise UntraceableModelError(
                    f"{name}.forward changes {where!r}: a traced graph would hold one value of "
                    "it while the model uses another (Note [Graph faithfulness])"
                )


_INPLACE_DUNDERS = {
    "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
    "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
    "__irshift__", "__setitem__",
}  # fmt: skip


def written(func: Any, args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors a torch call writes into: ``x.add_``, ``x += y``, ``out=``, ``inplace=``."""
    name = getattr(func, "__name__", "")
    first = [args[0]] if args and isinstance(args[0], Tensor) else []
    schema = getattr(func, "_schema", None)  # torch.ops.aten.add_.Tensor and the like
    if schema is not None:
        found = []
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                found += flat_tensors(value)
        return found
    if name in _INPLACE_DUNDERS or name == "__set__":  # __set__: `h.data = ...`
        return first
    if name.endswith("_") and not name.endswith("__"):
        return first
    out = kwargs.get("out")
    if out is not None:
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [t for t in outs if isinstance(t, Tensor)]
    if getattr(func, "__module__", "") == "torch.nn.functional":
        try:
            bound = inspect.signature(func).bind(*args, **kwargs)
        except (TypeError, ValueError):
            return []
        if bound.arguments.get("inplace"):
            return first
    return []


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


class InPlaceAudit(TorchFunctionMode):
    """Records the in-place updates of an eager forward (Note [Graph faithfulness]).

    Inside a leaf module (a node of the graph), only updates of the memory of its
    inputs count: its own temporaries are its business. Use as a context manager
    and call `close` afterwards to remove its hooks.
    """

    def __init__(self, leaves: list[nn.Module]) -> None:
        super().__init__()
        self.found: list[str] = []
        self.scopes: list[set[int]] = []
        self.handles = []
        for module in leaves:
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, module: nn.Module, args: Any) -> None:
        self.scopes.append({_storage(t) for t in flat_tensors(args)})

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.scopes.pop()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for target in written(func, args, kwargs):
            if not self.scopes or _storage(target) in self.scopes[-1]:
                self.found.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


def compare(out: Any, reference: Any, name: str, where: str) -> None:
    """Refuse unless ``out`` equals ``reference`` per sample, to sqrt(eps) of the dtype."""
    outs, refs = flat_tensors(out), flat_tensors(reference)
    same = len(outs) == len(refs) and (len(refs) > 0 or out is None)
    for got, ref in zip(outs, refs, strict=False):
        same = same and _close(got.detach(), ref.detach())
    if not same:
        raise UntraceableModelError(
            f"the graph torch.fx traced from {name} does not compute what the model computes "
            f"{where} (Note [Graph faithfulness]): an in-place update such as `x += ...` of a "
            "tensor used again, Python-side state, or a module whose forward differs from its "
            "class's? Give the module that does this a `lipschitz_bound` method"
        )


def _close(got: Tensor, ref: Tensor) -> bool:
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return False
    if not ref.numel():
        return True
    if torch.equal(got, ref):  # the usual case, one pass
        return True
    if not ref.is_floating_point():
        return False
    tol = math.sqrt(torch.finfo(ref.dtype).eps)
    # Per sample: a large output of one sample must not hide a mismatch in another.
    rows = ref.shape[0] if ref.ndim else 1
    r, g = ref.reshape(rows, -1), got.reshape(rows, -1)
    size = torch.where(torch.isfinite(r), r.abs(), torch.zeros_like(r))
    atol = tol * (1.0 + size.amax(dim=1, keepdim=True))
    close = ((g - r).abs() <= atol) | (g == r)  # == : infinities of one sign
    close |= torch.isnan(g) & torch.isnan(r)
    return bool(close.all())


# Torch modules whose output is always a new tensor (never their input or a view of it).
_FRESH_MODULES = (
    nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
)  # fmt: skip
_NEW_KINDS = {
    "add", "sub", "mul", "div", "neg", "maxmin", "clamp", "cat", "linear", "conv",
    "elementwise", "reduce", "sort",
}  # fmt: skip
_VIEW_KINDS = {"copy", "getitem", "alias", "replicate"}


def _inplace_module(module: nn.Module) -> bool:
    """torch.nn's own classes honour their ``inplace`` flag; nobody else's counts."""
    return type(module).__module__.startswith("torch.nn.") and bool(
        getattr(module, "inplace", False)
    )


def check_inplace(graph: Any) -> int:
    """Rule 1 of Note [Graph faithfulness]; returns the number of accepted in-place ops."""
    fresh: set[fx.Node] = set()
    accepted = 0
    for node in graph.gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if node.op == "call_module":
            module = graph.module(node)
            inplace = _inplace_module(module)
            new = not inplace and type(module).__module__.startswith("torch.nn.")
            new = new and isinstance(module, _FRESH_MODULES)
            kind = None
        else:
            spec = classify(node)
            inplace = spec is not None and spec.inplace
            kind = spec.kind if spec is not None else None
            new = (kind in _NEW_KINDS and not inplace) or (kind == "alias" and spec.name == "clone")
        source = first_operand(node)
        if inplace:
            others = [u for u in getattr(source, "users", {}) if u is not node]
            if not isinstance(source, fx.Node) or others or source not in fresh:
                users = ", ".join(repr(u.name) for u in others) or "an alias"
                name = getattr(source, "name", "an operand")
                raise UntraceableModelError(
                    f"{graph.where(node)} modifies '{name}' in place, and that memory is also "
                    f"reached through {users}; a traced graph cannot follow in-place updates "
                    "there (Note [Graph faithfulness]), so use the out-of-place version"
                )
            accepted += 1
            if len(source.users) == 1:
                fresh.add(node)  # the updated fresh tensor, read once more at most
        elif new:
            fresh.add(node)
        elif kind in _VIEW_KINDS and isinstance(source, fx.Node):
            # An unshared view of a fresh tensor: updating it changes nothing another
            # node reads (Linear -> Dropout -> ReLU(inplace=True)).
            if source in fresh and len(source.users) == 1:
                fresh.add(node)
        elif node.op == "call_module" and isinstance(source, fx.Node):
            if source in fresh and len(source.users) == 1 and _passes_through(graph.module(node)):
                fresh.add(node)
    return accepted


def _passes_through(module: nn.Module) -> bool:
    """torch.nn modules that return their input or a view of it (Identity, Dropout, Flatten)."""
    return type(module).__module__.startswith("torch.nn.") and isinstance(
        module, (nn.Identity, nn.modules.dropout._DropoutNd, nn.Flatten, nn.Unflatten)
    )
