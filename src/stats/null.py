"""The null: two nets' cross moments on randomly re-paired images.

A similarity measure of nets a and b at chance is what it gives when a's activations of image i
are paired with b's activations of another, random image. `RepairedCross` streams, for R
independent re-pairings, the cross sums ``sum_i x_a(i) x_b(sigma_d(i))^T`` (every position of an
image a sample, positions kept aligned) and the debiased-CKA sums, without keeping activations.

Each re-pairing sigma_d is a random cycle over the images of one group inside one batch
(`repairing`): no image is paired with itself, and each group (the even and the odd probe images)
is mapped onto itself, so net a's and net b's own sums over any union of groups are those of the
real statistics. `null_stats` therefore builds the re-paired statistics of a pair from the real
within-net sums and these cross sums. The probe set is a seeded random sample in random order, so
a batch is a random subset and a random cycle inside it is a random re-pairing of the probe set,
independent of labels and of the data set's order; and since the permutation of a batch depends
only on its first probe index and the draw, several processes get the same re-pairings as one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from convergent.stats.metric import SumStates
from convergent.stats.moments import (
    CHUNK_ELEMENTS,
    SHIFT_IMAGES,
    GroupedMomentStats,
    MomentStats,
    _full_precision_matmul,
    _WorkRows,
    chunk_shift,
    group_segments,
)


def repairing(first: int, n: int, draws: int, groups: int = 2, seed: int = 0) -> Tensor:
    """[draws, n] permutations of a batch's n rows (probe images first, first + 1, ...): row i of
    net a is paired with row ``perm[d, i]`` of net b in draw d. Each is a random cycle within each
    group of rows (row i in group (first + i) % groups), seeded by (seed, draw, first) only."""
    out = torch.empty(draws, n, dtype=torch.long)
    rows = torch.arange(n)
    classes = [rows[(first + rows) % groups == g] for g in range(groups)]
    for d in range(draws):
        g = torch.Generator().manual_seed(hash((int(seed), int(d), int(first))) & 0x7FFF_FFFF_FFFF_FFFF)
        for members in classes:
            if members.numel() == 0:
                continue
            order = members[torch.randperm(members.numel(), generator=g)]
            # a cycle through `order`: each row is paired with the next (no row with itself when n > 1)
            out[d, order] = torch.roll(order, -1)
    return out


class RepairedSums:
    """Summed states of `RepairedCross`: per draw d and group g, ``sxx[d, g]`` = sum of
    x_a x_b(sigma)^T [C_a, C_b], ``qq[d, g]``, ``qx_ab[d, g]`` = sum |x_a|^2 x_b(sigma) [C_b] and
    ``qx_ba[d, g]`` = sum |x_b(sigma)|^2 x_a [C_a]."""

    def __init__(self, sxx: Tensor, qq: Tensor, qx_ab: Tensor, qx_ba: Tensor) -> None:
        self.sxx, self.qq, self.qx_ab, self.qx_ba = sxx, qq, qx_ab, qx_ba

    @property
    def draws(self) -> int:
        return int(self.sxx.shape[0])


class RepairedCross(SumStates):
    """Cross moments of net a and net b for `draws` random re-pairings of the images, per group.

    ``update(a, b, perms, group=...)``: a [N, C_a, ...] and b [N, C_b, ...] for the same N images
    in the same order; ``perms`` [draws, N] (`repairing`); ``group`` each image's group as in
    `Moments.update` (an int o: image i is probe image o + i, in group (o + i) % groups). Products
    as in `Moments` (float32 on data shifted per chunk, shift terms added back in float64)."""

    def __init__(
        self, size_a: int, size_b: int, draws: int, groups: int = 2, product_dtype: torch.dtype = torch.float64, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        self.size_a, self.size_b, self.draws, self.groups = int(size_a), int(size_b), int(draws), int(groups)
        self.product_dtype = product_dtype
        r, g, ca, cb = self.draws, self.groups, self.size_a, self.size_b
        self.add_sum_state("sxx", (r, g, ca, cb))
        self.add_sum_state("qq", (r, g))
        self.add_sum_state("qx_ab", (r, g, cb))
        self.add_sum_state("qx_ba", (r, g, ca))

    def update(self, a: Tensor, b: Tensor, perms: Tensor, group: Tensor | int | None = None) -> None:
        if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:] or a.shape[1] != self.size_a or b.shape[1] != self.size_b:
            raise ValueError(
                f"expected a [N, {self.size_a}, ...] and b [N, {self.size_b}, ...] alike, got {tuple(a.shape)}, {tuple(b.shape)}"
            )
        n = a.shape[0]
        if tuple(perms.shape) != (self.draws, n):
            raise ValueError(f"perms must be [{self.draws}, {n}], got {tuple(perms.shape)}")
        if n == 0:
            return
        fa = a.detach().reshape(n, self.size_a, -1)
        fb = b.detach().reshape(n, self.size_b, -1)
        perms = perms.to(fa.device)
        work = torch.float64 if self.product_dtype == torch.float64 else self.product_dtype
        norms_b = fb.to(work).square().sum(1)  # [N, P]: |x_b|^2 of every sample, re-paired by index
        # chunks of a's images bound the work buffer (a's rows and every draw's b rows); their
        # partners come from the whole batch
        rows = self.size_a + 2 + self.draws * (self.size_b + 2)
        step = max(1, CHUNK_ELEMENTS // (fa.shape[2] * rows))
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            part = group if group is None else (group + lo if isinstance(group, int) else group[lo:hi])
            with _full_precision_matmul():
                self._fold(fa[lo:hi], fb, norms_b, perms[:, lo:hi], group_segments(hi - lo, self.groups, part))

    def _fold(self, a: Tensor, b: Tensor, norms_b: Tensor, perms: Tensor, segments) -> None:
        """a: this chunk's images [n, C_a, P]; b: the whole batch [N, C_b, P] and its per-sample
        squared norms [N, P]; perms [R, n]: each chunk image's partner in b, per draw. One work
        buffer: a's shifted units, a row of ones, |x_a|^2, then for every draw the re-paired b's
        shifted units, a row of ones and |x_b|^2; one product of a's rows with all the draws'
        rows (a thin product per draw is several times slower)."""
        f64 = torch.float64
        work = f64 if self.product_dtype == f64 else self.product_dtype
        ca, cb, r = self.size_a, self.size_b, self.draws
        n, p = a.shape[0], a.shape[2]
        wb = cb + 2  # rows of one draw
        x = _WorkRows(ca + 2 + r * wb, n, p, work, a.device)
        ra = slice(0, ca + 2)
        # b's shift from its first re-paired images only (`chunk_shift` looks at no more)
        sa, sb = chunk_shift(a, work), chunk_shift(b.index_select(0, perms[0, :SHIFT_IMAGES]), work)
        x.fill(slice(0, ca), a, sa, segments)
        x.rows(ca).fill_(1.0)
        x.fill_row(ca + 1, a.to(work).square().sum(1), segments)
        for d in range(r):
            base = ca + 2 + d * wb
            order = perms[d]
            x.fill(slice(base, base + cb), b.index_select(0, order), sb, segments)
            x.rows(base + cb).fill_(1.0)
            x.fill_row(base + cb + 1, norms_b.index_select(0, order), segments)
        prod = x.products(ra, slice(ca + 2, ca + 2 + r * wb), segments, "null.prod")  # [S, C_a + 2, R (C_b + 2)]
        prod = prod.reshape(prod.shape[0], ca + 2, r, wb).permute(2, 0, 1, 3)  # [R, S, C_a + 2, C_b + 2]
        sa64, sb64 = sa.to(f64), sb.to(f64)
        gids = torch.tensor([s.group for s in segments], dtype=torch.long, device=a.device)
        cross = prod[:, :, :ca, :cb]
        s_a, s_b = prod[:, :, :ca, cb], prod[:, :, ca, :cb]  # shifted sums of a and of the re-paired b
        cnt = prod[:, :, ca, cb]
        raw = cross + sa64[:, None] * s_b[:, :, None, :] + s_a[..., None] * sb64
        raw += cnt[..., None, None] * torch.outer(sa64, sb64)
        self.sxx.index_add_(1, gids, raw)
        self.qq.index_add_(1, gids, prod[:, :, ca + 1, cb + 1])
        self.qx_ab.index_add_(1, gids, prod[:, :, ca + 1, :cb] + prod[:, :, ca + 1, cb, None] * sb64)
        self.qx_ba.index_add_(1, gids, prod[:, :, :ca, cb + 1] + prod[:, :, ca, cb + 1, None] * sa64)

    def compute(self) -> RepairedSums:
        return RepairedSums(self.sxx.clone(), self.qq.clone(), self.qx_ab.clone(), self.qx_ba.clone())


def null_stats(
    real: GroupedMomentStats, a: int, b: int, repaired: RepairedSums, draw: int, groups: Sequence[int] | None = None
) -> MomentStats:
    """The statistics of nets a and b (indices 0 and 1 of the result) with b's images re-paired
    (draw `draw`), over the real statistics' groups `groups` (None: all). The null's own groups
    are the parity classes: real groups {0, 2, ...} are its group 0, {1, 3, ...} its group 1."""
    chosen = list(range(real.groups)) if groups is None else sorted(set(groups))
    own = real.total if groups is None else real.subset(chosen)
    parities = sorted({g % repaired.sxx.shape[1] for g in chosen})
    if groups is not None and any(g % 2 != chosen[0] % 2 for g in chosen) and len(chosen) != real.groups:
        raise ValueError("the null's statistics exist for all groups or for one parity class of them")
    sel = torch.tensor(parities, dtype=torch.long, device=repaired.sxx.device)

    def pick(t: Tensor) -> Tensor:
        return t[draw].index_select(0, sel).sum(0)

    sxx = {(0, 0): own.sxx[(a, a)], (1, 1): own.sxx[(b, b)], (0, 1): pick(repaired.sxx)}
    qq = qx = None
    if own.qq:
        qq = {(0, 0): own.qq[(a, a)], (1, 1): own.qq[(b, b)], (0, 1): pick(repaired.qq)}
        qx = {(0, 0): own.qx[(a, a)], (1, 1): own.qx[(b, b)], (0, 1): pick(repaired.qx_ab), (1, 0): pick(repaired.qx_ba)}
    stats = MomentStats((own.sizes[a], own.sizes[b]), own._n, [own.sums[a], own.sums[b]], sxx, qq, qx)
    return stats.share_nets({0: (own, a), 1: (own, b)})  # each net's own quantities are the real ones
