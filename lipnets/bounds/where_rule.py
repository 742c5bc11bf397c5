r"""The bound rules of ``torch.where`` and of the comparisons that feed it.

# Note [Where with a comparison]

A comparison ``u > c`` is a step function of ``u``: its output (a mask) is not Lipschitz,
and a mask multiplied by input-dependent values or summed is not either. So lipnets
accepts a comparison only as the condition of ``torch.where`` (every use of it: another
use is refused, naming the comparison), and ``torch.where(cond, a, b)`` only in these forms:

* ``cond`` does not depend on the input (a constant mask): every output entry is an entry
  of (the broadcast of) ``a`` or of ``b``, so $\|\Delta y\|^2 \le \|\Delta a'\|^2 +
  \|\Delta b'\|^2$ and $K \le \sqrt{(r_a K_a)^2 + (r_b K_b)^2}$, with $r$ the square root of
  the broadcast's copy count (one when nothing broadcasts);
* ``cond`` is ``u > c``, ``u >= c``, ``u < c`` or ``u <= c`` (or ``c < u`` and so on) with
  ``u`` input-dependent and ``c`` a constant scalar, and each branch is a constant scalar or
  an *entrywise function of the same* ``u``: built from ``u`` and constant scalars by the
  op table's elementwise functions, ``+``, ``-``, products and quotients by constants,
  ``clamp`` with constant bounds, ``maximum``/``minimum``, and the activation modules
  ReLU, LeakyReLU, ReLU6, Hardtanh, Tanh, Sigmoid, ELU, CELU, Softsign, Hardsigmoid,
  Identity. Then output entry $i$ is $g(u_i)$ with $g = f_a$ on one side of $c$ and $f_b$ on
  the other. If $f_a(c) = f_b(c)$, $g$ is continuous and, for $t < c < t'$, $|g(t') - g(t)|
  \le |g(t') - g(c)| + |g(c) - g(t)| \le L_a (t' - c) + L_b (c - t) \le \max(L_a, L_b) |t' -
  t|$, so $g$ is $\max(L_a, L_b)$-Lipschitz, and so is the entrywise map. The fold's
  constant $K_a$ of a branch is a positively homogeneous rule of $K_u$ (products, sums and
  square roots of sums of squares of constants), exact in real arithmetic at least
  $L_a K_u$ (the fold is sound for the entrywise map $u \mapsto f_a(u)$, whose norm is the
  scalar $L_a$) and rounded up; so $K = \max(K_a, K_b) \ge \max(L_a, L_b) K_u$.

The agreement $f_a(c) = f_b(c)$ is checked *exactly*: both branches are evaluated at $u = c$
in rational arithmetic (``fractions.Fraction``; floats are rationals), where the
piecewise-linear and rational functions (relu, leaky_relu, relu6, hardtanh, abs, clamp,
hardsigmoid, hardswish, softsign, softshrink, maximum, minimum, arithmetic) are exact and
the transcendental ones are known exactly only at 0 (tanh, tanhshrink, gelu, silu, mish,
elu, celu, selu: 0; sigmoid: 1/2) and ELU/CELU also above 0 (the identity there). Any
other value raises: no floating-point tolerance can tell a continuous function from one
with a jump below it, and a jump is not Lipschitz. So ``torch.where(x > 0, x, 0.1 * x)``
(a LeakyReLU) and ``torch.where(x > 1, x - 1, 0.5 * (x - 1))`` are bounded by the larger
slope, ``torch.where(x > 0, x, x - 1)`` and ``torch.where(x > 0, 1.0, -1.0)`` are refused
(a jump), and so are branches that depend on the input other than through ``u``
(``torch.where(x > 0, y, 0)``), a non-scalar ``c``, and comparisons of two
input-dependent tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from lipnets.bounds.rounding import mul_up, root_sum_squares
from lipnets.errors import UnboundedModuleError
from lipnets.graph import classify, first_operand, operand

if TYPE_CHECKING:
    from lipnets.bounds.fold import Fold

__all__ = ["compare_bound", "where_bound"]

_NOTE = "Note [Where with a comparison]"


def _where_operands(node: fx.Node) -> tuple[Any, Any, Any]:
    """(condition, a, b) of ``torch.where(condition, a, b)`` or ``a.where(condition, b)``."""
    args, kwargs = node.args, node.kwargs
    if node.op == "call_method":
        cond = kwargs.get("condition", args[1] if len(args) > 1 else None)
        return cond, args[0], kwargs.get("other", args[2] if len(args) > 2 else None)
    if len(args) + len(kwargs) < 3:
        raise UnboundedModuleError(
            "torch.where(condition) returns indices, not values; it has no bound rule"
        )
    names = ("condition", "input", "other")
    values = [kwargs.get(k, args[i] if len(args) > i else None) for i, k in enumerate(names)]
    return values[0], values[1], values[2]


def _is_cond_use(user: fx.Node, node: fx.Node) -> bool:
    spec = classify(user) if user.op in ("call_function", "call_method") else None
    if spec is None or spec.kind != "where":
        return False
    cond, a, b = _where_operands(user)
    return cond is node and a is not node and b is not node


def compare_bound(fold: Fold, node: fx.Node) -> float:
    """A comparison of an input-dependent tensor: accepted only as the condition of
    ``torch.where`` (Note [Where with a comparison]); its own constant is infinite."""
    bad = [user for user in node.users if not _is_cond_use(user, node)]
    if bad:
        raise UnboundedModuleError(
            f"{fold.where(node)} compares an input-dependent tensor: a step function, not "
            f"Lipschitz; lipnets accepts a comparison only as the condition of torch.where "
            f"({_NOTE}), but {fold.where(bad[0])} uses it otherwise"
        )
    return math.inf


def _scalar(fold: Fold, node: fx.Node, arg: Any) -> Fraction | None:
    """The exact value of a constant scalar operand, or None if it is not one."""
    if isinstance(arg, bool) or arg is None:
        return None
    if isinstance(arg, (int, float)):
        return Fraction(arg) if math.isfinite(arg) else None
    if isinstance(arg, fx.Node) and fold.K.get(arg, 0.0) == 0 and arg not in fold.meta:
        value = fold.const(arg, node)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
            number = float(value.reshape(()).item())
            return Fraction(number) if math.isfinite(number) else None
        return _scalar(fold, node, value) if isinstance(value, (int, float)) else None
    return None


def _param(fold: Fold, node: fx.Node, name: str, position: int, default: Any) -> Fraction:
    value = node.kwargs.get(name, node.args[position] if len(node.args) > position else default)
    exact = _scalar(fold, node, value)
    if exact is None:
        raise UnboundedModuleError(
            f"{fold.where(node)}: its argument {name}={value!r} is not a constant number"
        )
    return exact


def _clamp(t: Fraction, low: Fraction | None, high: Fraction | None) -> Fraction:
    if low is not None:
        t = max(t, low)
    if high is not None:
        t = min(t, high)
    return t


_HALF, _ZERO = Fraction(1, 2), Fraction(0)
# Exactly known values of the transcendental elementwise functions: at 0, and where they
# are the identity.
_AT_ZERO = {"tanh": _ZERO, "tanhshrink": _ZERO, "gelu": _ZERO, "silu": _ZERO, "mish": _ZERO}
_AT_ZERO.update({"elu": _ZERO, "celu": _ZERO, "selu": _ZERO, "sigmoid": _HALF})


def _elementwise(name: str, t: Fraction, p: Callable[[str, int, Any], Fraction]) -> Any:
    """The exact value of an elementwise function at ``t``, or None if unknown."""
    if name == "relu":
        return max(t, _ZERO)
    if name in ("abs", "absolute"):
        return abs(t)
    if name == "relu6":
        return _clamp(t, _ZERO, Fraction(6))
    if name == "hardtanh":
        return _clamp(t, p("min_val", 1, -1.0), p("max_val", 2, 1.0))
    if name == "leaky_relu":
        return t if t >= 0 else p("negative_slope", 1, 0.01) * t
    if name == "hardsigmoid":
        return _clamp(t / 6 + _HALF, _ZERO, Fraction(1))
    if name == "hardswish":
        return t * _clamp(t + 3, _ZERO, Fraction(6)) / 6
    if name == "softsign":
        return t / (1 + abs(t))
    if name == "softshrink":
        lam = p("lambd", 1, 0.5)
        return t - lam if t > lam else t + lam if t < -lam else _ZERO
    if name in ("elu", "celu") and t > 0:
        return t
    if t == 0:
        return _AT_ZERO.get(name)
    return None


_MODULES: dict[type[nn.Module], Callable[[nn.Module], tuple[str, dict[str, float]]]] = {
    nn.ReLU: lambda m: ("relu", {}),
    nn.ReLU6: lambda m: ("relu6", {}),
    nn.Tanh: lambda m: ("tanh", {}),
    nn.Sigmoid: lambda m: ("sigmoid", {}),
    nn.Softsign: lambda m: ("softsign", {}),
    nn.Hardsigmoid: lambda m: ("hardsigmoid", {}),
    nn.Identity: lambda m: ("identity", {}),
    nn.ELU: lambda m: ("elu", {}),
    nn.CELU: lambda m: ("celu", {}),
    nn.LeakyReLU: lambda m: ("leaky_relu", {"negative_slope": m.negative_slope}),
    nn.Hardtanh: lambda m: ("hardtanh", {"min_val": m.min_val, "max_val": m.max_val}),
}


class _Branch:
    """Checks that a branch is an entrywise function of ``u`` and evaluates it at ``c``."""

    def __init__(self, fold: Fold, where: fx.Node, u: fx.Node, c: Fraction) -> None:
        self.fold, self.where, self.u, self.c = fold, where, u, c
        self.memo: dict[fx.Node, Fraction] = {}

    def refuse(self, why: str) -> UnboundedModuleError:
        return UnboundedModuleError(
            f"{self.fold.where(self.where)} has no bound rule: {why} ({_NOTE})"
        )

    def value(self, arg: Any) -> Fraction:
        """The exact value of ``arg`` at ``u = c`` (refusing anything but the accepted forms)."""
        if arg is self.u:
            return self.c
        exact = _scalar(self.fold, self.where, arg)
        if exact is not None:
            return exact
        if not isinstance(arg, fx.Node) or self.fold.K.get(arg, 0.0) == 0:
            raise self.refuse(
                f"a branch uses {getattr(arg, 'name', repr(arg))}, which is not a constant "
                "scalar (a constant tensor could broadcast)"
            )
        if arg not in self.memo:
            self.memo[arg] = self.compute(arg)
        return self.memo[arg]

    def compute(self, n: fx.Node) -> Fraction:
        if n.op == "call_module":
            return self.module(n)
        spec = classify(n) if n.op in ("call_function", "call_method") else None
        kind = None if spec is None else spec.kind
        if kind in ("alias", "pos", "dropout", "neg"):
            v = self.value(first_operand(n))
            return -v if kind == "neg" else v
        if kind == "elementwise":
            assert spec is not None
            t = self.value(operand(n, spec))
            out = _elementwise(spec.name, t, lambda k, i, d: _param(self.fold, n, k, i, d))
            if out is None:
                raise self.refuse(
                    f"lipnets cannot compute {spec.name}({t}) exactly, so it cannot check that "
                    "the branches agree on the switching surface"
                )
            return out
        if kind in ("add", "sub", "mul", "div", "maxmin"):
            a = first_operand(n)
            b = n.args[1] if len(n.args) > 1 else n.kwargs.get("other")
            va, vb = self.value(a), self.value(b)
            if kind in ("add", "sub"):
                alpha = _scalar(self.fold, n, n.kwargs.get("alpha", 1))
                if alpha is None:
                    raise self.refuse("alpha is not a constant number")
                return va + alpha * vb if kind == "add" else va - alpha * vb
            if kind == "mul":
                return va * vb
            if kind == "div":
                if vb == 0 or n.kwargs.get("rounding_mode") is not None:
                    raise self.refuse("a branch divides by zero or rounds")
                return va / vb
            assert spec is not None
            return max(va, vb) if spec.name == "maximum" else min(va, vb)
        if kind == "clamp":
            assert spec is not None
            names = {"clamp_min": ("min",), "clamp_max": ("max",)}.get(spec.name, ("min", "max"))
            bounds = [
                n.kwargs.get(name, n.args[i + 1] if len(n.args) > i + 1 else None)
                for i, name in enumerate(names)
            ]
            limits = dict(
                zip(names, [None if b is None else self.value(b) for b in bounds], strict=True)
            )
            return _clamp(self.value(first_operand(n)), limits.get("min"), limits.get("max"))
        raise self.refuse(
            f"a branch applies {n.name} ({n.op} {getattr(n.target, '__name__', n.target)}), "
            "which is not an accepted entrywise operation"
        )

    def module(self, n: fx.Node) -> Fraction:
        module = self.fold.graph.module(n)
        describe = _MODULES.get(type(module))
        if describe is None or len(n.args) != 1 or n.kwargs:
            raise self.refuse(
                f"a branch applies {self.fold.where(n)}, which is not an accepted activation"
            )
        name, params = describe(module)
        t = self.value(n.args[0])
        if name == "identity":
            return t
        out = _elementwise(name, t, lambda k, i, d: Fraction(float(params.get(k, d))))
        if out is None:
            raise self.refuse(f"lipnets cannot compute {name}({t}) exactly")
        return out


def _comparison(fold: Fold, where: fx.Node, cond: fx.Node) -> tuple[fx.Node, Fraction]:
    """(u, c) of a condition ``u op c`` or ``c op u``."""
    left = first_operand(cond)
    right = cond.args[1] if len(cond.args) > 1 else cond.kwargs.get("other")
    dep = [isinstance(s, fx.Node) and fold.K.get(s, 0.0) > 0 for s in (left, right)]
    if all(dep):
        raise UnboundedModuleError(
            f"{fold.where(where)} has no bound rule: its condition compares two "
            f"input-dependent tensors ({_NOTE})"
        )
    u, c = (left, right) if dep[0] else (right, left)
    value = _scalar(fold, where, c)
    if value is None:
        raise UnboundedModuleError(
            f"{fold.where(where)} has no bound rule: its condition compares with {c!r}, "
            f"which is not a finite constant scalar ({_NOTE})"
        )
    return u, value


def where_bound(fold: Fold, node: fx.Node) -> float:
    """``torch.where`` in the forms of Note [Where with a comparison]."""
    cond, a, b = _where_operands(node)
    branches = [x for x in (a, b) if isinstance(x, fx.Node) and fold.K.get(x, 0.0) > 0]
    if not (isinstance(cond, fx.Node) and fold.K.get(cond, 0.0) > 0):
        parts = []
        for x, other in ((a, b), (b, a)):
            if x in branches:
                scalar = all(_scalar(fold, node, y) is not None for y in (cond, other))
                factor = 1.0 if scalar else fold.replication(node, x)
                parts.append(mul_up(fold.k(x), factor))
        return root_sum_squares(parts)
    spec = classify(cond) if cond.op in ("call_function", "call_method") else None
    if spec is None or spec.kind != "compare":
        raise UnboundedModuleError(
            f"{fold.where(node)} has no bound rule: its condition {cond.name} depends on the "
            f"input and is not a comparison with a constant ({_NOTE})"
        )
    u, c = _comparison(fold, node, cond)
    branch = _Branch(fold, node, u, c)
    va, vb = branch.value(a), branch.value(b)
    if va != vb:
        raise UnboundedModuleError(
            f"{fold.where(node)} has no bound rule: its branches differ where its condition "
            f"switches, at {float(c)!r} ({float(va)!r} against {float(vb)!r}): a jump, which "
            f"is not Lipschitz ({_NOTE})"
        )
    return max(fold.k(a), fold.k(b))
