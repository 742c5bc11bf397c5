r"""The operations of a propagation graph, each with its forward, interval and adjoint rules.

A propagation graph (built by `lipnets.propagation.builder` from a traced model)
has one nonlinear operation, `ReLU`; every other node is *affine* in its
inputs. Sorting activations (MaxMin, GroupSort, FullSort) are rewritten into
comparator layers made of two affine nodes around a ReLU (Note [Comparators as
ReLUs]).

Tensors are batched: a node's value has shape $(N, *S)$ with $S$ the
per-sample shape. A *coefficient* tensor of backward propagation has shape
$(N, K, *S)$: $K$ linear functions of the node's value per sample. Every
affine operation $y = W x + b$ answers:

* ``forward``: the value of the node from its inputs' values;
* ``interval``: bounds of the output from bounds of the inputs, by interval
  arithmetic (Note [Interval rules]);
* ``backward``: given coefficients $A$ of the output, the coefficients
  $A W$ of each input and the constant $A b$ (the adjoint, applied to $K$
  rows per sample at once).

# Note [Interval rules]

For $y = Wx + b$ and $x \in [l, u]$, the exact interval is
$W c + b \pm |W| r$ with $c = (l + u)/2$, $r = (u - l)/2$. ``Linear`` and
``BatchNorm`` use $|W|$ exactly. A convolution uses the convolution with the
kernel's absolute values, $|K|$: entry $(i, j)$ of that operator is the sum of
$|K_t|$ over the taps $t$ that connect $i$ to $j$, which is $\ge |\sum_t K_t| =
|W_{ij}|$ (equal when at most one tap connects them, as with zero padding), so
the rule is sound for every padding mode and exact for zero padding. Linear
parts with non-negative weights (average pooling, padding, permutations)
are monotone, and their interval is simply $[f(l), f(u)]$. The l2 rule of the
first layer is in `lipnets.propagation.lirpa` (Note [IBP over an l2 ball]);
it uses ``row_norms``, the exact Euclidean norms of the rows of $W$ (from the
squared kernel, offered only where each tap reaches a distinct input).

Interval rules are inclusion-monotone (narrower inputs give narrower
outputs), which `crown_bounds` relies on (Note [CROWN never looser than IBP]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipnets.functional.reshape import depth_to_space, space_to_depth

__all__: list[str] = []

Coeffs = tuple[list["Tensor | None"], "Tensor | None"]
"""What ``backward`` returns: one coefficient tensor per input (or None), and a constant."""


def _bias_term(a: Tensor, bias: Tensor | None) -> Tensor | None:
    """The constant sum_j A_kj b_j of coefficients (N, K, *S) and a bias broadcast to S."""
    if bias is None:
        return None
    return (a * bias).flatten(2).sum(-1)


def _rows(a: Tensor) -> tuple[int, int, Tensor]:
    """(N, K, *S) -> (N * K, *S) for an operation that treats rows as a batch."""
    n, k = a.shape[:2]
    return n, k, a.reshape(n * k, *a.shape[2:])


class Op:
    """One operation of a propagation graph (see the module docs)."""

    kind = "op"

    def __init__(self, in_shapes: Sequence[torch.Size], out_shape: torch.Size) -> None:
        self.in_shapes = [torch.Size(s) for s in in_shapes]
        self.out_shape = torch.Size(out_shape)

    def forward(self, xs: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def backward(self, a: Tensor) -> Coeffs:
        raise NotImplementedError


class ReLU(Op):
    """$y = \\max(x, 0)$, the only nonlinear operation; relaxed by the engine."""

    kind = "relu"

    def forward(self, xs: list[Tensor]) -> Tensor:
        return torch.relu(xs[0])

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        return torch.relu(lows[0]), torch.relu(ups[0])


# ---------------------------------------------------------------------------
# Single-input affine operations
# ---------------------------------------------------------------------------


class Affine(Op):
    """$y = W x + b$ for one input; subclasses give $W$, $|W|$, $W^\\top$ and $b$."""

    kind = "affine"
    monotone = False
    """True when $W \\ge 0$ entrywise, so that the interval is $[f(l), f(u)]$."""

    def __init__(self, in_shape: torch.Size, out_shape: torch.Size, module: nn.Module | None):
        super().__init__([in_shape], out_shape)
        self.module = module

    # -- what subclasses implement ----------------------------------------
    def linear(self, x: Tensor) -> Tensor:
        """$W x$ for a batch x of shape (B, *S_in)."""
        raise NotImplementedError

    def abs_linear(self, r: Tensor) -> Tensor:
        """An upper bound on $|W| r$ (entrywise) for $r \\ge 0$ (Note [Interval rules])."""
        raise NotImplementedError

    def adjoint(self, a: Tensor) -> Tensor:
        """$W^\\top a$ for a batch of shape (B, *S_out)."""
        raise NotImplementedError

    def bias(self) -> Tensor | None:
        """$b$, broadcastable to S_out, or None."""
        return None

    def row_norms(self) -> Tensor | None:
        """Exact l2 norms of the rows of $W$, broadcastable to S_out, or None if unknown."""
        return None

    def dense(self, limit: int) -> Tensor | None:
        """The (numel_out, numel_in) matrix of $W$, or None if larger than ``limit`` entries."""
        n_in, n_out = self.in_shapes[0].numel(), self.out_shape.numel()
        if n_in * n_out > limit:
            return None
        rows = []
        step = max(1, limit // max(n_in, n_out))
        for start in range(0, n_out, step):  # row i is the adjoint of the unit vector e_i
            stop = min(start + step, n_out)
            unit = torch.zeros((stop - start, n_out), dtype=self.dtype, device=self.device)
            unit[:, start:stop] = torch.eye(stop - start, dtype=self.dtype, device=self.device)
            rows.append(self.adjoint(unit.reshape(-1, *self.out_shape)).reshape(-1, n_in))
        return torch.cat(rows)

    # -- shared rules -----------------------------------------------------
    dtype: torch.dtype
    device: torch.device

    def apply(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        b = self.bias()
        return y if b is None else y + b

    def forward(self, xs: list[Tensor]) -> Tensor:
        return self.apply(xs[0])

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        lo, up = lows[0], ups[0]
        if self.monotone:
            return self.apply(lo), self.apply(up)
        center, radius = lo / 2 + up / 2, up / 2 - lo / 2  # no overflow for finite lo, up
        c, r = self.apply(center), self.abs_linear(radius)
        return c - r, c + r

    def backward(self, a: Tensor) -> Coeffs:
        return [self.backward_linear(a)], _bias_term(a, self.bias())

    def backward_linear(self, a: Tensor) -> Tensor:
        """The input coefficients $A W$ alone."""
        n, k, rows = _rows(a)
        return self.adjoint(rows).reshape(n, k, *self.in_shapes[0])


class Linear(Affine):
    """``F.linear(x, W, b)`` with an explicit matrix (nn.Linear, BjorckLinear, CayleyLinear)."""

    def __init__(self, in_shape, out_shape, module, weight: Tensor, bias: Tensor | None):
        super().__init__(in_shape, out_shape, module)
        self.weight = weight.detach()
        self.b = None if bias is None else bias.detach()
        self.dtype, self.device = self.weight.dtype, self.weight.device

    def linear(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def abs_linear(self, r: Tensor) -> Tensor:
        return F.linear(r, self.weight.abs())

    def adjoint(self, a: Tensor) -> Tensor:
        return a @ self.weight

    def bias(self) -> Tensor | None:
        return self.b

    def backward(self, a: Tensor) -> Coeffs:
        bias = None
        if self.b is not None:
            bias = a @ self.b  # (N, K, *S_out[:-1])
            bias = bias.flatten(2).sum(-1) if bias.ndim > 2 else bias
        return [a @ self.weight], bias

    def row_norms(self) -> Tensor | None:
        return torch.linalg.vector_norm(self.weight, dim=1)

    def dense(self, limit: int) -> Tensor | None:
        if len(self.in_shapes[0]) == 1:
            return self.weight  # a batch of vectors: the matrix itself, whatever its size
        return super().dense(limit)


class Conv(Affine):
    """A convolution module's ``_conv_forward`` with its realised kernel (Conv1d/2d/3d, BCOP)."""

    def __init__(self, in_shape, out_shape, module, weight: Tensor, bias: Tensor | None):
        super().__init__(in_shape, out_shape, module)
        self.weight = weight.detach()
        self.b = None if bias is None else bias.detach()
        self.dtype, self.device = self.weight.dtype, self.weight.device
        spatial = len(in_shape) - 1
        self.b_view = None if self.b is None else self.b.reshape(-1, *([1] * spatial))

    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        return self.module._conv_forward(x, weight, None)  # type: ignore[union-attr]

    def linear(self, x: Tensor) -> Tensor:
        return self._conv(x, self.weight)

    def abs_linear(self, r: Tensor) -> Tensor:
        return self._conv(r, self.weight.abs())

    def adjoint(self, a: Tensor) -> Tensor:
        m = self.module
        assert m is not None
        if isinstance(m.padding, str):  # "same"/"valid": let autograd find torch's padding
            with torch.enable_grad():
                z = a.new_zeros((a.shape[0], *self.in_shapes[0]), requires_grad=True)
                (g,) = torch.autograd.grad(self._conv(z, self.weight), z, a)
            return g
        # The adjoint of a convolution is the transposed convolution, with the output
        # padding that restores the input size; other padding modes pad first, so
        # their adjoint folds the padded border back (the adjoint of F.pad).
        zeros = m.padding_mode == "zeros"
        size = list(self.in_shapes[0][1:])
        if not zeros:
            pads = m._reversed_padding_repeated_twice
            size = [n + pads[2 * (len(size) - 1 - i)] + pads[2 * (len(size) - 1 - i) + 1]
                    for i, n in enumerate(size)]  # fmt: skip
        padding = m.padding if zeros else (0,) * len(size)
        extra = [
            n - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
            for n, o, s, p, d, k in zip(
                size, a.shape[2:], m.stride, padding, m.dilation, self.weight.shape[2:], strict=True
            )
        ]
        transpose = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[len(size) - 1]
        g = transpose(a, self.weight, None, m.stride, padding, extra, m.groups, m.dilation)
        if zeros:
            return g
        with torch.enable_grad():
            z = a.new_zeros((a.shape[0], *self.in_shapes[0]), requires_grad=True)
            padded = F.pad(z, m._reversed_padding_repeated_twice, mode=m.padding_mode)
            (g,) = torch.autograd.grad(padded, z, g)
        return g

    def bias(self) -> Tensor | None:
        return self.b_view

    def backward(self, a: Tensor) -> Coeffs:
        bias = None if self.b is None else a.flatten(3).sum(-1) @ self.b  # per-channel bias
        return [self.backward_linear(a)], bias

    def row_norms(self) -> Tensor | None:
        # Exact only when every tap of an output reaches a distinct input (zero
        # padding); circular, reflect and replicate padding can fold taps together.
        if self.module.padding_mode != "zeros":  # type: ignore[union-attr]
            return None
        ones = torch.ones((1, *self.in_shapes[0]), dtype=self.dtype, device=self.device)
        return self._conv(ones, self.weight.square()).clamp_min(0).sqrt()[0]


