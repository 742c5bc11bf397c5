"""Bounds of the linear (and piecewise-linear) ops users write, against float64 truths.

Each linear op is checked against the largest singular value of its dense float64
operator (the op applied to the identity basis), at several shapes and arguments: the
bound is never below it and, where lipnets computes the norm exactly, within 1e-6 of it
(the exact cases of Note [Separable interpolation], Note [Padding copies], Note [Unfold and
fold], Note [Cumulative sums and differences] and Note [Transposed convolution bound]).
``torch.where`` with a comparison is checked against its exact slopes and refusals (Note
[Where with a comparison]); gradient ascent on random models mixing the new ops with old
ones never finds a ratio above the bound.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipnets
from lipnets.errors import ShapeRequiredError, UnboundedModuleError
from lipnets.functional import linear_maps as LM
from tests.helpers import Fn, lipschitz_ascent

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
EXACT = 1e-6  # relative slack of an exact bound (float64 SVD slack and float32 positions)


def dense(fn, shape: tuple[int, ...], dtype=F64) -> torch.Tensor:
    """The (outputs, inputs) float64 matrix of the linear part of ``fn`` on one sample."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=dtype).reshape(n, *shape)
    with torch.no_grad():  # one sample at a time: constants (diff's prepend) have batch 1
        out = torch.cat([fn(e[None]) for e in basis]) - fn(torch.zeros((1, *shape), dtype=dtype))
    return out.reshape(n, -1).T.double()


def sigma(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix, ord=2)) if matrix.numel() else 0.0


def bound(fn, shape: tuple[int, ...] | None) -> float:
    full = None if shape is None else (1, *shape)
    return float(lipnets.lipschitz_bound(Fn(fn), full))


# -- transposed convolutions (Note [Transposed convolution bound]) -----------------------

CONV_T = [  # (in, out, kernel, stride, padding, dilation, groups, output_padding, size)
    (2, 3, 3, 1, 0, 1, 1, 0, 6),
    (2, 2, 4, 2, 1, 1, 1, 1, 5),
    (4, 2, 3, 2, 1, 1, 2, 1, 5),
    (3, 3, 3, 2, 0, 2, 3, 1, 4),
    (2, 4, 5, 3, 2, 1, 2, 2, 4),
    (1, 1, 2, 2, 0, 1, 1, 0, 7),
    (2, 2, 3, 1, 1, 3, 1, 2, 5),  # output padding >= stride (allowed by the dilation)
]


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("params", CONV_T, ids=[str(p) for p in CONV_T])
def test_conv_transpose_against_its_dense_operator(dims, params):
    cin, cout, k, s, p, d, g, q, size = params
    torch.manual_seed(sum(params) + dims)
    cls = nn.ConvTranspose1d if dims == 1 else nn.ConvTranspose2d
    layer = cls(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, output_padding=q)
    layer = layer.double()
    shape = (cin, *(size,) * dims)
    exact = sigma(dense(layer, shape))
    given = float(lipnets.lipschitz_bound(nn.Sequential(layer), (1, *shape)))
    every = float(lipnets.lipschitz_bound(nn.Sequential(layer)))
    assert given >= exact and every >= exact
    # exact: the dense norm of C_N at the largest output padding (q = max(q, s - 1) here)
    assert given <= exact * (1 + EXACT)
    for other in (size + 1, size + 3):  # the size-free bound holds at other sizes too
        assert every >= sigma(dense(layer, (cin, *(other,) * dims)))


def test_conv_transpose_bound_covers_output_size_calls_and_large_layers():
    torch.manual_seed(1)
    layer = nn.ConvTranspose2d(2, 2, 4, stride=2, padding=1).double()  # q = 0 < s - 1

    class Sized(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = layer

        def forward(self, x):
            return self.up(x, output_size=[11, 11])  # output padding 1

    shape = (2, 5, 5)
    call = sigma(dense(Sized(), shape))
    plain = sigma(dense(layer, shape))
    got = float(lipnets.lipschitz_bound(Sized(), (1, *shape)))
    assert got >= call and got >= plain
    assert got <= max(call, plain) * (1 + EXACT)
    # A layer above the dense limit goes through conv2d_spectral_norm_bound at N + 1.
    big = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1).double()
    shape = (4, 12, 12)
    exact = sigma(dense(big, shape))
    value = float(lipnets.lipschitz_bound(nn.Sequential(big), (1, *shape)))
    assert exact <= value <= 1.1 * exact


