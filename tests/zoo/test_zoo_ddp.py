"""Two gloo processes train with DDP exactly as one process on the same global batch.

`zoo.train.fit` shards each global batch over the ranks with a
`DistributedSampler`; with the mean losses of `lipnets.losses` and DDP's
gradient averaging, a two-rank step is a one-rank step on the union of the
two local batches. The Björck layers write their polar factor back into the
raw weights in training (a function of the weights, the same on every rank).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from zoo import models, train

CONFIG = train.TrainConfig(epochs=1, batch_size=32, lr=1e-2, seed=3)
OPTIONS = {"width": 32, "depth": 2}


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    )


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build("groupsort-mlp", input_shape=(1, 8, 8), num_outputs=10, **OPTIONS)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    ddp = train.Distributed.from_env()
    assert (ddp.rank, ddp.world_size) == (rank, world)
    ddp.init(torch.device("cpu"))
    try:
        assert dist.get_backend() == "gloo"
        model = _model()
        if rank == 1:  # a different start on rank 1: DDP must broadcast rank 0's weights
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1)
        history = train.fit(model, _dataset(), CONFIG, distributed=ddp, max_steps=2)
        assert history.steps == 2
        torch.save(model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        ddp.close()
    # Everything this test checks is written. Leave without the interpreter's
    # teardown: there torch's gloo threads have aborted the process once in CI
    # ("terminate called without an active exception" on both ranks, after a
    # clean destroy_process_group), which says nothing about DDP training.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    single = _model()
    history = train.fit(single, _dataset(), CONFIG, max_steps=2)  # same global batches
    assert history.steps == 2
    start = _model().state_dict()
    for key, value in single.state_dict().items():
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ in {key}"
        assert not torch.equal(value, start[key]), f"{key} did not train"
        assert torch.allclose(rank0[key], value, rtol=0, atol=1e-5), (
            f"{key}: DDP and one process differ by {float((rank0[key] - value).abs().max()):.2e}"
        )


def test_torchrun_cli_trains_with_two_processes(tmp_path):
    """The README's launcher: torchrun runs the CLI on two gloo ranks; rank 0 writes the run."""
    root = Path(__file__).resolve().parents[2]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "zoo", "train", "groupsort-mlp", "-o", "width=16", "--max-steps", "2",
        "--out", str(tmp_path), "--name", "run", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("clean accuracy") == 1  # only rank 0 reports and writes
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    assert card["training"]["processes"] == 2 and card["training"]["steps"] == 2
    assert card["command"].startswith("torchrun --nproc_per_node=2 -m zoo train groupsort-mlp")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