class BatchNorm(Affine):
    """Eval-mode batch norm: $y = s x + t$ per channel (dimension 1 of the batch)."""

    def __init__(self, in_shape, out_shape, module, scale: Tensor, shift: Tensor):
        super().__init__(in_shape, out_shape, module)
        view = (-1, *([1] * (len(in_shape) - 1)))
        self.scale = scale.detach().reshape(view)
        self.shift = shift.detach().reshape(view)
        self.dtype, self.device = self.scale.dtype, self.scale.device

    def linear(self, x: Tensor) -> Tensor:
        return x * self.scale

    def abs_linear(self, r: Tensor) -> Tensor:
        return r * self.scale.abs()

    def adjoint(self, a: Tensor) -> Tensor:
        return a * self.scale

    def bias(self) -> Tensor | None:
        return self.shift

    def row_norms(self) -> Tensor | None:
        return self.scale.abs()


class ModuleLinear(Affine):
    """A module known to be affine with non-negative weights (pooling, padding).

    The map is applied by calling the module; the adjoint is a vector-Jacobian
    product by autograd at zero (exact for an affine map); the interval is
    $[f(l), f(u)]$ because the linear part is monotone.
    """

    monotone = True

    def __init__(self, in_shape, out_shape, module: nn.Module, dtype, device):
        super().__init__(in_shape, out_shape, module)
        self.dtype, self.device = dtype, device
        with torch.no_grad():
            self.b = module(torch.zeros((1, *in_shape), dtype=dtype, device=device))[0]
        if not bool(self.b.any()):
            self.b = None

    def apply(self, x: Tensor) -> Tensor:
        return self.module(x)  # type: ignore[misc]

    def linear(self, x: Tensor) -> Tensor:
        return self.apply(x) if self.b is None else self.apply(x) - self.b

    def abs_linear(self, r: Tensor) -> Tensor:
        return self.linear(r)

    def adjoint(self, a: Tensor) -> Tensor:
        with torch.enable_grad():
            z = torch.zeros(
                (a.shape[0], *self.in_shapes[0]), dtype=a.dtype, device=a.device, requires_grad=True
            )
            (g,) = torch.autograd.grad(self.apply(z), z, a)
        return g

    def bias(self) -> Tensor | None:
        return self.b


