"""The true Lipschitz constants of models built with deel-torchlip and orthogonium.

Both libraries build layers that are 1-Lipschitz by construction, up to their iterative
approximations (power iteration, Björck steps). lipnets bounds such models from the
weights they realise (Note [Realised parametrizations] in `lipnets.graph.realise`); this
script measures, for each model, at initialisation and after a short training run on
scikit-learn's digits (8 x 8 images, 10 classes, Adam):

* the nominal constant the library claims (1);
* lipnets' sound bound in eval mode (the deployed function) and in training mode (the
  weights the next training step would use);
* the largest and the product of the per-layer bounds (each the exact operator norm of
  the layer's realised weight, computed in float64);
* a lower bound (`lipnets.estimators.lower_bound`, gradient ascent on the exported
  model, float64): the true constant lies between it and the bound;
* the clean accuracy on the digits, to show the training ran.

Every bound is checked to equal the bound of `lipnets.to_vanilla(model)` (the export has
the same weights), and for deel-torchlip also that of deel-torchlip's own export
(`vanilla_model`), and the model to be unchanged by the measurement.

Usage:
    pip install -e ".[bench,zoo]"
    python benchmarks/peers.py                 # writes benchmarks/results/peers-cpu.md
    python benchmarks/peers.py --steps 50 --out /tmp/peers.md

Nothing here runs in the test suite (tests/interop checks the same properties on smaller
runs).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import describe
from torch import nn

import lipnets
from lipnets.estimators import lower_bound

ROOT = Path(__file__).resolve().parent


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(data.target)


def _deel_mlp() -> nn.Module:
    from deel import torchlip as tl

    return tl.Sequential(
        tl.SpectralLinear(64, 256), tl.GroupSort2(),
        tl.SpectralLinear(256, 256), tl.GroupSort2(),
        tl.SpectralLinear(256, 10),
    )  # fmt: skip


def _deel_cnn() -> nn.Module:
    from deel import torchlip as tl

    return tl.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        tl.SpectralConv2d(1, 16, 3, padding=1), tl.GroupSort2(),
        tl.SpectralConv2d(16, 16, 3, padding=1), tl.GroupSort2(),
        nn.Flatten(), tl.SpectralLinear(16 * 64, 10),
    )  # fmt: skip


def _ortho_mlp() -> nn.Module:
    from orthogonium.layers import MaxMin, OrthoLinear

    return nn.Sequential(
        OrthoLinear(64, 256), MaxMin(), OrthoLinear(256, 256), MaxMin(), OrthoLinear(256, 10)
    )


def _ortho_cnn() -> nn.Module:
    from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin, OrthoLinear

    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        AdaptiveOrthoConv2d(1, 16, 3), MaxMin(),
        AdaptiveOrthoConv2d(16, 16, 3), MaxMin(),
        nn.Flatten(), OrthoLinear(16 * 64, 10),
    )  # fmt: skip


MODELS: dict[str, Callable[[], nn.Module]] = {
    "deel-torchlip MLP 64-256-256-10, SpectralLinear + GroupSort2": _deel_mlp,
    "deel-torchlip CNN, SpectralConv2d + GroupSort2": _deel_cnn,
    "orthogonium MLP 64-256-256-10, OrthoLinear + MaxMin": _ortho_mlp,
    "orthogonium CNN, AdaptiveOrthoConv2d + MaxMin": _ortho_cnn,
}


def _train(model: nn.Module, x, y, steps: int, lr: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        loss = F.cross_entropy(10.0 * model(x[idx]), y[idx])  # temperature 1/10
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _deel_export(model: nn.Module) -> nn.Module:
    """deel-torchlip's own export (its conv layers become nn.Conv2d): the bound of the model
    as it is (lipnets traces into SpectralConv2d, whose F.conv2d call is bounded by
    nn.Conv2d's rule, Note [Functional convolutions]) must equal the export's."""
    from deel.torchlip.modules.module import vanilla_model

    return vanilla_model(model, in_place=False)


def _layers(model: nn.Module, shape: tuple[int, ...]) -> list[float]:
    """The bound of each top-level layer with weights, at its input shape."""
    found = []
    x = torch.zeros(shape)
    with torch.no_grad():
        for layer in model:
            if any(True for _ in layer.parameters()):
                found.append(float(lipnets.lipschitz_bound(nn.Sequential(layer), x.shape)))
            x = layer(x)
    return found


def _state(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(t, t.detach().clone()) for t in [*model.parameters(), *model.buffers()]]


def measure(name: str, make, x, y, steps: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    model = make()
    _train(model, x, y, steps, lr, seed) if steps else model.eval()
    state = f"trained {steps} steps, lr {lr:g}" if steps else "init"
    if not all(bool(torch.isfinite(t).all()) for t in model.parameters()):
        return {"model": name, "state": state, "diverged": True}
    target = model
    shape = (1, 64)
    saved = _state(target)
    reference = copy.deepcopy(target)
    start = time.perf_counter()
    bound = float(lipnets.lipschitz_bound(target, shape))
    seconds = time.perf_counter() - start
    target.train()
    bound_train = float(lipnets.lipschitz_bound(target, shape))
    target.eval()
    for t, c in saved:  # lipnets leaves the model as it found it
        assert torch.equal(t, c)
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(target)(x[:8]), reference(x[:8]))
    plain = lipnets.to_vanilla(target)
    assert bound == float(lipnets.lipschitz_bound(plain, shape))
    if name.startswith("deel-torchlip"):
        assert bound == float(lipnets.lipschitz_bound(_deel_export(target), shape))
    g = torch.Generator().manual_seed(seed)
    lower = float(lower_bound(plain, x[:64], steps=100, restarts=4, generator=g))
    layers = _layers(plain, shape)
    with torch.no_grad():
        accuracy = float((plain(x).argmax(1) == y).float().mean())
    product = 1.0
    for v in layers:
        product *= v
    return {
        "model": name,
        "state": state,
        "bound": bound,
        "bound_train": bound_train,
        "max_layer": max(layers),
        "product": product,
        "lower": lower,
        "accuracy": accuracy,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="Adam steps of training")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--lr-high", type=float, default=5e-2, help="an aggressive rate too")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "peers-cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from importlib.metadata import version

    versions = {name: version(name) for name in ("deel-torchlip", "orthogonium")}
    x, y = _digits()
    rows = []
    for k, (name, make) in enumerate(MODELS.items()):
        for steps, lr in ((0, args.lr), (args.steps, args.lr), (args.steps, args.lr_high)):
            row = measure(name, make, x, y, steps, lr, seed=k)
            rows.append(row)
            print(row, flush=True)
    lines = [
        f"Measured on {describe(torch.device('cpu'))}, deel-torchlip "
        f"{versions['deel-torchlip']}, orthogonium {versions['orthogonium']}, lipnets "
        f"{lipnets.__version__}; models in float32, trained on scikit-learn's digits "
        "(Adam, batch 128, cross-entropy at temperature 1/10), seeded. "
        "Nominal constant: 1 for every model. Bounds are sound (lipnets.lipschitz_bound, "
        "from the realised weights; train: the weights the next training step realises); "
        "the lower bound is lipnets.estimators.lower_bound on lipnets.to_vanilla(model) "
        "(gradient ascent, float64): the true constant of the deployed (eval) model lies "
        "between the two. Produced by `python benchmarks/peers.py`.",
        "",
        "| model | state | accuracy | lipnets bound (eval) | bound (train) | largest layer "
        "| product of layers | lower bound | bound time (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("diverged"):
            lines.append(
                f"| {r['model']} | {r['state']} | – | diverged: NaN weights (lipnets refuses, "
                "NonFiniteError) | | | | | |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['state']} | {r['accuracy']:.3f} | {r['bound']:.7f} "
            f"| {r['bound_train']:.7f} | {r['max_layer']:.7f} | {r['product']:.7f} "
            f"| {r['lower']:.4f} | {r['seconds']:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
