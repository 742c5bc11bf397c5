"""Tests for the sorting activations (GroupSort, MaxMin, FullSort).

PITFALLS row 15: the output is a permutation within each group, each group is
sorted, the gradient preserves norms (ties included), NCHW and NHWC layouts,
dims other than -1, and odd channel counts raise. Row 14: torch.compile agrees
with eager mode.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipnets.functional.activations import full_sort, group_sort, max_min
from lipnets.nn.activations import FullSort, GroupSort, MaxMin

# ---------------------------------------------------------------------------
# Helpers: an independent view of the groups, written without the library.
# ---------------------------------------------------------------------------


def as_groups(t: torch.Tensor, group_size: int, dim: int) -> torch.Tensor:
    """Move `dim` last and split it into (n_groups, group_size)."""
    moved = t.movedim(dim, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // group_size, group_size)


def flip_pairs(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Swap the two entries of every adjacent pair (2i, 2i+1) along `dim`."""
    dim = dim % t.ndim
    return t.unflatten(dim, (t.shape[dim] // 2, 2)).flip(dim + 1).flatten(dim, dim + 1)


def make_input(shape, seed: int, ties: bool, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if ties:
        # Few distinct values, so exact ties inside groups are common.
        return torch.randint(-2, 3, shape, generator=gen).to(dtype)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def vjp(fn, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x), x, g)
    return grad


def norm(t: torch.Tensor) -> float:
    return torch.linalg.vector_norm(t).item()


@st.composite
def layouts(draw, group_sizes=None):
    """(shape, dim as passed, group_size): rank 1-4, any dim, positive or negative."""
    ndim = draw(st.integers(1, 4))
    axis = draw(st.integers(0, ndim - 1))
    group_size = draw(st.integers(1, 4) if group_sizes is None else group_sizes)
    n_groups = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    shape[axis] = group_size * n_groups
    dim = axis - ndim if draw(st.booleans()) else axis
    return tuple(shape), dim, group_size


SEEDS = st.integers(0, 2**31 - 1)
PROPERTY = settings(max_examples=60, deadline=None)
GRADIENT = settings(max_examples=30, deadline=None)

# Explicit layouts of PITFALLS row 15: NCHW (dim=1), NHWC (dim=-1), and dims 0 and 2.
FIXED_LAYOUTS = [
    pytest.param((3, 6, 4, 5), 1, id="NCHW-dim1"),
    pytest.param((3, 4, 5, 6), -1, id="NHWC-dim-1"),
    pytest.param((3, 4, 5, 6), 3, id="NHWC-dim3"),
    pytest.param((6, 4, 5), 0, id="dim0"),
    pytest.param((3, 4, 6, 5), 2, id="dim2"),
    pytest.param((3, 4, 6, 5), -2, id="dim-2"),
    pytest.param((5, 6), 1, id="NC"),
    pytest.param((12,), 0, id="1d"),
]


# ---------------------------------------------------------------------------
# Forward properties
# ---------------------------------------------------------------------------


def check_group_sort(x: torch.Tensor, group_size: int, dim: int) -> None:
    out = group_sort(x, group_size, dim)
    assert out.shape == x.shape
    groups_in, groups_out = as_groups(x, group_size, dim), as_groups(out, group_size, dim)
    # Each group is sorted in ascending order ...
    assert bool((groups_out[..., 1:] >= groups_out[..., :-1]).all())
    # ... and is a permutation of the same input group.
    assert torch.equal(groups_out.sort(dim=-1).values, groups_in.sort(dim=-1).values)
    # The module is a shell around the function.
    assert torch.equal(GroupSort(group_size, dim=dim)(x), out)


@PROPERTY
@given(layout=layouts(), seed=SEEDS, ties=st.booleans())
def test_group_sort_permutes_and_sorts_each_group(layout, seed, ties):
    shape, dim, group_size = layout
    check_group_sort(make_input(shape, seed, ties), group_size, dim)


@pytest.mark.parametrize(("shape", "dim"), FIXED_LAYOUTS)
@pytest.mark.parametrize("group_size", [1, 2, 3, 6])
def test_group_sort_fixed_layouts(shape, dim, group_size):
    if shape[dim] % group_size:
        group_size = shape[dim]
    for ties in (False, True):
        check_group_sort(make_input(shape, 0, ties), group_size, dim)


def test_group_sort_nchw_equals_nhwc():
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    nhwc = x.permute(0, 2, 3, 1)
    out_nchw = group_sort(x, 3, dim=1)
    out_nhwc = group_sort(nhwc, 3, dim=-1)
    assert torch.equal(out_nhwc.permute(0, 3, 1, 2), out_nchw)


def test_group_sort_group_size_one_is_identity():
    x = torch.randn(3, 5, dtype=torch.float64)
    assert torch.equal(group_sort(x, 1), x)


def test_group_sort_whole_dim_equals_full_sort():
    x = torch.randn(3, 5, 2, dtype=torch.float64)
    assert torch.equal(group_sort(x, 5), full_sort(x))


@PROPERTY
@given(layout=layouts(group_sizes=st.just(2)), seed=SEEDS, ties=st.booleans())
def test_max_min_is_flipped_group_sort_of_two(layout, seed, ties):
    shape, dim, _ = layout
    x = make_input(shape, seed, ties)
    out = max_min(x, dim)
    assert out.shape == x.shape
    pairs_in, pairs_out = as_groups(x, 2, dim), as_groups(out, 2, dim)
    assert torch.equal(pairs_out[..., 0], pairs_in.amax(dim=-1))
    assert torch.equal(pairs_out[..., 1], pairs_in.amin(dim=-1))
    # The documented order: group_sort(x, 2) with each pair's entries swapped.
    assert torch.equal(out, flip_pairs(group_sort(x, 2, dim), dim))
    assert torch.equal(MaxMin(dim=dim)(x), out)


def test_max_min_documented_order_on_a_pair():
    x = torch.tensor([[1.0, 4.0, 2.0, -3.0]])
    out = max_min(x)
    pairs = out.view(2, 2)
    # Maximum first, then minimum, in each pair; group_sort puts them the other way round.
    assert bool((pairs[:, 0] >= pairs[:, 1]).all())
    assert torch.equal(group_sort(x, 2).view(2, 2).flip(1), pairs)


@pytest.mark.parametrize(("shape", "dim"), FIXED_LAYOUTS)
def test_max_min_fixed_layouts(shape, dim):
    for ties in (False, True):
        x = make_input(shape, 1, ties)
        assert torch.equal(max_min(x, dim), flip_pairs(group_sort(x, 2, dim), dim))


def test_max_min_nan_propagates_to_its_pair():
    nan = float("nan")
    x = torch.tensor([[nan, 1.0, 1.0, nan, nan, nan, -2.0, 3.0]])
    out = max_min(x)
    expected = torch.tensor([[nan, nan, nan, nan, nan, nan, 3.0, -2.0]])
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


@PROPERTY
@given(layout=layouts(group_sizes=st.just(1)), seed=SEEDS, ties=st.booleans())
def test_full_sort_sorts_the_whole_dim(layout, seed, ties):
    shape, dim, _ = layout
    x = make_input(shape, seed, ties)
    out = full_sort(x, dim)
    moved_in, moved_out = x.movedim(dim, -1), out.movedim(dim, -1)
    assert bool((moved_out[..., 1:] >= moved_out[..., :-1]).all())
    assert torch.equal(moved_out.sort(dim=-1).values, moved_in.sort(dim=-1).values)
    assert torch.equal(FullSort(dim=dim)(x), out)


# ---------------------------------------------------------------------------
# Gradients: the vector-Jacobian product is a permutation (norm preserved)
# ---------------------------------------------------------------------------


ACTIVATIONS = [
    pytest.param(lambda t, d: group_sort(t, 2, d), 2, id="group_sort-2"),
    pytest.param(lambda t, d: group_sort(t, 3, d), 3, id="group_sort-3"),
    pytest.param(max_min, 2, id="max_min"),
    pytest.param(full_sort, None, id="full_sort"),
]


def check_vjp_is_permutation(fn, group_size, x, g, dim):
    grad = vjp(lambda t: fn(t, dim), x, g)
    size = x.shape[dim] if group_size is None else group_size
    # The gradient of a permutation is the inverse permutation of g (within each group) ...
    assert torch.equal(
        as_groups(grad, size, dim).sort(dim=-1).values,
        as_groups(g, size, dim).sort(dim=-1).values,
    )
    # ... hence ||vjp(g)|| == ||g||.
    assert math.isclose(norm(grad), norm(g), rel_tol=1e-12)


@pytest.mark.parametrize(("fn", "group_size"), ACTIVATIONS)
@GRADIENT
@given(seed=SEEDS, ties=st.booleans(), n_groups=st.integers(1, 3), nhwc=st.booleans())
def test_gradient_preserves_norm(fn, group_size, seed, ties, n_groups, nhwc):
    channels = 6 * n_groups
    shape, dim = ((2, 3, 2, channels), -1) if nhwc else ((2, channels, 3, 2), 1)
    x = make_input(shape, seed, ties and fn is not max_min)  # max_min ties: see below
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    check_vjp_is_permutation(fn, group_size, x, g, dim)


SORTS = [p for p in ACTIVATIONS if p.id != "max_min"]


@pytest.mark.parametrize(("fn", "group_size"), SORTS)
def test_gradient_preserves_norm_on_exact_ties(fn, group_size):
    # Every channel equal: every comparison is a tie; sort still routes each
    # output's gradient to exactly one input.
    x = torch.zeros(3, 6, dtype=torch.float64)
    g = torch.randn(3, 6, dtype=torch.float64)
    check_vjp_is_permutation(fn, group_size, x, g, 1)


def test_max_min_gradient_at_exact_ties_averages_and_never_grows():
    # Note [MaxMin ties]: torch.maximum/minimum split the gradient evenly at a == b.
    x = torch.zeros(3, 6, dtype=torch.float64)
    g = torch.randn(3, 6, dtype=torch.float64)
    grad = vjp(lambda t: max_min(t, 1), x, g)
    mean = g.unflatten(1, (3, 2)).mean(-1, keepdim=True).expand(3, 3, 2).flatten(1)
    torch.testing.assert_close(grad, mean, rtol=0, atol=1e-15)
    assert norm(grad) <= norm(g) * (1 + 1e-12)


@pytest.mark.parametrize(("fn", "group_size"), SORTS)
def test_jacobian_at_ties_is_a_permutation_matrix(fn, group_size):
    x = torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0, 0.0], dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: fn(t, 0), x)
    assert bool(((jac == 0) | (jac == 1)).all())
    assert torch.equal(jac.sum(0), torch.ones(6, dtype=torch.float64))
    assert torch.equal(jac.sum(1), torch.ones(6, dtype=torch.float64))
    # And the forward value is that permutation applied to x.
    assert torch.equal(jac @ x, fn(x, 0))


