r"""The single-input affine operations of a propagation graph: $y = W x + b$.

`Affine` holds the rules every such operation shares (forward, interval,
adjoint, dense matrix); its subclasses give $W$, $|W|$, $W^\top$ and $b$ for
explicit matrices, convolutions, batch norm, monotone modules and circular
convolutions. See `lipnets.propagation.ops_base` for the contract of an
operation.

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
first layer is in `lipnets.propagation.propagator` (Note [IBP over an l2 ball]);
it uses ``row_norms``, the exact Euclidean norms of the rows of $W$ (from the
squared kernel, offered only where each tap reaches a distinct input).

Interval rules are inclusion-monotone (narrower inputs give narrower
outputs), which `crown_bounds` relies on (Note [CROWN never looser than IBP] in
`lipnets.propagation.lirpa`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipnets.functional.reshape import depth_to_space, space_to_depth
from lipnets.propagation.ops_base import Coeffs, Op, _bias_term, _rows

__all__: list[str] = []


def held(t: Tensor) -> Tensor:
    """A weight, bias or coefficient as an op holds it: as it is under autograd
    (differentiable bounds, Note [Differentiable bounds] in `lipnets.propagation.checks`),
    detached otherwise.

    Detached without autograd because kernels may take another path for a tensor that
    requires grad (``a @ w`` with a stride-0 ``a`` folds into one matrix product only
    then), which would change the last bits of the bounds.
    """
    return t if torch.is_grad_enabled() else t.detach()


def rows_matmul(a: Tensor, w: Tensor) -> Tensor:
    """``a @ w`` for coefficients ``a`` (..., K, M) and a matrix (M, P) or vector (M,) ``w``,
    computed by the same kernels whether ``w`` requires grad or not.

    ``torch.matmul`` folds a batch ``a`` whose leading dimensions cannot be merged without
    a copy (a stride-0 specification expanded over the batch) into one matrix product
    when ``w`` requires grad, and runs a batched product otherwise; the two round
    differently. Here the batched product is used in both cases, so differentiable bounds
    equal the others to the bit (Note [Differentiable bounds] in
    `lipnets.propagation.checks`).
    """
    mergeable = all(a.stride(i) == a.stride(i + 1) * a.shape[i + 1] for i in range(a.ndim - 2))
    if not w.requires_grad or mergeable or a.ndim < 3:
        return a @ w
    batch = a.reshape(-1, *a.shape[-2:])
    matrix = w if w.ndim == 2 else w.unsqueeze(-1)
    out = torch.bmm(batch, matrix.expand(batch.shape[0], *matrix.shape))
    out = out.reshape(*a.shape[:-1], matrix.shape[-1])
    return out if w.ndim == 2 else out.squeeze(-1)


def vjp(function, in_shape: torch.Size, a: Tensor) -> Tensor:
    r"""$J^\top a$ for a linear ``function`` of inputs (B, *in_shape), by autograd at zero.

    Under autograd (differentiable bounds, Note [Differentiable bounds] in
    `lipnets.propagation.checks`) the product is built with ``create_graph``, so it is
    differentiable in ``a`` and in the tensors ``function`` reads; otherwise it is a
    constant, as before.
    """
    differentiable = torch.is_grad_enabled()
    with torch.enable_grad():
        z = a.new_zeros((a.shape[0], *in_shape), requires_grad=True)
        (g,) = torch.autograd.grad(function(z), z, a, create_graph=differentiable)
    return g


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

    def abs_weight(self) -> Tensor:
        """$|W|$ entrywise, for subclasses that hold a ``weight``."""
        return self.weight.abs()  # type: ignore[attr-defined]

    def memo(self, name: str, *args: object) -> Tensor | None:
        """``getattr(self, name)(*args)`` (`dense`, `row_norms`, `abs_weight`), computed
        once per op: an op's weights are fixed while it lives (a kept graph is rebuilt when
        the model's tensors change, Note [Propagation graphs reused] in
        `lipnets.propagation.graph`)."""
        key = (name, *args)
        cache = self.__dict__.setdefault("_memo", {})
        if key not in cache:
            cache[key] = getattr(self, name)(*args)
        return cache[key]

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
        half_lo, half_up = lo / 2, up / 2  # no overflow for finite lo, up
        center, radius = half_lo + half_up, half_up - half_lo
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
        self.weight = held(weight)
        self.b = None if bias is None else held(bias)
        self.dtype, self.device = self.weight.dtype, self.weight.device

    def linear(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def abs_linear(self, r: Tensor) -> Tensor:
        return F.linear(r, self.memo("abs_weight"))

    def adjoint(self, a: Tensor) -> Tensor:
        return a @ self.weight

    def bias(self) -> Tensor | None:
        return self.b

    def backward(self, a: Tensor) -> Coeffs:
        bias = None
        if self.b is not None:
            bias = rows_matmul(a, self.b)  # (N, K, *S_out[:-1])
            bias = bias.flatten(2).sum(-1) if bias.ndim > 2 else bias
        return [rows_matmul(a, self.weight)], bias

    def row_norms(self) -> Tensor | None:
        return torch.linalg.vector_norm(self.weight, dim=1)

    def dense(self, limit: int) -> Tensor | None:
        if len(self.in_shapes[0]) == 1:
            return self.weight  # a batch of vectors: the matrix itself, whatever its size
        return super().dense(limit)


def _per_dim(value: Any, n: int) -> tuple[int, ...]:
    """A convolution's stride, padding or dilation as one int per spatial dimension."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return values * n if len(values) == 1 else values


