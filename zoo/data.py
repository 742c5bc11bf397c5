"""Datasets of the zoo: digits (embedded), torchvision image sets, 2-D distributions.

Every image dataset has pixels in ``[0, 1]`` and no mean/std normalisation, so
a certified l2 radius is measured in pixel units, the same for every model.

- ``digits``: scikit-learn's bundled 8x8 digits (1 797 images, no download),
  pixels divided by 16, shape ``(1, 8, 8)``; a seeded, stratified held-out
  split (25 % by default) is the test set.
- ``mnist``, ``fashion-mnist``, ``cifar10``: torchvision.datasets, loaded from
  ``--data-root`` (torchvision's on-disk layout) or fetched with
  ``--download``; their official train/test splits.
- 2-D distributions for Wasserstein critics (`DISTRIBUTIONS`): Gaussian
  mixtures and the like, sampled with a seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from zoo.errors import ZooError, unknown

__all__ = [
    "DATASETS",
    "DISTRIBUTIONS",
    "DataInfo",
    "ImageTensors",
    "Split",
    "load",
    "sample",
]


@dataclass(frozen=True)
class DataInfo:
    """What a model card records about the data: enough to rebuild the same test set.

    Attributes:
        name: the dataset's registry name.
        input_shape: shape of one sample, ``(channels, height, width)``.
        num_classes: number of classes.
        split: how the test set is made (``"official"`` or the held-out rule).
        seed: the seed of a held-out split (``None`` for official splits).
        test_fraction: the share held out (``None`` for official splits).
        train_size: samples in the training set.
        test_size: samples in the test set.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    split: str
    seed: int | None
    test_fraction: float | None
    train_size: int
    test_size: int

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "pixels": "[0, 1], no normalisation",
            "split": self.split,
            "seed": self.seed,
            "test_fraction": self.test_fraction,
            "train_size": self.train_size,
            "test_size": self.test_size,
        }


@dataclass(frozen=True)
class Split:
    """A training set, a test set, and their `DataInfo`."""

    train: Dataset
    test: Dataset
    info: DataInfo


class ImageTensors(Dataset):
    """uint8 images ``(N, C, H, W)`` and int64 labels, served as float32 pixels in ``[0, 1]``.

    Holding the images as bytes keeps MNIST at 47 MB instead of 188 MB; each
    sample is converted when it is read.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}"
            )
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index].float().div_(255.0), self.labels[index]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its loader, and what is known of it before loading.

    ``input_shape`` and ``num_classes`` let ``python -m zoo train`` check a
    model's options before any data are loaded; `load` checks that the loaded
    data agree.
    """

    name: str
    summary: str
    default_eps: tuple[float, ...]
    loader: Callable[..., Split]
    input_shape: tuple[int, ...]
    num_classes: int


def _digits(
    root: Path, download: bool, seed: int = 0, test_fraction: float = 0.25, **_: object
) -> Split:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ZooError(f"test_fraction must be in (0, 1), got {test_fraction}")
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.int64)
    index = list(range(len(y)))
    train_idx, test_idx = train_test_split(
        index, test_size=test_fraction, random_state=seed, stratify=data.target
    )
    train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
    info = DataInfo(
        name="digits",
        input_shape=(1, 8, 8),
        num_classes=10,
        split="held-out, stratified (sklearn train_test_split)",
        seed=seed,
        test_fraction=test_fraction,
        train_size=len(train_idx),
        test_size=len(test_idx),
    )
    return Split(
        TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx]), info
    )


# torchvision class, the folder it reads under the root, and the files there.
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw", "train-images-idx3-ubyte, t10k-images-idx3-ubyte, ..."),
    "fashion-mnist": (
        "FashionMNIST",
        "FashionMNIST/raw",
        "train-images-idx3-ubyte, t10k-images-idx3-ubyte, ...",
    ),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "data_batch_1 .. data_batch_5, test_batch"),
}


def _images(dataset: Dataset) -> ImageTensors:
    """The bytes a torchvision image dataset loaded, as ``(N, C, H, W)`` uint8 + labels."""
    images = torch.as_tensor(dataset.data)
    if images.ndim == 3:  # MNIST-like: (N, H, W), one channel
        images = images.unsqueeze(1)
    elif images.ndim == 4 and images.shape[-1] in (1, 3):  # CIFAR: (N, H, W, C)
        images = images.permute(0, 3, 1, 2)
    return ImageTensors(images.contiguous(), torch.as_tensor(dataset.targets))


