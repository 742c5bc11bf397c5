"""Branch and bound (`lipnets.verify.verify`) against the exact MILP answers, and attacked.

The 200 seeded cases of `tests.verify.cases` (ReLU and MaxMin networks, l-infinity balls,
a tenth of them inside the input domain [0, 1]) carry `milp_verify`'s exact answers, each
at least `GAP` from the boundary: branch and bound must give the same answer on every
one, every counterexample must be confirmed by a forward pass, and no verified case may
fall to PGD.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lipnets
from lipnets.certify import certify_crown
from lipnets.estimators.attack import pgd_l2
from lipnets.verify import verify
from lipnets.verify.attack import attack_margins
from tests.verify.cases import verification_cases

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64


@pytest.fixture(scope="module")
def answers():
    cases = verification_cases(200)
    results = []
    for case in cases:
        result = verify(
            case.model, case.x, case.y, case.eps, domain=case.domain, time_limit=30.0,
            progress=False,
        )  # fmt: skip
        results.append(result)
    return cases, results


def test_agrees_with_milp_on_200_cases(answers):
    cases, results = answers
    wrong = [
        (c.name, c.status, r.status[0], r.reason[0])
        for c, r in zip(cases, results, strict=True)
        if r.status[0] != c.status
    ]
    assert not wrong, f"{len(wrong)} disagreements with the MILP: {wrong[:5]}"
    # the set is not trivial: BaB decides what CROWN alone leaves open
    beyond = sum(c.status == "verified" and not c.crown_verified for c in cases)
    falsified = sum(c.status == "falsified" for c in cases)
    assert beyond >= 20 and falsified >= 20


def test_counterexamples_are_real_and_inside(answers):
    cases, results = answers
    for case, result in zip(cases, results, strict=True):
        if result.status[0] != "falsified":
            assert bool(torch.isnan(result.counterexample).all())
            continue
        point = result.counterexample
        assert float((point - case.x).abs().max()) <= case.eps * (1 + 1e-12)
        if case.domain is not None:
            assert bool(((point >= case.domain[0]) & (point <= case.domain[1])).all())
        with torch.no_grad():
            scores = case.model(point)[0]
        y = int(case.y)
        others = torch.cat([scores[:y], scores[y + 1 :]])
        assert float(scores[y] - others.max()) <= 0


def test_verified_cases_resist_pgd(answers):
    cases, results = answers
    for case, result in zip(cases, results, strict=True):
        if result.status[0] != "verified":
            continue
        assert float(result.lower[0]) > 0
        spec = torch.eye(case.model[-1].out_features, dtype=DT)[case.y] - torch.eye(
            case.model[-1].out_features, dtype=DT
        )
        keep = torch.arange(spec.shape[0]) != int(case.y)
        spec = spec[keep].unsqueeze(0)
        generator = torch.Generator().manual_seed(5)
        domain = None
        if case.domain is not None:
            domain = tuple(torch.full_like(case.x, v) for v in case.domain)
        point = attack_margins(
            case.model, case.x, spec, torch.tensor([case.eps], dtype=DT), math.inf,
            generator, domain, steps=40, restarts=4,
        )  # fmt: skip
        with torch.no_grad():
            value = float((spec @ case.model(point).reshape(1, -1, 1)).min())
        assert value >= float(result.lower[0]) - 1e-9


def test_never_below_crown():
    """Whatever CROWN certifies, branch and bound verifies (at the root)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                          nn.Linear(12, 4)).to(DT)  # fmt: skip
    x = torch.randn(30, 5, dtype=DT)
    y = model(x).argmax(1)
    for eps in (0.05, 0.2):
        crown = certify_crown(model, x, y, eps, norm=math.inf)
        result = verify(model, x, y, eps, progress=False)
        assert bool((result.verified | ~crown).all())
        assert not bool((result.falsified & crown).any())
        roots = [r == "root" for r in result.reason]
        assert all(roots[i] for i in range(30) if bool(crown[i]))


def test_l2_sound_against_pgd():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 10), lipnets.MaxMin(), nn.Linear(10, 3)).to(DT)
    x = torch.randn(25, 4, dtype=DT)
    y = model(x).argmax(1)
    result = verify(model, x, y, 0.3, norm=2, progress=False)
    assert set(result.status) <= {"verified", "falsified", "unknown"}
    adv = pgd_l2(model, x, y, 0.3, steps=100, restarts=5)
    with torch.no_grad():
        broken = model(adv).argmax(1) != y
    assert not bool((broken & result.verified).any())
    assert result.verified.any() and result.falsified.any()
    for i in torch.nonzero(result.falsified).flatten().tolist():
        point = result.counterexample[i : i + 1]
        assert float((point - x[i]).norm()) <= 0.3 * (1 + 1e-12)
        with torch.no_grad():
            scores = model(point)[0]
        assert float(scores[y[i]]) <= float(torch.cat([scores[: y[i]], scores[y[i] + 1 :]]).max())


