"""The auto_LiRPA side of `benchmarks/autolirpa.py` (not part of the library).

`benchmarks/autolirpa.py` runs this file with the Python of its own
virtualenv (torch < 2.9 and auto_LiRPA, see that script), as a long-lived
child process. The protocol is one JSON object per line:

* the worker first writes ``{"ready": true, "torch": ..., "auto_LiRPA": ...}``;
* then, for each line ``{"job": DIR}`` it reads on stdin, it loads
  ``DIR/job.json`` (the architecture, the ball, the method, optional
  ``bound_opts`` for ``BoundedModule`` and optional ``bound_lower`` /
  ``bound_upper`` for ``compute_bounds``) and
  ``DIR/tensors.pt`` (``state``: the state dict, ``x``: the centres, ``C``:
  an optional specification), computes the bounds with auto_LiRPA, saves
  ``{"lower", "upper"}`` to ``DIR/bounds.pt`` and answers
  ``{"ok": true, "seconds": ...}``, or ``{"ok": false, "error": ...}``; with
  ``"repeat": R`` in the job, the ``BoundedModule`` is built once and
  ``compute_bounds`` called R times, and the answer also has ``build_s`` and
  ``calls`` (the seconds of each call: `benchmarks/bound_speed.py`);
* an empty line or the end of stdin ends it.

Everything auto_LiRPA prints goes to stderr, which keeps stdout for the
protocol. The architecture description and `build_model` are shared with the
lipnets side, which imports this module (auto_LiRPA is only imported by
`main`), so both processes build the same ``nn.Sequential``.

Two layer types exist for the α-CROWN panel (`benchmarks/alpha_crown.py`):
``{"type": "residual", "body": [...]}`` is ``x + body(x)``, and
``{"type": "maxmin", "width": W}`` is lipnets' MaxMin on ``(N, W)`` (the max,
then the min, of each adjacent pair). auto_LiRPA has no MaxMin, so here it is
the same function in ops it bounds, `ReluMaxMin`: with ``d = relu(x_{2i} -
x_{2i+1})``, ``max = x_{2i+1} + d`` and ``min = x_{2i} - d``, as two constant
matrices around one ReLU; the lipnets side passes ``lipnets.nn.MaxMin`` to
`build_model` instead, and checks that the two agree.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch
from torch import nn

#: Layer descriptions: ``{"type": name, ...arguments}``.
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu")


class ReluMaxMin(nn.Module):
    """MaxMin on ``(N, width)`` in plain torch ops: ``P x + S relu(D x)`` (module docstring)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        if width % 2:
            raise ValueError(f"maxmin width must be even, got {width}")
        half = width // 2
        diff = torch.zeros(half, width)  # d_i = x_{2i} - x_{2i+1}
        swap = torch.zeros(width, width)  # (P x)_{2i} = x_{2i+1}, (P x)_{2i+1} = x_{2i}
        spread = torch.zeros(width, half)  # +d_i at 2i (the max), -d_i at 2i + 1 (the min)
        for i in range(half):
            diff[i, 2 * i], diff[i, 2 * i + 1] = 1.0, -1.0
            swap[2 * i, 2 * i + 1] = swap[2 * i + 1, 2 * i] = 1.0
            spread[2 * i, i], spread[2 * i + 1, i] = 1.0, -1.0
        # Not in the state dict, so both sides share one.
        self.register_buffer("diff", diff, persistent=False)
        self.register_buffer("swap", swap, persistent=False)
        self.register_buffer("spread", spread, persistent=False)

    def forward(self, x):
        d = torch.relu(nn.functional.linear(x, self.diff))
        return nn.functional.linear(x, self.swap) + nn.functional.linear(d, self.spread)


