"""One probe pass: the probe set through every member, folded into streaming statistics.

Runs on every process (each on its batches of the probe set); `compute()` of each statistic sums
the processes' states, so every rank ends with the same `ProbeStats`. Members run in eval mode
under no_grad; their previous mode is restored.

Per layer: the grouped `Moments` of every member (probe image i in group i mod G: the jackknife's
groups and the fit / held-out split), the null's `RepairedCross` per null pair (random re-pairings
of the images inside each batch), and over the heavy pairs' members `UnitBins` + `JointHistogram`
for mutual information (a second pass) and `TopActivations` for unit visualisations. Across layers:
one `Moments` of image-level features (conv taps averaged over space) for cross-layer measures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from convergent.analysis.plan import Plan
from convergent.analysis.registry import Needs
from convergent.models import CONV_LAYERS
from convergent.stats import Moments, estimate_state_bytes
from convergent.stats.histogram import JointHistogram, UnitBins, count_dtype, estimate_joint_bytes
from convergent.stats.layer import JointCounts, LayerStats, ProbeStats
from convergent.stats.null import RepairedCross, repairing
from convergent.stats.scratch import release_free_memory
from convergent.stats.topk import TopActivations

POOLED = "pooled"  # key of the image-level features in a member's taps


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


def pooled_blocks(layers: Sequence[str], k: int, pairs: Sequence[tuple[int, int]]) -> tuple[dict, list[tuple[int, int]]]:
    """Index of every (layer, member) among the pooled nets, and the blocks cross-layer measures
    need: every layer of a against every layer of b, for each member pair."""
    index = {(layer, m): li * k + m for li, layer in enumerate(layers) for m in range(k)}
    blocks = [(index[(la, a)], index[(lb, b)]) for a, b in pairs for la in layers for lb in layers]
    return index, blocks


def product_dtype(setting: str) -> torch.dtype:
    """`analysis.products`: auto and float32 are float32 products (exact to ~1e-6 of float64 with the
    per-chunk shift; TF32 is switched off for them), float64 the slow reference."""
    return torch.float64 if setting == "float64" else torch.float32


class ProbeRunner:
    def __init__(self, plan: Plan, widths: dict[str, int]) -> None:
        self.plan = plan
        c = plan.config
        self.k = plan.k
        self.layers = list(c.layers)
        self.units = {layer: unit_subset(widths[layer], c.max_units, layer) for layer in self.layers}
        self.widths = {layer: (len(u) if u is not None else widths[layer]) for layer, u in self.units.items()}
        self.heavy_members = plan.heavy_members
        self.heavy_index = {m: i for i, m in enumerate(self.heavy_members)}
        self.heavy_pair_index = [(self.heavy_index[a], self.heavy_index[b]) for a, b in plan.heavy_pairs]
        self.pooled_index, self.pooled_pairs = pooled_blocks(self.layers, self.k, plan.heavy_pairs)
        self.pooled_sizes = [self.widths[layer] for layer in self.layers for _ in range(self.k)]
        self.mi_layers = plan.layers if not plan.on("mutual_info") else _mi_layers(plan)
        self.groups = c.interval.groups
        self.draws = c.null.draws
        self._acc: dict[str, Any] | None = None

    # --- what is collected -------------------------------------------------------------------
    def needs(self, full: bool) -> Needs:
        return self.plan.needs(full)

    @property
    def mi_null_pairs(self) -> list[tuple[int, int]]:
        return self.plan.null_pairs_of(self.plan.heavy_pairs)

    def mi_acts(self, layer: str, acts: list[Tensor]) -> list[Tensor]:
        """Activations used for mutual information: conv taps at a fixed subset of positions."""
        if acts[0].dim() != 4:
            return acts
        keep = position_subset(acts[0].shape[2] * acts[0].shape[3], self.plan.config.mutual_info.positions, layer)
        if keep is None:
            return acts
        keep = keep.to(acts[0].device)
        return [a.flatten(2)[:, :, keep] for a in acts]

    # --- memory ------------------------------------------------------------------------------
    def estimate_bytes(self) -> dict[str, int]:
        """Bytes the statistics will hold, by kind (without allocating them)."""
        needs, k, g = self.needs(full=True), self.k, self.groups
        est = {"moments": 0, "null": 0, "mutual_info": 0, "top_k": 0, "pooled": 0}
        for layer in self.layers:
            w = self.widths[layer]
            est["moments"] += estimate_state_bytes([w] * k, self.plan.member_pairs, groups=g)
            if needs.null:
                est["null"] += len(self.plan.null_pairs) * 8 * self.draws * 2 * (w * w + 1 + 2 * w)
            if needs.histograms and layer in self.mi_layers:
                heavy = [w] * len(self.heavy_members)
                size = self._count_dtype().itemsize
                est["mutual_info"] += (
                    estimate_joint_bytes(heavy, self.heavy_pair_index, groups=g, state_bytes=size) + 8 * sum(heavy) * 1203
                )
                if needs.null:
                    null = estimate_joint_bytes([w] * (1 + self.draws), [(0, d + 1) for d in range(self.draws)], state_bytes=size)
                    est["mutual_info"] += len(self.mi_null_pairs) * null
            if needs.top and layer in CONV_LAYERS:
                est["top_k"] += 8 * 4 * self.plan.config.patches.top_k * w * len(self.heavy_members)
        if needs.pooled:
            est["pooled"] = estimate_state_bytes(self.pooled_sizes, self.pooled_pairs)
        est["total"] = sum(est.values())
        return est

    def _count_dtype(self) -> torch.dtype:
        """float32 joint counts when no cell can reach 2**24 (every probe position at most once)."""
        positions = self.plan.config.mutual_info.positions
        return count_dtype(self.plan.config.probe_size * positions) if positions else torch.float64

    # --- the pass ----------------------------------------------------------------------------
    def taps(self, members: Sequence[nn.Module], images: Tensor, pooled: bool = False) -> list[dict[str, Tensor]]:
        """Every member's post-ReLU taps as float32 (unit subset applied), plus pooled features."""
        out = []
        for member in members:
            _, taps = member(images, taps=self.layers)
            kept = {}
            for layer, act in taps.items():
                act = act.float()
                if self.units[layer] is not None:
                    act = act[:, self.units[layer].to(act.device)]
                kept[layer] = act
            if pooled:
                kept[POOLED] = torch.cat([a.mean(dim=(2, 3)) if a.dim() == 4 else a for a in kept.values()], dim=1)
            out.append(kept)
        return out

    def _pooled_acts(self, taps: list[dict[str, Tensor]]) -> list[Tensor]:
        """Pooled features split back into one tensor per (layer, member), in pooled_index order."""
        acts, lo = [], 0
        for layer in self.layers:
            w = self.widths[layer]
            acts.extend(t[POOLED][:, lo : lo + w] for t in taps)
            lo += w
        return acts

    def accumulators(self, device: torch.device) -> dict[str, Any]:
        """The streaming statistics, built once per device and reset before every pass (building
        thousands of metric states costs more than a probe pass on a small net)."""
        device = torch.device(device)
        if self._acc is not None and self._acc["device"] == device:
            for metric in self._acc["metrics"]:
                metric.reset()
            return self._acc
        plan, k, layers = self.plan, self.k, self.layers
        dtype = product_dtype(plan.config.products)
        needs = self.needs(full=True)
        acc: dict[str, Any] = {
            "device": device,
            "moments": {
                l: Moments([self.widths[l]] * k, pairs=plan.member_pairs, product_dtype=dtype, groups=self.groups).to(device)
                for l in layers
            },
            "null": {
                (l, p): RepairedCross(self.widths[l], self.widths[l], self.draws, groups=2, product_dtype=dtype).to(device)
                for l in layers
                for p in (plan.null_pairs if needs.null else [])
            },
            "bins": {
                l: UnitBins([self.widths[l]] * len(self.heavy_members)).to(device)
                for l in (self.mi_layers if needs.histograms else [])
            },
            "top": {
                l: TopActivations([self.widths[l]] * len(self.heavy_members), k=plan.config.patches.top_k).to(device)
                for l in (layers if needs.top else [])
                if l in CONV_LAYERS
            },
            "pooled": Moments(self.pooled_sizes, pairs=self.pooled_pairs, product_dtype=dtype).to(device)
            if needs.pooled
            else None,
        }
        acc["metrics"] = [m for key in ("moments", "null", "bins", "top") for m in acc[key].values()] + (
            [acc["pooled"]] if acc["pooled"] is not None else []
        )
        self._acc = acc
        return acc

    def run(
        self, members: Sequence[nn.Module], loader: Iterable, device: torch.device, full: bool = True, stop=None
    ) -> ProbeStats:
        """One pass (two with mutual information). `full=False` skips the statistics only the heavy
        analyses use. `stop()` (optional) is asked between batches: a true answer abandons the pass
        (`PassAbandoned`)."""
        needs = self.needs(full)
        acc = self.accumulators(device)
        moments, null = acc["moments"], acc["null"] if needs.null else {}
        bins = acc["bins"] if needs.histograms else {}
        top = acc["top"] if needs.top else {}
        pooled = acc["pooled"] if needs.pooled else None
        seed = self.plan.config.null.seed
        n_images = 0
        with evaluating(members), torch.no_grad():
            for batch in loader:
                if stop is not None and stop():
                    raise PassAbandoned("stop requested during the probe pass")
                images, index = batch[0].to(device), batch[2]
                first = consecutive_first(index)
                taps = self.taps(members, images, pooled=pooled is not None)
                n = images.shape[0]
                n_images += n
                perms = repairing(first, n, self.draws, groups=2, seed=seed) if null else None
                for l in self.layers:
                    acts = [t[l] for t in taps]
                    moments[l].update(*acts, group=first)
                    for (layer, (a, b)), cross in null.items():
                        if layer == l:
                            cross.update(acts[a], acts[b], perms, group=first)
                    heavy = [acts[i] for i in self.heavy_members]
                    if l in bins:
                        bins[l].update(*self.mi_acts(l, heavy))
                    if l in top:
                        top[l].update(*heavy, image_index=index.to(device))
                if pooled is not None:
                    pooled.update(*self._pooled_acts(taps))
                del taps  # before the next forward: two batches of taps would be alive at once
            counts = self._joint_counts(members, loader, device, bins, stop) if bins else {}
        release_free_memory()
        result = {}
        for l in self.layers:
            result[l] = LayerStats(
                groups=moments[l].compute_groups(),
                repaired={p: null[(l, p)].compute() for p in self.plan.null_pairs if (l, p) in null},
                mi=counts.get(l),
                top=dict(zip(self.heavy_members, top[l].compute())) if l in top else None,
                units=self.units[l],
            )
        return ProbeStats(
            layers=result,
            k=self.k,
            n_images=n_images,
            pooled=pooled.compute() if pooled is not None else None,
            pooled_index=self.pooled_index,
        )

    def _joint_counts(self, members, loader, device, bins: dict, stop) -> dict[str, JointCounts]:
        """Pass 2: joint bin counts with the bin edges of pass 1 (the heavy pairs' members only),
        per image group, and on re-paired images for the null pairs."""
        release_free_memory()  # the heap's free pages back to the OS between passes (no creep)
        H = len(self.heavy_members)
        edges = {l: bins[l].compute() for l in bins}
        joint = {
            l: JointHistogram(
                [self.widths[l]] * H, edges[l], pairs=self.heavy_pair_index, groups=self.groups, state_dtype=self._count_dtype()
            ).to(device)
            for l in bins
        }
        null_pairs = self.mi_null_pairs if self.needs(True).null else []
        nulls = {
            (l, p): JointHistogram(
                [self.widths[l]] * (1 + self.draws),
                [edges[l][self.heavy_index[p[0]]]] + [edges[l][self.heavy_index[p[1]]]] * self.draws,
                pairs=[(0, d + 1) for d in range(self.draws)],
                state_dtype=self._count_dtype(),
            ).to(device)
            for l in bins
            for p in null_pairs
        }
        heavy_members = [members[i] for i in self.heavy_members]
        seed = self.plan.config.null.seed
        for batch in loader:
            if stop is not None and stop():
                raise PassAbandoned("stop requested during the mutual-information pass")
            first = consecutive_first(batch[2])
            taps = self.taps(heavy_members, batch[0].to(device))
            n = batch[0].shape[0]
            perms = repairing(first, n, self.draws, groups=2, seed=seed).to(device) if nulls else None
            for l in bins:
                acts = self.mi_acts(l, [t[l] for t in taps])
                joint[l].update(*acts, group=first)
                for p in null_pairs:
                    a, b = acts[self.heavy_index[p[0]]], acts[self.heavy_index[p[1]]]
                    nulls[(l, p)].update(a, *[b.index_select(0, perms[d]) for d in range(self.draws)])
            del taps
        out = {}
        for l in bins:
            grouped = joint[l].compute_groups()
            counts = {(self.heavy_members[i], self.heavy_members[j]): c for (i, j), c in grouped.items()}
            null = None
            if null_pairs:
                null = {p: torch.stack([nulls[(l, p)].counts(0, d + 1) for d in range(self.draws)]) for p in null_pairs}
            out[l] = JointCounts(counts, null)
        return out


class PassAbandoned(RuntimeError):
    """A probe pass stopped before its end (a SIGTERM arrived)."""


def _mi_layers(plan: Plan) -> list[str]:
    return plan.analyses[[a.name for a in plan.analyses].index("mutual_info")].layers(plan)


def consecutive_first(index: Tensor) -> int:
    """The probe index of a batch's first image; the batch must hold consecutive probe images
    (the probe loader's batches do: the null's re-pairings and the image groups rely on it)."""
    index = index.reshape(-1).cpu()
    first = int(index[0])
    if index.numel() > 1 and not bool((index == torch.arange(first, first + index.numel())).all()):
        raise ValueError("probe batches must hold consecutive probe images (use the data module's probe_dataloader)")
    return first


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
