"""Exact streaming first and second moments of several networks' activations.

`Moments` is a torchmetrics `Metric`: every state is a float64 *sum*, so accumulating on several
processes and summing (``dist_reduce_fx="sum"``) gives the same statistics as one process.
Nothing is kept of the activations once a batch has been folded in.

Second moments are accumulated per chunk of images as products of the activations shifted by an
estimate of the chunk's mean s (the mean of its first images), plus the shift's terms added back
exactly: ``sum X^T Y = sum (X - s_x)^T (Y - s_y) + s_x S_y^T + S_x s_y^T + n s_x s_y^T`` with S the
sums of the shifted values. The shifted products can be computed in float32 (``product_dtype``)
for speed: near-centred values keep their rounding within ~1e-6 of the covariance; everything
else, and every accumulation, is float64.

`MomentStats` holds the summed states and derives every statistic from them (mean, covariance,
correlation, dead units). Two accumulators (for example a fit and a held-out split of the probe
set) merge exactly with ``+``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from convergent.stats.metric import SumStates
from convergent.stats.scratch import scratch

Block = tuple[int, int]

# A unit whose variance is below this fraction of its squared mean (or exactly zero) is dead:
# ReLU units that never fire, or constant ones. Their correlations are defined as 0.
DEAD_RELATIVE_VARIANCE = 1e-12
# Values per temporary buffer in update(): batches are folded in chunks of whole images.
CHUNK_ELEMENTS = 1 << 24
# Below this many positions per image, products run over all samples at once instead of per image.
BMM_MIN_SAMPLES = 256
# Samples per float32 product in the row-major layout (see _run_length): at least MIN_RUN, at most
# PRODUCT_SAMPLES; the pieces are summed in float64.
MIN_RUN = 64
PRODUCT_SAMPLES = 1 << 11
# Images of a chunk whose mean shifts the chunk before its float32 products (see Moments._fold).
SHIFT_IMAGES = 16


def flatten_samples(x: Tensor) -> Tensor:
    """[N, C] -> [N, C]; [N, C, *spatial] -> [N * prod(spatial), C] (every position a sample)."""
    if x.dim() == 2:
        return x
    if x.dim() < 2:
        raise ValueError(f"activations must be [N, C] or [N, C, H, W], got shape {tuple(x.shape)}")
    c = x.shape[1]
    return x.movedim(1, -1).reshape(-1, c)


def _block_name(kind: str, i: int, j: int) -> str:
    return f"{kind}_{i}_{j}"


def resolve_blocks(k: int, pairs: Iterable[Sequence[int]] | None) -> list[Block]:
    """Blocks to keep: every within-net block (i, i) and the between-net blocks of `pairs`
    (all i < j when `pairs` is None). Pairs are normalised to i < j."""
    if pairs is None:
        between = [(i, j) for i in range(k) for j in range(i + 1, k)]
    else:
        between = sorted({(min(int(a), int(b)), max(int(a), int(b))) for a, b in pairs})
        for a, b in between:
            if a == b or a < 0 or b >= k:
                raise ValueError(f"pair ({a}, {b}) is not a pair of distinct nets in 0..{k - 1}")
    return [(i, i) for i in range(k)] + between


class SummedStates:
    """Summed moment states of K networks (`MomentStats`: one set; `GroupedMomentStats`: one per
    group of images, a leading group dimension), held in containers of their own, n in float64."""

    def __init__(
        self,
        sizes: Sequence[int],
        n: Tensor,
        sums: Sequence[Tensor],
        sxx: dict[Block, Tensor],
        qq: dict[Block, Tensor] | None = None,
        qx: dict[Block, Tensor] | None = None,
    ) -> None:
        self.sizes = tuple(int(s) for s in sizes)
        self._n = n.to(torch.float64)
        self.sums = list(sums)
        self.sxx = dict(sxx)
        self.qq = dict(qq or {})
        self.qx = dict(qx or {})
        self._memo: dict = {}


class MomentStats(SummedStates):
    """Summed moment states of K networks' units, and every statistic derived from them.

    ``n`` samples; ``sums[i]`` = sum of x_i; ``sxx[(i, j)]`` = sum of x_i x_j^T (i <= j, raw);
    optional per-sample squared-norm sums used by the debiased CKA:
    ``qq[(i, j)]`` = sum of |x_i|^2 |x_j|^2 and ``qx[(i, j)]`` = sum of |x_i|^2 x_j.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._parents: dict[int, tuple[MomentStats, int]] = {}

    def memo(self, key, compute):
        """Cache a derived quantity (the sums never change after construction): analyses ask for
        the same covariances and whitening matrices many times. A net's own quantities (see
        `_own_net`) of stats that share a parent's within-net sums (`share_nets`) are the parent's."""
        net = _own_net(key)
        if net is not None and net in self._parents:
            parent, index = self._parents[net]
            return parent.memo(_renamed(key, index), compute)
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def share_nets(self, parents: dict[int, tuple[MomentStats, int]]) -> MomentStats:
        """Declare that net i's own sums equal those of net j of `parent` ({i: (parent, j)}): its
        own derived quantities (covariance, dead units, whitener, ...) are then computed once, on the
        parent. The null's statistics share the real statistics' within-net sums this way."""
        self._parents = dict(parents)
        return self

    # --- bookkeeping -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(round(float(self._n)))

    @property
    def k(self) -> int:
        return len(self.sizes)

    @property
    def blocks(self) -> list[Block]:
        return sorted(self.sxx)

    def has_block(self, i: int, j: int) -> bool:
        return (min(i, j), max(i, j)) in self.sxx

    def __add__(self, other: MomentStats) -> MomentStats:
        if self.sizes != other.sizes or set(self.sxx) != set(other.sxx):
            raise ValueError("cannot merge MomentStats of different nets or blocks")

        def add(a: dict, b: dict) -> dict:
            return {key: a[key] + b[key] for key in a if key in b}

        return MomentStats(
            self.sizes,
            self._n + other._n,
            [a + b for a, b in zip(self.sums, other.sums)],
            add(self.sxx, other.sxx),
            add(self.qq, other.qq),
            add(self.qx, other.qx),
        )

    def to(self, device: torch.device | str) -> MomentStats:
        def move(d: dict) -> dict:
            return {key: v.to(device) for key, v in d.items()}

        return MomentStats(
            self.sizes,
            self._n.to(device),
            [s.to(device) for s in self.sums],
            move(self.sxx),
            move(self.qq),
            move(self.qx),
        )

    def _check(self, i: int, j: int | None = None) -> None:
        for x in (i, j) if j is not None else (i,):
            if not 0 <= x < self.k:
                raise IndexError(f"net index {x} out of range 0..{self.k - 1}")
        if j is not None and not self.has_block(i, j):
            raise KeyError(f"no joint moments kept for nets ({i}, {j}); add the pair to `pairs` (kept: {self.blocks})")
        if self._n <= 0:
            raise ValueError("no samples accumulated: run update() before asking for statistics")

    # --- statistics --------------------------------------------------------------------------
    def mean(self, i: int) -> Tensor:
        self._check(i)
        return self.sums[i] / self._n

    def second_moment(self, i: int, j: int) -> Tensor:
        """Raw E[x_i x_j^T] (float64)."""
        self._check(i, j)
        if i <= j:
            return self.sxx[(i, j)] / self._n
        return self.sxx[(j, i)].T / self._n

    def cov(self, i: int, j: int) -> Tensor:
        """Population covariance (divides by n), float64, [C_i, C_j]."""

        def compute() -> Tensor:
            c = self.second_moment(i, j) - torch.outer(self.mean(i), self.mean(j))
            if i == j:
                c = (c + c.T) / 2  # exact symmetry despite rounding
            return c

        return self.memo(("cov", i, j), compute)

    def var(self, i: int) -> Tensor:
        return torch.diagonal(self.cov(i, i)).clamp_min(0.0)

    def std(self, i: int) -> Tensor:
        return self.var(i).sqrt()

    def dead(self, i: int) -> Tensor:
        """Units with (numerically) zero variance: never-firing or constant units."""
        return self.memo(("dead", i), lambda: self.var(i) <= DEAD_RELATIVE_VARIANCE * self.mean(i).square())

    def corr(self, i: int, j: int) -> Tensor:
        """Pearson correlation [C_i, C_j]; rows and columns of dead units are 0, never NaN."""
        return self.memo(("corr", i, j), lambda: self._corr(i, j))

    def _corr(self, i: int, j: int) -> Tensor:
        cov = self.cov(i, j)
        si, sj = self.std(i), self.std(j)
        live_i, live_j = ~self.dead(i), ~self.dead(j)
        si = torch.where(live_i, si, torch.ones_like(si))
        sj = torch.where(live_j, sj, torch.ones_like(sj))
        r = cov / torch.outer(si, sj)
        r = r * torch.outer(live_i, live_j).to(r.dtype)
        if i == j:
            r.fill_diagonal_(1.0)
            r = r * torch.outer(live_i, live_i).to(r.dtype)
        return r.clamp(-1.0, 1.0)


