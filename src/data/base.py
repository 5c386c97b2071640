"""The common shape of every data set: train/val splits, the training order, and the probe set.

The probe set is defined here and nowhere else: `probe_size` validation images drawn with a fixed
seed, in random order, with the validation transform. Every analysis (live or post hoc) uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from convergent.data.samplers import MemberTuples, SeededOrderSampler
from convergent.errors import ConfigError

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
            raise ConfigError(f"ensemble.data_order must be one of {DATA_ORDERS}, got {data_order!r}")
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
    def probe_indices(self, probe_size: int, seed: int = 0) -> list[int]:
        """The probe set: `probe_size` validation images drawn at random (a fixed seed), in a random
        order, so that neither the labels nor the data set's order (an ImageFolder sorted by class,
        a split interleaving classes) can bias a statistic; the same images in every run."""
        self.setup()
        n_val = len(self.val_set)
        if probe_size < 1 or probe_size > n_val:
            raise ConfigError(
                f"analysis.probe_size={probe_size} but the validation split has {n_val} images; "
                f"use a probe size between 1 and {n_val}"
            )
        g = torch.Generator().manual_seed(PROBE_SEED_BASE + int(seed))
        return torch.randperm(n_val, generator=g)[: int(probe_size)].tolist()

    def probe_set(self, probe_size: int, seed: int = 0) -> Subset:
        """The probe images (validation transform); probe image i is ``probe_set(...)[i]``."""
        indices = self.probe_indices(probe_size, seed)  # (sets the data up first)
        return Subset(self.val_set, indices)

    def probe_dataloader(self, probe_size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> DataLoader:
        """This process's probe batches: whole batches of consecutive probe images (the same batches
        whatever the number of processes, so the null's re-pairings are too), a contiguous run of
        them per rank; each item is (image, label, probe index)."""
        probe = self.probe_set(probe_size, seed)
        bounds = probe_batch_bounds(len(probe), batch_size)
        lo, hi = len(bounds) * rank // world_size, len(bounds) * (rank + 1) // world_size
        batches = [list(range(a, b)) for a, b in bounds[lo:hi]]
        return DataLoader(IndexedDataset(probe), batch_sampler=batches, num_workers=0)


# A constant added to analysis.probe_seed, so the probe sample does not share its stream with other
# seeded draws that use small seeds.
PROBE_SEED_BASE = 20_151_107


def probe_batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[lo, hi) of the probe batches: `batch_size` images each, the last one possibly smaller but
    never under 4 images (the null re-pairs images within a batch's even and odd images), unless the
    probe set itself is that small."""
    bounds = [(lo, min(n, lo + batch_size)) for lo in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < MIN_BATCH:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds


MIN_BATCH = 4


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
