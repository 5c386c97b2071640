"""ILSVRC-2012 layout: `root/train/<class>/*.jpeg` and `root/val/<class>/*.jpeg`.

AlexNet augmentation for training (resize 256, random crop, horizontal flip); a centre crop for
validation (and so for the probe set).
"""

from __future__ import annotations

import os

from torchvision import datasets, transforms

from convergent.data.base import ClassificationData
from convergent.errors import ConfigError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageFolderData(ClassificationData):
    in_channels = 3

    def __init__(self, root: str, crop: int = 227, resize: int = 256, **loader) -> None:
        super().__init__(**loader)
        self.root = os.path.expanduser(str(root)) if root else ""
        self.input_size = int(crop)
        self.resize = int(resize)
        self.num_classes = 0  # known once the folders are read

    def check(self) -> None:
        missing = [s for s in ("train", "val") if not os.path.isdir(os.path.join(self.root, s))]
        if not self.root or missing:
            raise ConfigError(
                f"data.root={self.root or '(unset)'} has no {' or '.join(missing or ['train', 'val'])}/ folder; "
                "point data.root at a folder with train/<class>/ and val/<class>/ image folders"
            )

    def build(self) -> None:
        self.check()
        norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train_tf = transforms.Compose(
            [
                transforms.Resize(self.resize),
                transforms.RandomCrop(self.input_size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                norm,
            ]
        )
        val_tf = transforms.Compose(
            [transforms.Resize(self.resize), transforms.CenterCrop(self.input_size), transforms.ToTensor(), norm]
        )
        self.train_set = datasets.ImageFolder(os.path.join(self.root, "train"), transform=train_tf)
        self.val_set = datasets.ImageFolder(os.path.join(self.root, "val"), transform=val_tf)
        if self.train_set.classes != self.val_set.classes:
            raise ConfigError(f"train/ and val/ under {self.root} have different class folders; they must match")
        self.num_classes = len(self.train_set.classes)
