"""Speed and orthogonality of lipnets' orthogonal convolutions against nn.Conv2d.

For each channel count c and input size H x W (square c -> c layers, 3 x 3
kernels, circular padding, batch 64) the script builds every layer and times,
**interleaved** in one loop (each round runs every layer once, the order
alternating between rounds, so machine noise and cache effects fall on all
layers alike), a training step (forward + backward + AdamW step) and an eval
forward (no_grad, eval mode); it reports medians over `--steps` rounds after
`--warmup` untimed ones, the ratios to nn.Conv2d, and the realised largest and
smallest singular values of the layer *as an operator on c x H x W inputs*
after the training steps. Rows:

* `nn.Conv2d` (`padding=1, padding_mode="circular"`), the reference;
* `BCOPConv2d` and `CayleyConv2d` (lipnets);
* `BCOPConv2d export` / `CayleyConv2d export`: `lipnets.to_vanilla` of the
  trained layer (eval only), with the largest difference between the export's
  output and the layer's on the benchmark batch;
* `orthogonium AdaptiveOrthoConv2d` (if `orthogonium` is installed), measured
  in the same run.

Singular values (see `operator_sigmas`): a stride-1 circular convolution is
diagonalised by the 2-D DFT, so its singular values are those of the c x c
matrices $\\hat K(\\omega)$, one per frequency. For an `nn.Conv2d` (plain,
exported, or a parametrized subclass such as BCOP's or orthogonium's) $\\hat K$
is the DFT of the realised kernel wrapped onto the H x W grid, in float64.
CayleyConv2d gives its realised matrices through `frequency_matrices(size)`
(their SVD is taken in float64). Any other shift-equivariant layer (the
exported `FrequencyConv2d`) is probed with one impulse per input channel; its impulse responses are
computed in the layer's own dtype and then transformed in float64. A layer
with an `orthogonality_error(input_shape)` method also reports that value.

The machine's 1-minute load average is recorded before and after each
configuration (other processes share the cores; the ratios are what to read).
The default is one thread (`--threads`): on a shared 2-core machine, two OpenMP
threads make every small LAPACK call of a batched solve (`torch.linalg.inv` of
544 complex 64 x 64 matrices: one parallel region per matrix) wait on the other
processes, and the step times of all layers swing by factors of 2 to 20.

Usage:
    python benchmarks/conv.py                               # c 32 64 128, 16x16 and 32x32
    python benchmarks/conv.py --channels 64 --sizes 32 --markdown docs/_conv_table.md
    python benchmarks/conv.py --channels 8 --sizes 8 --steps 2 --warmup 1   # smoke run

Timings depend on the machine; docs/benchmarks.md says where each table was
measured. Nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from _timing import describe, eval_forward, tqdm
from torch import nn

import lipnets

Maker = Callable[[int, tuple[int, int]], nn.Module]


def _plain_conv(c: int, size: tuple[int, int]) -> nn.Module:
    return nn.Conv2d(c, c, 3, padding=1, padding_mode="circular")


def _makers() -> dict[str, Maker]:
    """Layer constructors by row name; layers whose module is missing are skipped."""
    makers: dict[str, Maker] = {"nn.Conv2d": _plain_conv}
    try:
        from lipnets.nn.bcop import BCOPConv2d

        makers["BCOPConv2d"] = lambda c, size: BCOPConv2d(c, c, 3)
    except ImportError as err:
        warnings.warn(f"skipping BCOPConv2d: {err}", stacklevel=1)
    try:
        from lipnets.nn.cayley_conv import CayleyConv2d

        makers["CayleyConv2d"] = lambda c, size: CayleyConv2d(c, c, 3, input_size=size)
    except ImportError as err:
        warnings.warn(f"skipping CayleyConv2d: {err}", stacklevel=1)
    try:
        from orthogonium.layers import AdaptiveOrthoConv2d

        makers["orthogonium AdaptiveOrthoConv2d"] = lambda c, size: AdaptiveOrthoConv2d(
            c, c, 3, padding="same", padding_mode="circular"
        )
    except ImportError:
        pass
    return makers


EXPORTED = ("BCOPConv2d", "CayleyConv2d")


def _dft_applicable(layer: nn.Module) -> bool:
    """A stride-1, undilated, ungrouped circular nn.Conv2d that keeps the size."""
    if not isinstance(layer, nn.Conv2d) or layer.padding_mode != "circular":
        return False
    if layer.stride != (1, 1) or layer.dilation != (1, 1) or layer.groups != 1:
        return False
    kh, kw = layer.kernel_size
    if layer.padding == "same":
        return kh % 2 == 1 and kw % 2 == 1
    return layer.padding == ((kh - 1) // 2, (kw - 1) // 2) and kh % 2 == 1 and kw % 2 == 1


def _kernel_transfer(layer: nn.Conv2d, size: tuple[int, int]) -> torch.Tensor:
    """Per-frequency matrices (.., c_out, c_in) of a circular conv, from its kernel in float64.

    torch computes the cross-correlation y[h, w] = sum K[i, j] x[h + i - p, w + j - p];
    tap (i, j) therefore acts as a shift by (i - p, j - p), and the wrapped kernel
    k[(p - i) mod H, (p - j) mod W] += K[i, j] gives y = k (circularly convolved with) x.
    Taps that wrap onto the same position (kernel larger than the input) add up.
    """
    h, w = size
    weight = layer.weight.detach().to(torch.float64, copy=True).cpu()
    kh, kw = weight.shape[-2:]
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    wrapped = torch.zeros(*weight.shape[:2], h, w, dtype=torch.float64)
    for i in range(kh):
        for j in range(kw):
            wrapped[:, :, (ph - i) % h, (pw - j) % w] += weight[:, :, i, j]
    # A real kernel has K(-w) = conj(K(w)): the half spectrum holds every singular value.
    return torch.fft.rfft2(wrapped).permute(2, 3, 0, 1)


def _impulse_transfer(layer: nn.Module, c_in: int, size: tuple[int, int]) -> torch.Tensor:
    """Per-frequency matrices of a shift-equivariant linear layer, from impulse responses."""
    param = next(layer.parameters(), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    device = param.device if param is not None else torch.device("cpu")
    impulses = torch.zeros(c_in, c_in, *size, dtype=dtype, device=device)
    impulses[torch.arange(c_in), torch.arange(c_in), 0, 0] = 1.0
    with torch.no_grad():
        offset = layer(torch.zeros(1, c_in, *size, dtype=dtype, device=device))
        response = (layer(impulses) - offset).to(torch.float64).cpu()  # (c_in, c_out, H, W)
    return torch.fft.rfft2(response).permute(2, 3, 1, 0)


def operator_sigmas(layer: nn.Module, c_in: int, size: tuple[int, int]) -> dict:
    """Largest and smallest singular values of the layer as an operator on (c_in, H, W)."""
    layer.eval()
    own = getattr(layer, "frequency_matrices", None)
    if _dft_applicable(layer):
        transfer, method = _kernel_transfer(layer, size), "kernel DFT (float64)"
    elif callable(own) and getattr(layer, "stride", 1) in (1, (1, 1)):
        # CayleyConv2d: the realised per-frequency matrices its forward applies
        with torch.no_grad():
            transfer = own(size).detach().cpu().to(torch.complex128)
        method = "frequency_matrices (float64 SVD)"
    else:
        transfer, method = _impulse_transfer(layer, c_in, size), "impulse response"
    s = torch.linalg.svdvals(transfer.reshape(-1, *transfer.shape[-2:]))
    out = {"sigma_max": float(s.max()), "sigma_min": float(s.min()), "sigma_method": method}
    check = getattr(layer, "orthogonality_error", None)
    if callable(check):
        try:
            out["orthogonality_error"] = float(check((1, c_in, *size)))
        except (TypeError, ValueError) as err:
            out["orthogonality_error_failed"] = repr(err)
    return out


def interleaved_medians(
    fns: dict[str, Callable[[], object]], rounds: int, warmup: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """Median wall and CPU (process) time of each callable, run in turns.

    Every round calls every function once, in an order that alternates between
    rounds, so that load from other processes and cache effects fall on all of
    them alike.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())
    for step in range(rounds):
        for key, fn in order if step % 2 == 0 else reversed(order):
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    return {k: {"wall": statistics.median(wall[k]), "cpu": statistics.median(cpu[k])} for k in fns}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(layer: nn.Module, opt, x: torch.Tensor, target: torch.Tensor):
    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(layer(x), target).backward()
        opt.step()

    return step


