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
from torchmetrics import Metric

from convergent.stats.scratch import scratch

Block = tuple[int, int]

# A unit whose variance is below this fraction of its squared mean (or exactly zero) is dead:
# ReLU units that never fire, or constant ones. Their correlations are defined as 0.
DEAD_RELATIVE_VARIANCE = 1e-12
# Values per temporary buffer in update(): batches are folded in chunks of whole images.
CHUNK_ELEMENTS = 1 << 24
# Below this many positions per image, products run over all samples at once instead of per image.
BMM_MIN_SAMPLES = 256
# Samples per float32 product over all samples: its rounding grows with the terms it sums, so
# longer runs are split and the pieces summed in float64.
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


class MomentStats:
    """Summed moment states of K networks' units, and every statistic derived from them.

    ``n`` samples; ``sums[i]`` = sum of x_i; ``sxx[(i, j)]`` = sum of x_i x_j^T (i <= j, raw);
    optional per-sample squared-norm sums used by the debiased CKA:
    ``qq[(i, j)]`` = sum of |x_i|^2 |x_j|^2 and ``qx[(i, j)]`` = sum of |x_i|^2 x_j.
    """

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

    def memo(self, key, compute):
        """Cache a derived quantity (the sums never change after construction): analyses ask for
        the same covariances and whitening matrices many times."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

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
            raise KeyError(
                f"no joint moments kept for nets ({i}, {j}); add the pair to `pairs` "
                f"(kept: {self.blocks})"
            )
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
    else row-major [rows, B, P] (one product over all samples)."""

    def __init__(self, n_rows: int, b: int, p: int, dtype: torch.dtype, device) -> None:
        self.per_image = p >= BMM_MIN_SAMPLES and b > 1
        self.buf = scratch("moments.x", (b, n_rows, p) if self.per_image else (n_rows, b, p), dtype, device)

    def rows(self, sl) -> Tensor:
        """Rows `sl` as [B, n, P] (per image) or [n, B, P]; an int gives [B, P]."""
        return self.buf[:, sl] if self.per_image else self.buf[sl]

    def fill(self, sl: slice, a: Tensor, shift: Tensor) -> None:
        """Rows `sl` = a - shift, for a [B, C, P] and shift [C]: copy and shift in one pass."""
        if self.per_image:
            torch.sub(a, shift[:, None], out=self.buf[:, sl])
        else:
            torch.sub(a.transpose(0, 1), shift[:, None, None], out=self.buf[sl])

    def product(self, r: slice, c: slice) -> Tensor:
        """sum over samples of rows(r) rows(c)^T, float64."""
        f64 = torch.float64
        if self.per_image:
            return torch.bmm(self.buf[:, r], self.buf[:, c].transpose(1, 2)).sum(0).to(f64)
        flat = self.buf.flatten(1)
        runs = [flat[:, lo : lo + PRODUCT_SAMPLES] for lo in range(0, flat.shape[1], PRODUCT_SAMPLES)]
        total = (runs[0][r] @ runs[0][c].T).to(f64)
        for run in runs[1:]:
            total += run[r] @ run[c].T
        return total


class SumStates(Metric):
    """A Metric whose states are sums of fixed shape.

    torchmetrics keeps a deep copy of every state as its reset value; for moment matrices that
    doubles the memory. Here the reset values are 0-dim zeros and `reset()` zeroes in place."""

    def add_sum_state(self, name: str, shape, dtype: torch.dtype = torch.float64, reduce: str = "sum") -> None:
        self.add_state(name, torch.zeros((), dtype=dtype), dist_reduce_fx=reduce)
        setattr(self, name, torch.zeros(shape, dtype=dtype, device=self.device))

    def reset(self) -> None:
        self._update_count = 0
        self._forward_cache = None
        self._computed = None
        self._cache = None
        self._is_synced = False
        for name in self._defaults:
            getattr(self, name).zero_()