def test_conv_transpose_refusals():
    with pytest.raises(UnboundedModuleError, match="ConvTranspose3d"):
        lipnets.lipschitz_bound(nn.Sequential(nn.ConvTranspose3d(1, 1, 3)))
    with pytest.raises(ValueError, match="lazy"):
        lipnets.lipschitz_bound(nn.Sequential(nn.LazyConvTranspose2d(2, 3)))


# -- interpolation (Note [Separable interpolation]) --------------------------------------

INTERP = [
    ("nearest", None, False),
    ("nearest-exact", None, False),
    ("bilinear", False, False),
    ("bilinear", True, False),
    ("bilinear", False, True),
    ("bicubic", False, False),
    ("bicubic", True, False),
    ("bicubic", False, True),
    ("area", None, False),
]
RESIZES = [((5, 7), 2, None), ((4, 6), (1.5, 0.7), None), ((6, 5), None, (9, 3))]
RESIZES += [((5, 5), 3, None), ((7, 4), 0.5, None), ((3, 8), None, (3, 17))]


@pytest.mark.parametrize("mode,align,aa", INTERP, ids=[f"{m}-{a}-{aa}" for m, a, aa in INTERP])
def test_interpolation_exact_at_every_shape(mode, align, aa):
    for sizes, scale, size in RESIZES:
        for recompute in (None, True) if size is None else (None,):
            params = dict(size=size, scale_factor=scale, mode=mode, align_corners=align)
            params.update(antialias=aa, recompute_scale_factor=recompute)
            operator = dense(lambda x, p=params: F.interpolate(x, **p), (1, *sizes))
            exact = sigma(operator)
            got = bound(lambda x, p=params: F.interpolate(x, **p), (2, *sizes))
            assert exact <= got <= exact * (1 + EXACT), (sizes, scale, size, recompute)
            # the separability lipnets relies on: the operator is the Kronecker product
            mats = [LM.interpolation_operator(sizes, d, params) for d in range(2)]
            torch.testing.assert_close(torch.kron(*mats), operator, rtol=0, atol=1e-14)


def test_interpolation_1d_3d_modules_and_the_schur_path(monkeypatch):
    for mode, align in [("linear", False), ("linear", True), ("nearest", None)]:
        p = dict(scale_factor=1.7, mode=mode, align_corners=align)
        exact = sigma(dense(lambda x, p=p: F.interpolate(x, **p), (1, 9)))
        assert exact <= bound(lambda x, p=p: F.interpolate(x, **p), (3, 9)) <= exact * (1 + EXACT)
    p = dict(scale_factor=(2, 1.5, 0.8), mode="trilinear", align_corners=False)
    exact = sigma(dense(lambda x, p=p: F.interpolate(x, **p), (1, 3, 4, 5)))
    assert exact <= bound(lambda x, p=p: F.interpolate(x, **p), (1, 3, 4, 5)) <= exact * (1 + EXACT)
    bilinear = lambda x: F.interpolate(x, None, 2, "bilinear")  # noqa: E731
    corners = lambda x: F.interpolate(x, (7, 9), None, "bilinear", True)  # noqa: E731
    for module, fn in [
        (nn.Upsample(scale_factor=2, mode="bilinear"), bilinear),
        (nn.UpsamplingNearest2d(scale_factor=3), lambda x: F.interpolate(x, scale_factor=3)),
        (nn.UpsamplingBilinear2d(size=(7, 9)), corners),
    ]:
        exact = sigma(dense(fn, (1, 4, 5)))
        got = float(lipnets.lipschitz_bound(nn.Sequential(module), (1, 1, 4, 5)))
        assert exact <= got <= exact * (1 + EXACT)
    # Above the dense limit the 1-D operator gets Schur's test: still >= the exact norm.
    monkeypatch.setattr(LM, "DENSE_LIMIT", 64)
    for mode in ("bilinear", "bicubic"):
        p = dict(scale_factor=1.5, mode=mode, align_corners=False)
        exact = sigma(dense(lambda x, p=p: F.interpolate(x, **p), (1, 8, 9)))
        assert bound(lambda x, p=p: F.interpolate(x, **p), (1, 8, 9)) >= exact


def test_interpolation_refusals():
    with pytest.raises(ShapeRequiredError, match="float32"):
        lipnets.lipschitz_bound(nn.Sequential(nn.Upsample(scale_factor=2)))
    with pytest.raises(ShapeRequiredError, match="Upsample"):
        lipnets.lipschitz_bound(nn.Sequential(nn.Linear(2, 2), nn.Upsample(scale_factor=2)))


# -- padding (Note [Padding copies]) ----------------------------------------------------


