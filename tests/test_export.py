"""to_vanilla: plain torch modules computing the same function (PITFALLS 11 and 21)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import lipnets


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = lipnets.BjorckLinear(8, 8)
        self.act = lipnets.GroupSort(2)

    def forward(self, x):
        return x + 0.5 * self.act(self.fc(x))


def make_model() -> nn.Module:
    return nn.Sequential(
        lipnets.CayleyLinear(6, 8),
        lipnets.MaxMin(),
        Block(),
        lipnets.BjorckLinear(8, 3, bias=False),
    )


def trained(model: nn.Module, steps: int = 3) -> nn.Module:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 6)).square().sum().backward()
        opt.step()  # leaves the Björck raw weights off the manifold
    return model


def plain_types(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules()}


def test_exported_model_is_plain_and_equal():
    torch.manual_seed(0)
    model = trained(make_model())
    plain = lipnets.to_vanilla(model)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert "ParametrizedBjorckLinear" not in plain_types(plain)
    assert isinstance(plain[0], nn.Linear) and type(plain[0]) is nn.Linear
    assert type(plain[2].fc) is nn.Linear and type(plain[3]) is nn.Linear
    # names, bias and shapes kept
    assert [n for n, _ in plain.named_modules()] == [
        n for n, _ in model.named_modules() if "parametrizations" not in n
    ]
    assert plain[3].bias is None and plain[0].bias is not None
    assert (plain[3].in_features, plain[3].out_features) == (8, 3)
    x = torch.randn(32, 6)
    model.eval()
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-6)
    # the same bound, measured on the same weights
    torch.testing.assert_close(
        lipnets.lipschitz_bound(plain, (1, 6)), lipnets.lipschitz_bound(model, (1, 6))
    )


def test_export_right_after_load_state_dict():
    # deel-torchlip #17: export needed a forward pass after loading.
    torch.manual_seed(0)
    source = trained(make_model())
    state = source.state_dict()
    torch.manual_seed(1)
    fresh = make_model()
    fresh.load_state_dict(state)
    plain = lipnets.to_vanilla(fresh)  # no forward pass in between
    x = torch.randn(8, 6)
    torch.testing.assert_close(plain(x), source.eval()(x), rtol=0, atol=1e-6)


def test_export_does_not_touch_the_original():
    torch.manual_seed(0)
    model = trained(make_model()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lipnets.to_vanilla(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and type(model[0]).__name__ == "ParametrizedCayleyLinear"


def test_export_keeps_flags_and_sharing():
    shared = lipnets.BjorckLinear(4, 4)
    model = nn.Sequential(shared, lipnets.MaxMin(), shared).eval()
    model[0].bias.requires_grad_(False)
    plain = lipnets.to_vanilla(model)
    assert plain[0] is plain[2]
    assert not plain.training and not plain[0].training
    assert not plain[0].bias.requires_grad and plain[0].weight.requires_grad
    x = torch.randn(3, 4)
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-6)


def test_export_of_a_single_layer_and_of_other_parametrizations():
    layer = lipnets.BjorckLinear(5, 7)
    plain = lipnets.to_vanilla(layer)
    assert type(plain) is nn.Linear
    torch.testing.assert_close(plain.weight, layer.eval().weight, rtol=0, atol=0)
    # a torch parametrization on a plain layer keeps the value it realises
    ortho = nn.utils.parametrizations.orthogonal(nn.Linear(4, 4))
    plain = lipnets.to_vanilla(ortho)
    assert type(plain) is nn.Linear and not parametrize.is_parametrized(plain)
    # the original still works (deepcopy shares parametrize's class; see _freeze_parametrizations)
    torch.testing.assert_close(plain.weight, ortho.weight)
    assert parametrize.is_parametrized(ortho, "weight")


def test_export_rejects_bad_input():
    with pytest.raises(TypeError, match=r"must be an nn\.Module"):
        lipnets.to_vanilla(lambda x: x)  # type: ignore[arg-type]

    class Bad(nn.Module):
        def to_vanilla(self):
            return 3

    with pytest.raises(TypeError, match=r"Bad.to_vanilla\(\) must return an nn.Module"):
        lipnets.to_vanilla(nn.Sequential(Bad()))


def test_exported_weights_load_into_plain_torch():
    torch.manual_seed(0)
    model = trained(make_model())
    plain = lipnets.to_vanilla(model)
    state = plain.state_dict()
    assert all("parametrizations" not in k for k in state)
    twin = nn.Sequential(nn.Linear(6, 8), lipnets.MaxMin(), Block(), nn.Linear(8, 3, bias=False))
    twin[2].fc = nn.Linear(8, 8)
    twin.load_state_dict(state)
    x = torch.randn(4, 6)
    torch.testing.assert_close(twin(x), plain(x), rtol=0, atol=0)
