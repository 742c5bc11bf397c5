"""lipnets.graft.finetune (Note [FGSM with GradAlign]): parameter groups, schedule, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipnets.graft import finetune, graft

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 4, generator=g, dtype=DT)
    return x, (x[:, 0] > x[:, 1]).long()


def _grafted(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    return graft(model, {"1": torch.tensor([True, True, True, False, False, False])})


def test_one_step_uses_ten_times_the_rate_and_no_decay_on_the_lines() -> None:
    """Plain SGD (no momentum), eps 0, one full batch: the update of every parameter is the
    gradient of the clean cross-entropy times its group's rate, plus the weights' decay."""
    x, y = _data()
    model = _grafted()
    with torch.no_grad():
        model[1].slope.copy_(torch.linspace(-0.5, 0.9, 6, dtype=DT))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss = F.cross_entropy(model(x), y)
    grads = dict(zip(before, torch.autograd.grad(loss, list(model.parameters())), strict=True))
    lr, decay = 0.1, 0.01
    history = finetune(
        model,
        (x, y),
        0.0,
        epochs=1,
        lr=lr,
        weight_decay=decay,
        momentum=0.0,
        schedule="constant",
        batch_size=len(x),
        progress=False,
    )
    assert history.steps == 1 and math.isnan(history.alignment[0])
    assert history.losses[0] == pytest.approx(float(loss.detach()), rel=1e-12)
    for name, p in model.named_parameters():
        if name.startswith("1."):  # slope, intercept: 10 x lr, no decay
            want = before[name] - 10 * lr * grads[name]
        else:
            want = before[name] - lr * (grads[name] + decay * before[name])
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)
    ungrafted = ~model[1].mask
    assert torch.equal(model[1].slope.detach()[ungrafted], before["1.slope"][ungrafted])


def test_frozen_lines_stay_fixed_and_modes_are_restored() -> None:
    x, y = _data()
    model = _grafted()
    with torch.no_grad():
        model[1].slope.zero_()
        model[1].intercept.zero_()
    model[1].slope.requires_grad_(False)
    model[1].intercept.requires_grad_(False)
    model.eval()
    model[0].train()
    weight = model[0].weight.detach().clone()
    finetune(model, (x, y), 0.1, epochs=2, lr=0.05, batch_size=8, progress=False)
    assert not model.training and model[0].training  # each submodule's mode restored
    assert float(model[1].slope.abs().max()) == 0 and float(model[1].intercept.abs().max()) == 0
    assert not torch.equal(model[0].weight.detach(), weight)


@pytest.mark.parametrize("norm", [math.inf, 2])
def test_runs_are_reproduced_by_the_generator(norm: float) -> None:
    x, y = _data()

    def run(seed: int) -> tuple[torch.Tensor, tuple[float, ...]]:
        model = _grafted()
        gen = torch.Generator().manual_seed(seed)
        h = finetune(
            model,
            (x, y),
            0.1,
            norm=norm,
            epochs=2,
            lr=0.05,
            batch_size=8,
            optimizer="adam",
            generator=gen,
            progress=False,
        )
        assert all(-1 <= c <= 1 for c in h.alignment)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), h.losses

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])


def test_a_data_loader_is_iterated_as_given() -> None:
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    h = finetune(_grafted(), loader, 0.05, epochs=2, lr=0.01, progress=False)
    assert h.steps == 8 and len(h.losses) == 2  # 4 batches (10, 10, 10, 2) per epoch


def test_errors_name_the_argument() -> None:
    x, y = _data()
    model = _grafted()
    kw = {"epochs": 1, "lr": 0.1, "progress": False}
    with pytest.raises(ValueError, match=r"eps must be finite and in \[0, inf\)"):
        finetune(model, (x, y), -0.1, **kw)
    with pytest.raises(ValueError, match="epochs"):
        finetune(model, (x, y), 0.1, epochs=0, lr=0.1)
    with pytest.raises(ValueError, match=r"lr must be finite and in \(0, inf\)"):
        finetune(model, (x, y), 0.1, epochs=1, lr=0.0)
    with pytest.raises(ValueError, match="slope_lr_scale"):
        finetune(model, (x, y), 0.1, slope_lr_scale=-1, **kw)
    with pytest.raises(ValueError, match="grad_align"):
        finetune(model, (x, y), 0.1, grad_align=math.nan, **kw)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        finetune(model, (x, y), 0.1, optimizer="lbfgs", **kw)
    with pytest.raises(ValueError, match="schedule must be one of"):
        finetune(model, (x, y), 0.1, schedule="step", **kw)
    with pytest.raises(ValueError, match="norm"):
        finetune(model, (x, y), 0.1, norm=1, **kw)
    with pytest.raises(ValueError, match="same number N >= 1 of rows"):
        finetune(model, (x, y[:3]), 0.1, **kw)
    with pytest.raises(TypeError, match="data must be a tuple"):
        finetune(model, 3, 0.1, **kw)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        finetune(model, (x, y), 0.1, generator=0, **kw)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        finetune("model", (x, y), 0.1, **kw)  # type: ignore[arg-type]
    frozen = _grafted().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        finetune(frozen, (x, y), 0.1, **kw)
    with pytest.raises(ValueError, match="diverged"):
        finetune(_grafted(), (x * math.inf, y), 0.0, **kw)
