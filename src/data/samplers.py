"""Training orders: one shuffle shared by all members, or one per member.

The order depends only on (seed, epoch), never on the global RNG, so a run, a resumed run and a
DDP rank all see the same sequence.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler


class SeededOrderSampler(Sampler):
    """Yields a permutation of ``range(n)`` per epoch; with several seeds, tuples of indices
    (one independent permutation per member)."""

    def __init__(self, n: int, seeds: Sequence[int]) -> None:
        self.n = int(n)
        self.seeds = [int(s) for s in seeds]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def permutation(self, seed: int, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator:
        perms = [self.permutation(s, self.epoch).tolist() for s in self.seeds]
        # Lightning calls set_epoch before each epoch; when a wrapper (DDP) hides this sampler
        # from it, advancing here still gives every epoch a new order.
        self.epoch += 1
        if len(perms) == 1:
            return iter(perms[0])
        return iter(zip(*perms))

    def __len__(self) -> int:
        return self.n


class MemberTuples(Dataset):
    """Indexed by a tuple of indices (one per member): returns (images [K, ...], labels [K])."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, indices):
        items = [self.base[i] for i in indices]
        return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.tensor([int(y) for _, y in items])