class Moments(SumStates):
    """Streaming joint moments of the units of ``len(sizes)`` networks.

    ``update(*acts)`` takes one tensor per network, for the same inputs in the same order:
    ``[N, C]`` (every image a sample) or ``[N, C, H, W]`` (every position of every image a sample).
    ``compute()`` returns a :class:`MomentStats`.

    Options:
      pairs: between-net blocks to keep (default all); within-net blocks are always kept.
      product_dtype: dtype of the per-batch centred products (float64 default; float32 is faster,
        still summed in float64).
      cka_sums: also keep the per-sample-norm sums that the debiased CKA needs.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(
        self,
        sizes: Sequence[int],
        pairs: Iterable[Sequence[int]] | None = None,
        product_dtype: torch.dtype = torch.float64,
        cka_sums: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.sizes = tuple(int(s) for s in sizes)
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"sizes must be positive unit counts, got {sizes}")
        self.block_list = resolve_blocks(len(self.sizes), pairs)
        self.product_dtype = product_dtype
        self.cka_sums = cka_sums
        self.add_sum_state("n", ())
        for i, c in enumerate(self.sizes):
            self.add_sum_state(f"sum_{i}", (c,))
        for i, j in self.block_list:
            self.add_sum_state(_block_name("sxx", i, j), (self.sizes[i], self.sizes[j]))
            if cka_sums:
                self.add_sum_state(_block_name("qq", i, j), ())
                for a, b in {(i, j), (j, i)}:
                    self.add_sum_state(_block_name("qx", a, b), (self.sizes[b],))

    def update(self, *acts: Tensor) -> None:
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
        if first.dim() == 2:  # [N, C]: one block of N samples
            self._update_blocks([a.detach().T.unsqueeze(0) for a in acts])
            return
        # [N, C, *spatial]: one block of positions per image, in chunks that bound the buffer.
        per_image = first[0, 0].numel() * (sum(self.sizes) + self._extra_rows)
        step = max(1, CHUNK_ELEMENTS // per_image)
        for lo in range(0, first.shape[0], step):
            self._update_blocks([a.detach()[lo : lo + step].flatten(2) for a in acts])

    def _update_blocks(self, acts: list[Tensor]) -> None:
        with _full_precision_matmul():
            self._fold(acts)

    def _fold(self, acts: list[Tensor]) -> None:
        """`acts[i]`: [B, C_i, P] (B images of P positions). One work buffer holds every net's
        units one after another (D rows), shifted by the mean of the chunk's first images, then a
        row of ones and, with the CKA sums, each net's per-sample squared norm (E extra rows).
        Products of its rows give the shifted products, the sums and the CKA sums; the shift is
        added back exactly in float64."""
        f64 = torch.float64
        work = f64 if self.product_dtype == f64 else self.product_dtype
        edges, d, k = self._edges, sum(self.sizes), len(self.sizes)
        b, p = acts[0].shape[0], acts[0].shape[2]
        rows = b * p
        x = _WorkRows(d + self._extra_rows, b, p, work, acts[0].device)
        shift = torch.cat([a[:SHIFT_IMAGES].mean((0, 2), dtype=work) for a in acts])
        for (lo, hi), a in zip(edges, acts):
            x.fill(slice(lo, hi), a, shift[lo:hi])
        x.rows(d).fill_(1.0)
        if self.cka_sums:
            sq = scratch("moments.sq", (b, max(self.sizes), p), work, x.buf.device)
            for i, a in enumerate(acts):  # |x_i|^2 of every sample, from the raw activations
                part = sq[:, : a.shape[1]]  # squared in the work dtype (a float32 square loses digits)
                squares = torch.mul(a, a, out=part) if a.dtype == work else part.copy_(a).square_()
                torch.sum(squares, 1, out=x.rows(d + 1 + i))
        # The extra rows against every row apart: a product of D + E rows is much slower than of
        # D rows when D fits the kernel's tiles and D + E does not.
        extra = x.product(slice(d, None), slice(None))  # [E, D + E]
        shift = shift.to(f64)
        shifted_sums = extra[0, :d]  # sum of (x - shift): not exactly 0 in float32
        sums = shifted_sums + rows * shift
        # sum x_i x_j^T = sum (x_i - s_i)(x_j - s_j)^T + s_i S_j^T + S_i s_j^T + n s_i s_j^T
        # (the last three terms as one product [s, S + n s / 2] [S + n s / 2, s]^T)
        half = shifted_sums + rows / 2 * shift
        left, right = torch.stack([shift, half], 1), torch.stack([half, shift], 0)
        if len(self.block_list) == k * (k + 1) // 2:  # every pair: one product of all units
            raw = x.product(slice(0, d), slice(0, d)).addmm_(left, right)
            blocks = [raw[slice(*edges[i]), slice(*edges[j])] for i, j in self.block_list]
        else:
            blocks = []
            for i, j in self.block_list:
                si, sj = slice(*edges[i]), slice(*edges[j])
                blocks.append(x.product(si, sj).addmm_(left[si], right[:, sj]))
        states, values = [], []  # added with one call: per-state calls cost more than small layers' products

        def add(name: str, value: Tensor) -> None:
            states.append(getattr(self, name))
            values.append(value)

        self.n += rows
        for i, (lo, hi) in enumerate(edges):
            add(f"sum_{i}", sums[lo:hi])
        for (i, j), block in zip(self.block_list, blocks):
            add(_block_name("sxx", i, j), block)
        if self.cka_sums:
            q = extra[1:]  # [K, D + E]: sums of |x_a|^2 times each row
            qq = q[:, d + 1 :]
            qx = q[:, :d] + torch.outer(q[:, d], shift)  # sum |x_a|^2 x = sum |x_a|^2 (x - s) + (sum |x_a|^2) s
            for i, j in self.block_list:
                add(_block_name("qq", i, j), qq[i, j])
                for a, c in {(i, j), (j, i)}:
                    add(_block_name("qx", a, c), qx[a, slice(*edges[c])])
        torch._foreach_add_(states, values)

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

    def compute(self) -> MomentStats:
        qq = qx = None
        if self.cka_sums:
            qq = {(i, j): getattr(self, _block_name("qq", i, j)) for i, j in self.block_list}
            qx = {}
            for i, j in self.block_list:
                for a, b in {(i, j), (j, i)}:
                    qx[(a, b)] = getattr(self, _block_name("qx", a, b))
        return MomentStats(
            self.sizes,
            self.n.clone(),
            [getattr(self, f"sum_{i}").clone() for i in range(len(self.sizes))],
            {(i, j): getattr(self, _block_name("sxx", i, j)).clone() for i, j in self.block_list},
            qq,
            qx,
        )

    def state_bytes(self) -> int:
        """Bytes held by this accumulator's states."""
        return sum(t.numel() * t.element_size() for t in self.metric_state.values() if isinstance(t, Tensor))


def estimate_state_bytes(sizes: Sequence[int], pairs: Iterable[Sequence[int]] | None = None, cka_sums: bool = True) -> int:
    """Bytes one `Moments(sizes, pairs)` will hold, without allocating it."""
    blocks = resolve_blocks(len(sizes), pairs)
    total = 8 * (1 + sum(sizes))
    for i, j in blocks:
        total += 8 * sizes[i] * sizes[j]
        if cka_sums:
            total += 8 * (1 + sizes[i] + (sizes[j] if i != j else 0))
    return total