class CircularConv(Affine):
    """A circular convolution on ``space_to_depth(x, s)`` with a full-size kernel.

    CayleyConv2d and FrequencyConv2d apply, frequency by frequency, matrices
    that commute with circular shifts of the folded input, so their linear part
    is the circular convolution with the impulse responses ``kernel`` (shape
    $(m, n, H/s, W/s)$), which the graph builder measures and checks (Note
    [Circular convolution kernels] in `lipnets.propagation.rules`). Every tap
    reaches a distinct input, so $|K|$ gives $|W|$ exactly and the squared
    kernel gives the exact row norms.
    """

    def __init__(self, in_shape, out_shape, module, kernel: Tensor, bias: Tensor | None, stride):
        super().__init__(in_shape, out_shape, module)
        self.kernel = kernel.detach()
        self.stride = stride
        self.dtype, self.device = kernel.dtype, kernel.device
        self.size = tuple(kernel.shape[-2:])
        self.spectrum = torch.fft.rfft2(self.kernel)
        self.abs_spectrum = torch.fft.rfft2(self.kernel.abs())
        self.b = None if bias is None else bias.detach().to(kernel.dtype).reshape(-1, 1, 1)

    def _fold(self, x: Tensor) -> Tensor:
        return space_to_depth(x, self.stride) if self.stride > 1 else x

    def _unfold(self, x: Tensor) -> Tensor:
        return depth_to_space(x, self.stride) if self.stride > 1 else x

    def _circular(self, x: Tensor, spectrum: Tensor) -> Tensor:
        x_hat = torch.fft.rfft2(x)
        y_hat = torch.einsum("ocuv,bcuv->bouv", spectrum, x_hat)
        return torch.fft.irfft2(y_hat, s=self.size)

    def linear(self, x: Tensor) -> Tensor:
        return self._circular(self._fold(x), self.spectrum)

    def abs_linear(self, r: Tensor) -> Tensor:
        return self._circular(self._fold(r), self.abs_spectrum).clamp_min(0)

    def adjoint(self, a: Tensor) -> Tensor:
        a_hat = torch.fft.rfft2(a)
        g_hat = torch.einsum("ocuv,bouv->bcuv", self.spectrum.conj(), a_hat)
        return self._unfold(torch.fft.irfft2(g_hat, s=self.size))

    def bias(self) -> Tensor | None:
        return self.b

    def row_norms(self) -> Tensor | None:
        return torch.linalg.vector_norm(self.kernel.flatten(1), dim=1).reshape(-1, 1, 1)