# Memo keys of quantities of one net alone: (name, net, ...) or (name, net, net, ...) for these names.
_OWN_SINGLE = frozenset({"dead", "whitener", "scaled_live_eigh", "debiased_hsic"})
_OWN_PAIR = frozenset({"cov", "corr", "live_cov"})


def _own_net(key) -> int | None:
    """The net a memo key belongs to alone, or None (a between-net quantity)."""
    if not isinstance(key, tuple) or len(key) < 2:
        return None
    if key[0] in _OWN_SINGLE:
        return key[1]
    if key[0] in _OWN_PAIR and len(key) >= 3 and key[1] == key[2]:
        return key[1]
    return None


def _renamed(key: tuple, net: int) -> tuple:
    if key[0] in _OWN_SINGLE:
        return (key[0], net, *key[2:])
    return (key[0], net, net, *key[3:])


class GroupedMomentStats(SummedStates):
    """Moment sums of G disjoint groups of images (`Moments(..., groups=G)`), and the statistics of
    any union of them, each a :class:`MomentStats`: ``total`` (every image), ``subset(groups)``,
    ``leave_out(g)`` (every group but g, for jackknife intervals), and ``fit`` / ``held`` (the even /
    odd groups: with G even and image i in group i % G, the even / odd probe images).

    States as in MomentStats with a leading group dimension: ``n`` [G], ``sums[i]`` [G, C_i],
    ``sxx[(i, j)]`` [G, C_i, C_j], ``qq`` [G], ``qx`` [G, C]. The derived MomentStats are built once
    each (analyses memoise on them)."""

    @property
    def n(self) -> Tensor:
        """Samples per group [G]."""
        return self._n

    @property
    def groups(self) -> int:
        return int(self.n.shape[0])

    def _reduce(self, key, pick) -> MomentStats:
        if key not in self._memo:

            def red(t: Tensor) -> Tensor:
                return pick(t)

            self._memo[key] = MomentStats(
                self.sizes,
                red(self.n),
                [red(s) for s in self.sums],
                {b: red(v) for b, v in self.sxx.items()},
                {b: red(v) for b, v in self.qq.items()},
                {b: red(v) for b, v in self.qx.items()},
            )
        return self._memo[key]

    @property
    def total(self) -> MomentStats:
        return self._reduce("total", lambda t: t.sum(0))

    def subset(self, groups: Sequence[int]) -> MomentStats:
        chosen = sorted({int(g) for g in groups})
        if not chosen or chosen[0] < 0 or chosen[-1] >= self.groups:
            raise ValueError(f"groups {list(groups)} are not a non-empty subset of 0..{self.groups - 1}")
        if len(chosen) == self.groups:
            return self.total
        index = torch.tensor(chosen, dtype=torch.long, device=self.n.device)
        return self._reduce(("subset", tuple(chosen)), lambda t: t.index_select(0, index).sum(0))

    def leave_out(self, g: int) -> MomentStats:
        """Every group but g: the total minus group g (float64; the groups are exact sums)."""
        if not 0 <= g < self.groups:
            raise IndexError(f"group {g} out of range 0..{self.groups - 1}")
        return self._reduce(("leave_out", g), lambda t: t.sum(0) - t[g])

    @property
    def fit(self) -> MomentStats:
        """The even groups (even probe images when image i is in group i % G and G is even)."""
        return self.subset(range(0, self.groups, 2))

    @property
    def held(self) -> MomentStats:
        """The odd groups (odd probe images); needs G >= 2."""
        if self.groups < 2:
            raise ValueError("a held-out split needs at least 2 groups")
        return self.subset(range(1, self.groups, 2))


