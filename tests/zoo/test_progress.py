"""The training bar ends full (N/N epochs, also when max_steps stops the run early), and
the thread count follows the model's size unless --threads is given."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from zoo import models, train


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,)))


def test_training_bar_reaches_the_last_epoch(capsys) -> None:
    for epochs, max_steps, shown in ((3, None, "3/3"), (5, 6, "2/2")):  # 4 steps per epoch
        torch.manual_seed(0)
        model = models.build("groupsort-mlp", input_shape=(1, 8, 8), num_outputs=10, width=8)
        config = train.TrainConfig(epochs=epochs, batch_size=10, lr=1e-2, seed=0)
        history = train.fit(model, _data(), config, max_steps=max_steps, progress=True)
        assert history.steps == (max_steps or 4 * epochs)
        final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
        assert shown in final, final


def test_threads_default_to_one_for_small_models() -> None:
    """set_threads: --threads wins; small models get 1 thread, large ones torch's default."""
    before = torch.get_num_threads()
    try:
        small = models.build("groupsort-mlp", input_shape=(1, 8, 8), num_outputs=10, width=8)
        big = torch.nn.Linear(1000, 200)  # 200 200 parameters
        torch.set_num_threads(2)
        assert train.set_threads(None, small) == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert train.set_threads(None, big) == 2 and torch.get_num_threads() == 2
        assert train.set_threads(2, small) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
