"""One probe pass: the probe set through every member, folded into streaming statistics.

Runs on every process (each on its shard of the probe set); `compute()` of each statistic sums
the processes' states, so every rank ends with the same `ProbeStats`. Members run in eval mode
under no_grad; their previous mode is restored.

Per layer: two `Moments` (fit / held-out: even / odd probe images), optionally the same for the
permutation null (`CyclicShift`), `UnitBins` + `JointHistogram` for mutual information (a second
pass) and `TopActivations` for unit visualisations (both over the heavy pairs' members only).
Across layers: one `Moments` of image-level features (conv taps averaged over space) of every
(layer, member), for cross-layer measures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

from convergent.models import CONV_LAYERS
from convergent.stats import MomentStats, Moments, estimate_state_bytes
from convergent.stats.histogram import JointHistogram, UnitBins, estimate_joint_bytes
from convergent.stats.scratch import release_free_memory
from convergent.stats.shift import CyclicShift
from convergent.stats.topk import TopActivations

POOLED = "pooled"  # key of the image-level features in a member's taps


@dataclass
class ProbeOptions:
    layers: Sequence[str]
    pairs: list[tuple[int, int]] | None = None  # member pairs (None: all)
    null_pairs: list[tuple[int, int]] | None = None  # member pairs of the permutation null (None: all)
    heavy_pairs: list[tuple[int, int]] | None = None  # pairs for mutual information and cross-layer (None: all)
    null: bool = True
    mutual_info: bool = True
    top_k: int = 0  # 0: no unit visualisations
    pooled: bool = True  # image-level features for cross-layer measures
    product_dtype: torch.dtype | None = None  # None: float64 on CUDA, float32 on the CPU
    max_units: int | None = None
    mi_layers: Sequence[str] | None = None  # layers with mutual information (None: all)
    mi_positions: int | None = 16  # positions per image used for MI (None: all)


@dataclass
class LayerStats:
    fit: MomentStats  # even probe images (every image at light steps)
    held: MomentStats | None  # odd probe images (None at light steps)
    null_fit: MomentStats | None = None
    null_held: MomentStats | None = None
    mi_counts: dict[tuple[int, int], Tensor] | None = None
    top: dict[int, tuple[Tensor, Tensor]] | None = None  # member -> (values [C, k], (image, y, x) [C, k, 3])
    units: Tensor | None = None  # indices of the units kept (analysis.max_units)

    # Cached: the analyses memoise derived quantities on these MomentStats, so each is built once.
    @cached_property
    def all(self) -> MomentStats:
        """Every probe image (at light steps everything is in `fit` and `held` is empty)."""
        return self.fit if self.held is None else self.fit + self.held

    @cached_property
    def null(self) -> MomentStats | None:
        if self.null_fit is None:
            return None
        return self.null_fit if self.null_held is None else self.null_fit + self.null_held


@dataclass
class ProbeStats:
    layers: dict[str, LayerStats]
    k: int
    n_images: int
    pooled: MomentStats | None = None  # nets indexed by pooled_index[(layer, member)]
    pooled_index: dict[tuple[str, int], int] = field(default_factory=dict)
    null_index: dict[int, int] = field(default_factory=dict)  # member -> its net index in the null stats


def unit_subset(width: int, max_units: int | None, layer: str) -> Tensor | None:
    """A fixed random subset of units (the same in every run) when a layer is wider than max_units."""
    if not max_units or width <= max_units:
        return None
    g = torch.Generator().manual_seed(sum(map(ord, layer)))
    return torch.randperm(width, generator=g)[:max_units].sort().values


def position_subset(hw: int, positions: int | None, layer: str) -> Tensor | None:
    """A fixed random subset of spatial positions (the same for every image, member and run)."""
    if not positions or hw <= positions:
        return None
    g = torch.Generator().manual_seed(1_000 + sum(map(ord, layer)))
    return torch.randperm(hw, generator=g)[:positions].sort().values


def member_pairs(k: int, pairs) -> list[tuple[int, int]]:
    return [(a, b) for a in range(k) for b in range(a + 1, k)] if pairs is None else [tuple(p) for p in pairs]


def member_subset(k: int, pairs) -> tuple[list[int], dict[int, int], list[tuple[int, int]]]:
    """The members of some pairs (sorted), each one's index among them, and the pairs in those
    indices: statistics kept over a subset of members index them 0.."""
    kept = member_pairs(k, pairs)
    members = sorted({i for p in kept for i in p})
    index = {m: i for i, m in enumerate(members)}
    return members, index, [(index[a], index[b]) for a, b in kept]


def pooled_blocks(layers: Sequence[str], k: int, pairs) -> tuple[dict, list[tuple[int, int]]]:
    """Index of every (layer, member) among the pooled nets, and the blocks cross-layer measures
    need: every layer of a against every layer of b, for each member pair."""
    index = {(layer, m): li * k + m for li, layer in enumerate(layers) for m in range(k)}
    blocks = [(index[(la, a)], index[(lb, b)]) for a, b in member_pairs(k, pairs) for la in layers for lb in layers]
    return index, blocks


class ProbeRunner:
    def __init__(self, options: ProbeOptions, widths: dict[str, int], k: int) -> None:
        self.options = options
        self.k = k
        self.units = {layer: unit_subset(widths[layer], options.max_units, layer) for layer in options.layers}
        self.widths = {layer: (len(u) if u is not None else widths[layer]) for layer, u in self.units.items()}
        self.pooled_index, self.pooled_pairs = pooled_blocks(options.layers, k, options.heavy_pairs)
        # Top activations and mutual information need only the members of the heavy pairs, the
        # null only those of its pairs: statistics over those, re-indexed 0.. (keys map back).
        self.heavy_members, _, self.heavy_pair_index = member_subset(k, options.heavy_pairs)
        self.null_members, self.null_index, self.null_pair_index = member_subset(k, options.null_pairs)
        self.pooled_sizes = [self.widths[layer] for layer in options.layers for _ in range(k)]
        self.mi_layers = [l for l in options.layers if options.mi_layers is None or l in options.mi_layers]
        self._acc: dict[str, Any] | None = None

    def mi_acts(self, layer: str, acts: list[Tensor]) -> list[Tensor]:
        """Activations used for mutual information: conv taps at a fixed subset of positions."""
        if acts[0].dim() != 4:
            return acts
        keep = position_subset(acts[0].shape[2] * acts[0].shape[3], self.options.mi_positions, layer)
        if keep is None:
            return acts
        keep = keep.to(acts[0].device)
        return [a.flatten(2)[:, :, keep] for a in acts]

    # --- memory ------------------------------------------------------------------------------
    def estimate_bytes(self) -> dict[str, int]:
        """Bytes the statistics will hold, by kind (without allocating them)."""
        o, k = self.options, self.k
        est = {"moments": 0, "null": 0, "mutual_info": 0, "top_k": 0, "pooled": 0}
        for layer in o.layers:
            sizes = [self.widths[layer]] * k
            est["moments"] += 2 * estimate_state_bytes(sizes, o.pairs)
            if o.null and k > 1:
                est["null"] += 2 * estimate_state_bytes([self.widths[layer]] * len(self.null_members), self.null_pair_index)
            if o.mutual_info and k > 1 and layer in self.mi_layers:
                heavy = [self.widths[layer]] * len(self.heavy_members)
                est["mutual_info"] += estimate_joint_bytes(heavy, self.heavy_pair_index) + 8 * sum(heavy) * 1203
            if o.top_k and layer in CONV_LAYERS:
                est["top_k"] += 8 * 4 * o.top_k * self.widths[layer] * len(self.heavy_members)
        if o.pooled and k > 1:
            est["pooled"] = estimate_state_bytes(self.pooled_sizes, self.pooled_pairs)
        est["total"] = sum(est.values())
        return est

    # --- the pass ----------------------------------------------------------------------------
    def taps(self, members: Sequence[nn.Module], images: Tensor, pooled: bool = True) -> list[dict[str, Tensor]]:
        """Every member's post-ReLU taps as float32 (unit subset applied), plus pooled features
        (unless `pooled` is False)."""
        out = []
        for member in members:
            _, taps = member(images, taps=self.options.layers)
            kept = {}
            for layer, act in taps.items():
                act = act.float()
                if self.units[layer] is not None:
                    act = act[:, self.units[layer].to(act.device)]
                kept[layer] = act
            if pooled and self.options.pooled:
                kept[POOLED] = torch.cat([a.mean(dim=(2, 3)) if a.dim() == 4 else a for a in kept.values()], dim=1)
            out.append(kept)
        return out

    def _member_keys(self, counts: dict[tuple[int, int], Tensor]) -> dict[tuple[int, int], Tensor]:
        """Joint counts keyed by member pairs (the histogram indexes the heavy members 0..)."""
        return {(self.heavy_members[i], self.heavy_members[j]): c for (i, j), c in counts.items()}

    def _pooled_acts(self, taps: list[dict[str, Tensor]]) -> list[Tensor]:
        """Pooled features split back into one tensor per (layer, member), in pooled_index order."""
        acts = []
        for layer in self.options.layers:
            lo = sum(self.widths[l] for l in self.options.layers[: self.options.layers.index(layer)])
            acts.extend(t[POOLED][:, lo : lo + self.widths[layer]] for t in taps)
        return acts

    def accumulators(self, device: torch.device) -> dict[str, Any]:
        """The streaming statistics, built once per device and reset before every pass (building
        thousands of metric states costs more than a probe pass on a small net)."""
        device = torch.device(device)
        if self._acc is not None and self._acc["device"] == device:
            for metric in self._acc["metrics"]:
                metric.reset()
            return self._acc
        o, k, layers = self.options, self.k, list(self.options.layers)
        dtype = o.product_dtype or (torch.float64 if device.type == "cuda" else torch.float32)

        def moments(sizes, pairs=o.pairs):
            return Moments(sizes, pairs=pairs, product_dtype=dtype).to(device)

        null_on, pooled_on = o.null and k > 1, o.pooled and k > 1
        acc: dict[str, Any] = {
            "device": device,
            "fit": {l: moments([self.widths[l]] * k) for l in layers},
            "held": {l: moments([self.widths[l]] * k) for l in layers},
            "null_fit": {l: moments([self.widths[l]] * len(self.null_members), self.null_pair_index) for l in layers}
            if null_on
            else {},
            "null_held": {l: moments([self.widths[l]] * len(self.null_members), self.null_pair_index) for l in layers}
            if null_on
            else {},
            "bins": {
                l: UnitBins([self.widths[l]] * len(self.heavy_members)).to(device)
                for l in (self.mi_layers if o.mutual_info and k > 1 else [])
            },
            "top": {
                l: TopActivations([self.widths[l]] * len(self.heavy_members), k=o.top_k).to(device)
                for l in layers
                if l in CONV_LAYERS
            }
            if o.top_k
            else {},
            "pooled": moments(self.pooled_sizes, self.pooled_pairs) if pooled_on else None,
        }
        acc["metrics"] = [
            m
            for key in ("fit", "held", "null_fit", "null_held", "bins", "top")
            for m in acc[key].values()
        ] + ([acc["pooled"]] if acc["pooled"] is not None else [])
        self._acc = acc
        return acc

    def run(self, members: Sequence[nn.Module], loader: Iterable, device: torch.device, full: bool = True) -> ProbeStats:
        """One pass (two with mutual information). `full=False` skips the statistics only the
        heavy analyses use (mutual information, top activations, image-level features)."""
        o, k = self.options, self.k
        layers = list(o.layers)
        acc = self.accumulators(device)
        fit, held, null_fit, null_held = acc["fit"], acc["held"], acc["null_fit"], acc["null_held"]
        bins, top, pooled = acc["bins"], acc["top"], acc["pooled"]
        if not full:
            bins, top, pooled = {}, {}, None
        shift = CyclicShift(len(self.null_members)) if null_fit else None
        n_images = 0

        def fold_null(chunks: list[tuple[int, list[dict[str, Tensor]]]]) -> None:
            for first_row, rows in chunks:
                even, odd = parity_rows(torch.tensor([first_row]))  # rows first_row, first_row + 1, ...
                for l in layers:
                    acts = [r[l] for r in rows]
                    if full:
                        null_fit[l].update(*[a[even] for a in acts])
                        null_held[l].update(*[a[odd] for a in acts])
                    else:
                        null_fit[l].update(*acts)

        with evaluating(members), torch.no_grad():
            for batch in loader:
                images, index = batch[0].to(device), batch[2].to(device)
                taps = self.taps(members, images)
                n_images += images.shape[0]
                even, odd = parity_rows(index) if full else (None, None)
                for l in layers:
                    acts = [t[l] for t in taps]
                    if full:
                        fit[l].update(*[a[even] for a in acts])
                        held[l].update(*[a[odd] for a in acts])
                    else:  # no held-out analysis at light steps: one accumulator, no split copies
                        fit[l].update(*acts)
                    heavy = [acts[i] for i in self.heavy_members]
                    if l in bins:
                        bins[l].update(*self.mi_acts(l, heavy))
                    if l in top:
                        top[l].update(*heavy, image_index=index)
                if pooled is not None:
                    pooled.update(*self._pooled_acts(taps))
                if shift is not None:
                    fold_null(shift.push([taps[m] for m in self.null_members]))
                del taps  # before the next forward: two batches of taps would be alive at once
            if shift is not None:
                fold_null(shift.finish())

            joint = {}
            if bins:
                release_free_memory()  # the heap's free pages back to the OS between passes (no creep)
                # Pass 2: joint bin counts, with the bin edges of pass 1 (the heavy pairs' members only).
                joint = {
                    l: JointHistogram([self.widths[l]] * len(self.heavy_members), bins[l].compute(), pairs=self.heavy_pair_index).to(device)
                    for l in bins
                }
                heavy_members = [members[i] for i in self.heavy_members]
                for batch in loader:
                    taps = self.taps(heavy_members, batch[0].to(device), pooled=False)
                    for l in bins:
                        joint[l].update(*self.mi_acts(l, [t[l] for t in taps]))
                    del taps

        release_free_memory()
        result = {
            l: LayerStats(
                fit=fit[l].compute(),
                held=held[l].compute() if full else None,
                null_fit=null_fit[l].compute() if l in null_fit else None,
                null_held=null_held[l].compute() if l in null_held and full else None,
                mi_counts=self._member_keys(joint[l].compute()) if l in joint else None,
                top=dict(zip(self.heavy_members, top[l].compute())) if l in top else None,
                units=self.units[l],
            )
            for l in layers
        }
        return ProbeStats(
            layers=result,
            k=k,
            n_images=n_images,
            pooled=pooled.compute() if pooled is not None else None,
            pooled_index=self.pooled_index,
            null_index=self.null_index,
        )


def parity_rows(index: Tensor) -> tuple[slice | Tensor, slice | Tensor]:
    """Rows of a batch of probe images with even / odd probe index (the fit / held-out split).
    ``index`` holds every row's index, or just the first row's when the rows are consecutive.
    Consecutive rows (the usual probe loader) give strided slices, views that cost no copy;
    otherwise boolean masks."""
    if index.numel() == 0:
        return slice(0, 0), slice(0, 0)
    if index.numel() == 1 or bool((index[1:] - index[:-1] == 1).all()):
        first = int(index[0]) % 2
        return slice(first, None, 2), slice(1 - first, None, 2)
    even = (index % 2) == 0
    return even, ~even


@contextlib.contextmanager
def evaluating(members: Sequence[nn.Module]):
    """Eval mode for the pass; each member's previous mode restored afterwards."""
    modes = [m.training for m in members]
    try:
        for m in members:
            m.eval()
        yield
    finally:
        for m, mode in zip(members, modes):
            m.train(mode)