def _pad_sizes(mode: str, left: int, right: int):
    low = {"reflect": max(left, right) + 1, "circular": max(left, right, 1)}.get(mode, 1)
    return range(low, low + left + right + 6)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_exact_with_the_size_and_worst_case_without(mode):
    for left, right in [(1, 1), (2, 0), (0, 3), (2, 3), (4, 1)]:
        worst = 0.0
        for n in _pad_sizes(mode, left, right):
            fn = lambda x, lr=(left, right): F.pad(x, lr, mode=mode)  # noqa: E731
            exact = sigma(dense(fn, (1, n)))
            assert exact == pytest.approx(bound(fn, (2, n)), rel=1e-12)
            worst = max(worst, exact)
        every = bound(lambda x, lr=(left, right): F.pad(x, lr, mode=mode), None)
        assert every == pytest.approx(worst, rel=1e-12)  # >= every size, and reached
    # 2-D and 3-D pads are products; modules trace into F.pad.
    for module, shape in [
        (nn.ReflectionPad2d((1, 2, 2, 0)), (1, 4, 5)),
        (nn.ReplicationPad2d((0, 2, 1, 1)), (2, 3, 4)),
        (nn.CircularPad2d((1, 1, 2, 1)), (1, 3, 3)),
        (nn.ReflectionPad1d(2), (1, 4)),
        (nn.ReplicationPad3d(1), (1, 2, 3, 2)),
        (nn.CircularPad3d((1, 0, 0, 1, 1, 1)), (1, 2, 2, 3)),
        (nn.ReplicationPad1d((0, 3)), (1, 4)),
    ]:
        exact = sigma(dense(module, shape))
        got = float(lipnets.lipschitz_bound(nn.Sequential(module), (1, *shape)))
        assert exact == pytest.approx(got, rel=1e-12)
        assert float(lipnets.lipschitz_bound(nn.Sequential(module))) >= exact


def test_padding_negative_and_constant():
    fn = lambda x: F.pad(x, (-1, 2), mode="replicate")  # noqa: E731
    assert bound(fn, (1, 5)) == pytest.approx(sigma(dense(fn, (1, 5))), rel=1e-12)
    with pytest.raises(ShapeRequiredError, match="negative"):
        bound(fn, None)
    assert bound(lambda x: F.pad(x, (2, 3), value=1.5), None) == 1.0


# -- unfold and fold (Note [Unfold and fold]) ---------------------------------------------

UNFOLD = [  # kernel, dilation, padding, stride
    (2, 1, 0, 1),
    (3, 1, 1, 2),
    ((2, 3), (1, 2), (1, 0), (1, 2)),
    (3, 2, 2, 2),
    (3, 3, 1, 2),
    (4, 1, 0, 4),
]


