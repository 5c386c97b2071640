"""Streaming, exact-across-processes histograms for the paper's mutual-information statistic.

Li et al. (2015) bin every unit's activations into ten bins: one for the ReLU zeros and nine
equal-count (percentile) bins over the positive values; the mutual information of two units is
that of their binned activations. Two passes over the probe set:

1. `UnitBins` (pass 1) accumulates, for every unit of every net, a fine histogram of the positive
   values on a fixed log-spaced grid, and the number of zeros. ``compute()`` reads the nine
   equal-count bins' edges off it (approximate percentiles of the positive values).
2. `JointHistogram` (pass 2) takes those edges and accumulates, for every pair of nets (a, b),
   the joint counts ``J[u, v, p, q]`` = number of samples where unit u of a is in bin p and unit v
   of b in bin q. `convergent.analysis.mutual_info.mutual_information` turns them into MI.

Both are torchmetrics `Metric`s whose states are integer-valued *sums* (``dist_reduce_fx="sum"``,
plus one ``"max"``), so accumulating on several processes gives exactly the one-process result,
and their memory does not grow with the probe set. Both take ``update(*acts)`` with one tensor per
net, like `Moments`: ``[N, C]`` (every image a sample) or ``[N, C, H, W]`` (every position of every
image a sample). Nothing leaves the device in ``update`` (no host synchronisation).

Bins of one unit (``B = n_positive_bins + 1`` bins, edges ``e`` of shape ``[C, B]``):
bin 0 holds ``x < e[0]`` (``e[0]`` is the zero threshold, 1e-6: the ReLU zeros, and any negative
or NaN value); bin j (1 <= j < B - 1) holds ``e[j-1] <= x < e[j]``; bin B-1 holds ``x >= e[B-2]``.
That is ``np.digitize(x, e[:-1])``. The last edge ``e[B-1]`` is the largest value seen in pass 1;
it is informative only (larger values of pass 2 still fall in the top bin).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from convergent.stats.metric import StreamingMetric, SumStates
from convergent.stats.moments import flatten_samples

Pair = tuple[int, int]

ZERO_THRESHOLD = 1e-6  # values below this are the ReLU zeros (bin 0)
MAX_VALUE = 1e6  # top of the fine grid; larger values go to one overflow bin
N_FINE = 1200  # fine bins over [1e-6, 1e6): 100 per decade, neighbouring edges 2.33 % apart
N_POSITIVE_BINS = 9  # the paper's nine equal-count bins over the positive values

# Elements per temporary in update() (rows are processed in chunks of about this many values).
CHUNK_ELEMENTS = 1 << 24
# float32 one-hot products are exact integer counts while a chunk has fewer rows than this.
FLOAT32_EXACT_ROWS = 1 << 24


def _check_acts(acts: Sequence[Tensor], sizes: Sequence[int]) -> list[Tensor]:
    if len(acts) != len(sizes):
        raise ValueError(f"update() needs one tensor per net ({len(sizes)}), got {len(acts)}")
    xs = [flatten_samples(a.detach()) for a in acts]
    rows = xs[0].shape[0]
    for i, x in enumerate(xs):
        if x.shape != (rows, sizes[i]):
            raise ValueError(
                f"net {i}: expected {rows} samples of {sizes[i]} units, got {tuple(x.shape)}; all nets must see the same inputs"
            )
    return xs


def _row_chunks(rows: int, width: int, budget: int, cap: int | None = None) -> Iterable[slice]:
    step = max(1, budget // max(1, width))
    if cap is not None:
        step = min(step, cap)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def digitize(x: Tensor, edges: Tensor) -> Tensor:
    """Bin index of every value: ``[S, C]`` values, ``[C, B]`` edges -> ``[S, C]`` int64 in 0..B-1.

    Same as ``np.digitize(x[:, c], edges[c, :-1])`` for every unit c (edges non-decreasing),
    compared in float64. NaN goes to bin 0.
    """
    x = x.to(torch.float64)
    inner = edges[:, :-1].to(device=x.device, dtype=torch.float64)
    idx = torch.zeros(x.shape, dtype=torch.int64, device=x.device)
    for j in range(inner.shape[1]):
        idx += x >= inner[:, j]
    return idx


class UnitBins(StreamingMetric):
    """Pass 1: per-unit bin edges (zero bin + equal-count percentile bins over positive values).

    ``UnitBins(sizes)``: ``sizes[i]`` is the number of units of net i.
    ``update(*acts)``: one tensor per net, ``[N, C_i]`` or ``[N, C_i, H, W]``, same inputs.
    ``compute() -> list[Tensor]``: per net the edges ``[C_i, n_positive_bins + 1]`` (float64):
    ``e[:, 0]`` the zero threshold, ``e[:, 1:-1]`` the approximate ``j / n_positive_bins``
    percentiles (j = 1..n_positive_bins-1) of the unit's positive values, ``e[:, -1]`` its largest
    value. Units without positive values (dead) get every edge equal to the threshold, so their
    zeros all fall in bin 0 (no NaN).

    Resolution: the positive values are counted on ``n_fine`` log-spaced bins over
    ``[zero_threshold, max_value)`` (default 1200 bins over 1e-6..1e6: 100 per decade, each bin
    ``10**(1/100) - 1 = 2.33 %`` wide) plus one overflow bin ``[max_value, largest value]``.
    A percentile is interpolated log-linearly inside the fine bin where the cumulative count
    crosses ``j / n_positive_bins`` of the unit's positive count, so it is within one fine bin
    (2.33 %) of the exact order statistic at that rank. Memory: ``8 * C * (n_fine + 3)`` bytes per
    net (9.6 kB per unit by default).

    States (exact integer counts, summed across processes): ``counts_i`` int64
    ``[C_i, n_fine + 2]`` (column 0: values below the threshold, 1..n_fine: the fine grid,
    n_fine + 1: overflow) and ``max_i`` float64 ``[C_i]`` (reduced with ``max``).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        n_fine: int = N_FINE,
        n_positive_bins: int = N_POSITIVE_BINS,
        zero_threshold: float = ZERO_THRESHOLD,
        max_value: float = MAX_VALUE,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.sizes = tuple(int(s) for s in sizes)
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"sizes must be positive unit counts, got {sizes}")
        if n_fine < 1 or n_positive_bins < 1:
            raise ValueError("n_fine and n_positive_bins must be positive")
        if not 0 < zero_threshold < max_value:
            raise ValueError(f"need 0 < zero_threshold < max_value, got {zero_threshold}, {max_value}")
        self.n_fine = int(n_fine)
        self.n_positive_bins = int(n_positive_bins)
        self.zero_threshold = float(zero_threshold)
        self.max_value = float(max_value)
        self._log_lo = math.log(self.zero_threshold)
        self._log_step = (math.log(self.max_value) - self._log_lo) / self.n_fine
        for i, c in enumerate(self.sizes):
            self.add_state(f"counts_{i}", torch.zeros(c, self.n_fine + 2, dtype=torch.int64), dist_reduce_fx="sum")
            self.add_state(f"max_{i}", torch.zeros(c, dtype=torch.float64), dist_reduce_fx="max")

    @property
    def bin_ratio(self) -> float:
        """Ratio of neighbouring fine-grid edges (1.0233 by default)."""
        return math.exp(self._log_step)

    def fine_edges(self) -> Tensor:
        """The ``n_fine + 1`` fine-grid edges, float64 (``zero_threshold`` .. ``max_value``)."""
        steps = torch.arange(self.n_fine + 1, dtype=torch.float64)
        return torch.exp(self._log_lo + steps * self._log_step)

    def update(self, *acts: Tensor) -> None:
        xs = _check_acts(acts, self.sizes)
        nb = self.n_fine + 2
        for i, x in enumerate(xs):
            c = x.shape[1]
            counts = getattr(self, f"counts_{i}")
            offsets = torch.arange(c, device=x.device, dtype=torch.int64) * nb
            for rows in _row_chunks(x.shape[0], c, CHUNK_ELEMENTS):
                v = x[rows].to(torch.float64)
                positive = v >= self.zero_threshold  # False for NaN and negatives
                # 1 + floor(log(v / lo) / step), clamped to the overflow bin; 0 below the threshold.
                fine = torch.floor((torch.log(v.clamp_min(self.zero_threshold)) - self._log_lo) / self._log_step)
                fine = fine.clamp(0, self.n_fine).to(torch.int64) + 1
                idx = torch.where(positive, fine, torch.zeros_like(fine)) + offsets
                counts += torch.bincount(idx.reshape(-1), minlength=c * nb).view(c, nb)
                top = torch.where(positive, v, torch.zeros_like(v)).amax(0)
                torch.maximum(getattr(self, f"max_{i}"), top, out=getattr(self, f"max_{i}"))

    def _edges(self, counts: Tensor, largest: Tensor) -> Tensor:
        c = counts.shape[0]
        k = self.n_positive_bins
        pos = counts[:, 1:].to(torch.float64)  # [C, n_fine + 1] positive bins, overflow last
        cum = pos.cumsum(1)
        total = cum[:, -1]
        targets = total[:, None] * (torch.arange(1, k, dtype=torch.float64, device=counts.device) / k)
        b = torch.searchsorted(cum, targets.contiguous(), right=False).clamp_max(self.n_fine)  # [C, k-1]
        before = torch.where(b > 0, cum.gather(1, (b - 1).clamp_min(0)), torch.zeros_like(targets))
        inside = pos.gather(1, b)
        frac = ((targets - before) / inside.clamp_min(1.0)).clamp(0.0, 1.0)
        log_low = self._log_lo + b.to(torch.float64) * self._log_step
        log_high = log_low + self._log_step
        # Overflow bin: from max_value up to the largest value seen (finite).
        big = torch.where(torch.isfinite(largest), largest, torch.full_like(largest, torch.finfo(torch.float64).max))
        log_top = torch.log(big.clamp_min(self.max_value))
        overflow = b == self.n_fine
        log_high = torch.where(overflow, log_top[:, None].expand_as(log_high), log_high)
        inner = torch.exp(log_low + frac * (log_high - log_low))
        inner = torch.minimum(inner, big[:, None].clamp_min(self.zero_threshold))  # never above the max
        inner = torch.cummax(inner, dim=1).values  # non-decreasing despite rounding
        edges = torch.empty(c, k + 1, dtype=torch.float64, device=counts.device)
        edges[:, 0] = self.zero_threshold
        edges[:, 1:k] = inner
        edges[:, k] = torch.maximum(largest, inner[:, -1] if k > 1 else edges[:, 0])
        dead = total <= 0
        edges[dead] = self.zero_threshold
        return edges

    def compute(self) -> list[Tensor]:
        return [self._edges(getattr(self, f"counts_{i}"), getattr(self, f"max_{i}")) for i in range(len(self.sizes))]

    def zero_fraction(self) -> list[Tensor]:
        """Per net, the fraction of each unit's samples below the zero threshold (float64 [C])."""
        out = []
        for i in range(len(self.sizes)):
            counts = getattr(self, f"counts_{i}")
            out.append(counts[:, 0].to(torch.float64) / counts.sum(1).clamp_min(1).to(torch.float64))
        return out


