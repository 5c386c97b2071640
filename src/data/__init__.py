"""LightningDataModules and the probe set (`ClassificationData.probe_set`)."""

from convergent.data.base import DATA_ORDERS, ClassificationData, IndexedDataset
from convergent.data.cifar import CIFAR
from convergent.data.imagefolder import ImageFolderData
from convergent.data.mnist5k import MNIST5k
from convergent.data.synthetic import Synthetic

__all__ = ["ClassificationData", "IndexedDataset", "DATA_ORDERS", "MNIST5k", "Synthetic", "CIFAR", "ImageFolderData"]