class Residual(nn.Module):
    """``x + body(x)``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def build_model(
    arch: list[dict], gelu: type[nn.Module] = nn.GELU, maxmin=ReluMaxMin
) -> nn.Sequential:
    """The ``nn.Sequential`` described by ``arch`` (float64, default initialisation).

    ``gelu`` replaces ``nn.GELU`` (auto_LiRPA needs its own marker op for it);
    it must compute the same function and have no parameters. ``maxmin(width)``
    builds a ``maxmin`` layer (`ReluMaxMin` by default; the lipnets side passes
    ``lambda width: lipnets.nn.MaxMin()``); it must have no state-dict entries.
    """
    return nn.Sequential(*_layers(arch, gelu, maxmin)).double()


def _layers(arch: list[dict], gelu, maxmin) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for spec in arch:
        kind = spec["type"]
        if kind == "linear":
            layers.append(nn.Linear(spec["in"], spec["out"]))
        elif kind == "conv2d":
            layers.append(
                nn.Conv2d(
                    spec["in"],
                    spec["out"],
                    spec["kernel"],
                    stride=spec.get("stride", 1),
                    padding=spec.get("padding", 0),
                )
            )
        elif kind == "flatten":
            layers.append(nn.Flatten())
        elif kind == "maxpool2d":
            layers.append(nn.MaxPool2d(spec["kernel"], stride=spec.get("stride")))
        elif kind == "relu":
            layers.append(nn.ReLU())
        elif kind == "leaky_relu":
            layers.append(nn.LeakyReLU(spec["slope"]))
        elif kind == "tanh":
            layers.append(nn.Tanh())
        elif kind == "sigmoid":
            layers.append(nn.Sigmoid())
        elif kind == "gelu":
            layers.append(gelu())
        elif kind == "maxmin":
            layers.append(maxmin(spec["width"]))
        elif kind == "residual":
            layers.append(Residual(nn.Sequential(*_layers(spec["body"], gelu, maxmin))))
        else:
            raise ValueError(f"unknown layer type {kind!r}")
    return layers


def _gelu_module() -> type[nn.Module]:
    """An exact GELU that exports as ``custom::Gelu``, the op auto_LiRPA bounds as GELU."""

    class _Gelu(torch.autograd.Function):
        @staticmethod
        def symbolic(g, x):
            return g.op("custom::Gelu", x)

        @staticmethod
        def forward(ctx, x):
            return nn.functional.gelu(x)

    class Gelu(nn.Module):
        def forward(self, x):
            return _Gelu.apply(x)

    return Gelu


def _run(job_dir: str) -> dict:
    """One job: build the BoundedModule and compute the bounds; with ``"repeat": R`` the
    build is timed alone and then R calls of ``compute_bounds`` each (per-call times)."""
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

    with open(os.path.join(job_dir, "job.json")) as f:
        job = json.load(f)
    tensors = torch.load(os.path.join(job_dir, "tensors.pt"), weights_only=True)
    model = build_model(job["arch"], gelu=_gelu_module())
    model.load_state_dict(tensors["state"])
    model.eval()
    x = tensors["x"]
    spec = tensors.get("C")
    norm = float("inf") if job["norm"] == "inf" else float(job["norm"])
    start = time.perf_counter()
    bounded = BoundedModule(model, x, bound_opts=job.get("bound_opts"), device="cpu", verbose=False)
    build_s = time.perf_counter() - start
    ptb = PerturbationLpNorm(norm=norm, eps=float(job["eps"]))

    def call():
        return bounded.compute_bounds(
            x=(BoundedTensor(x, ptb),),
            C=spec,
            method=job["method"],
            bound_lower=job.get("bound_lower", True),
            bound_upper=job.get("bound_upper", True),
        )

    calls = []
    for _ in range(max(1, int(job.get("repeat", 1)))):
        start = time.perf_counter()
        lower, upper = call()
        calls.append(time.perf_counter() - start)
    pairs = (("lower", lower), ("upper", upper))
    saved = {k: v.detach().clone() for k, v in pairs if v is not None}
    torch.save(saved, os.path.join(job_dir, "bounds.pt"))
    return {"seconds": build_s + calls[0], "build_s": build_s, "calls": calls}


def main() -> None:
    # The protocol keeps the real stdout; everything else printed to fd 1 goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    torch.set_default_dtype(torch.float64)
    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))
    import auto_LiRPA

    proto.write(
        json.dumps(
            {"ready": True, "torch": torch.__version__, "auto_LiRPA": auto_LiRPA.__version__}
        )
        + "\n"
    )
    for line in sys.stdin:
        if not line.strip():
            break
        request = json.loads(line)
        try:
            answer = {"ok": True} | _run(request["job"])
        except Exception as err:  # reported to the main script, which records it
            traceback.print_exc()
            answer = {"ok": False, "error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
        proto.write(json.dumps(answer) + "\n")
    proto.close()


if __name__ == "__main__":
    main()
