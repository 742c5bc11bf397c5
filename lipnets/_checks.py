r"""Argument validators, written once for every subpackage.

Each validator takes the value and the argument's name, returns the value in
its canonical form (an ``int``, a pair, a ``float``...) and otherwise raises
an error that names the argument, the allowed values and what was received
(DESIGN "Errors"). A value of the wrong *type* (a bool or a float where an int
is expected, a string where a number is) raises
`lipnets.errors.ArgumentTypeError`, which is both a ``TypeError`` and a
``ValueError``; a value of the right type but out of range raises a
``ValueError``.

This is a private top-level helper: any subpackage may import it (DESIGN
"Layout"). Checks that belong to one operation (a kernel's shape, a label
convention) stay with that operation.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from lipnets.errors import ArgumentTypeError

__all__ = [
    "BJORCK_ORDERS",
    "check_bjorck_options",
    "check_choice",
    "check_dim",
    "check_eps",
    "check_int",
    "check_instance",
    "check_int_pair",
    "check_norm",
    "check_optional_int",
    "check_probability",
    "check_radii",
    "check_real",
    "check_shape",
    "check_spatial_shape",
    "check_square",
    "check_tensor",
]

#: The orders of the Björck iteration lipnets implements (Note [Bjorck pre-scaling]
#: in `lipnets.functional.orthogonal`).
BJORCK_ORDERS = (1, 2)

_NORMS = {"2": 2.0, "l2": 2.0, "inf": math.inf, "linf": math.inf}


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_sequence(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _listing(choices: Sequence[object]) -> str:
    """``'a', 'b' or 'c'``."""
    items = [repr(c) for c in choices]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


# ---------------------------------------------------------------- integers


def check_int(value: object, name: str, minimum: int = 1, *, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]`` (no upper limit by default).

    A bool is not an int here. Any ``numbers.Integral`` (a numpy integer) is
    accepted and returned as a Python ``int``.

    Examples:
        >>> check_int(3, "kernel_size")
        3
        >>> check_int(0, "padding", 0)
        0
        >>> check_int(True, "stride")
        Traceback (most recent call last):
        ...
        lipnets.errors.ArgumentTypeError: stride must be an int >= 1, got True (bool)
    """
    allowed = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"
    if not _is_int(value):
        raise ArgumentTypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    number = int(value)  # type: ignore[call-overload]
    if number < minimum or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


def check_optional_int(value: object, name: str, minimum: int = 1) -> int | None:
    """``None``, or ``value`` as an int ``>= minimum`` (a bool is not an int)."""
    if value is None:
        return None
    if not _is_int(value) or int(value) < minimum:  # type: ignore[call-overload]
        error = ValueError if _is_int(value) else ArgumentTypeError
        raise error(f"{name} must be None or an int >= {minimum}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def check_int_pair(value: object, name: str, minimum: int = 1) -> tuple[int, int]:
    """``value`` (an int, or a sequence of one or two ints, each ``>= minimum``) as a pair.

    This is how ``torch.nn.Conv2d`` reads ``kernel_size``, ``stride``,
    ``padding`` and ``dilation``.

    Examples:
        >>> check_int_pair(3, "kernel_size")
        (3, 3)
        >>> check_int_pair((1, 2), "padding", 0)
        (1, 2)
    """
    message = f"{name} must be an int >= {minimum} or a pair of such ints, got {value!r}"
    if _is_int(value):
        items: tuple[object, ...] = (value, value)
    elif _is_sequence(value):
        items = tuple(value)  # type: ignore[arg-type]
        if len(items) == 1:
            items = items * 2
        if len(items) != 2:
            raise ValueError(message)
    else:
        raise ArgumentTypeError(message)
    if not all(_is_int(v) for v in items):
        raise ArgumentTypeError(message)
    pair = (int(items[0]), int(items[1]))  # type: ignore[call-overload]
    if min(pair) < minimum:
        raise ValueError(message)
    return pair


def check_square(value: object, name: str, minimum: int = 1, *, why: str = "") -> int:
    """``value`` (an int, or a pair of two equal ints, ``>= minimum``) as one int.

    For layers that only support square kernels or strides; ``why`` (such as
    ``" (space_to_depth folds square blocks)"``) is added to the message.

    Examples:
        >>> check_square((3, 3), "kernel_size")
        3
    """
    message = f"{name} must be an int >= {minimum} or a pair of equal ints{why}, got {value!r}"
    item = value
    if _is_sequence(value):
        items = tuple(value)  # type: ignore[arg-type]
        if len(items) != 2 or items[0] != items[1]:
            raise ValueError(message)
        item = items[0]
    if not _is_int(item):
        raise ArgumentTypeError(message)
    if int(item) < minimum:  # type: ignore[call-overload]
        raise ValueError(message)
    return int(item)  # type: ignore[call-overload]


def check_dim(value: object, name: str = "dim") -> int:
    """``value`` as an int, for a dimension index (its range is the caller's to check)."""
    if not _is_int(value):
        raise ArgumentTypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)  # type: ignore[call-overload]


