"""Hierarchical agglomerative clustering of both nets' units (the paper's 2016 analysis 7)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from convergent.analysis import clustering
from convergent.analysis.registry import Analysis, Output, Pair, Result, pair_suffix, register_analysis
from convergent.errors import check_choice


@dataclass
class HierarchicalOptions:
    """Options of hierarchical clustering (config group `analysis.hierarchical`)."""

    method: str = "average"  # scipy linkage on 1 - corr: average | single | complete | weighted

    def __post_init__(self) -> None:
        check_choice(self.method, clustering.LINKAGE_METHODS, "analysis.hierarchical.method")


@dataclass
class HierarchicalResult(Result):
    layer: str
    linkage: dict[Pair, np.ndarray] = field(default_factory=dict)  # scipy linkage matrix [C_a + C_b - 1, 4]
    n_a: dict[Pair, int] = field(default_factory=dict)
    first_merges_cross: dict[Pair, float] = field(default_factory=dict)
    first_merges_same: dict[Pair, float] = field(default_factory=dict)
    cross_fraction: dict[Pair, float] = field(default_factory=dict)

    def scalars(self):
        key = f"hier/{self.layer}"
        return {
            f"{key}/first_merges_cross": self.first_merges_cross,
            f"{key}/first_merges_same": self.first_merges_same,
            f"{key}/cross_fraction": self.cross_fraction,
        }

    def arrays(self):
        return {f"{self.layer}/linkage/{pair_suffix(a, b)}": z for (a, b), z in self.linkage.items()}


@register_analysis
class Hierarchical(Analysis):
    name = "hierarchical"
    heavy = True
    options = HierarchicalOptions
    description = "agglomerative clustering on 1 - corr: first merges across nets (one-to-one) and within"

    def outputs(self, plan, layer):
        return [Output(f"hier/{layer}/{n}") for n in ("first_merges_cross", "first_merges_same", "cross_fraction")]

    def run(self, ctx) -> HierarchicalResult:
        stats = ctx.stats.all
        res = HierarchicalResult(ctx.layer)
        for a, b in ctx.pairs:
            r = clustering.hierarchical_merges(stats, a=a, b=b, method=ctx.plan.config.hierarchical.method)
            res.linkage[(a, b)] = r.Z
            res.n_a[(a, b)] = r.n_a
            res.first_merges_cross[(a, b)] = float(r.first_merges_cross)
            res.first_merges_same[(a, b)] = float(r.first_merges_same)
            res.cross_fraction[(a, b)] = float(r.cross_fraction) if np.isfinite(r.cross_fraction) else 0.0
        return res
