"""Tiny MNIST, Fashion-MNIST and CIFAR-10 files in torchvision's on-disk format.

The files are written here (nothing is downloaded) and read by the real
torchvision dataset classes through the zoo's data layer; a model then trains
one step on them.

CIFAR-10: torchvision checks every batch file against the md5 of the real
dataset (`CIFAR10.train_list`, `test_list` and `meta` are class attributes).
The test replaces those digests, for the duration of the test only
(``monkeypatch``), with the digests of the files it wrote, so torchvision's
integrity check still runs, on these files.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from zoo import data, models, train
from zoo.errors import ZooError


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file of unsigned bytes (type 0x08), big-endian sizes."""
    assert array.dtype == np.uint8
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def _write_mnist(root: Path, folder: str, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = images
    return arrays


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_cifar10(root: Path, per_batch: int, n_test: int) -> tuple[dict, dict, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    first = None

    def batch(name: str, n: int) -> list[str]:
        nonlocal first
        rows = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)  # R, G, B planes
        if first is None:
            first = rows[0]
        entry = {"data": rows, "labels": [int(i % 10) for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(entry))
        return [name, _md5(folder / name)]

    train_list = [batch(f"data_batch_{i}", per_batch) for i in range(1, 6)]
    test_list = [batch("test_batch", n_test)]
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]  # fmt: skip
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    meta = {"filename": "batches.meta", "key": "label_names", "md5": _md5(folder / "batches.meta")}
    return {"train_list": train_list, "test_list": test_list}, meta, first


def _one_step(split: data.Split, name: str, **options) -> None:
    torch.manual_seed(0)
    info = split.info
    model = models.build(
        name, input_shape=info.input_shape, num_outputs=info.num_classes, **options
    )
    before = [p.detach().clone() for p in model.parameters()]
    config = train.TrainConfig(epochs=1, batch_size=8)
    history = train.fit(model, split.train, config, max_steps=1)
    assert history.steps == 1 and np.isfinite(history.losses[-1])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    ev = train.evaluate(model, split.test, [0.1], lower=None)
    assert 0.0 <= ev.certified_accuracy[0.1] <= ev.clean_accuracy <= 1.0


@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")]
)
def test_tiny_mnist_loads_through_torchvision_and_trains(tmp_path, name, folder):
    arrays = _write_mnist(tmp_path, folder, n_train=16, n_test=8)
    split = data.load(name, root=tmp_path)
    assert split.info.input_shape == (1, 28, 28) and split.info.num_classes == 10
    assert (split.info.train_size, split.info.test_size) == (16, 8)
    x, y = split.train[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x[0], torch.from_numpy(arrays["train"][3]).float() / 255)
    assert int(y) == 3
    _one_step(split, "groupsort-mlp", width=16)


def test_tiny_cifar10_loads_through_torchvision_and_trains(tmp_path, monkeypatch):
    lists, meta, first = _write_cifar10(tmp_path, per_batch=4, n_test=6)
    cifar = torchvision.datasets.CIFAR10
    # The real integrity check, against the digests of the files written above.
    monkeypatch.setattr(cifar, "train_list", lists["train_list"])
    monkeypatch.setattr(cifar, "test_list", lists["test_list"])
    monkeypatch.setattr(cifar, "meta", meta)
    split = data.load("cifar10", root=tmp_path)
    assert split.info.input_shape == (3, 32, 32)
    assert (split.info.train_size, split.info.test_size) == (20, 6)
    x, _ = split.train[0]
    assert torch.equal(x, torch.from_numpy(first.reshape(3, 32, 32)).float() / 255)  # CHW order
    _one_step(split, "lipconvnet", width=4, depth=1)
    # a corrupted file is caught by torchvision's check and explained by the zoo
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"broken")
    with pytest.raises(ZooError, match=r"cifar10 not found.*--download"):
        data.load("cifar10", root=tmp_path)


def test_missing_dataset_says_how_to_get_it(tmp_path):
    for name, folder in (("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")):
        with pytest.raises(ZooError) as info:
            data.load(name, root=tmp_path)
        message = str(info.value)
        assert "--download" in message and "--data-root" in message
        assert str(tmp_path / folder) in message
