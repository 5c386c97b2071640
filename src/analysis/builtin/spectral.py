"""Spectral clustering of both nets' units together (many-to-many, the paper's 2015 analysis 6)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convergent.analysis import clustering
from convergent.analysis.registry import Analysis, Output, Pair, Result, pair_suffix, register_analysis
from convergent.errors import ConfigError, check_choice


@dataclass
class SpectralOptions:
    """Options of spectral clustering (config group `analysis.spectral`)."""

    n_clusters: int = 8  # clusters over both nets' units
    affinity: str = "abs"  # abs: abs(corr); shifted: (1 + corr) / 2
    assign_labels: str = "cluster_qr"  # labels from the embedding: cluster_qr (deterministic) | kmeans | discretize

    def __post_init__(self) -> None:
        if self.n_clusters < 2:
            raise ConfigError(f"analysis.spectral.n_clusters={self.n_clusters} must be at least 2")
        check_choice(self.affinity, clustering.AFFINITIES, "analysis.spectral.affinity")
        check_choice(self.assign_labels, clustering.ASSIGN_LABELS, "analysis.spectral.assign_labels")


@dataclass
class SpectralResult(Result):
    layer: str
    labels: dict[Pair, np.ndarray] = field(default_factory=dict)  # [C_a + C_b], a's units first; -1: dead
    order: dict[Pair, np.ndarray] = field(default_factory=dict)
    boundaries: dict[Pair, np.ndarray] = field(default_factory=dict)
    shared_fraction: dict[Pair, float] = field(default_factory=dict)
    within_corr: dict[Pair, float] = field(default_factory=dict)
    random_corr: dict[Pair, float] = field(default_factory=dict)

    def scalars(self) -> dict[str, Any]:
        key = f"spectral/{self.layer}"
        return {
            f"{key}/shared_fraction": self.shared_fraction,
            f"{key}/within_corr": self.within_corr,
            f"{key}/random_corr": self.random_corr,
        }

    def arrays(self):
        out = {}
        for (a, b), labels in self.labels.items():
            tag = pair_suffix(a, b)
            out[f"{self.layer}/spectral_labels/{tag}"] = labels
            out[f"{self.layer}/spectral_order/{tag}"] = self.order[(a, b)]
            out[f"{self.layer}/spectral_boundaries/{tag}"] = self.boundaries[(a, b)]
        return out


def _finite(x: float) -> float:
    """NaN (no a-b pair shares a cluster) is reported as 0."""
    return float(x) if np.isfinite(x) else 0.0


@register_analysis
class Spectral(Analysis):
    name = "spectral"
    heavy = True
    options = SpectralOptions
    description = "spectral clustering of both nets' units: shared clusters, within-cluster correlation vs random"

    def outputs(self, plan, layer):
        return [Output(f"spectral/{layer}/{n}") for n in ("shared_fraction", "within_corr", "random_corr")]

    def check_widths(self, plan, widths) -> None:
        n = plan.config.spectral.n_clusters
        for layer in plan.layers:
            if n > 2 * widths[layer]:
                raise ConfigError(
                    f"analysis.spectral.n_clusters={n} is more than the {2 * widths[layer]} units of two "
                    f"{layer} nets; lower it or drop {layer} from analysis.layers"
                )

    def run(self, ctx) -> SpectralResult:
        o, seed = ctx.plan.config.spectral, ctx.plan.config.seed
        stats = ctx.stats.all
        res = SpectralResult(ctx.layer)
        for a, b in ctx.pairs:
            n_clusters = min(o.n_clusters, int((~stats.dead(a)).sum() + (~stats.dead(b)).sum()))
            if n_clusters < 2:  # fewer than two live units: nothing to cluster; scored 0
                res.shared_fraction[(a, b)] = res.within_corr[(a, b)] = res.random_corr[(a, b)] = 0.0
                continue
            labels = clustering.spectral_clusters(
                stats, a, b, n_clusters, affinity=o.affinity, seed=seed, assign_labels=o.assign_labels
            )
            summary = clustering.spectral_summary(stats, labels, a=a, b=b, seed=seed)
            res.labels[(a, b)] = labels.cpu().numpy() if hasattr(labels, "cpu") else np.asarray(labels)
            res.order[(a, b)] = np.asarray(summary["order"])
            res.boundaries[(a, b)] = np.asarray(summary["boundaries"])
            res.shared_fraction[(a, b)] = float(summary["shared_fraction"])
            res.within_corr[(a, b)] = _finite(summary["within_cluster_corr"])
            res.random_corr[(a, b)] = _finite(summary["random_within_cluster_corr"])
        return res
