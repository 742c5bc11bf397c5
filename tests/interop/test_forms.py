"""The traced forms of deel-torchlip's and orthogonium's activations compute their functions.

Each form (Note [Traced forms] in lipnets.graph.forms) must equal the peer module bit for
bit, on random inputs of several shapes, both called directly and as the traced graph that
every lipnets entry point reads; the bounds and propagation of the forms are then exact
consequences of the op table.
"""

from __future__ import annotations

import pytest
import torch
from deel import torchlip as tl
from deel.torchlip import functional as deel_functional
from orthogonium.layers.custom_activations import MaxMin as OrthoMaxMin
from torch import nn

import lipnets
from lipnets.errors import LipnetsWarning
from lipnets.graph import trace
from lipnets.graph.forms import form_of, register_checked_form, source_digest
from lipnets.propagation import crown_bounds, interval_bounds

pytestmark = pytest.mark.usefixtures("one_thread")  # small models on a shared machine

DT = torch.float64
SHAPES = [(5, 8), (3, 4, 5, 6), (2, 8, 3), (4, 12, 2, 2), (2, 6, 4)]


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=DT)
    x.view(-1)[::7] = 0.0  # ties and zeros, where sorting and ReLUs switch
    x.view(-1)[1::11] = x.view(-1)[2::11][: x.view(-1)[1::11].numel()]
    return x


def _deel_modules():
    return [
        tl.GroupSort2(),
        tl.GroupSort2(k_coef_lip=0.5),
        tl.GroupSort(2, k_coef_lip=3.0),
        tl.GroupSort(4),
        tl.GroupSort(1),
        tl.FullSort(),
        tl.FullSort(k_coef_lip=2.0),
        tl.GroupSort(None, k_coef_lip=0.25),
        tl.MaxMin(),
        tl.MaxMin(k_coef_lip=2.0),
        tl.MaxMin(dim=2),
    ]


def _ortho_modules():
    return [OrthoMaxMin(), OrthoMaxMin(axis=2), OrthoMaxMin(axis=-1)]


def _fits(module, shape) -> bool:
    """Shapes the peer module itself accepts (channels divisible by the group, dims exist)."""
    try:
        module(torch.zeros(shape, dtype=DT))
    except (RuntimeError, ValueError, IndexError):
        return False
    return True


@pytest.mark.parametrize("module", _deel_modules() + _ortho_modules(), ids=repr)
def test_form_and_traced_graph_equal_the_peer_module_bit_for_bit(module) -> None:
    lipnets.lipschitz_bound(nn.Sequential(module))  # first sight: the interop module loads
    form = form_of(module)
    assert form is not None
    tried = 0
    for shape in SHAPES:
        if not _fits(module, shape):
            continue
        tried += 1
        for seed in range(3):
            x = _inputs(shape, seed)
            expected = module(x)
            assert torch.equal(form(module, x), expected)
            graph = trace(nn.Sequential(module), shape)  # the eager check runs too
            assert torch.equal(graph.gm(x), expected)
    assert tried >= 2


def test_forms_load_only_when_a_peer_class_is_seen() -> None:
    # The forms' modules import the peers; lipnets itself does not.
    import subprocess
    import sys

    code = (
        "import sys, torch, lipnets\n"
        "from torch import nn\n"
        "lipnets.lipschitz_bound(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))\n"
        "assert not any(m.startswith(('deel', 'orthogonium', 'lipnets.interop.')) "
        "for m in sys.modules), sorted(m for m in sys.modules if 'interop' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (tl.GroupSort2(), 1.0),
        (tl.GroupSort2(k_coef_lip=0.5), 0.5),
        (tl.FullSort(k_coef_lip=2.0), 2.0),
        (tl.GroupSort(4, k_coef_lip=-3.0), 3.0),
        (OrthoMaxMin(), 1.0),
        (OrthoMaxMin(axis=-1), 1.0),
    ],
    ids=repr,
)
def test_sorting_forms_are_bounded_by_their_scale_exactly(module, expected) -> None:
    assert float(lipnets.lipschitz_bound(nn.Sequential(module), (2, 8))) == expected
    assert float(lipnets.lipschitz_bound(nn.Sequential(module))) == expected