@contextlib.contextmanager
def _full_precision_matmul():
    """float32 products must not silently run as TF32 (10-bit mantissa) on NVIDIA GPUs."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


class _WorkRows:
    """The fold's work buffer: rows of values over the B * P samples of a chunk. Laid out per
    image [B, rows, P] when images have many positions (a batched product per image is fastest),
    else row-major [rows, B, P] (products over runs of samples). Images are written group by
    group, so every group of images is a contiguous range of the buffer."""

    def __init__(self, n_rows: int, b: int, p: int, dtype: torch.dtype, device) -> None:
        self.per_image = p >= BMM_MIN_SAMPLES and b > 1
        self.p = p
        self.buf = scratch("moments.x", (b, n_rows, p) if self.per_image else (n_rows, b, p), dtype, device)

    def rows(self, sl) -> Tensor:
        """Rows `sl` as [B, n, P] (per image) or [n, B, P]; an int gives [B, P]."""
        return self.buf[:, sl] if self.per_image else self.buf[sl]

    def fill(self, sl: slice, a: Tensor, shift: Tensor, segments: list[Segment]) -> None:
        """Rows `sl` = a - shift, for a [B, C, P] and shift [C], images in segment order: copy,
        reorder and shift in one pass."""
        for seg in segments:
            src = a[seg.images]
            if self.per_image:
                torch.sub(src, shift[:, None], out=self.buf[seg.lo : seg.hi, sl])
            else:
                torch.sub(src.transpose(0, 1), shift[:, None, None], out=self.buf[sl, seg.lo : seg.hi])

    def fill_row(self, row: int, values: Tensor, segments: list[Segment]) -> None:
        """Row `row` = one value per sample, `values` [B, P] with images in the chunk's order."""
        target = self.rows(row)  # [B, P] in segment order
        for seg in segments:
            target[seg.lo : seg.hi] = values[seg.images]

    def products(self, r: slice, c: slice, segments: list[Segment], name: str) -> Tensor:
        """Per segment, the float64 sum over its samples of rows(r) rows(c)^T: [S, n_r, n_c], in the
        scratch buffer `name` (valid until the next call with that name). The products and their
        sums go to reused buffers: fresh ones of several MB per call cost page faults that took as
        long as the arithmetic (fc layers with 10 groups: 8-300 ms per batch instead of 8)."""
        f64 = torch.float64
        rows = self.buf.shape[1 if self.per_image else 0]
        n_r, n_c = len(range(*r.indices(rows))), len(range(*c.indices(rows)))
        out = scratch(f"{name}.sums", (len(segments), n_r, n_c), f64, self.buf.device)
        if self.per_image:
            b = self.buf.shape[0]
            prod = torch.bmm(
                self.buf[:, r],
                self.buf[:, c].transpose(1, 2),
                out=scratch(f"{name}.bmm", (b, n_r, n_c), self.buf.dtype, self.buf.device),
            )
            for i, s in enumerate(segments):
                torch.sum(prod[s.lo : s.hi], 0, dtype=f64, out=out[i])
            return out
        flat = self.buf.flatten(1)
        rows_r, rows_c = flat[r], flat[c]
        run = _run_length(n_r + n_c)
        piece = scratch(f"{name}.piece", (n_r, n_c), self.buf.dtype, self.buf.device)
        out.zero_()
        for i, s in enumerate(segments):
            lo, hi = s.lo * self.p, s.hi * self.p
            for start in range(lo, hi, run):
                stop = min(hi, start + run)
                out[i] += torch.mm(rows_r[:, start:stop], rows_c[:, start:stop].T, out=piece)
        return out