@pytest.mark.parametrize("args", UNFOLD, ids=[str(a) for a in UNFOLD])
def test_unfold_and_fold_against_dense_operators(args):
    k, d, p, s = args
    worst = 0.0
    for size in [(5, 6), (7, 7), (9, 8), (12, 13)]:
        unfold = lambda x: F.unfold(x, k, d, p, s)  # noqa: E731
        operator = dense(unfold, (2, *size))
        exact = sigma(operator)
        worst = max(worst, exact)
        assert exact == pytest.approx(bound(unfold, (2, *size)), rel=1e-12)
        module = nn.Unfold(k, d, p, s)
        assert exact == pytest.approx(
            float(lipnets.lipschitz_bound(nn.Sequential(module), (1, 2, *size))), rel=1e-12
        )
        fold = lambda x, sz=size: F.fold(x, sz, k, d, p, s)  # noqa: E731
        blocks = operator.shape[0]
        patches = blocks // (2 * math.prod((k, k) if isinstance(k, int) else k))
        fold_shape = (blocks // patches, patches)
        folded = dense(fold, fold_shape)
        assert sigma(folded) == pytest.approx(exact, rel=1e-12)  # the adjoint
        assert bound(fold, fold_shape) == pytest.approx(exact, rel=1e-12)
        assert bound(fold, None) == pytest.approx(exact, rel=1e-12)  # output_size is given
    every = bound(lambda x: F.unfold(x, k, d, p, s), None)
    assert every >= worst * (1 - 1e-12)  # (float64 SVD error: the norms are square roots)
    big = bound(lambda x: F.unfold(x, k, d, p, s), (1, 40, 41))
    assert every == pytest.approx(big, rel=1e-12)  # the size-free cover is reached


# -- cumsum, diff and the copies (Note [Cumulative sums and differences]) -----------------


def test_cumsum_norm_formula_and_bound():
    for n in [1, 2, 3, 5, 8, 13, 40]:
        exact = sigma(torch.tril(torch.ones(n, n, dtype=F64)))
        formula = 1 / (2 * math.sin(math.pi / (2 * (2 * n + 1))))
        assert formula == pytest.approx(exact, rel=1e-12)
        assert exact <= LM.cumsum_norm_bound(n) <= exact * (1 + 1e-12)
    for fn, shape in [
        (lambda x: torch.cumsum(x, 1), (4, 3)),
        (lambda x: x.cumsum(-1), (4, 7)),
        (lambda x: x.cumsum(dim=2), (2, 5, 3)),
    ]:
        exact = sigma(dense(fn, shape))
        assert exact <= bound(fn, shape) <= exact * (1 + EXACT)
    with pytest.raises(ShapeRequiredError, match="cumulative"):
        bound(lambda x: x.cumsum(-1), None)
    with pytest.raises(UnboundedModuleError, match="batch"):
        bound(lambda x: x.cumsum(0), (3,))


def test_diff_exact_with_the_shape_and_two_to_the_order_without(monkeypatch):
    for n in [2, 3, 6, 11]:  # first difference: 2 cos(pi / (2n))
        assert sigma(dense(lambda x: torch.diff(x), (n,))) == pytest.approx(
            2 * math.cos(math.pi / (2 * n)), rel=1e-12
        )
    pre, post = torch.ones(1, 2, 2, dtype=F64), torch.full((1, 2, 1), 3.0, dtype=F64)
    cases = [
        (lambda x: torch.diff(x, 2, -1), (3, 7)),
        (lambda x: x.diff(n=3, dim=1), (9, 2)),
        (
            lambda x: torch.diff(
                x,
                1,
                -1,
                prepend=pre,
                append=post,
            ),
            (2, 5),
        ),
        (lambda x: torch.diff(x, n=2, dim=2, append=post), (2, 4)),
        (lambda x: torch.diff(x, n=0, dim=-1, prepend=pre), (2, 3)),
    ]
    for fn, shape in cases:
        exact = sigma(dense(fn, shape))
        assert exact <= bound(fn, shape) <= exact * (1 + EXACT)
    order3 = lambda x: x.diff(n=3, dim=-1)  # noqa: E731
    assert bound(order3, None) == 8.0
    monkeypatch.setattr(LM, "DENSE_LIMIT", 4)  # the product of first-difference norms
    for fn, shape in cases[:4]:
        assert bound(fn, shape) >= sigma(dense(fn, shape))


@pytest.mark.parametrize(
    "fn,shape",
    [
        (lambda x: x.flip(-1), (3, 4)),
        (lambda x: torch.roll(x, 2, 1), (5, 2)),
        (lambda x: x.expand(-1, 3, 4, 2), (1, 4, 1)),
        (lambda x: x.repeat(1, 2, 3), (2, 2)),
        (lambda x: torch.tile(x, (1, 2)), (3,)),
        (lambda x: x.unsqueeze(1).expand(-1, 5, -1), (3,)),
    ],
)
def test_copies_are_exact(fn, shape):
    exact = sigma(dense(fn, shape))
    assert exact == pytest.approx(bound(fn, shape), rel=1e-12)


# -- torch.where (Note [Where with a comparison]) ---------------------------------------


def _grid_slope(fn) -> float:
    """The largest difference quotient of ``fn`` on a fine float64 grid (both directions
    of every switching point included)."""
    t = torch.linspace(-3, 3, 60001, dtype=F64)
    y = fn(t.reshape(1, -1)).reshape(-1)
    return float(((y[1:] - y[:-1]) / (t[1:] - t[:-1])).abs().max())


ACCEPTED = [
    (lambda x: torch.where(x > 0, x, 0.1 * x), 1.0),
    (lambda x: torch.where(x >= 0, x, -3.0 * x), 3.0),
    (lambda x: torch.where(x > 1, x - 1, 0.5 * (x - 1)), 1.0),
    (lambda x: torch.where(x <= 0.5, 2 * x, x + 0.5), 2.0),
    (lambda x: torch.where(0.25 < x, x, 0.5 * x + 0.125), 1.0),
    (lambda x: torch.where(x < 0, torch.tanh(x), x), 1.0),
    (lambda x: torch.where(x > 0, x, F.elu(x)), 1.0),
    (lambda x: torch.where(x > 0, 0.0, x.clamp(min=-1.0)), 1.0),
    (lambda x: x.where(x > 0, torch.zeros(())), 1.0),
    (lambda x: torch.where(x.gt(2.0), torch.relu(x - 2.0), 0.0), 1.0),
    (lambda x: torch.where(x > -1, x.abs(), -x), 1.0),
    (lambda x: torch.where(x > 0, 0.0, 0.0), 0.0),
]


@pytest.mark.parametrize("index", range(len(ACCEPTED)))
def test_where_of_a_comparison_gets_the_larger_slope(index):
    fn, slope = ACCEPTED[index]
    exact = _grid_slope(fn)
    assert exact == pytest.approx(slope, rel=1e-6, abs=1e-9)
    for shape in (None, (4,), (2, 3)):
        assert bound(fn, shape) == pytest.approx(slope, rel=1e-12)


def test_where_after_a_layer_and_with_a_constant_mask():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4).double()

    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin
            self.act = nn.LeakyReLU(0.2)

        def forward(self, x):
            h = self.lin(x)
            return torch.where(h > 0, h, self.act(h))

    got = float(lipnets.lipschitz_bound(Leaky()))
    assert got == pytest.approx(sigma(lin.weight.detach()), rel=1e-9)
    mask = torch.tensor([[True, False, True, True]] * 3)
    fn = lambda x: torch.where(mask, x, 0.5)  # noqa: E731  x (1, 4) copied 3 times
    assert bound(fn, (1, 4)) == pytest.approx(sigma(dense(fn, (1, 4))), rel=1e-12)