# ---------------------------------------------------------------- real numbers


def check_real(
    value: object,
    name: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float in the interval from ``low`` to ``high``.

    Each end is closed unless ``low_open`` / ``high_open``; an infinite end is
    always open, so the defaults accept every finite number. A bool is not a
    number here; a tensor is not either (pass ``t.item()``).

    Examples:
        >>> check_real(0.5, "margin", low=0.0, low_open=True)
        0.5
        >>> check_real(-1, "alpha", low=0.0)
        Traceback (most recent call last):
        ...
        ValueError: alpha must be finite and in [0, inf), got -1
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a real number, got {type(value).__name__}")
    number = float(value)
    too_low = number <= low if low_open else number < low
    too_high = number >= high if high_open else number > high
    if not math.isfinite(number) or too_low or too_high:
        left = "(" if low_open or math.isinf(low) else "["
        right = ")" if high_open or math.isinf(high) else "]"
        raise ValueError(
            f"{name} must be finite and in {left}{low:g}, {high:g}{right}, got {value!r}"
        )
    return number


def check_probability(value: object, name: str, *, closed: bool = False) -> float:
    """``value`` as a float in $(0, 1)$, or in $[0, 1]$ when ``closed``.

    Examples:
        >>> check_probability(0.25, "positive_fraction")
        0.25
    """
    return check_real(value, name, low=0.0, high=1.0, low_open=not closed, high_open=not closed)


def check_choice(value: object, name: str, choices: Sequence[object], *, why: str = "") -> object:
    """The entry of ``choices`` equal to ``value`` (of the same type; an int for an integer).

    ``why`` is added to the message after the list of choices.

    Examples:
        >>> check_choice("mean", "reduction", ("none", "mean", "sum"))
        'mean'
        >>> check_choice("avg", "reduction", ("none", "mean", "sum"))
        Traceback (most recent call last):
        ...
        ValueError: reduction must be one of 'none', 'mean' or 'sum', got 'avg'
    """
    key = int(value) if _is_int(value) else value  # type: ignore[call-overload]
    for choice in choices:
        if type(key) is type(choice) and key == choice:
            return choice
    raise ValueError(f"{name} must be one of {_listing(choices)}{why}, got {value!r}")


def check_norm(value: object, name: str = "norm") -> float:
    """The l_p norm ``value`` as ``2.0`` or ``math.inf``.

    Accepted spellings: ``2``, ``2.0``, ``float('inf')``, ``math.inf`` and the
    strings ``"2"``, ``"l2"``, ``"inf"``, ``"linf"`` (any case).

    Examples:
        >>> check_norm("Linf")
        inf
    """
    if isinstance(value, str):
        norm = _NORMS.get(value.lower())
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        norm = float(value) if float(value) in (2.0, math.inf) else None
    else:
        norm = None
    if norm is None:
        raise ValueError(
            f"{name} must be 2 or float('inf') (or 'l2', 'inf', 'linf'), got {value!r}"
        )
    return norm


def check_eps(
    value: object,
    n: int,
    name: str = "eps",
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Per-sample radii: a number, or a real tensor of shape () or (n,), finite and ``>= 0``.

    Returns a tensor of shape ``(n,)`` in ``dtype`` on ``device``, detached.

    Examples:
        >>> check_eps(0.5, 3)
        tensor([0.5000, 0.5000, 0.5000], dtype=torch.float64)
    """
    message = f"{name} must be a float or a real tensor of shape () or ({n},)"
    if isinstance(value, Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise ArgumentTypeError(f"{message}, got dtype {value.dtype}")
        if value.ndim > 1 or (value.ndim == 1 and value.shape[0] != n):
            raise ValueError(f"{message} (one radius per sample), got shape {tuple(value.shape)}")
        radii = value.detach().to(device=device, dtype=dtype).expand(n).clone()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        radii = torch.full((n,), float(value), dtype=dtype, device=device)
    else:
        raise ArgumentTypeError(f"{message}, got {type(value).__name__}")
    if not bool(torch.isfinite(radii).all()) or bool((radii < 0).any()):
        shown = value if not isinstance(value, Tensor) else value.tolist()
        raise ValueError(f"{name} must be finite and >= 0, got {shown!r}")
    return radii


def check_radii(value: object, name: str = "eps") -> list[float]:
    """A list of radii from a number or a non-empty sequence (or tensor) of numbers ``>= 0``.

    Examples:
        >>> check_radii([0.0, 0.25])
        [0.0, 0.25]
    """
    many = isinstance(value, Sequence) or (isinstance(value, Tensor) and value.ndim > 0)
    values = list(value) if many else [value]  # type: ignore[call-overload]
    if isinstance(value, str) or not values:
        raise ValueError(f"{name} must be a number or a non-empty sequence of numbers")
    out = []
    for item in values:
        if isinstance(item, Tensor) and item.numel() == 1:
            item = item.item()
        if isinstance(item, bool) or not isinstance(item, numbers.Real):
            raise ArgumentTypeError(
                f"{name} must be a number or a sequence of numbers, got {item!r}"
            )
        if not math.isfinite(item) or item < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {item!r}")
        out.append(float(item))
    return out


# ---------------------------------------------------------------- tensors and shapes


def check_instance(value: object, name: str, cls: type, *, what: str | None = None) -> object:
    """``value`` if it is an instance of ``cls``; ``what`` names the class in the message.

    Examples:
        >>> check_instance([], "config", dict, what="a dict of options")
        Traceback (most recent call last):
        ...
        TypeError: config must be a dict of options, got list
    """
    if not isinstance(value, cls):
        kind = what or f"a {cls.__name__}"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    return value


def check_tensor(
    value: object, name: str = "x", *, floating: bool = False, allow_complex: bool = False
) -> Tensor:
    """``value`` if it is a tensor; of a floating-point dtype when ``floating``.

    With ``floating`` and ``allow_complex`` a complex dtype is accepted too.

    Raises:
        TypeError: naming ``name`` and the type or dtype received.

    Examples:
        >>> check_tensor(torch.ones(2, dtype=torch.int64), "w", floating=True)
        Traceback (most recent call last):
        ...
        TypeError: w must be a floating-point tensor, got dtype torch.int64
    """
    kind = "floating-point or complex" if allow_complex else "floating-point"
    if not isinstance(value, Tensor):
        what = f"a {kind} torch.Tensor" if floating else "a torch.Tensor"
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    if floating and not (value.is_floating_point() or (allow_complex and value.is_complex())):
        raise TypeError(f"{name} must be a {kind} tensor, got dtype {value.dtype}")
    return value


def check_shape(
    value: object, name: str = "input_shape", *, min_ndim: int = 1, hint: str = ""
) -> tuple[int, ...]:
    """``value`` as a tuple of at least ``min_ndim`` positive ints (a ``torch.Size`` is one).

    ``hint`` (such as ``" such as (1, 3, 32, 32)"``) is added to the message.
    """
    dims = tuple(value) if _is_sequence(value) else None  # type: ignore[arg-type]
    if dims is None or len(dims) < min_ndim or not all(_is_int(d) and d >= 1 for d in dims):
        raise ValueError(
            f"{name} must be a sequence of at least {min_ndim} positive ints{hint}, got {value!r}"
        )
    return tuple(int(d) for d in dims)


def check_spatial_shape(value: object, name: str = "input_shape") -> tuple[int, ...]:
    """``value`` as a tuple of positive ints ending with the spatial size ``(H, W)``.

    Examples:
        >>> check_spatial_shape((1, 3, 8, 8))[-2:]
        (8, 8)
    """
    hint = " ending with the spatial size (H, W), such as (1, C, H, W)"
    return check_shape(value, name, min_ndim=2, hint=hint)


# ---------------------------------------------------------------- options


def check_bjorck_options(
    order: object, tol: object, iterations: object, max_iterations: object
) -> None:
    """The options of the Björck iteration (`lipnets.functional.bjorck`).

    ``order`` in `BJORCK_ORDERS`, ``tol`` in $(0, 1)$, ``iterations`` None or
    an int ``>= 1``, ``max_iterations`` an int ``>= 1``.
    """
    check_choice(order, "order", BJORCK_ORDERS)
    check_probability(tol, "tol")
    check_optional_int(iterations, "iterations")
    check_int(max_iterations, "max_iterations")