def test_max_min_jacobian_at_ties_is_doubly_stochastic_with_norm_one():
    x = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 0.0], dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: max_min(t, 0), x)
    assert torch.equal(jac.sum(0), torch.ones(6, dtype=torch.float64))
    assert torch.equal(jac.sum(1), torch.ones(6, dtype=torch.float64))
    assert float(torch.linalg.matrix_norm(jac, 2)) <= 1 + 1e-12
    assert torch.equal(jac @ x, max_min(x, 0))


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_group_sort_channels_not_divisible():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="group_size") as info:
        group_sort(x, 3)
    assert "3" in str(info.value)
    assert "10" in str(info.value)
    with pytest.raises(ValueError, match="10"):
        GroupSort(4)(x)


def test_group_sort_channels_not_divisible_other_dim():
    x = torch.randn(7, 4, 4)
    with pytest.raises(ValueError) as info:
        group_sort(x, 2, dim=0)
    assert "group_size=2" in str(info.value)
    assert "7" in str(info.value)


@pytest.mark.parametrize("dim", [1, -1])
def test_max_min_odd_channels(dim):
    x = torch.randn(2, 5)
    with pytest.raises(ValueError) as info:
        max_min(x, dim)
    assert "5" in str(info.value)
    assert "2" in str(info.value)
    with pytest.raises(ValueError, match="5"):
        MaxMin(dim)(x)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, False, "2", None])
