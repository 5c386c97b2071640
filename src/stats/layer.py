"""What one probe pass leaves per layer: the statistics every analysis reads.

`LayerStats` holds, for one layer and every member, the grouped moments (probe image i in group
i mod G: the fit / held-out split and the jackknife's leave-one-group-out statistics are unions of
groups), the null's re-paired cross moments per null pair, the mutual-information counts and the
top activations (heavy pairs' members, full steps). `MomentViews` / `CountViews` present them to
`convergent.analysis.calibration`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from torch import Tensor

from convergent.stats.moments import GroupedMomentStats, MomentStats
from convergent.stats.null import RepairedSums, null_stats

Pair = tuple[int, int]


@dataclass
class JointCounts:
    """Mutual-information counts of the heavy pairs: per pair, ``groups`` [G, C_a, C_b, B, B]
    (image groups as the moments'), and the null's ``null[pair]`` [R, C_a, C_b, B, B] on
    re-paired images (None without the null)."""

    groups: dict[Pair, Tensor]
    null: dict[Pair, Tensor] | None = None

    def total(self, pair: Pair) -> Tensor:
        return self.groups[pair].sum(0)


@dataclass
class LayerStats:
    groups: GroupedMomentStats  # every member (net i = member i)
    repaired: dict[Pair, RepairedSums] = field(default_factory=dict)  # null pair -> re-paired cross sums
    mi: JointCounts | None = None
    top: dict[int, tuple[Tensor, Tensor]] | None = None  # member -> (values [C, k], (image, y, x) [C, k, 3])
    units: Tensor | None = None  # indices of the units kept (analysis.max_units)
    _nulls: dict = field(default_factory=dict, repr=False)

    @property
    def all(self) -> MomentStats:
        """Every probe image."""
        return self.groups.total

    @property
    def fit(self) -> MomentStats:
        """The even probe images (the sparse predictor's fit split)."""
        return self.groups.fit

    @property
    def held(self) -> MomentStats:
        """The odd probe images (its held-out split)."""
        return self.groups.held

    def null(self, pair: Pair, draw: int, groups=None) -> MomentStats:
        """Nets a, b of `pair` (indices 0, 1) with b's images re-paired (draw `draw`); built once
        (the measures memoise their work on it)."""
        if pair not in self.repaired:
            raise KeyError(f"no null kept for members {pair}; null pairs: {sorted(self.repaired)}")
        key = (pair, draw, None if groups is None else tuple(groups))
        if key not in self._nulls:
            self._nulls[key] = null_stats(self.groups, pair[0], pair[1], self.repaired[pair], draw, groups)
        return self._nulls[key]


class MomentViews:
    """`calibration.Views` of a layer's moments: every image, every image but a group, a null draw."""

    def __init__(self, ls: LayerStats, groups: int, draws: int) -> None:
        self.ls = ls
        self.groups = groups if ls.groups.groups > 1 else 0
        self.draws = draws if ls.repaired else 0

    def full(self) -> MomentStats:
        return self.ls.all

    def leave_out(self, g: int) -> MomentStats | None:
        grouped = self.ls.groups
        if float(grouped.n[g]) == 0 or float(grouped.n[g]) == float(grouped.n.sum()):
            return None
        return grouped.leave_out(g)

    def null(self, draw: int, pair: Pair) -> tuple[MomentStats, int, int]:
        return self.ls.null(pair, draw), 0, 1


class SplitViews:
    """Views of (fit, held-out) moment pairs for the sparse predictor: without group g, g's images
    leave whichever split holds them; the null re-pairs within each split."""

    def __init__(self, ls: LayerStats, draws: int) -> None:
        self.ls = ls
        self.groups = ls.groups.groups
        self.draws = draws if ls.repaired else 0

    def full(self) -> tuple[MomentStats, MomentStats]:
        return self.ls.fit, self.ls.held

    @cached_property
    def _splits(self) -> tuple[list[int], list[int]]:
        g = self.groups
        return list(range(0, g, 2)), list(range(1, g, 2))

    def leave_out(self, g: int) -> tuple[MomentStats, MomentStats] | None:
        fit, held = self._splits
        grouped = self.ls.groups
        split = fit if g % 2 == 0 else held
        rest = [x for x in split if x != g]
        if float(grouped.n[g]) == 0 or not rest or float(grouped.n[rest].sum()) == 0:
            return None  # an empty group, or one whose removal empties its split
        if g % 2 == 0:
            return grouped.subset([x for x in fit if x != g]), self.ls.held
        return self.ls.fit, grouped.subset([x for x in held if x != g])

    def null(self, draw: int, pair: Pair) -> tuple[tuple[MomentStats, MomentStats], int, int]:
        fit, held = self._splits
        return (self.ls.null(pair, draw, fit), self.ls.null(pair, draw, held)), 0, 1


class CountViews:
    """Views of the mutual-information counts (dicts pair -> counts)."""

    def __init__(self, counts: JointCounts, groups: int, draws: int) -> None:
        self.counts = counts
        self.groups = groups if next(iter(counts.groups.values())).shape[0] > 1 else 0
        self.draws = draws if counts.null else 0

    def full(self) -> dict[Pair, Tensor]:
        return {p: c.sum(0) for p, c in self.counts.groups.items()}

    def leave_out(self, g: int) -> dict[Pair, Tensor] | None:
        first = next(iter(self.counts.groups.values()))
        per_group = first[:, 0, 0].sum((-1, -2))  # samples per group (the counts of one unit pair)
        if float(per_group[g]) == 0 or float(per_group[g]) == float(per_group.sum()):
            return None
        return {p: c.sum(0) - c[g] for p, c in self.counts.groups.items()}

    def null(self, draw: int, pair: Pair) -> tuple[dict[Pair, Tensor], int, int]:
        assert self.counts.null is not None
        return {(0, 1): self.counts.null[pair][draw]}, 0, 1


@dataclass
class ProbeStats:
    """Everything one probe pass measured."""

    layers: dict[str, LayerStats]
    k: int
    n_images: int
    pooled: MomentStats | None = None  # image-level features: nets indexed by pooled_index[(layer, member)]
    pooled_index: dict[tuple[str, int], int] = field(default_factory=dict)
