"""The k top-activating image patches of every unit (the paper's visualisations), streaming.

`TopActivations` keeps, for every unit of every net, the k largest activations seen in the probe
pass with where they occurred (global image index, y, x): memory O(units * k), whatever the
probe set's size. Order is total and deterministic: by value, descending, then by image index,
y and x, ascending. So the result does not depend on batching, on the order of the batches, or
on how the probe set is split across processes.

DDP: each net's state is one float64 tensor ``[k, C, 4]`` of candidates (value, image, y, x)
reduced with a custom function that re-selects the top k of the gathered candidates, exact
because each process's top k contains its share of the global top k. The same image seen twice
(a `DistributedSampler` pads ranks with repeated images) is counted once.

`crop_patch` cuts a unit's receptive field out of an input image, padded to the full field size
where it is clipped at the border, so all patches of a layer line up in a grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor
from torch.nn import functional as F

from convergent.models.receptive_field import ReceptiveField
from convergent.stats.metric import StreamingMetric
from convergent.stats.scratch import scratch

# Candidates = (value, image, y, x); a key orders (image, y, x) lexicographically.
_SHIFT = 16  # y and x below 2**16, images below 2**31
_NO_KEY = torch.iinfo(torch.int64).max  # empty slots (value -inf, index -1) sort last
_CHUNK_ELEMENTS = 1 << 22


def _keys(cand: Tensor) -> Tensor:
    """int64 order keys of candidates ``[..., 4]`` (empty slots: the largest key)."""
    idx = cand[..., 1:].to(torch.int64)
    key = (idx[..., 0] << (2 * _SHIFT)) | (idx[..., 1] << _SHIFT) | idx[..., 2]
    return torch.where(idx[..., 0] < 0, torch.full_like(key, _NO_KEY), key)


def _empty(k: int, c: int, device=None) -> Tensor:
    out = torch.full((k, c, 4), -1.0, dtype=torch.float64, device=device)
    out[..., 0] = float("-inf")
    return out


def _sort(cand: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """Sort candidates ``[M, C, 4]`` along M by (value desc, key asc); stable, so exact."""
    order = torch.sort(key, dim=0, stable=True).indices
    cand = cand.gather(0, order[..., None].expand_as(cand))
    key = key.gather(0, order)
    order = torch.sort(cand[..., 0], dim=0, descending=True, stable=True).indices
    return cand.gather(0, order[..., None].expand_as(cand)), key.gather(0, order)


def select_top(cand: Tensor, k: int) -> Tensor:
    """The k best of candidates ``[M, C, 4]`` (or ``[R, M, C, 4]``, flattened) per unit, in order.

    Repeated (image, y, x) of a unit keep their largest value once. Pads with empty slots
    (value -inf, index -1) when there are fewer than k.
    """
    cand = cand.reshape(-1, *cand.shape[-2:])
    key = _keys(cand)
    # Drop repeats: group by key (largest value first), blank all but the first of each group.
    order = torch.sort(cand[..., 0], dim=0, descending=True, stable=True).indices
    cand = cand.gather(0, order[..., None].expand_as(cand))
    key = key.gather(0, order)
    order = torch.sort(key, dim=0, stable=True).indices
    cand = cand.gather(0, order[..., None].expand_as(cand))
    key = key.gather(0, order)
    repeat = torch.zeros_like(key, dtype=torch.bool)
    repeat[1:] = (key[1:] == key[:-1]) & (key[1:] != _NO_KEY)
    blank = _empty(1, cand.shape[1], cand.device).expand_as(cand)
    cand = torch.where(repeat[..., None], blank, cand)
    key = torch.where(repeat, torch.full_like(key, _NO_KEY), key)
    cand, key = _sort(cand, key)
    if cand.shape[0] < k:
        cand = torch.cat([cand, _empty(k - cand.shape[0], cand.shape[1], cand.device)])
    return cand[:k].contiguous()


def _batch_top(values: Tensor, keys: Callable[[Tensor], Tensor], k: int, floor: Tensor) -> Tensor:
    """Rows of the top k per unit of ``values [C, M]`` in (value desc, key asc) order, exactly:
    every value above the k-th largest, then the tied ones with the smallest keys. ``keys(rows)``
    gives the int64 keys of row indices; ``floor [C]`` (float64) is the k-th best value already
    kept per unit: values below it cannot enter. Returns row indices ``[C, min(k, M)]``.

    ``topk`` alone is exact unless a unit has more values equal to its k-th largest than slots
    left for them (ReLU zeros of a sparse or dead unit) and those ties could still enter; only
    such units pay for ranking by key.
    """
    kk = min(k, values.shape[1])
    rows = torch.topk(values, kk, dim=1).indices  # sorted=True: the k-th largest is last
    kth = values.gather(1, rows[:, -1:])  # [C, 1]
    tied = ((values >= kth).sum(1) > kk) & ~(floor > kth[:, 0].to(floor.dtype))
    if bool(tied.any()):
        cols = tied.nonzero().squeeze(1)
        sub, sub_kth = values[cols], kth[cols]
        key = keys(torch.arange(values.shape[1], device=values.device))
        rank = torch.where(
            sub > sub_kth, torch.full_like(key, -1), torch.where(sub == sub_kth, key, torch.full_like(key, _NO_KEY))
        )
        rows[cols] = torch.topk(rank, kk, dim=1, largest=False).indices
    return rows


class TopActivations(StreamingMetric):
    """Top-k activations of every unit of ``len(sizes)`` nets, with their (image, y, x).

    ``TopActivations(sizes, k=9)``.
    ``update(*acts, image_index)``: one tensor per net, ``[N, C_i]`` (fc: position (0, 0)) or
    ``[N, C_i, H, W]``; ``image_index`` ``[N]`` integer tensor, the global probe index of each
    image of the batch (0 <= index < 2**31; H, W < 2**16). NaN counts as -inf.
    ``compute() -> list[tuple[Tensor, Tensor]]``: per net ``(values [C, k] float64,
    indices [C, k, 3] int64 (image, y, x))``, sorted by value descending, ties by image, y, x
    ascending. Slots never filled (fewer than k samples seen) have value -inf and index -1.
    An image index should appear at most once per batch (repeats across batches or processes are
    merged); activations are compared in float64 (exact for float32/16 inputs).
    """

    def __init__(self, sizes: Sequence[int], k: int = 9, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sizes = tuple(int(s) for s in sizes)
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"sizes must be positive unit counts, got {sizes}")
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        self.k = int(k)
        for i, c in enumerate(self.sizes):
            # Sync stacks every process's [k, C, 4] state into [world, k, C, 4] (and forward()'s
            # merge stacks two); select_top re-selects the k best of them: exact, fixed size.
            self.add_state(f"top_{i}", _empty(self.k, c), dist_reduce_fx=partial(select_top, k=self.k))

    def update(self, *acts: Tensor, image_index: Tensor) -> None:
        if len(acts) != len(self.sizes):
            raise ValueError(f"update() needs one tensor per net ({len(self.sizes)}), got {len(acts)}")
        n = acts[0].shape[0]
        image_index = torch.as_tensor(image_index).reshape(-1)
        if image_index.shape[0] != n:
            raise ValueError(f"image_index must have one entry per image ({n}), got {image_index.shape[0]}")
        for i, a in enumerate(acts):
            a = a.detach()
            if a.dim() not in (2, 4) or a.shape[0] != n or a.shape[1] != self.sizes[i]:
                raise ValueError(
                    f"net {i}: expected [{n}, {self.sizes[i]}] or [{n}, {self.sizes[i]}, H, W], got {tuple(a.shape)}"
                )
            if n == 0:
                continue
            h, w = (a.shape[2], a.shape[3]) if a.dim() == 4 else (1, 1)
            if h >= 1 << _SHIFT or w >= 1 << _SHIFT:
                raise ValueError(f"spatial size {h}x{w} too large (max {(1 << _SHIFT) - 1})")
            c, hw = self.sizes[i], h * w
            images = image_index.to(device=a.device, dtype=torch.int64)
            state = getattr(self, f"top_{i}").to(a.device)
            per_chunk = max(1, _CHUNK_ELEMENTS // (c * hw))
            for lo in range(0, n, per_chunk):
                hi = min(n, lo + per_chunk)
                # [C, rows] with rows in (image, y, x) order, compared in float32 (exact for
                # float16/bfloat16/float32; float64 stays float64).
                v = scratch("topk.values", (c, hi - lo, hw), torch.promote_types(a.dtype, torch.float32), a.device)
                v.copy_(a[lo:hi].reshape(hi - lo, c, hw).transpose(0, 1))
                v = v.view(c, (hi - lo) * hw).nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))

                def where(
                    rows: Tensor, lo: int = lo, hw: int = hw, images: Tensor = images, w: int = w
                ) -> Tensor:  # (image, y, x) of rows
                    pos = rows % hw
                    return torch.stack([images[lo + torch.div(rows, hw, rounding_mode="floor")], pos // w, pos % w], -1)

                def keys(rows: Tensor, where=where) -> Tensor:
                    at = where(rows)
                    return (at[..., 0] << (2 * _SHIFT)) | (at[..., 1] << _SHIFT) | at[..., 2]

                # The k-th best value kept so far (a lower bound of it while the state holds stacked states)
                floor = state[..., 0].reshape(-1, c).min(0).values
                rows = _batch_top(v, keys, self.k, floor)  # [C, kk]
                cand = torch.empty(rows.shape[1], c, 4, dtype=torch.float64, device=a.device)
                cand[..., 0] = v.gather(1, rows).T
                cand[..., 1:] = where(rows).transpose(0, 1).to(torch.float64)
                state = select_top(torch.cat([state, cand]), self.k)
            setattr(self, f"top_{i}", state)

    def compute(self) -> list[tuple[Tensor, Tensor]]:
        out = []
        for i in range(len(self.sizes)):
            top = select_top(getattr(self, f"top_{i}"), self.k)  # also merges forward()/sync stacks
            values = top[..., 0].T.contiguous()
            indices = top[..., 1:].to(torch.int64).transpose(0, 1).contiguous()
            out.append((values, indices))
        return out


def crop_patch(image: Tensor, field: ReceptiveField, y: int, x: int, fill: float = 0.0) -> Tensor:
    """The input patch ``[C, size, size]`` seen by the unit at (y, x) of a layer with `field`.

    ``image`` ``[C, H, W]``. Where the field extends beyond the image, the patch is padded with
    `fill`, so the unit's field centre is always the patch centre and patches line up.
    """
    if image.dim() != 3:
        raise ValueError(f"image must be [C, H, W], got shape {tuple(image.shape)}")
    _, height, width = image.shape
    half = (field.size - 1) // 2
    top = field.start + int(y) * field.jump - half
    left = field.start + int(x) * field.jump - half
    rows, _ = field.box(y, x, height)
    _, cols = field.box(y, x, width)
    patch = image[:, rows, cols]
    pad_top = rows.start - top
    pad_left = cols.start - left
    pad_bottom = field.size - pad_top - patch.shape[1]
    pad_right = field.size - pad_left - patch.shape[2]
    if patch.shape[1] == 0 or patch.shape[2] == 0:
        return torch.full((image.shape[0], field.size, field.size), fill, dtype=image.dtype, device=image.device)
    return F.pad(patch, (pad_left, pad_right, pad_top, pad_bottom), value=fill)