def test_bad_group_size(bad):
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="group_size") as info:
        group_sort(x, bad)
    assert repr(bad) in str(info.value)
    with pytest.raises(ValueError, match="group_size"):
        GroupSort(bad)


@pytest.mark.parametrize("fn", [lambda t: group_sort(t, 2), max_min, full_sort])
@pytest.mark.parametrize("bad", [[1.0, 2.0], 3.0, None])
def test_non_tensor_input(fn, bad):
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        fn(bad)


@pytest.mark.parametrize(
    "fn", [lambda t, d: group_sort(t, 2, d), max_min, full_sort], ids=["gs", "mm", "fs"]
)
@pytest.mark.parametrize("dim", [2, -3, 5])
def test_dim_out_of_range(fn, dim):
    x = torch.randn(2, 4)
    with pytest.raises(IndexError, match=f"dim={dim}") as info:
        fn(x, dim)
    assert "ndim=2" in str(info.value)


def test_zero_dim_input():
    with pytest.raises(IndexError, match="ndim=0"):
        full_sort(torch.tensor(1.0), 0)


@pytest.mark.parametrize("bad", [1.0, "1", None, True])
def test_bad_dim_type(bad):
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match="dim must be an int"):
        max_min(x, bad)
    for make in (lambda: GroupSort(2, dim=bad), lambda: MaxMin(bad), lambda: FullSort(bad)):
        with pytest.raises(TypeError, match="dim must be an int"):
            make()


def test_extra_repr():
    assert repr(GroupSort(3, dim=-1)) == "GroupSort(group_size=3, dim=-1)"
    assert repr(MaxMin()) == "MaxMin(dim=1)"
    assert repr(FullSort(dim=2)) == "FullSort(dim=2)"


# ---------------------------------------------------------------------------
# dtype, device, memory layout
# ---------------------------------------------------------------------------