def bench_config(
    c: int, hw: int, makers: dict[str, Maker], args, device: torch.device
) -> list[dict]:
    size = (hw, hw)
    load_start = os.getloadavg()[0]
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.batch, c, *size, generator=gen).to(device)
    target = torch.randn(args.batch, c, *size, generator=gen).to(device)
    layers: dict[str, nn.Module] = {}
    steps = {}
    for name, make in makers.items():
        torch.manual_seed(0)
        layer = make(c, size).to(device).train()
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, weight_decay=1e-2)
        layers[name] = layer
        steps[name] = _train_step(layer, opt, x, target)
    train = interleaved_medians(steps, args.steps, args.warmup, device)
    evals: dict[str, nn.Module] = {}
    extra: dict[str, dict] = {}
    for name, layer in layers.items():
        evals[name] = layer.eval()
        if name in EXPORTED:
            plain = lipnets.to_vanilla(layer).eval()
            evals[f"{name} export"] = plain
            with torch.no_grad():
                diff = (plain(x) - layer(x)).abs().max()
            extra[f"{name} export"] = {
                "export_type": type(plain).__name__,
                "export_max_abs_diff": float(diff),
            }
    forward = {k: (lambda m=m: eval_forward(m, x)) for k, m in evals.items()}
    evaluate = interleaved_medians(forward, 2 * args.steps, args.warmup, device)
    load_end = os.getloadavg()[0]
    rows = []
    for name, module in evals.items():
        timed = train.get(name, {"wall": math.nan, "cpu": math.nan})
        rows.append(
            {"channels": c, "size": hw, "layer": name}
            | {"train_s": timed["wall"], "train_cpu_s": timed["cpu"]}
            | {"eval_s": evaluate[name]["wall"], "eval_cpu_s": evaluate[name]["cpu"]}
            | extra.get(name, {})
            | operator_sigmas(module, c, size)
            | {"load_start": load_start, "load_end": load_end}
        )
    ref = next(r for r in rows if r["layer"] == "nn.Conv2d")
    for r in rows:
        for key in ("train", "eval"):
            r[f"{key}_x"] = r[f"{key}_s"] / ref[f"{key}_s"]
            r[f"{key}_cpu_x"] = r[f"{key}_cpu_s"] / ref[f"{key}_cpu_s"]
    return rows


