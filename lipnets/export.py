r"""Export to plain torch modules (`to_vanilla`) and to ONNX (`to_onnx`).

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

`to_onnx` exports `to_vanilla(model)` with torch's ONNX exporter and, by default,
runs the result in onnxruntime on the example and compares it with the model.

# Note [ONNX exporter choice]

torch has two ONNX exporters. The dynamo one (``torch.onnx.export(...,
dynamo=True)``: torch.export, then onnxscript) exports every layer of
`lipnets.nn` after `to_vanilla`, including the complex FFT products of
`FrequencyConv2d` (as ONNX ``DFT``). The TorchScript one (``dynamo=False``,
deprecated since torch 2.9) has no complex tensors: it refuses
`FrequencyConv2d` (``aten::view_as_complex``) and, before `to_vanilla`, the
``mT`` of the Björck iteration. `to_onnx` uses the dynamo exporter and falls
back to the TorchScript one, with a warning, only when the dynamo one fails
(torch older than 2.5, a model torch.export cannot capture); passing
``dynamo=True`` or ``dynamo=False`` picks one with no fallback. The ONNX model
records which one ran in its ``metadata_props`` (key ``lipnets.exporter``). A
lipnets model exported without `to_vanilla` fails under both: the dynamo exporter
stops at a data-dependent guard of the orthogonalisation, the TorchScript one at
``mT``.

# Note [ONNX export of L2NormPool2d]

`l2_norm_pool2d` sums the squares of each window with ``avg_pool2d(...,
divisor_override=1)``. Both ONNX exporters (torch 2.14) drop
``divisor_override`` and write a plain ``AveragePool``, so the exported layer
would compute the norm divided by $\sqrt{k_H k_W}$, silently. `to_onnx` exports
each `L2NormPool2d` as `_WindowNormPool2d` instead: the same windows summed as
$k_H k_W$ strided slices of the zero-padded squares (plain ``Slice`` and
``Add``, which onnxruntime also runs in float64, where it has no
``AveragePool``), then the square root. The sums are the same terms added in
another order (a rounding difference). Any other module that calls
``avg_pool2d``/``avg_pool3d`` with ``divisor_override`` is refused with an
`ExportError` naming it.
"""

from __future__ import annotations

import copy
import importlib
import io
import math
import os
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from lipnets._checks import check_int
from lipnets._state import freeze_parametrizations
from lipnets._version import __version__
from lipnets.errors import ExportError, LipnetsWarning
from lipnets.graph import check_finite, hooks_of, method_owner, module_kind, trusted
from lipnets.nn.cayley_conv import CayleyConv2d
from lipnets.nn.pooling import L2NormPool2d

__all__ = ["freeze_parametrizations", "to_onnx", "to_vanilla"]


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


def _convert(
    module: nn.Module,
    memo: dict[int, nn.Module],
    name: str = "",
    sizes: dict[int, tuple[int, int]] | None = None,
) -> nn.Module:
    """`to_vanilla` of a copy, in place; ``sizes`` gives the input size of a CayleyConv2d
    built without one (keyed by ``id``), as `to_onnx` reads it from the example."""
    key = id(module)
    if key in memo:
        return memo[key]
    export = getattr(module, "to_vanilla", None)
    if callable(export):
        _check_exportable(module, name)
        size = None if sizes is None else sizes.get(key)
        new = export() if size is None else export(input_size=size)
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
            child_path = f"{name}.{child_name}".lstrip(".")
            setattr(new, child_name, _convert(child, memo, child_path, sizes))
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


# ---------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------

# Largest relative error (max-norm, against the largest reference entry) `to_onnx` accepts.
# float64 is not 1e-12: onnxruntime's DFT for lengths that are not a power of two
# (a FrequencyConv2d at 6 x 6) agrees with torch's FFT to about 6e-8 (measured; 5e-16 at
# 8 x 8 and 16 x 16).
_RTOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
_EXTRA = "install the onnx extra: pip install 'lipnets[onnx]'"