# ---------------------------------------------------------------------------
# Multi-input and structural affine operations
# ---------------------------------------------------------------------------


class Gather(Op):
    """Entries picked from the inputs (reshapes, permutations, slicing, cat, padding).

    Output entry $i$ of each sample is entry ``index[i]`` of input
    ``source[i]`` of the same sample, or the constant ``const[:, i]`` where
    ``source[i] == -1``. Entries may be picked more than once (``expand``,
    reflect padding): the adjoint sums them.
    """

    kind = "gather"

    def __init__(self, in_shapes, out_shape, source: Tensor, index: Tensor, const: Tensor | None):
        super().__init__(in_shapes, out_shape)
        self.source, self.index = source, index
        self.const = const  # (N or 1, M) or None
        self.parts = []  # per input: (output positions, input positions)
        for k in range(len(in_shapes)):
            where = torch.nonzero(source == k).flatten()
            self.parts.append((where, index[where]))
        m = out_shape.numel()
        self.reshape_only = (
            len(in_shapes) == 1
            and const is None
            and in_shapes[0].numel() == m
            and bool((source == 0).all())
            and bool(torch.equal(index, torch.arange(m, device=index.device)))
        )

    def _pick(self, xs: list[Tensor]) -> Tensor:
        n = xs[0].shape[0]
        if self.reshape_only:
            return xs[0].reshape(n, *self.out_shape)
        first = xs[0]
        if self.const is not None:
            out = self.const.to(first.dtype).expand(n, -1).clone()
        else:
            out = first.new_zeros((n, self.out_shape.numel()))
        for x, (where, idx) in zip(xs, self.parts, strict=True):
            out[:, where] = x.reshape(n, -1)[:, idx]
        return out.reshape(n, *self.out_shape)

    def forward(self, xs: list[Tensor]) -> Tensor:
        return self._pick(xs)

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self._pick(lows), self._pick(ups)

    def backward(self, a: Tensor) -> Coeffs:
        n, k = a.shape[:2]
        if self.reshape_only:
            return [a.reshape(n, k, *self.in_shapes[0])], None
        flat = a.reshape(n, k, -1)
        outs: list[Tensor | None] = []
        for shape, (where, idx) in zip(self.in_shapes, self.parts, strict=True):
            a_in = flat.new_zeros((n, k, shape.numel()))
            a_in.index_add_(2, idx, flat[:, :, where])
            outs.append(a_in.reshape(n, k, *shape))
        bias = None
        if self.const is not None:
            bias = (flat * self.const.to(a.dtype).unsqueeze(1)).sum(-1)
        return outs, bias

    def multiplicities(self) -> list[int]:
        """For each input, the largest number of times one of its entries is picked."""
        return [int(torch.bincount(idx).max()) if idx.numel() else 0 for _, idx in self.parts]