def markdown(rows: list[dict], device: str, batch: int) -> str:
    loads = [r[k] for r in rows for k in ("load_start", "load_end")]
    diffs = [
        f"{r['layer']} at {r['channels']} ch {r['size']}²: {r['export_max_abs_diff']:.1e}"
        for r in rows
        if "export_max_abs_diff" in r
    ]
    lines = [
        f"Measured on {device}, batch {batch}, 3x3 kernels, circular padding, "
        "AdamW (lr 1e-3, weight decay 1e-2); the layers of each configuration ran "
        "interleaved (alternating order), times are medians. σ are the realised "
        "singular values of the layer as an operator at the input size. 1-minute load "
        f"average during the run: {min(loads):.1f} to {max(loads):.1f} (2 cores, shared).",
        "",
        "| c | H×W | layer | train step (ms) | × nn.Conv2d | eval (ms) | × nn.Conv2d "
        "| σ_max | σ_min |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        train = "–" if math.isnan(r["train_s"]) else f"{1e3 * r['train_s']:.2f}"
        train_x = "–" if math.isnan(r["train_s"]) else f"{r['train_x']:.2f}"
        lines.append(
            f"| {r['channels']} | {r['size']}×{r['size']} | {r['layer']} | {train} | {train_x} "
            f"| {1e3 * r['eval_s']:.2f} | {r['eval_x']:.2f} "
            f"| {r['sigma_max']:.7f} | {r['sigma_min']:.7f} |"
        )
    if diffs:
        lines += ["", "Largest |export(x) − layer(x)| on the batch (float32): " + "; ".join(diffs)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32], help="H = W")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (see the module docstring)"
    )
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--json", help="also write the raw rows to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    where = describe(device)
    makers = _makers()
    rows = []
    configs = list(itertools.product(args.sizes, args.channels))
    for hw, c in tqdm(configs, desc="configurations"):
        rows += bench_config(c, hw, makers, args, device)
    table = markdown(rows, where, args.batch)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "batch": args.batch, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