def _torchvision(name: str) -> Callable[..., Split]:
    cls_name, folder, files = _TORCHVISION[name]

    def load_it(root: Path, download: bool, **_: object) -> Split:
        import torchvision.datasets

        cls = getattr(torchvision.datasets, cls_name)
        try:
            train = cls(str(root), train=True, download=download)
            test = cls(str(root), train=False, download=download)
        except RuntimeError as error:
            if download:
                raise ZooError(
                    f"{name}: torchvision could not download it into {str(root)!r} ({error})"
                ) from error
            raise ZooError(
                f"{name} not found under --data-root {str(root)!r}: torchvision looks for "
                f"{root / folder}/ ({files}). Pass --download to fetch it there "
                f"(python -m zoo train MODEL --data {name} --data-root {root} --download), "
                "or put torchvision's files in that folder."
            ) from None
        train_set, test_set = _images(train), _images(test)
        info = DataInfo(
            name=name,
            input_shape=tuple(train_set.images.shape[1:]),
            num_classes=len(train.classes),
            split="official",
            seed=None,
            test_fraction=None,
            train_size=len(train_set),
            test_size=len(test_set),
        )
        return Split(train_set, test_set, info)

    return load_it


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "digits",
            "scikit-learn's bundled 8x8 digits (no download); 25% stratified held-out test split",
            (0.1, 0.25, 0.5, 0.75, 1.0),
            _digits,
            (1, 8, 8),
            10,
        ),
        DatasetSpec(
            "mnist",
            "MNIST 28x28 through torchvision (--data-root, --download)",
            (0.5, 1.0, 1.5),
            _torchvision("mnist"),
            (1, 28, 28),
            10,
        ),
        DatasetSpec(
            "fashion-mnist",
            "Fashion-MNIST 28x28 through torchvision (--data-root, --download)",
            (0.25, 0.5, 1.0),
            _torchvision("fashion-mnist"),
            (1, 28, 28),
            10,
        ),
        DatasetSpec(
            "cifar10",
            "CIFAR-10 32x32x3 through torchvision (--data-root, --download)",
            (36 / 255, 72 / 255, 108 / 255),
            _torchvision("cifar10"),
            (3, 32, 32),
            10,
        ),
    )
}


def get(name: str) -> DatasetSpec:
    """The registered dataset ``name``; a `ZooError` lists the valid names."""
    if name not in DATASETS:
        raise unknown("dataset", name, list(DATASETS))
    return DATASETS[name]


def load(
    name: str,
    *,
    root: str | Path = "data",
    download: bool = False,
    seed: int = 0,
    test_fraction: float = 0.25,
) -> Split:
    """Load dataset ``name`` as a `Split` (train, test, info).

    Args:
        name: a name of `DATASETS`.
        root: torchvision's ``root`` for the image datasets.
        download: let torchvision download a missing dataset.
        seed: seed of the held-out split (digits).
        test_fraction: share of the held-out split (digits).

    Raises:
        ZooError: for an unknown name, or a missing dataset without ``download``
            (the message says where the files are expected and how to get them).
    """
    spec = get(name)
    split = spec.loader(Path(root), download, seed=seed, test_fraction=test_fraction)
    info = split.info
    if tuple(info.input_shape) != spec.input_shape or info.num_classes != spec.num_classes:
        raise ZooError(
            f"{name} under {str(root)!r} holds {info.num_classes} classes of shape "
            f"{tuple(info.input_shape)}, not the {spec.num_classes} classes of shape "
            f"{spec.input_shape} of {name}: are these the right files?"
        )
    return split


# ---------------------------------------------------------------- 2-D distributions


def _ring_centres(k: int, radius: float) -> Tensor:
    angles = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    return radius * torch.stack([angles.cos(), angles.sin()], dim=1)


def _mixture(centres: Tensor, std: float) -> Callable[[int, torch.Generator], Tensor]:
    def draw(n: int, generator: torch.Generator) -> Tensor:
        which = torch.randint(0, centres.shape[0], (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return centres[which] + std * noise

    return draw


def _ring(n: int, generator: torch.Generator) -> Tensor:
    angle = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * math.pi
    radius = 2.0 + 0.1 * torch.randn(n, generator=generator, dtype=torch.float64)
    return torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)


def _moons(n: int, generator: torch.Generator) -> Tensor:
    half = torch.randint(0, 2, (n,), generator=generator)
    t = torch.rand(n, generator=generator, dtype=torch.float64) * math.pi
    upper = torch.stack([t.cos(), t.sin()], dim=1)
    lower = torch.stack([1 - t.cos(), 0.5 - t.sin()], dim=1)
    points = torch.where(half[:, None] == 0, upper, lower)
    points = points + 0.05 * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return 2.0 * (points - torch.tensor([0.5, 0.25], dtype=torch.float64))


_GRID = torch.cartesian_prod(*(2 * [torch.linspace(-2.0, 2.0, 3, dtype=torch.float64)]))

#: 2-D distributions for critics: name -> (summary, sampler(n, generator) -> (n, 2) float64).
DISTRIBUTIONS: dict[str, tuple[str, Callable[[int, torch.Generator], Tensor]]] = {
    "8gaussians": (
        "mixture of 8 Gaussians (std 0.2) on a circle of radius 2",
        _mixture(_ring_centres(8, 2.0), 0.2),
    ),
    "4gaussians": (
        "mixture of 4 Gaussians (std 0.3) at (+-1.5, +-1.5)",
        _mixture(
            torch.tensor([[1.5, 1.5], [1.5, -1.5], [-1.5, 1.5], [-1.5, -1.5]], dtype=torch.float64),
            0.3,
        ),
    ),
    "grid": ("mixture of 9 Gaussians (std 0.15) on a 3x3 grid in [-2, 2]^2", _mixture(_GRID, 0.15)),
    "gaussian": ("one Gaussian at the origin, std 0.5", _mixture(torch.zeros(1, 2), 0.5)),
    "ring": ("a ring of radius 2 (radial std 0.1)", _ring),
    "moons": ("two interleaved half-moons (noise 0.05), scaled by 2", _moons),
}


def sample(name: str, n: int, *, seed: int = 0) -> Tensor:
    """``n`` samples of the 2-D distribution ``name``, float32 ``(n, 2)``, seeded."""
    if name not in DISTRIBUTIONS:
        raise unknown("distribution", name, list(DISTRIBUTIONS))
    if n < 1:
        raise ZooError(f"the number of samples must be >= 1, got {n}")
    generator = torch.Generator().manual_seed(seed)
    return DISTRIBUTIONS[name][1](n, generator).float()