MODULES = [
    pytest.param(lambda: GroupSort(2), id="GroupSort-2"),
    pytest.param(lambda: GroupSort(3), id="GroupSort-3"),
    pytest.param(lambda: MaxMin(), id="MaxMin"),
    pytest.param(lambda: FullSort(), id="FullSort"),
]


@pytest.mark.parametrize("make", MODULES)
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64]
)
def test_dtype_and_device_propagate(make, dtype):
    module = make()
    x = make_input((3, 6, 2, 2), 3, ties=False, dtype=dtype)
    out = module(x)
    assert out.dtype == dtype
    assert out.device == x.device
    # Only a rearrangement: the same result as in float64, converted back exactly.
    assert torch.equal(out, module(x.to(torch.float64)).to(dtype))


@pytest.mark.parametrize("make", MODULES)
def test_non_contiguous_input(make):
    module = make()
    base = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    nchw_view = base.permute(0, 3, 1, 2)  # (3, 6, 4, 5), channels strided
    sliced = torch.randn(3, 12, 4, dtype=torch.float64)[:, ::2]  # (3, 6, 4)
    for x in (nchw_view, sliced):
        assert not x.is_contiguous()
        assert torch.equal(module(x), module(x.contiguous()))


# ---------------------------------------------------------------------------
# Lipschitz bound
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", MODULES)
def test_lipschitz_bound_is_one(make):
    module = make()
    for bound in (module.lipschitz_bound(), module.lipschitz_bound(input_shape=(2, 6, 4, 4))):
        assert isinstance(bound, torch.Tensor)
        assert bound.ndim == 0
        assert bound.dtype == torch.float64
        assert bound.device.type == "cpu"
        assert bound.item() == 1.0


@pytest.mark.parametrize("make", MODULES)
def test_empirical_lipschitz_ratio_within_bound(make):
    module = make()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(512, 6, 2, 2, generator=gen, dtype=torch.float64)
    # Far pairs, near pairs (order changes inside a group) and pairs from a tie.
    y_far = torch.randn(512, 6, 2, 2, generator=gen, dtype=torch.float64)
    y_near = x + 1e-3 * torch.randn(512, 6, 2, 2, generator=gen, dtype=torch.float64)
    x_tie = torch.zeros(512, 6, 2, 2, dtype=torch.float64)
    pairs = [(x, y_far), (x, y_near), (x_tie, y_near)]
    bound = module.lipschitz_bound().item()
    for a, b in pairs:
        num = torch.linalg.vector_norm((module(a) - module(b)).flatten(1), dim=1)
        den = torch.linalg.vector_norm((a - b).flatten(1), dim=1)
        assert (num / den).max().item() <= bound + 1e-12


# ---------------------------------------------------------------------------
# ONNX export and torch.compile (PITFALLS row 14)
# ---------------------------------------------------------------------------


def export_and_run(module, x, path):
    import onnx
    import onnxruntime

    # The dynamo-based exporter (torch.export + onnxscript); the legacy
    # TorchScript exporter (dynamo=False) gives the same op types here.
    torch.onnx.export(module.eval(), (x,), str(path), dynamo=True, verbose=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    op_types = {node.op_type for node in model.graph.node}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return op_types, torch.from_numpy(out)


def test_onnx_export_max_min(tmp_path):
    module = MaxMin()
    x = torch.randn(4, 6, 3, 3)
    x[0, 0] = x[0, 1]  # exact ties are exported correctly too
    op_types, out = export_and_run(module, x, tmp_path / "maxmin.onnx")
    # Elementwise Max and Min, never a sort.
    assert {"Max", "Min"} <= op_types
    assert not op_types & {"TopK", "Sort"}
    torch.testing.assert_close(out, module(x), rtol=0, atol=1e-6)


def test_onnx_export_group_sort(tmp_path):
    module = GroupSort(3)
    x = torch.randn(4, 6, 3, 3)
    op_types, out = export_and_run(module, x, tmp_path / "groupsort.onnx")
    assert "TopK" in op_types  # torch.sort exports as ONNX TopK (k = group size)
    torch.testing.assert_close(out, module(x), rtol=0, atol=1e-6)


def test_torch_compile_matches_eager():
    # backend="aot_eager" (Dynamo + AOTAutograd, no code generation): inductor
    # also gives identical outputs, but its cold start (C++ toolchain, ~20 s on
    # 2 CPU cores) would triple this file's runtime.
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    for module in (GroupSort(2), MaxMin()):
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
        out_eager, out_compiled = module(x), compiled(x)
        assert torch.equal(out_compiled, out_eager)
        (grad_eager,) = torch.autograd.grad(out_eager, x, g)
        (grad_compiled,) = torch.autograd.grad(out_compiled, x, g)
        assert torch.equal(grad_compiled, grad_eager)
        assert torch.equal(compiled.lipschitz_bound(), module.lipschitz_bound())
