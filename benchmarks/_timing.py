"""Timing helpers shared by the benchmark scripts (not part of the library).

The scripts run as `python benchmarks/<name>.py`, which puts this folder on
`sys.path`, so they import this module as `_timing`.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm ships with the zoo/dev/bench extras

    def tqdm(iterable, **_):
        return iterable


__all__ = ["describe", "eval_forward", "interleaved_eval_medians", "median_time", "tqdm"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Median wall time of `fn` over `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def eval_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer(x)


def interleaved_eval_medians(
    modules: dict[str, nn.Module], x: torch.Tensor, rounds: int, warmup: int, device
) -> dict[str, float]:
    """Median eval time of each module, timed in turns with the order alternating.

    Timing plain modules in one loop keeps machine noise (other processes,
    frequency changes) from favouring one of them, and alternating the order
    keeps a module from always paying for the caches the previous one evicted
    (an FFT layer, say).
    """
    times: dict[str, list[float]] = {k: [] for k in modules}
    for _ in range(warmup):
        for module in modules.values():
            eval_forward(module, x)
    order = list(modules.items())
    for step in range(rounds):
        for key, module in order if step % 2 == 0 else reversed(order):
            _sync(device)
            start = time.perf_counter()
            eval_forward(module, x)
            _sync(device)
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _cpu_name() -> str:
    """The CPU's model name where Linux reports one (ratios to nn.Conv2d depend on it),
    else the architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device) -> str:
    """Where a table was measured: the device (or CPU and threads) and the torch version."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{_cpu_name()} CPU, {torch.get_num_threads()} threads"
    return f"{where}, torch {torch.__version__}"