class Segment:
    """Images of one group inside a chunk: `images` selects them from the chunk (a slice or an
    index tensor); they occupy [lo, hi) of the work buffer."""

    __slots__ = ("group", "images", "lo", "hi")

    def __init__(self, group: int, images, lo: int, hi: int) -> None:
        self.group, self.images, self.lo, self.hi = group, images, lo, hi


def group_segments(b: int, groups: int, group: Tensor | int | None) -> list[Segment]:
    """How the B images of a chunk split into groups. `group`: each image's group (a tensor), or
    an int o meaning image i is probe image o + i, in group (o + i) % groups (the probe loader's
    consecutive images: strided views, no copy); None when there is one group."""
    if groups == 1 or group is None:
        if groups != 1:
            raise ValueError(f"update() of a Moments with {groups} groups needs each image's group (`group=`)")
        return [Segment(0, slice(None), 0, b)]
    segments, lo = [], 0
    if isinstance(group, int):
        for g in range(groups):
            first = (g - group) % groups
            if first < b:
                count = (b - 1 - first) // groups + 1
                segments.append(Segment(g, slice(first, None, groups), lo, lo + count))
                lo += count
        return segments
    group = group.reshape(-1)
    if group.numel() != b:
        raise ValueError(f"`group` must give one group per image ({b}), got {group.numel()}")
    if bool(((group < 0) | (group >= groups)).any()):
        raise ValueError(f"`group` values must be in 0..{groups - 1}")
    for g in torch.unique(group).tolist():
        idx = torch.nonzero(group == g).flatten()
        segments.append(Segment(int(g), idx, lo, lo + idx.numel()))
        lo += idx.numel()
    return segments


