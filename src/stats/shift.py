"""The permutation null: member i's probe images shifted by i places (cyclically).

Streaming over the probe set, row r pairs member i's activations of image (r - i) mod M, so any
two members see different images in every row: image correspondence is broken while every
member's own sample is unchanged. Memory: at most K - 1 images per member (the first images,
and the last ones seen), copied out of their batch, whatever the probe size. Rows that lie
wholly inside the current batch are emitted as views of it (no copy).
"""

from __future__ import annotations

import torch
from torch import Tensor

Taps = dict[str, Tensor]  # one member's activations of a batch: layer -> [N, ...]
Chunk = tuple[int, list[Taps]]  # (first row, one dict per member of the rows from there on)


def _rows(taps: Taps) -> int:
    return next(iter(taps.values())).shape[0]


def _cat(parts: list[Taps]) -> Taps:
    return parts[0] if len(parts) == 1 else {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _slice(taps: Taps, lo: int, hi: int) -> Taps:
    return {key: v[lo:hi] for key, v in taps.items()}


def _own(taps: Taps) -> Taps:
    """A copy that does not keep the batch it was sliced from alive."""
    return {key: v.clone() for key, v in taps.items()}


class CyclicShift:
    """Feed batches with `push`; it returns the rows that are complete. `finish` returns the
    first K - 1 rows, which need the last images. Each is a list of chunks (first row, one dict
    per member)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.seen = 0
        self.head: list[Taps | None] = [None] * k  # first K-1 images of each member
        self.tail: list[Taps | None] = [None] * k  # last i images of member i

    def push(self, members: list[Taps]) -> list[Chunk]:
        n, k = _rows(members[0]), self.k
        t0, self.seen = self.seen, self.seen + n
        if self.head[0] is None or _rows(self.head[0]) < k - 1:
            for i, taps in enumerate(members):
                have = [] if self.head[i] is None else [self.head[i]]  # the head holds images 0..t0-1
                self.head[i] = _own(_cat([*have, _slice(taps, 0, k - 1 - t0)]))
        r_lo, r_hi = max(t0, k - 1), t0 + n  # rows emitted now: [r_lo, r_hi)
        # Rows below t0 + K - 1 need some members' previous images (the tails): a small copy.
        # From there on member i's row r is image r - i of this batch: a view.
        split = min(r_hi, max(r_lo, t0 + k - 1))
        chunks: list[Chunk] = []
        if split > r_lo:
            chunks.append((r_lo, [self._rows_from(i, taps, t0, r_lo, split) for i, taps in enumerate(members)]))
        if r_hi > split:
            chunks.append((split, [_slice(taps, split - i - t0, r_hi - i - t0) for i, taps in enumerate(members)]))
        for i, taps in enumerate(members[1:], start=1):  # keep the last i images of member i
            have = [] if self.tail[i] is None else [self.tail[i]]
            stream = _cat([*have, _slice(taps, max(0, n - i), n)])
            self.tail[i] = _own(_slice(stream, max(0, _rows(stream) - i), _rows(stream)))
        return chunks

    def _rows_from(self, i: int, taps: Taps, t0: int, lo: int, hi: int) -> Taps:
        """Member i's images r - i for rows r in [lo, hi): from the tail where r - i < t0."""
        first = t0 - (0 if self.tail[i] is None else _rows(self.tail[i]))  # image of tail row 0
        parts = []
        if lo - i < t0:
            parts.append(_slice(self.tail[i], lo - i - first, min(hi - i, t0) - first))
        if hi - i > t0:
            parts.append(_slice(taps, max(lo - i, t0) - t0, hi - i - t0))
        return _cat(parts)

    def finish(self) -> list[Chunk]:
        """Rows 0..K-2: member i's image r - i if r >= i, else image M - i + r (from the end)."""
        m = self.seen
        if m < self.k:
            raise ValueError(
                f"the permutation null needs more probe images per process ({m}) than members ({self.k}); "
                "raise analysis.probe_size or set analysis.permutation_null=false"
            )
        if self.k < 2:
            return []
        out = []
        for i in range(self.k):
            parts = [_slice(self.tail[i], r, r + 1) if r < i else _slice(self.head[i], r - i, r - i + 1) for r in range(self.k - 1)]
            out.append(_cat(parts))
        return [(0, out)]