def test_binary_classifier_and_leaky_relu():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1)).to(DT)
    x = torch.randn(20, 3, dtype=DT)
    y = (model(x)[:, 0] > 0).long()
    result = verify(model, x, y, 0.2, progress=False)
    assert "unknown" not in result.status
    signs = 2.0 * y.to(DT) - 1
    for i, status in enumerate(result.status):
        if status == "falsified":
            with torch.no_grad():
                assert float(signs[i] * model(result.counterexample[i : i + 1])[0, 0]) <= 0


def test_budget_ends_unknown_not_wrong():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 3)).to(DT)  # fmt: skip
    x = torch.randn(12, 8, dtype=DT)
    y = model(x).argmax(1)
    result = verify(model, x, y, 0.3, max_nodes=1, attack=False, progress=False)
    assert "unknown" in result.status
    for i, status in enumerate(result.status):
        if status == "unknown":
            assert result.reason[i] == "node limit"
            assert float(result.lower[i]) <= 0
        elif status == "verified":
            assert result.reason[i] == "root" and float(result.lower[i]) > 0
    broken = pgd_l2(model, x, y, 0.3, steps=50, restarts=3)  # inside the l-inf ball too
    with torch.no_grad():
        assert not bool(((model(broken).argmax(1) != y) & result.verified).any())


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"time_limit": 0}, ValueError, "time_limit must be"),
        ({"max_nodes": 0}, ValueError, "max_nodes must be"),
        ({"batch_size": 1}, ValueError, "batch_size must be"),
        ({"optimize": -2}, ValueError, "optimize must be"),
        ({"attack": "yes"}, TypeError, "attack must be"),
        ({"domain": (0.5, 0.4)}, ValueError, "lo <= hi"),
        ({"domain": (2.0, 3.0)}, ValueError, "lie in the domain"),
        ({"domain": 1.0}, TypeError, "domain must be"),
        ({"norm": 3}, ValueError, "norm must be"),
    ],
)
def test_errors(kwargs, error, text):
    model = nn.Sequential(nn.Linear(2, 3)).to(DT)
    x = torch.rand(2, 2, dtype=DT)
    with pytest.raises(error, match=text):
        verify(model, x, torch.tensor([0, 1]), 0.1, progress=False, **kwargs)


class _PlainGraft(nn.Module):
    """The function of a GraftedReLU written in plain torch (what the MILP encodes)."""

    def __init__(self, graft: lipnets.nn.GraftedReLU) -> None:
        super().__init__()
        self.register_buffer("m", graft.mask.to(DT))
        self.register_buffer("a", graft.slope.detach().clone())
        self.register_buffer("b", graft.intercept.detach().clone())

    def forward(self, x):
        return self.m * (self.a * x + self.b) + (1 - self.m) * torch.relu(x)


def test_grafted_networks_agree_with_the_milp_of_their_plain_form():
    """A grafted op is not a ReLU to the MILP (it refuses it, instead of encoding a ReLU),
    and branch and bound on the grafted model agrees with the MILP on the same function."""
    from lipnets.errors import InvalidModelError
    from lipnets.verify import milp_verify

    wrong = 0
    for seed in range(6):
        torch.manual_seed(seed)
        graft = lipnets.nn.GraftedReLU((10,), mask=torch.rand(10) < 0.5)
        with torch.no_grad():
            graft.slope.uniform_(-2, 2)
            graft.intercept.uniform_(-0.5, 0.5)
        first, last = nn.Linear(3, 10), nn.Linear(10, 3)
        model = nn.Sequential(first, graft, last).to(DT)
        plain = nn.Sequential(first, _PlainGraft(graft), last).to(DT)
        x = torch.randn(6, 3, dtype=DT)
        y = model(x).argmax(1)
        with pytest.raises(InvalidModelError, match="grafted_relu"):
            milp_verify(model, x, y, 0.2)
        exact = milp_verify(plain, x, y, 0.2)
        result = verify(model, x, y, 0.2, progress=False)
        wrong += sum(
            a != b and "unknown" not in (a, b)
            for a, b in zip(result.status, exact.status, strict=True)
        )
    assert wrong == 0
