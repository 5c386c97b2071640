"""Generated images with learnable class structure, for fast tests and benchmarks.

Each class has a smooth random prototype; an image is its class prototype, randomly shifted by a
pixel or two, plus noise. Deterministic in `data_seed`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from convergent.data.base import ClassificationData


def make_images(n: int, num_classes: int, channels: int, size: int, noise: float, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, channels, max(2, size // 4), max(2, size // 4), generator=g)
    prototypes = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    images = prototypes[labels]
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    images = torch.stack([torch.roll(im, (int(a), int(b)), dims=(1, 2)) for im, (a, b) in zip(images, shifts)])
    images = images + noise * torch.randn(images.shape, generator=g)
    return TensorDataset(images.float(), labels)


class Synthetic(ClassificationData):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        train_size: int = 1024,
        val_size: int = 256,
        noise: float = 1.0,
        data_seed: int = 0,
        **loader,
    ) -> None:
        super().__init__(**loader)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.input_size = int(input_size)
        self.train_size, self.val_size = int(train_size), int(val_size)
        self.noise, self.data_seed = float(noise), int(data_seed)

    def build(self) -> None:
        # One draw for both splits so they share the prototypes.
        full = make_images(
            self.train_size + self.val_size, self.num_classes, self.in_channels, self.input_size, self.noise, self.data_seed
        )
        x, y = full.tensors
        self.train_set = TensorDataset(x[: self.train_size], y[: self.train_size])
        self.val_set = TensorDataset(x[self.train_size :], y[self.train_size :])