class LinearCombination(Op):
    """$y = \\sum_k a_k \\odot x_k + c$ with constant coefficients (add, sub, mul, div, neg).

    The inputs have the output's shape (a dependent operand is never
    broadcast); coefficient tensors and the constant have shape $(N, *S)$
    (broadcast views), scalar coefficients are floats.
    """

    kind = "combination"

    def __init__(self, in_shapes, out_shape, coeffs: list[Tensor | float], const: Tensor | None):
        super().__init__(in_shapes, out_shape)
        self.coeffs = coeffs
        self.const = const

    def forward(self, xs: list[Tensor]) -> Tensor:
        out = sum(c * x for c, x in zip(self.coeffs, xs, strict=True))
        return out if self.const is None else out + self.const

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        lo = up = None
        for c, low, high in zip(self.coeffs, lows, ups, strict=True):
            if isinstance(c, Tensor):
                pos, neg = c.clamp_min(0), c.clamp_max(0)
                term_lo, term_up = pos * low + neg * high, pos * high + neg * low
            else:
                term_lo, term_up = (c * low, c * high) if c >= 0 else (c * high, c * low)
            lo = term_lo if lo is None else lo + term_lo
            up = term_up if up is None else up + term_up
        assert lo is not None and up is not None
        if self.const is not None:
            lo, up = lo + self.const, up + self.const
        return lo, up

    def backward(self, a: Tensor) -> Coeffs:
        outs: list[Tensor | None] = [
            a * (c.unsqueeze(1) if isinstance(c, Tensor) else c) for c in self.coeffs
        ]
        const = None if self.const is None else self.const.unsqueeze(1)
        return outs, _bias_term(a, const)

    def scales(self) -> list[float]:
        """$\\max |a_k|$ for each input."""
        return [
            float(c.abs().max()) if isinstance(c, Tensor) else abs(float(c)) for c in self.coeffs
        ]


class Reduce(Op):
    """Sum (times ``scale``: 1 for ``sum``, 1/count for ``mean``) over per-sample dims."""

    kind = "reduce"

    def __init__(self, in_shape, out_shape, dims: tuple[int, ...], keepdim: bool, scale: float):
        super().__init__([in_shape], out_shape)
        self.dims = dims  # per-sample dims (0-based, without the batch)
        self.keepdim = keepdim
        self.scale = scale
        self.count = math.prod(in_shape[d] for d in dims)

    def forward(self, xs: list[Tensor]) -> Tensor:
        dims = tuple(d + 1 for d in self.dims)
        return xs[0].sum(dim=dims, keepdim=self.keepdim) * self.scale

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self.forward(lows), self.forward(ups)

    def backward(self, a: Tensor) -> Coeffs:
        n, k = a.shape[:2]
        if not self.keepdim:
            for d in sorted(self.dims):
                a = a.unsqueeze(d + 2)
        return [(a * self.scale).expand(n, k, *self.in_shapes[0])], None


