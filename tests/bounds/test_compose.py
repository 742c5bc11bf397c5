"""Composition of sound bounds over the traced graph (AutoLip as a graph algorithm)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

import lipnets
from lipnets import lipschitz_bound
from lipnets.errors import ShapeRequiredError, UnboundedModuleError, UntraceableModelError
from tests.helpers import as_float64, dense_jacobian, lipschitz_ascent, spectral_norm

# ---------------------------------------------------------------------------
# Seeded random models
# ---------------------------------------------------------------------------

_ACTS = [
    lambda: nn.ReLU(),
    lambda: lipnets.GroupSort(2),
    lambda: lipnets.MaxMin(),
    lambda: lipnets.FullSort(),
    lambda: nn.Tanh(),
    lambda: nn.LeakyReLU(0.2),
    lambda: nn.Sigmoid(),
]


def _linear(rng: random.Random, d_in: int, d_out: int) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    with torch.no_grad():
        layer.weight.mul_(rng.uniform(0.5, 2.5))
    return layer


class RandomNet(nn.Module):
    """A random program over Linear, activations, residual adds (x + f(x) and
    a x + (1 - a) f(x)), concatenation, flatten, slicing and scalar scaling."""

    def __init__(self, seed: int, linear_only: bool = False) -> None:
        super().__init__()
        rng = random.Random(seed)
        self.d_in = d = rng.choice([4, 6, 8])
        self.blocks = nn.ModuleList()
        self.plan: list[tuple[str, object]] = []
        kinds = ["seq", "res", "convex", "cat", "slice", "pick", "flatten", "scale"]
        for _ in range(rng.randint(2, 5)):
            kind = rng.choice(kinds)
            act = (lambda: nn.Identity()) if linear_only else rng.choice(_ACTS)
            extra: object = None
            if kind == "seq":
                d_out = rng.choice([4, 6, 8])
                block = nn.Sequential(_linear(rng, d, d_out), act())
                d = d_out
            elif kind in ("res", "convex"):
                block = nn.Sequential(_linear(rng, d, d), act(), _linear(rng, d, d))
                extra = rng.uniform(-0.5, 1.5)
            elif kind == "cat":
                half = rng.choice([2, 4])
                block = nn.Sequential(_linear(rng, d, half), act())
                d += half
            elif kind == "slice":
                block, extra = nn.Identity(), rng.randrange(2, d + 1, 2)
                d = extra
            elif kind == "pick":
                idx = [rng.randrange(d) for _ in range(rng.choice([2, 4]))]
                block, extra, d = nn.Identity(), idx, len(idx)
            elif kind == "flatten":
                block = nn.Identity()
            else:
                block, extra = nn.Identity(), rng.uniform(-3, 3)
            self.blocks.append(block)
            self.plan.append((kind, extra))

    def forward(self, x):
        for (kind, extra), block in zip(self.plan, self.blocks, strict=True):
            if kind == "seq":
                x = block(x)
            elif kind == "res":
                x = x + block(x)
            elif kind == "convex":
                x = extra * x + (1 - extra) * block(x)
            elif kind == "cat":
                x = torch.cat([x, block(x)], dim=1)
            elif kind == "slice":
                x = x[:, :extra]
            elif kind == "pick":
                x = x[:, extra]
            elif kind == "flatten":
                x = x.reshape(x.shape[0], 2, -1).flatten(1)
            else:
                x = extra * x
        return x


@pytest.mark.parametrize("chunk", range(8))
def test_bound_dominates_gradient_ascent_on_200_random_models(chunk):
    for seed in range(chunk * 25, chunk * 25 + 25):
        torch.manual_seed(seed)
        model = RandomNet(seed).eval()
        shape = (1, model.d_in)
        bound = float(lipschitz_bound(model, shape))
        found = lipschitz_ascent(as_float64(model), shape, starts=8, steps=25, seed=seed)
        assert 0 < found <= bound * (1 + 1e-9), f"seed {seed}: ascent {found} > bound {bound}"


@pytest.mark.parametrize("seed", range(40))
def test_bound_of_random_linear_graphs_dominates_the_dense_operator(seed):
    # With identities for activations every model is linear: its dense
    # Jacobian is the operator, so the bound must dominate the exact norm.
    torch.manual_seed(seed)
    model = RandomNet(seed, linear_only=True).eval()
    shape = (1, model.d_in)
    exact = spectral_norm(dense_jacobian(as_float64(model), torch.randn(shape)))
    assert exact <= float(lipschitz_bound(model, shape)) * (1 + 1e-9)


# ---------------------------------------------------------------------------
# Exact compositions
# ---------------------------------------------------------------------------


def test_chain_of_linear_layers_is_product_of_exact_norms():
    torch.manual_seed(0)
    layers = [nn.Linear(a, b) for a, b in [(9, 7), (7, 12), (12, 5), (5, 3)]]
    model = nn.Sequential(*layers)
    product = math.prod(float(torch.linalg.svdvals(m.weight.detach().double())[0]) for m in layers)
    assert float(lipschitz_bound(model)) == pytest.approx(product, rel=1e-6)
    assert float(lipschitz_bound(model, (1, 9))) == pytest.approx(product, rel=1e-6)


class Residual(nn.Module):
    def __init__(self, f: nn.Module, a: float | None = None) -> None:
        super().__init__()
        self.f, self.a = f, a

    def forward(self, x):
        if self.a is None:
            return x + self.f(x)
        return self.a * x + (1 - self.a) * self.f(x)


def test_residual_is_one_plus_inner_bound_not_a_product(f64_tol):
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(6, 6), lipnets.GroupSort(2), nn.Linear(6, 6))
    inner = float(lipschitz_bound(f))
    assert float(lipschitz_bound(Residual(f), (1, 6))) == f64_tol.approx(1 + inner)
    for a in (0.3, -0.5, 1.7):
        expected = abs(a) + abs(1 - a) * inner
        got = float(lipschitz_bound(Residual(f, a), (1, 6)))
        assert got == f64_tol.approx(expected)


def test_residual_with_identity_branch_on_adversarial_pairs(f64_tol):
    # PITFALLS row 1: with f = identity, x + f(x) = 2x and the merge constant
    # is reached exactly on any pair; a convex merge is exactly 1.
    x = torch.randn(8, 5, dtype=torch.float64)
    delta = torch.randn(8, 5, dtype=torch.float64)
    for a, expected in ((None, 2.0), (0.25, 1.0)):
        model = Residual(nn.Identity(), a)
        ratio = (model(x + delta) - model(x)).norm(dim=1) / delta.norm(dim=1)
        bound = float(lipschitz_bound(model, (1, 5)))
        assert bound == pytest.approx(expected)
        assert float(ratio.max()) == f64_tol.approx(bound)


class Merge(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, x):
        if self.how == "cat":
            return torch.cat([x, x], dim=1)
        if self.how == "stack":
            return torch.stack([x, -x, x], dim=1)
        if self.how == "pick":
            return x[:, [0, 0, 0, 1]]
        if self.how == "pick-neg":
            return x[:, [1, -1]]
        if self.how == "broadcast":
            return x[:, :1] + x
        if self.how == "mean":
            return x.mean(dim=1)
        if self.how == "sum":
            return x.sum(dim=1)
        if self.how == "max":
            return torch.maximum(x, 2 * x[:, :1])
        raise AssertionError(self.how)


@pytest.mark.parametrize(
    "how,expected",
    [
        ("cat", math.sqrt(2)),
        ("stack", math.sqrt(3)),
        ("pick", math.sqrt(3)),
        ("pick-neg", math.sqrt(2)),
        ("broadcast", None),
        ("mean", 1 / math.sqrt(2)),
        ("sum", math.sqrt(2)),
        ("max", None),
    ],
)
def test_merge_rules_dominate_the_exact_operator(how, expected, f64_tol):
    model = Merge(how)
    shape = (1, 2)
    bound = float(lipschitz_bound(model, shape))
    exact = lipschitz_ascent(model, shape, steps=30)
    assert exact <= bound * (1 + 1e-9)
    if expected is not None:
        assert bound == f64_tol.approx(expected)
        assert exact == pytest.approx(expected, rel=1e-6)


def test_broadcasting_an_input_dependent_tensor_is_counted():
    # x[:, :1] is added to all 4 columns: its entry is repeated 4 times.
    model = Merge("broadcast")
    shape = (1, 4)
    exact = spectral_norm(dense_jacobian(model, torch.randn(shape)))
    bound = float(lipschitz_bound(model, shape))
    assert exact > 2.0  # a bound that ignored broadcasting (1 + 1 = 2) would be unsound
    assert exact <= bound * (1 + 1e-12)


def test_scaling_by_a_constant_tensor():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.tensor([0.5, -3.0, 2.0]))

        def forward(self, x):
            return self.gamma * x / 2

    model = Scale()
    assert float(lipschitz_bound(model, (1, 3))) == pytest.approx(1.5)
    with pytest.raises(ShapeRequiredError, match="input_shape"):
        lipschitz_bound(model)


# ---------------------------------------------------------------------------
# Parts without a rule, untraceable models, faithfulness of the graph
# ---------------------------------------------------------------------------


class Square(nn.Module):
    def forward(self, x):
        return x * x


def test_user_module_without_rule_is_named():
    with pytest.raises(UnboundedModuleError, match=r"1 \(Square\)"):
        lipschitz_bound(nn.Sequential(nn.Linear(4, 4), Square()))


def test_builtin_without_rule_is_named():
    with pytest.raises(UnboundedModuleError, match=r"1 \(Softplus\) has no bound rule"):
        lipschitz_bound(nn.Sequential(nn.Linear(4, 4), nn.Softplus()))


def test_unknown_op_is_named_by_its_node():
    class Exp(nn.Module):
        def forward(self, x):
            return torch.exp(x)

    with pytest.raises(UnboundedModuleError, match=r"0 \(Exp\), node 'exp'"):
        lipschitz_bound(nn.Sequential(Exp()))


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class Holder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.inner = inner

    def forward(self, x):
        return self.inner(self.lin(x))


def test_untraceable_module_is_named_and_a_method_fixes_it():
    with pytest.raises(UntraceableModelError, match=r"inner \(DataDependent\).*lipschitz_bound"):
        lipschitz_bound(Holder(DataDependent()))

    class Bounded(DataDependent):
        def lipschitz_bound(self, input_shape=None):
            return torch.tensor(1.0, dtype=torch.float64)  # |x| sign flip: 1-Lipschitz pieces

    model = Holder(Bounded())
    assert float(lipschitz_bound(model)) == pytest.approx(float(lipschitz_bound(model.lin)))


def test_in_place_update_of_a_reused_tensor_is_refused():
    class Alias(nn.Module):
        def forward(self, x):
            h = x
            x += 2 * x  # fx records an out-of-place add; eager mutates h too
            return h + x

    class ReluInPlace(nn.Module):
        def forward(self, x):
            y = 2 * x
            z = y.relu_()
            return z + y

    # One faithfulness policy (Note [Graph faithfulness]): the source scan refuses it
    # with or without a shape, with the same error.
    for shape in (None, (2, 3)):
        with pytest.raises(UntraceableModelError, match=r"`x \+= 2 \* x`"):
            lipschitz_bound(Alias(), shape)
    with pytest.raises(UntraceableModelError, match="in place"):
        lipschitz_bound(ReluInPlace(), (2, 3))
    # The usual pattern, an in-place op on a tensor not used again, is fine.
    ok = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True), nn.Linear(3, 2))
    assert float(lipschitz_bound(ok, (1, 3))) > 0


def test_bound_computation_has_no_side_effects():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    model(torch.randn(16, 4))
    model.eval()
    model[2].train()  # training-mode dropout draws random numbers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    lipschitz_bound(model, (3, 4))
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_arguments_raise_clear_errors():
    model = nn.Linear(3, 3)
    for bad in [(0, 3), (1, -2), (), "1,3", (1.5, 3), 3]:
        with pytest.raises(ValueError, match="input_shape"):
            lipschitz_bound(nn.Sequential(model), bad)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        lipschitz_bound(lambda x: x)
    with pytest.raises(ValueError, match="shape"):
        lipschitz_bound(nn.Sequential(model), (1, 4))  # wrong feature size


def test_reflect_padding_is_the_root_of_its_largest_copy_count():
    class Pad(nn.Module):
        def forward(self, x):
            return nn.functional.pad(x, (1, 1), mode="reflect")

    basis = torch.eye(10, dtype=torch.float64).reshape(10, 2, 5)
    exact = torch.linalg.matrix_norm(Pad()(basis).reshape(10, -1), ord=2)  # entries 1, 3: twice
    assert float(lipschitz_bound(Pad(), (1, 2, 5))) == pytest.approx(float(exact), rel=1e-12)
    assert float(exact) == pytest.approx(2**0.5, rel=1e-12)


def test_wrappers_are_unwrapped_and_compile_matches_eager():
    torch.manual_seed(0)
    # PITFALLS row 14: a scaled (k != 1) sequential model under torch.compile.
    model = nn.Sequential(nn.Linear(5, 8), lipnets.GroupSort(2), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[2].weight.mul_(3.0)
    eager = lipschitz_bound(model)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(4, 5)
    torch.testing.assert_close(compiled(x), model(x))
    assert torch.equal(lipschitz_bound(compiled), eager)
    assert torch.equal(lipschitz_bound(nn.DataParallel(model)), eager)


def test_bound_follows_weight_changes_and_load_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    first = lipschitz_bound(model)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    assert float(lipschitz_bound(model)) == pytest.approx(2 * float(first))
    other = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    other.load_state_dict(model.state_dict())
    assert torch.equal(lipschitz_bound(other), lipschitz_bound(model))


def test_constant_model_and_tuple_outputs():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x), {"b": self.b(x)}

    model = Two()
    la, lb = float(lipschitz_bound(model.a)), float(lipschitz_bound(model.b))
    assert float(lipschitz_bound(model)) == pytest.approx(math.hypot(la, lb))

    class Const(nn.Module):
        def forward(self, x):
            return torch.zeros_like(x) + 1

    assert float(lipschitz_bound(Const(), (1, 3))) == 0.0