def to_onnx(
    model: nn.Module,
    example: Tensor | tuple[Tensor, ...],
    path: str | os.PathLike[str] | None = None,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    check: bool = True,
    rtol: float | None = None,
    **kwargs: Any,
) -> Any:
    """Export `to_vanilla(model)` to ONNX and check it in onnxruntime.

    The plain copy is put in eval mode and exported with torch's dynamo exporter,
    or its TorchScript one where that fails (Note [ONNX exporter choice]); every
    layer of `lipnets.nn` exports. A `CayleyConv2d` built without ``input_size``
    is exported for the size it sees in ``example``; an `L2NormPool2d` as the same
    windows summed by slices (Note [ONNX export of L2NormPool2d]). With
    ``check=True`` the ONNX model runs in onnxruntime (CPU) on ``example`` and
    each output must match the model's, in eval mode, to ``rtol`` times its largest
    entry. Needs the ``onnx`` extra (onnx, onnxscript, onnxruntime).

    Args:
        model: the `nn.Module` to export; it is not modified.
        example: an input tensor, or a tuple of input tensors, for `model`.
        path: where to write the ONNX file, or ``None`` (not written).
        opset: the ONNX opset version, or ``None`` for the exporter's default.
        dynamic_batch: make dimension 0 of every input and output dynamic, so that
            the ONNX model takes any batch size.
        check: run the ONNX model in onnxruntime on ``example`` and compare.
        rtol: the relative tolerance of the check; ``None`` means 1e-4 for float32
            outputs, 1e-6 for float64, 1e-2 for float16.
        **kwargs: passed on to `torch.onnx.export` (they override what `to_onnx`
            sets); ``dynamo=True`` or ``dynamo=False`` picks the exporter.

    Returns:
        The `onnx.ModelProto` (also written to ``path`` when given).

    Raises:
        ImportError: if onnx, onnxscript (for the dynamo exporter) or onnxruntime
            (for the check) is missing.
        ExportError: if a module cannot be exported (named: `to_vanilla`'s
            refusals, ``avg_pool2d`` with ``divisor_override``, a `CayleyConv2d`
            seen at two sizes), both exporters fail, onnxruntime cannot run the
            model (it has no float64 ``Conv`` or ``AveragePool``), or an output
            does not match.
        TypeError: if ``model`` or ``example`` has the wrong type.

    Examples:
        >>> import torch, lipnets
        >>> net = nn.Sequential(lipnets.BjorckLinear(4, 8), lipnets.GroupSort(2))
        >>> proto = lipnets.export.to_onnx(net, torch.randn(2, 4))  # checked in onnxruntime
        >>> [p.value for p in proto.metadata_props if p.key == "lipnets.exporter"]
        ['dynamo']
        >>> "Gemm" in {node.op_type for node in proto.graph.node}  # the realised weight
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs = _example_inputs(example, dynamic_batch)
    if opset is not None:
        opset = check_int(opset, "opset", 7)
    dynamo = kwargs.pop("dynamo", None)
    for flag, name in ((dynamic_batch, "dynamic_batch"), (check, "check")):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if dynamo is not None and not isinstance(dynamo, bool):
        raise TypeError(f"dynamo must be None, True or False, got {dynamo!r}")
    if rtol is not None:
        rtol = float(rtol) if isinstance(rtol, (int, float)) and not isinstance(rtol, bool) else -1
        if not 0 < rtol < math.inf:
            raise ValueError(f"rtol must be a finite number > 0, got {rtol!r}")
    packages = ["onnx", *(["onnxscript"] if dynamo is not False else [])]
    onnx, *_ = _require([*packages, *(["onnxruntime"] if check else [])])
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        check_finite(tensor, name)
    work = copy.deepcopy(model).eval()
    sizes, reference = _read_example(work, inputs)
    vanilla = _for_onnx(_convert(work, {}, sizes=sizes), {}).eval()
    _refuse_dropped_divisor(vanilla, inputs)
    in_names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    out_names = (
        ["output"] if len(reference) == 1 else [f"output_{i}" for i in range(len(reference))]
    )
    options: dict[str, Any] = {
        "input_names": in_names,
        "output_names": out_names,
        "opset_version": opset,
        "verbose": False,
    }
    proto, exporter = _export(vanilla, inputs, options, kwargs, dynamic_batch, dynamo, onnx)
    onnx.helper.set_model_props(
        proto, {"lipnets.exporter": exporter, "lipnets.version": __version__}
    )
    if check:
        _check(proto, inputs, in_names, reference, rtol)
    if path is not None:
        onnx.save(proto, os.fspath(path))
    return proto


def _require(names: list[str]) -> list[Any]:
    found, missing = [], []
    for name in names:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"lipnets.export.to_onnx needs {', '.join(missing)}: {_EXTRA}")
    return found


def _example_inputs(example: object, dynamic_batch: bool) -> tuple[Tensor, ...]:
    inputs = (example,) if isinstance(example, Tensor) else example
    if (
        not isinstance(inputs, (tuple, list))
        or not inputs
        or not all(isinstance(t, Tensor) for t in inputs)
    ):
        raise TypeError(
            "example must be a tensor or a non-empty tuple of tensors (the model's inputs), "
            f"got {type(example).__name__}"
        )
    if dynamic_batch and any(t.ndim == 0 for t in inputs):
        raise ValueError(
            "dynamic_batch=True makes dimension 0 of every input dynamic, but example has "
            "a 0-dim tensor; pass dynamic_batch=False"
        )
    return tuple(inputs)


def _leaves(output: object) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [leaf for item in output for leaf in _leaves(item)]
    raise TypeError(
        "to_onnx exports models that return a tensor or (nested) tuples and lists of "
        f"tensors, got {type(output).__name__}"
    )


def _read_example(
    work: nn.Module, inputs: tuple[Tensor, ...]
) -> tuple[dict[int, tuple[int, int]], list[Tensor]]:
    """Run the (eval-mode copy of the) model on the example: its outputs, and the input
    size of each CayleyConv2d built without one."""
    sizes: dict[int, tuple[int, int]] = {}
    names: dict[int, str] = {}

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        size = tuple(args[0].shape[-2:]) if args and isinstance(args[0], Tensor) else None
        if size is not None and sizes.setdefault(id(module), size) != size:  # type: ignore[arg-type]
            raise ExportError(
                f"{names[id(module)]} (CayleyConv2d) is called at input sizes "
                f"{sizes[id(module)]} and {size}; its export holds the matrices of one size"
            )

    handles = []
    for name, module in work.named_modules():
        if isinstance(module, CayleyConv2d) and module.input_size is None:
            names[id(module)] = name or "the model"
            handles.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            reference = [t.detach() for t in _leaves(work(*inputs))]
    finally:
        for handle in handles:
            handle.remove()
    return sizes, reference  # type: ignore[return-value]


class _WindowNormPool2d(nn.Module):
    """`L2NormPool2d` written with ops the ONNX exporters keep (Note [ONNX export of
    L2NormPool2d]): window sums of squares as sums of strided slices."""

    def __init__(self, pool: L2NormPool2d) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = pool.kernel_size, pool.stride, pool.padding

    def forward(self, x: Tensor) -> Tensor:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        squares = nn.functional.pad(work * work, (pw, pw, ph, ph))
        rows = (squares.shape[-2] - kh) // sh + 1
        cols = (squares.shape[-1] - kw) // sw + 1
        sums = sum(
            squares[..., i : i + sh * (rows - 1) + 1 : sh, j : j + sw * (cols - 1) + 1 : sw]
            for i in range(kh)
            for j in range(kw)
        )
        return torch.sqrt(sums).to(x.dtype)  # type: ignore[arg-type]


def _for_onnx(module: nn.Module, memo: dict[int, nn.Module], name: str = "") -> nn.Module:
    """Replace each L2NormPool2d of the plain copy by `_WindowNormPool2d`, in place."""
    if id(module) in memo:
        return memo[id(module)]
    new = module
    if isinstance(module, L2NormPool2d):
        if not trusted(module, L2NormPool2d):
            raise ExportError(
                f"{name or 'the model'} ({module_kind(module)}) has hooks or a forward of "
                "its own; to_onnx exports only L2NormPool2d itself (Note [ONNX export of "
                "L2NormPool2d] in lipnets.export)"
            )
        new = _WindowNormPool2d(module)
    memo[id(module)] = new
    for child_name, child in list(new._modules.items()):
        if child is not None:
            child_path = f"{name}.{child_name}".lstrip(".")
            setattr(new, child_name, _for_onnx(child, memo, child_path))
    return new


class _DivisorScan(TorchFunctionMode):
    """Records the first average pooling called with ``divisor_override``."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack, self.found = stack, None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in (torch._C._nn.avg_pool2d, torch._C._nn.avg_pool3d) and self.found is None:
            divisor = args[6] if len(args) > 6 else kwargs.get("divisor_override")
            if divisor is not None:
                self.found = self.stack[-1]
        return func(*args, **kwargs)


