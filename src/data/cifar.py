"""CIFAR-10 / CIFAR-100 through torchvision (downloads when online)."""

from __future__ import annotations

import os

from torchvision import datasets, transforms

from convergent.data.base import ClassificationData
from convergent.errors import ConfigError

STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


class CIFAR(ClassificationData):
    in_channels = 3
    input_size = 32

    def __init__(
        self, name: str = "cifar10", root: str = "~/.cache/convergent", download: bool = True, augment: bool = True, **loader
    ) -> None:
        super().__init__(**loader)
        if name not in STATS:
            raise ConfigError(f"unknown CIFAR variant {name!r}; use cifar10 or cifar100")
        self.name = name
        self.root = os.path.expanduser(str(root))
        self.download = bool(download)
        self.augment = bool(augment)
        self.num_classes = 10 if name == "cifar10" else 100

    def build(self) -> None:
        mean, std = STATS[self.name]
        normalise = [transforms.ToTensor(), transforms.Normalize(mean, std)]
        train_tf = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if self.augment else []
        cls = datasets.CIFAR10 if self.name == "cifar10" else datasets.CIFAR100
        try:
            self.train_set = cls(
                self.root, train=True, download=self.download, transform=transforms.Compose(train_tf + normalise)
            )
            self.val_set = cls(self.root, train=False, download=self.download, transform=transforms.Compose(normalise))
        except Exception as e:  # offline, or a corrupt archive
            raise ConfigError(
                f"{self.name} not found in {self.root} and it could not be downloaded ({type(e).__name__}); "
                f"put {ARCHIVES[self.name]} or the extracted {FOLDERS[self.name]}/ folder in {self.root} "
                "(or set data.root)"
            ) from None