REFUSED = [
    (lambda x: torch.where(x > 0, x, x - 1), "jump"),
    (lambda x: torch.where(x > 0, 1.0, -1.0), "jump"),
    (lambda x: torch.where(x > 0.3, torch.tanh(x), x), "exactly"),
    (lambda x: torch.where(x > 0, x.flip(-1), 0.0), "entrywise"),
    (lambda x: torch.where(x[..., :1] > 0, x, 0.0), "entrywise"),
    (lambda x: torch.where(x > x.flip(-1), x, 0.0), "two input-dependent"),
    (lambda x: torch.where(x > torch.ones(3), x, 0.0), "constant scalar"),
    (lambda x: torch.where(x > 0, x, torch.zeros(2, 3)), "broadcast"),
    (lambda x: (x > 0) * x, "condition of torch.where"),
    (lambda x: torch.where(x > 0, x, 0.0) + (x > 0), "condition of torch.where"),
    (lambda x: (x > 0).float(), "condition of torch.where"),
]


@pytest.mark.parametrize("index", range(len(REFUSED)))
def test_where_refusals_are_typed(index):
    fn, why = REFUSED[index]
    with pytest.raises(UnboundedModuleError, match=why):
        bound(fn, (3,))


# -- gradient ascent on random models ---------------------------------------------------


class _Mix(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.kind = seed % 5
        self.c1 = nn.Conv2d(1, 2, 3, padding=1)
        self.up = nn.ConvTranspose2d(2, 2, 4, stride=2, padding=1)
        self.c2 = nn.Conv2d(2, 1, 3, stride=2)
        self.lin = nn.Linear(8, 8)
        self.mode = ["bilinear", "bicubic", "nearest", "area"][seed % 4]
        self.pad = ["reflect", "replicate", "circular"][seed % 3]
        self.slope = float(torch.rand((), generator=g)) * 2
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        if self.kind == 4:  # 1-D: cumsum, diff and a where of a comparison
            h = self.lin(x.flatten(1))
            h = torch.where(h > 0, h, self.slope * h)
            return self.lin(h.cumsum(-1)).diff(dim=-1)
        h = F.pad(x, (1, 1, 1, 1), mode=self.pad)
        h = torch.relu(self.c1(h))
        if self.kind in (0, 1):
            h = F.interpolate(h, scale_factor=2, mode=self.mode)
        else:
            h = self.up(h)
        h = F.unfold(self.c2(h), 2) if self.kind == 3 else self.c2(h)
        return torch.where(h > 0.5, h - 0.5, self.slope * (h - 0.5)).flatten(1)


@pytest.mark.parametrize("seed", range(20))
def test_gradient_ascent_never_exceeds_the_bound(seed):
    model = _Mix(seed).double().eval()
    shape = (1, 1, 4, 2) if model.kind == 4 else (1, 1, 6, 6)
    value = float(lipnets.lipschitz_bound(model, shape))
    low = lipschitz_ascent(model, shape, starts=8, steps=40, seed=seed)
    assert low <= value * (1 + 1e-9), (low, value)