def _refuse_dropped_divisor(vanilla: nn.Module, inputs: tuple[Tensor, ...]) -> None:
    """Note [ONNX export of L2NormPool2d]: the exporters drop ``divisor_override``."""
    stack: list[str] = []
    handles = []
    for name, module in vanilla.named_modules():
        where = f"{name or 'the model'} ({module_kind(module)})"
        handles.append(module.register_forward_pre_hook(lambda *_, w=where: stack.append(w)))
        handles.append(module.register_forward_hook(lambda *_: stack.pop() and None))
    scan = _DivisorScan(stack)
    try:
        with torch.no_grad(), scan:
            vanilla(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    if scan.found is not None:
        raise ExportError(
            f"{scan.found} calls avg_pool2d/avg_pool3d with divisor_override, which torch's "
            "ONNX exporters drop (the ONNX model would divide by the window size); write "
            "the window sums another way"
        )


def _export(
    vanilla: nn.Module,
    inputs: tuple[Tensor, ...],
    options: dict[str, Any],
    kwargs: dict[str, Any],
    dynamic_batch: bool,
    dynamo: bool | None,
    onnx: Any,
) -> tuple[Any, str]:
    """Note [ONNX exporter choice]: dynamo first, TorchScript when it fails."""
    failures: list[tuple[str, BaseException]] = []
    for use_dynamo in [True, False] if dynamo is None else [dynamo]:
        exporter = "dynamo" if use_dynamo else "torchscript"
        try:
            with warnings.catch_warnings():
                # the TorchScript exporter's deprecation notice: to_onnx chose it
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                proto = _run_exporter(
                    vanilla, inputs, options, kwargs, dynamic_batch, use_dynamo, onnx
                )
        except Exception as error:  # any failure of one exporter: try the other
            failures.append((exporter, error))
            continue
        if failures:
            warnings.warn(
                f"to_onnx: the dynamo ONNX exporter failed ({_summary(failures[0][1])}); "
                "used the TorchScript exporter",
                LipnetsWarning,
                stacklevel=3,
            )
        return proto, exporter
    text = "; ".join(f"{name} exporter: {_summary(error)}" for name, error in failures)
    raise ExportError(f"torch.onnx.export failed on to_vanilla(model): {text}") from failures[-1][1]


def _run_exporter(
    vanilla: nn.Module,
    inputs: tuple[Tensor, ...],
    options: dict[str, Any],
    kwargs: dict[str, Any],
    dynamic_batch: bool,
    dynamo: bool,
    onnx: Any,
) -> Any:
    """One exporter; the batch dimension is made dynamic the way that exporter expects."""
    options = dict(options)
    if dynamic_batch and dynamo:
        batch = getattr(torch.export.Dim, "DYNAMIC", None) or torch.export.Dim("batch")
        options["dynamic_shapes"] = tuple({0: batch} for _ in inputs)
    elif dynamic_batch:
        names = [*options["input_names"], *options["output_names"]]
        options["dynamic_axes"] = {name: {0: "batch"} for name in names}
    options.update(kwargs)
    if dynamo:
        return torch.onnx.export(vanilla, inputs, dynamo=True, **options).model_proto
    buffer = io.BytesIO()
    torch.onnx.export(vanilla, inputs, buffer, dynamo=False, **options)
    return onnx.load_from_string(buffer.getvalue())


def _summary(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _check(
    proto: Any,
    inputs: tuple[Tensor, ...],
    in_names: list[str],
    reference: list[Tensor],
    rtol: float | None,
) -> None:
    """Run the ONNX model in onnxruntime on the example and compare with ``reference``."""
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(
            proto.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        names = [i.name for i in session.get_inputs()]
        given = dict(zip(in_names, inputs, strict=True))
        feeds = {name: given[name].detach().cpu().numpy() for name in names}
        outputs = session.run(None, feeds)
    except Exception as error:  # onnxruntime's errors have no common base class
        raise ExportError(
            f"onnxruntime cannot run the exported model ({_summary(error)}); onnxruntime "
            "has no float64 Conv or AveragePool: export a float32 model, or pass check=False"
        ) from error
    if len(outputs) != len(reference):
        raise ExportError(f"the ONNX model has {len(outputs)} outputs, the model {len(reference)}")
    for k, (out, ref) in enumerate(zip(outputs, reference, strict=True)):
        got = torch.from_numpy(out).to(torch.float64)
        want = ref.detach().cpu().to(torch.float64)
        if got.shape != want.shape:
            raise ExportError(
                f"output {k} of the ONNX model has shape {tuple(got.shape)}, the model's "
                f"{tuple(want.shape)}"
            )
        tol = rtol if rtol is not None else _RTOL.get(ref.dtype, 1e-4)
        scale = max(
            float(want.abs().max()) if want.numel() else 0.0,
            torch.finfo(ref.dtype).eps if ref.is_floating_point() else 1.0,
        )
        error = float((got - want).abs().max()) if want.numel() else 0.0
        if not error <= tol * scale:
            raise ExportError(
                f"output {k} of the ONNX model differs from the model's by {error:.3g} "
                f"(relative {error / scale:.3g}, allowed rtol={tol:g}) on the example"
            )