# ---------------------------------------------------------------------------
# Comparator layers
# ---------------------------------------------------------------------------


class Difference(Op):
    """$d_p = x_{lo_p} - x_{hi_p}$ along one per-sample dim (a comparator's input)."""

    kind = "difference"

    def __init__(self, in_shape, out_shape, dim: int, lo: Tensor, hi: Tensor):
        super().__init__([in_shape], out_shape)
        self.dim, self.lo, self.hi = dim, lo, hi

    def forward(self, xs: list[Tensor]) -> Tensor:
        x, d = xs[0], self.dim + 1
        return x.index_select(d, self.lo) - x.index_select(d, self.hi)

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        d = self.dim + 1
        lo, up = lows[0], ups[0]
        return (
            lo.index_select(d, self.lo) - up.index_select(d, self.hi),
            up.index_select(d, self.lo) - lo.index_select(d, self.hi),
        )

    def backward(self, a: Tensor) -> Coeffs:
        n, k, d = a.shape[0], a.shape[1], self.dim + 2
        a_in = a.new_zeros((n, k, *self.in_shapes[0]))
        a_in.index_add_(d, self.lo, a)
        a_in.index_add_(d, self.hi, -a)
        return [a_in], None


class Compare(Op):
    """One comparator layer: $y = x$ except $y_{lo} = x_{lo} - r$, $y_{hi} = x_{hi} + r$.

    Its second input is $r = \\mathrm{relu}(x_{lo} - x_{hi})$ (a `Difference`
    then a `ReLU` of the same $x$), so $y_{lo} = \\min(x_{lo}, x_{hi})$ and
    $y_{hi} = \\max(x_{lo}, x_{hi})$: the pairs are disjoint. The interval rule
    uses that identity directly: min and max are nondecreasing in each
    argument, so $[\\min(l_{lo}, l_{hi}), \\min(u_{lo}, u_{hi})]$ (and the same
    for max) is exact for a box.
    """

    kind = "compare"

    def __init__(self, in_shape, dim: int, lo: Tensor, hi: Tensor):
        super().__init__([in_shape, _with(in_shape, dim, lo.numel())], in_shape)
        self.dim, self.lo, self.hi = dim, lo, hi

    def forward(self, xs: list[Tensor]) -> Tensor:
        x, r = xs
        d = self.dim + 1
        return x.index_add(d, self.lo, -r).index_add(d, self.hi, r)

    def _sorted(self, x: Tensor) -> Tensor:
        d = self.dim + 1
        a, b = x.index_select(d, self.lo), x.index_select(d, self.hi)
        return x.index_copy(d, self.lo, torch.minimum(a, b)).index_copy(
            d, self.hi, torch.maximum(a, b)
        )

    def interval(self, lows: list[Tensor], ups: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self._sorted(lows[0]), self._sorted(ups[0])

    def backward(self, a: Tensor) -> Coeffs:
        d = self.dim + 2
        return [a, a.index_select(d, self.hi) - a.index_select(d, self.lo)], None


def _with(shape: torch.Size, dim: int, size: int) -> torch.Size:
    dims = list(shape)
    dims[dim] = size
    return torch.Size(dims)


def sorting_network(n: int) -> list[list[tuple[int, int]]]:
    """Comparator layers that sort ``n`` wires ascending: (i, j), i < j, puts the min at i.

    Batcher's merge exchange (Knuth, TAOCP vol. 3, Algorithm 5.2.2M), valid
    for every ``n``; its comparators are scheduled greedily into layers of
    disjoint pairs, each as early as the comparators before it on its two
    wires allow (which keeps the order of the comparators on each wire, so the
    network computes the same function).
    """
    if n < 2:
        return []
    t = (n - 1).bit_length()
    comparators: list[tuple[int, int]] = []
    p = 1 << (t - 1)
    while p > 0:
        q, r, d = 1 << (t - 1), 0, p
        while True:
            comparators.extend((i, i + d) for i in range(n - d) if i & p == r)
            if q == p:
                break
            d, q, r = q - p, q >> 1, p
        p >>= 1
    depth = [0] * n
    layers: list[list[tuple[int, int]]] = []
    for i, j in comparators:
        level = max(depth[i], depth[j])
        if level == len(layers):
            layers.append([])
        layers[level].append((i, j))
        depth[i] = depth[j] = level + 1
    return layers