def resolve_pairs(k: int, pairs: Iterable[Sequence[int]] | None) -> list[Pair]:
    """Pairs of nets to keep: all ``(i, j)``, i < j, by default; given pairs normalised to i <= j
    (``(i, i)`` — a net with itself — is allowed when asked for explicitly)."""
    if pairs is None:
        return [(i, j) for i in range(k) for j in range(i + 1, k)]
    out = sorted({(min(int(a), int(b)), max(int(a), int(b))) for a, b in pairs})
    for a, b in out:
        if a < 0 or b >= k:
            raise ValueError(f"pair ({a}, {b}) is not a pair of nets in 0..{k - 1}")
    return out


class JointHistogram(SumStates):
    """Pass 2: joint bin counts of every unit pair of every pair of nets.

    ``JointHistogram(sizes, edges, pairs=None)``: ``edges[i]`` is net i's ``[C_i, B]`` edges (from
    `UnitBins.compute()`; B bins per unit, 10 by default); ``pairs`` the pairs of nets (all
    ``i < j`` by default; ``(i, i)`` allowed explicitly).
    ``update(*acts)``: one tensor per net, ``[N, C_i]`` or ``[N, C_i, H, W]``, same inputs.
    ``compute() -> dict[(a, b), Tensor]``: float64 counts ``[C_a, C_b, B, B]`` (exact integers):
    ``J[u, v, p, q]`` = samples with unit u of net a in bin p and unit v of net b in bin q.

    Per batch chunk the counts are a product of one-hot bin indicators,
    ``onehot_a^T @ onehot_b`` (``[S, C_a B]^T [S, C_b B]``). ``product_dtype`` float32 (default) is
    exact because a chunk has fewer than 2**24 rows (also under TF32: 0/1 are exact and products
    accumulate in float32); float64 is the slow, obviously exact alternative. Chunks hold about
    ``chunk_elements`` one-hot entries. States are float64 sums ``[C_a * B, C_b * B]`` per pair
    (``8 * B**2 * C_a * C_b`` bytes: 118 MB for two 384-unit layers) plus the sample count ``n``.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        edges: Sequence[Tensor],
        pairs: Iterable[Sequence[int]] | None = None,
        product_dtype: torch.dtype = torch.float32,
        chunk_elements: int = CHUNK_ELEMENTS,
        groups: int = 1,
        state_dtype: torch.dtype = torch.float64,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.sizes = tuple(int(s) for s in sizes)
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"sizes must be positive unit counts, got {sizes}")
        if state_dtype not in (torch.float32, torch.float64):
            raise ValueError("state_dtype must be float32 (exact counts below 2**24 per cell) or float64")
        self.state_dtype = state_dtype
        if len(edges) != len(self.sizes):
            raise ValueError(f"need one edges tensor per net ({len(self.sizes)}), got {len(edges)}")
        if product_dtype not in (torch.float32, torch.float64):
            raise ValueError("product_dtype must be float32 or float64 (lower precision miscounts)")
        self.n_bins = int(edges[0].shape[-1])
        for i, (c, e) in enumerate(zip(self.sizes, edges)):
            if tuple(e.shape) != (c, self.n_bins):
                raise ValueError(f"net {i}: edges must be [{c}, {self.n_bins}], got {tuple(e.shape)}")
            self.register_buffer(f"edges_{i}", e.detach().to(torch.float64).clone(), persistent=False)
        self.pair_list = resolve_pairs(len(self.sizes), pairs)
        self.product_dtype = product_dtype
        self.chunk_elements = int(chunk_elements)
        if int(groups) < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self.groups = int(groups)
        self.add_sum_state("n", (self.groups,))
        b = self.n_bins
        for i, j in self.pair_list:
            self.add_sum_state(f"joint_{i}_{j}", (self.groups, self.sizes[i] * b, self.sizes[j] * b), dtype=state_dtype)

    def edges(self, i: int) -> Tensor:
        return getattr(self, f"edges_{i}")

    def _onehot(self, x: Tensor, i: int) -> Tensor:
        b = self.n_bins
        idx = digitize(x, self.edges(i).to(x.device))
        idx = idx + torch.arange(x.shape[1], device=x.device, dtype=torch.int64) * b
        out = torch.zeros(x.shape[0], x.shape[1] * b, dtype=self.product_dtype, device=x.device)
        return out.scatter_(1, idx, 1.0)

    def update(self, *acts: Tensor, group: Tensor | int | None = None) -> None:
        """Fold a batch in; ``group`` (with ``groups`` > 1) gives each image's group as in
        `Moments.update` (a tensor, or an int o: image i in group (o + i) % groups)."""
        xs = _check_acts(acts, self.sizes)
        rows = xs[0].shape[0]
        if rows == 0:
            return
        if self.groups == 1:
            self._add(xs, 0)
            return
        images = acts[0].shape[0]
        per_image = rows // images
        if isinstance(group, int):
            image_group = (group + torch.arange(images, device=xs[0].device)) % self.groups
        elif group is None:
            raise ValueError(f"update() of a JointHistogram with {self.groups} groups needs each image's group (`group=`)")
        else:
            image_group = group.reshape(-1).to(xs[0].device)
        row_group = image_group.repeat_interleave(per_image)
        for g in torch.unique(image_group).tolist():
            keep = torch.nonzero(row_group == g).flatten()
            self._add([x.index_select(0, keep) for x in xs], int(g))

    def _add(self, xs: list[Tensor], g: int) -> None:
        rows = xs[0].shape[0]
        self.n[g] += rows
        used = sorted({i for pair in self.pair_list for i in pair})
        width = sum(self.sizes[i] for i in used) * self.n_bins
        cap = FLOAT32_EXACT_ROWS - 1 if self.product_dtype == torch.float32 else None
        for chunk in _row_chunks(rows, width, self.chunk_elements, cap):
            onehot = {i: self._onehot(xs[i][chunk], i) for i in used}
            for i, j in self.pair_list:
                getattr(self, f"joint_{i}_{j}")[g].add_((onehot[i].T @ onehot[j]).to(self.state_dtype))

    def counts(self, i: int, j: int, grouped: bool = False) -> Tensor:
        """Joint counts ``[C_i, C_j, B, B]`` of one kept pair over every group (``grouped=True``:
        ``[G, C_i, C_j, B, B]``, one per group)."""
        b = self.n_bins
        if (i, j) in self.pair_list:
            state = getattr(self, f"joint_{i}_{j}").view(self.groups, self.sizes[i], b, self.sizes[j], b).permute(0, 1, 3, 2, 4)
            return state if grouped else state.sum(0)
        if (j, i) in self.pair_list:
            return self.counts(j, i, grouped).transpose(-4, -3).transpose(-2, -1)
        raise KeyError(f"no joint counts kept for nets ({i}, {j}); kept: {self.pair_list}")

    def compute(self) -> dict[Pair, Tensor]:
        return {(i, j): self.counts(i, j).to(torch.float64) for i, j in self.pair_list}

    def compute_groups(self) -> dict[Pair, Tensor]:
        """Per pair the counts of every group, ``[G, C_i, C_j, B, B]``, summed across processes
        (every process must call it, like `compute`)."""
        with self.sync_context():
            return {(i, j): self.counts(i, j, grouped=True).to(torch.float64) for i, j in self.pair_list}

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.metric_state.values() if isinstance(t, Tensor))


def estimate_joint_bytes(
    sizes: Sequence[int], pairs: Iterable[Sequence[int]] | None = None, n_bins: int = 10, groups: int = 1, state_bytes: int = 8
) -> int:
    """Bytes of the states of one `JointHistogram(sizes, edges, pairs, groups=groups)`, without allocating it."""
    return groups * (8 + sum(state_bytes * n_bins * n_bins * sizes[i] * sizes[j] for i, j in resolve_pairs(len(sizes), pairs)))


def count_dtype(max_count: int) -> torch.dtype:
    """float32 states hold integer counts exactly below 2**24: half the memory of float64."""
    return torch.float32 if max_count < FLOAT32_EXACT_ROWS else torch.float64
