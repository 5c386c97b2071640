"""The common shape of every data set: train/val splits, the training order, and the probe set.

The probe set is defined here and nowhere else: the first `probe_size` images of the validation
split, in order, with the validation transform. Every analysis (live or post hoc) uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset, Subset

from convergent.data.samplers import MemberTuples, SeededOrderSampler

DATA_ORDERS = ("shared", "independent")


class ClassificationData(pl.LightningDataModule):
    """Subclasses set `num_classes`, `in_channels`, `input_size` and build `train_set`/`val_set`
    in `build()`."""

    num_classes: int
    in_channels: int
    input_size: int

    def __init__(self, batch_size: int = 128, val_batch_size: int | None = None, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.data_order = "shared"
        self.order_seeds: list[int] = [0]

    # --- subclasses --------------------------------------------------------------------------
    def build(self) -> None:
        raise NotImplementedError

    # --- Lightning ---------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.build()

    def set_order(self, data_order: str, seeds: Sequence[int]) -> None:
        """`shared`: one shuffle (seeds[0]) for all members; `independent`: one per member."""
        if data_order not in DATA_ORDERS:
            raise ValueError(f"ensemble.data_order must be one of {DATA_ORDERS}, got {data_order!r}")
        self.data_order = data_order
        self.order_seeds = [int(s) for s in seeds] if data_order == "independent" else [int(seeds[0])]

    def _loader(self, dataset: Dataset, batch_size: int, sampler=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        sampler = SeededOrderSampler(len(self.train_set), self.order_seeds)
        dataset = MemberTuples(self.train_set) if self.data_order == "independent" else self.train_set
        return self._loader(dataset, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, self.val_batch_size)

    # --- the probe set -----------------------------------------------------------------------
    def probe_set(self, probe_size: int) -> Subset:
        """The first `probe_size` validation images, in order, validation transform."""
        self.setup()
        n_val = len(self.val_set)
        if probe_size < 1 or probe_size > n_val:
            raise ValueError(
                f"analysis.probe_size={probe_size} but the validation split has {n_val} images; "
                f"use a probe size between 1 and {n_val}"
            )
        return Subset(self.val_set, range(int(probe_size)))

    def probe_dataloader(self, probe_size: int, batch_size: int, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Probe batches of this process: a contiguous shard in DDP, in order, no shuffling."""
        probe = self.probe_set(probe_size)
        lo = probe_size * rank // world_size
        hi = probe_size * (rank + 1) // world_size
        shard = Subset(probe.dataset, range(lo, hi))
        return DataLoader(IndexedDataset(shard, offset=lo), batch_size=batch_size, shuffle=False, num_workers=0)


class IndexedDataset(Dataset):
    """Yields (image, label, probe index) so statistics that keep positions know the image."""

    def __init__(self, base: Dataset, offset: int = 0) -> None:
        self.base = base
        self.offset = offset

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return x, y, self.offset + i