class Conv(Affine):
    """A convolution module's ``_conv_forward`` with its realised kernel (Conv1d/2d/3d, BCOP)."""

    def __init__(self, in_shape, out_shape, module, weight: Tensor, bias: Tensor | None):
        super().__init__(in_shape, out_shape, module)
        self.weight = held(weight)
        self.b = None if bias is None else held(bias)
        self.dtype, self.device = self.weight.dtype, self.weight.device
        spatial = len(in_shape) - 1
        self.b_view = None if self.b is None else self.b.reshape(-1, *([1] * spatial))

    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        return self.module._conv_forward(x, weight, None)  # type: ignore[union-attr]

    def linear(self, x: Tensor) -> Tensor:
        return self._conv(x, self.weight)

    def abs_linear(self, r: Tensor) -> Tensor:
        return self._conv(r, self.memo("abs_weight"))

    def adjoint(self, a: Tensor) -> Tensor:
        m = self.module
        assert m is not None
        if isinstance(m.padding, str):  # "same"/"valid": let autograd find torch's padding
            return vjp(lambda z: self._conv(z, self.weight), self.in_shapes[0], a)
        # The adjoint of a convolution is the transposed convolution, with the output
        # padding that restores the input size; other padding modes pad first, so
        # their adjoint folds the padded border back (the adjoint of F.pad).
        zeros = m.padding_mode == "zeros"
        size = list(self.in_shapes[0][1:])
        # torch's convolutions read a one-entry stride, padding or dilation as that entry
        # in every dimension (nn.Conv2d(..., padding=(1,)) keeps the 1-tuple)
        stride, padding, dilation = (
            _per_dim(v, len(size)) for v in (m.stride, m.padding, m.dilation)
        )
        if not zeros:
            pads = m._reversed_padding_repeated_twice
            size = [n + pads[2 * (len(size) - 1 - i)] + pads[2 * (len(size) - 1 - i) + 1]
                    for i, n in enumerate(size)]  # fmt: skip
        padding = padding if zeros else (0,) * len(size)
        extra = [
            n - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
            for n, o, s, p, d, k in zip(
                size, a.shape[2:], stride, padding, dilation, self.weight.shape[2:], strict=True
            )
        ]
        transpose = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[len(size) - 1]
        g = transpose(a, self.weight, None, stride, padding, extra, m.groups, dilation)
        if zeros:
            return g
        pads, mode = m._reversed_padding_repeated_twice, m.padding_mode
        return vjp(lambda z: F.pad(z, pads, mode=mode), self.in_shapes[0], g)

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
        self.scale = held(scale).reshape(view)
        self.shift = held(shift).reshape(view)
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
        return vjp(self.apply, self.in_shapes[0], a)

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
        self.kernel = held(kernel)
        self.stride = stride
        self.dtype, self.device = kernel.dtype, kernel.device
        self.size = tuple(kernel.shape[-2:])
        self.spectrum = torch.fft.rfft2(self.kernel)
        self.abs_spectrum = torch.fft.rfft2(self.kernel.abs())
        self.b = None if bias is None else held(bias).to(kernel.dtype).reshape(-1, 1, 1)

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
