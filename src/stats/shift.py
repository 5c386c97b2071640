"""The permutation null: member i's probe images shifted by i places (cyclically).

Streaming over the probe set, row r pairs member i's activations of image (r - i) mod M, so any
two members see different images in every row: image correspondence is broken while every
member's own sample is unchanged. Memory: at most K - 1 images per member (the first images,
and the last ones seen), whatever the probe size.
"""

from __future__ import annotations

import torch
from torch import Tensor

Taps = dict[str, Tensor]  # one member's activations of a batch: layer -> [N, ...]


def _rows(taps: Taps) -> int:
    return next(iter(taps.values())).shape[0]


def _cat(a: Taps | None, b: Taps) -> Taps:
    return b if a is None else {key: torch.cat([a[key], b[key]]) for key in b}


def _slice(taps: Taps, lo: int, hi: int) -> Taps:
    return {key: v[lo:hi] for key, v in taps.items()}


class CyclicShift:
    """Feed batches with `push`; it returns the rows that are complete. `finish` returns the
    first K - 1 rows, which need the last images. Every output is one dict per member."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.seen = 0
        self.head: list[Taps | None] = [None] * k  # first K-1 images of each member
        self.tail: list[Taps | None] = [None] * k  # last i images of member i

    def push(self, members: list[Taps]) -> list[Taps] | None:
        n = _rows(members[0])
        t0, self.seen = self.seen, self.seen + n
        if self.head[0] is None or _rows(self.head[0]) < self.k - 1:
            for i, taps in enumerate(members):
                joined = _cat(self.head[i], taps)
                self.head[i] = _slice(joined, 0, self.k - 1)
        r_lo, r_hi = max(t0, self.k - 1), t0 + n  # rows emitted now: [r_lo, r_hi)
        out: list[Taps] = []
        for i, taps in enumerate(members):
            stream = _cat(self.tail[i], taps)  # images [t0 - len(tail), t0 + n)
            first = t0 - (0 if self.tail[i] is None else _rows(self.tail[i]))
            if r_hi > r_lo:
                out.append(_slice(stream, r_lo - i - first, r_hi - i - first))
            self.tail[i] = _slice(stream, max(0, _rows(stream) - i), _rows(stream)) if i else None
        return out if r_hi > r_lo else None

    def finish(self) -> list[Taps] | None:
        """Rows 0..K-2: member i's image r - i if r >= i, else image M - i + r (from the end)."""
        m = self.seen
        if m < self.k:
            raise ValueError(
                f"the permutation null needs more probe images per process ({m}) than members ({self.k}); "
                "raise analysis.probe_size or set analysis.permutation_null=false"
            )
        out = []
        for i in range(self.k):
            parts = []
            for r in range(self.k - 1):
                if r >= i:
                    parts.append(_slice(self.head[i], r - i, r - i + 1))
                else:
                    parts.append(_slice(self.tail[i], r, r + 1))
            joined = parts[0]
            for p in parts[1:]:
                joined = _cat(joined, p)
            out.append(joined)
        return out if self.k > 1 else None