def test_deel_maxmin_is_crelu_and_its_bound_is_sound() -> None:
    # cat(relu(x), relu(-x)) is 1-Lipschitz; the fold bounds it by sqrt(2) (loose, sound).
    bound = float(lipnets.lipschitz_bound(nn.Sequential(tl.MaxMin()), (1, 4)))
    assert bound == pytest.approx(2**0.5, rel=1e-15)


@pytest.mark.parametrize(
    ("peer", "lipnets_twin"),
    [
        (tl.GroupSort2(), lipnets.GroupSort(2)),
        (tl.FullSort(), lipnets.FullSort()),
    ],
    ids=["GroupSort2", "FullSort"],
)
def test_propagation_through_a_form_equals_lipnets_own_activation(peer, lipnets_twin) -> None:
    g = torch.Generator().manual_seed(3)
    first, last = nn.Linear(6, 8).to(DT), nn.Linear(8, 3).to(DT)
    with torch.no_grad():
        for p in [*first.parameters(), *last.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    a = nn.Sequential(first, peer, last)
    b = nn.Sequential(first, lipnets_twin, last)
    x = torch.randn(4, 6, generator=g, dtype=DT)
    for fn in (crown_bounds, interval_bounds):
        (lo_a, up_a), (lo_b, up_b) = fn(a, x, 0.1, norm=2), fn(b, x, 0.1, norm=2)
        assert torch.equal(lo_a, lo_b) and torch.equal(up_a, up_b)


def test_orthogonium_maxmin_crown_bounds_contain_sampled_outputs() -> None:
    g = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 8), OrthoMaxMin(), nn.Linear(8, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    x = torch.randn(2, 6, generator=g, dtype=DT)
    eps = 0.3
    lo, up = crown_bounds(model, x, eps, norm=2)
    d = torch.randn(2, 2000, 6, generator=g, dtype=DT)
    d = d / d.norm(dim=-1, keepdim=True) * eps * torch.rand(2, 2000, 1, generator=g, dtype=DT)
    d[:, :1000] = d[:, :1000] / d[:, :1000].norm(dim=-1, keepdim=True) * eps  # the sphere
    out = model((x[:, None] + d).reshape(-1, 6)).reshape(2, 2000, 3)
    slack = 1e-12
    assert bool((out >= lo[:, None] - slack).all() and (out <= up[:, None] + slack).all())


class _SubclassWithForward(tl.GroupSort2):
    def forward(self, input):
        return 10 * super().forward(input)


def test_a_subclass_that_defines_forward_gets_no_form() -> None:
    module = _SubclassWithForward()
    lipnets.lipschitz_bound(nn.Sequential(tl.GroupSort2()))
    assert form_of(module) is None
    with pytest.raises(lipnets.errors.UntraceableModelError, match="_SubclassWithForward"):
        lipnets.lipschitz_bound(nn.Sequential(module), (1, 4))


class _Peer(nn.Module):
    def forward(self, x):
        return 2 * x


def test_a_form_is_registered_only_for_the_code_it_was_checked_against() -> None:
    with pytest.warns(LipnetsWarning, match="differs from the version"):
        assert not register_checked_form(_Peer, lambda m, x: 2 * x, (_Peer.forward,), "0" * 64)
    assert form_of(_Peer()) is None
    digest = source_digest(_Peer.forward)
    assert register_checked_form(_Peer, lambda m, x: 2 * x, (_Peer.forward,), digest)
    assert form_of(_Peer()) is not None
    # the interop modules' digests are those of the installed peers (else no form loads)
    from lipnets.interop import orthogonium as O
    from lipnets.interop import torchlip as T

    assert source_digest(tl.GroupSort.forward, deel_functional.group_sort) == T._GROUP_SORT
    assert source_digest(OrthoMaxMin.forward) == O._MAX_MIN