def _run_length(rows: int) -> int:
    """Samples per float32 product in the row-major layout: float32 accumulation error grows with
    the terms a product sums (~1e-6 relative at 300), so products run over short stretches summed
    in float64; wider layers take longer runs, since each run's [D, D] output costs as much as
    D samples of input."""
    return int(min(PRODUCT_SAMPLES, max(MIN_RUN, 2 * rows)))


def chunk_shift(a: Tensor, dtype: torch.dtype) -> Tensor:
    """Per-unit shift of a chunk [B, C, P] before its float32 products: the mean of its first
    images, an estimate of the chunk's mean cheap enough to compute for every chunk."""
    return a[:SHIFT_IMAGES].mean((0, 2), dtype=dtype)


class Moments(SumStates):
    """Streaming joint moments of the units of ``len(sizes)`` networks.

    ``update(*acts)`` takes one tensor per network, for the same inputs in the same order:
    ``[N, C]`` (every image a sample) or ``[N, C, H, W]`` (every position of every image a sample).
    ``compute()`` returns a :class:`MomentStats` over everything accumulated.

    Options:
      pairs: between-net blocks to keep (default all); within-net blocks are always kept.
      product_dtype: dtype of the per-chunk shifted products (float64 default; float32 is faster,
        still summed in float64).
      cka_sums: also keep the per-sample-norm sums that the debiased CKA needs.
      groups: keep separate sums for G disjoint groups of images (``update(..., group=...)`` says
        which image is in which group); ``compute_groups()`` returns them as
        :class:`GroupedMomentStats` (leave-one-group-out statistics for jackknife intervals, a
        fit/held-out split of even/odd groups). Every group's sums cost one more copy of the states.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        pairs: Iterable[Sequence[int]] | None = None,
        product_dtype: torch.dtype = torch.float64,
        cka_sums: bool = True,
        groups: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.sizes = tuple(int(s) for s in sizes)
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"sizes must be positive unit counts, got {sizes}")
        if int(groups) < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self.groups = int(groups)
        self.block_list = resolve_blocks(len(self.sizes), pairs)
        self.product_dtype = product_dtype
        self.cka_sums = cka_sums
        g = self.groups
        self.add_sum_state("n", (g,))
        for i, c in enumerate(self.sizes):
            self.add_sum_state(f"sum_{i}", (g, c))
        for i, j in self.block_list:
            self.add_sum_state(_block_name("sxx", i, j), (g, self.sizes[i], self.sizes[j]))
            if cka_sums:
                self.add_sum_state(_block_name("qq", i, j), (g,))
                for a, b in {(i, j), (j, i)}:
                    self.add_sum_state(_block_name("qx", a, b), (g, self.sizes[b]))

    def update(self, *acts: Tensor, group: Tensor | int | None = None) -> None:
        """Fold a batch in. ``group`` (with ``groups`` > 1): each image's group, as a tensor, or
        an int o for consecutive probe images o, o + 1, ... (image i in group (o + i) % groups)."""
        if len(acts) != len(self.sizes):
            raise ValueError(f"update() needs one tensor per net ({len(self.sizes)}), got {len(acts)}")
        first = acts[0]
        for i, a in enumerate(acts):
            if a.dim() < 2 or a.shape[1] != self.sizes[i] or a.shape[0] != first.shape[0] or a.shape[2:] != first.shape[2:]:
                raise ValueError(
                    f"net {i}: expected [N, {self.sizes[i]}, ...] like net 0's {tuple(first.shape)}, got "
                    f"{tuple(a.shape)}; all nets must see the same inputs"
                )
        if first.shape[0] == 0:
            return
        # [N, C] is N images of one position; [N, C, *spatial] one block of positions per image.
        # Folded in chunks of whole images that bound the work buffer.
        flat = [a.detach().reshape(a.shape[0], a.shape[1], -1) for a in acts]
        per_image = flat[0].shape[2] * (sum(self.sizes) + self._extra_rows)
        step = max(1, CHUNK_ELEMENTS // per_image)
        for lo in range(0, first.shape[0], step):
            part = group if group is None else (group + lo if isinstance(group, int) else group[lo : lo + step])
            chunk = [a[lo : lo + step] for a in flat]
            with _full_precision_matmul():
                self._fold(chunk, group_segments(chunk[0].shape[0], self.groups, part))

    def _fold(self, acts: list[Tensor], segments: list[Segment]) -> None:
        """`acts[i]`: [B, C_i, P] (B images of P positions). One work buffer holds every net's
        units one after another (D rows), shifted by the mean of the chunk's first images, then a
        row of ones and, with the CKA sums, each net's per-sample squared norm (E extra rows).
        Products of its rows give, per group of images, the shifted products, the sums and the
        CKA sums; the shift is added back exactly in float64."""
        f64 = torch.float64
        work = f64 if self.product_dtype == f64 else self.product_dtype
        edges, d, k = self._edges, sum(self.sizes), len(self.sizes)
        b, p = acts[0].shape[0], acts[0].shape[2]
        x = _WorkRows(d + self._extra_rows, b, p, work, acts[0].device)
        shift = torch.cat([chunk_shift(a, work) for a in acts])
        for (lo, hi), a in zip(edges, acts):
            x.fill(slice(lo, hi), a, shift[lo:hi], segments)
        x.rows(d).fill_(1.0)
        if self.cka_sums:
            sq = scratch("moments.sq", (b, max(self.sizes), p), work, x.buf.device)
            for i, a in enumerate(acts):  # |x_i|^2 of every sample, from the raw activations
                part = sq[:, : a.shape[1]]  # squared in the work dtype (a float32 square loses digits)
                squares = torch.mul(a, a, out=part) if a.dtype == work else part.copy_(a).square_()
                x.fill_row(d + 1 + i, torch.sum(squares, 1), segments)
        # The extra rows against every row apart: a product of D + E rows is much slower than of
        # D rows when D fits the kernel's tiles and D + E does not.
        extra = x.products(slice(d, None), slice(None), segments, "moments.extra")  # [S, E, D + E]
        shift = shift.to(f64)
        n = torch.tensor([float((s.hi - s.lo) * p) for s in segments], dtype=f64, device=extra.device)  # [S]
        shifted_sums = extra[:, 0, :d]  # [S, D]: sum of (x - shift), not exactly 0 in float32
        sums = shifted_sums + n[:, None] * shift
        # sum x_i x_j^T = sum (x_i - s_i)(x_j - s_j)^T + s_i S_j^T + S_i s_j^T + n s_i s_j^T
        # (the last three terms as one product [s, S + n s / 2] [S + n s / 2, s]^T per group)
        half = shifted_sums + n[:, None] / 2 * shift
        left = torch.stack([shift.expand_as(half), half], 2)  # [S, D, 2]
        right = torch.stack([half, shift.expand_as(half)], 1)  # [S, 2, D]
        if len(self.block_list) == k * (k + 1) // 2:  # every pair: one product of all units
            raw = x.products(slice(0, d), slice(0, d), segments, "moments.raw").baddbmm_(left, right)
            blocks = [raw[:, slice(*edges[i]), slice(*edges[j])] for i, j in self.block_list]
        else:
            blocks = []
            for i, j in self.block_list:
                si, sj = slice(*edges[i]), slice(*edges[j])
                # each block's product is taken (and cloned) before the next reuses the buffer
                blocks.append(x.products(si, sj, segments, "moments.raw").baddbmm_(left[:, si], right[:, :, sj]).clone())
        gids = torch.tensor([s.group for s in segments], dtype=torch.long, device=extra.device)

        def add(name: str, value: Tensor) -> None:
            getattr(self, name).index_add_(0, gids, value)

        add("n", n)
        for i, (lo, hi) in enumerate(edges):
            add(f"sum_{i}", sums[:, lo:hi])
        for (i, j), block in zip(self.block_list, blocks):
            add(_block_name("sxx", i, j), block)
        if self.cka_sums:
            q = extra[:, 1:]  # [S, K, D + E]: sums of |x_a|^2 times each row
            qq = q[:, :, d + 1 :]  # [S, K, K]
            # sum |x_a|^2 x = sum |x_a|^2 (x - s) + (sum |x_a|^2) s
            qx = q[:, :, :d] + q[:, :, d, None] * shift
            for i, j in self.block_list:
                add(_block_name("qq", i, j), qq[:, i, j])
                for u, v in {(i, j), (j, i)}:
                    add(_block_name("qx", u, v), qx[:, u, slice(*edges[v])])

    @property
    def _extra_rows(self) -> int:
        return 1 + (len(self.sizes) if self.cka_sums else 0)

    @property
    def _edges(self) -> list[tuple[int, int]]:
        edges, lo = [], 0
        for c in self.sizes:
            edges.append((lo, lo + c))
            lo += c
        return edges

    def compute_groups(self) -> GroupedMomentStats:
        """The sums of every group of images (`groups` of them), summed across processes (every
        process must call it, like `compute`)."""
        with self.sync_context():
            return self._grouped()

    def _grouped(self) -> GroupedMomentStats:
        qq = qx = None
        if self.cka_sums:
            qq = {(i, j): getattr(self, _block_name("qq", i, j)).clone() for i, j in self.block_list}
            qx = {}
            for i, j in self.block_list:
                for a, b in {(i, j), (j, i)}:
                    qx[(a, b)] = getattr(self, _block_name("qx", a, b)).clone()
        return GroupedMomentStats(
            self.sizes,
            self.n.clone(),  # type: ignore[operator]  # (a state; mypy takes `n` for a method)
            [getattr(self, f"sum_{i}").clone() for i in range(len(self.sizes))],
            {(i, j): getattr(self, _block_name("sxx", i, j)).clone() for i, j in self.block_list},
            qq,
            qx,
        )

    def compute(self) -> MomentStats:
        return self._grouped().total  # (torchmetrics syncs the states around compute)


def estimate_state_bytes(
    sizes: Sequence[int], pairs: Iterable[Sequence[int]] | None = None, cka_sums: bool = True, groups: int = 1
) -> int:
    """Bytes one `Moments(sizes, pairs, groups=groups)` will hold, without allocating it."""
    blocks = resolve_blocks(len(sizes), pairs)
    total = 8 * (1 + sum(sizes))
    for i, j in blocks:
        total += 8 * sizes[i] * sizes[j]
        if cka_sums:
            total += 8 * (1 + sizes[i] + (sizes[j] if i != j else 0))
    return groups * total
