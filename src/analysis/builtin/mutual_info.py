"""Mutual information between units (the paper's analysis 4): 10 bins per unit (the ReLU zeros and
nine equal-count bins of the positive values), joint counts from a second probe pass, MI in nats.

``mi/{layer}/semi_match``: the mean over a's units of the MI with their best unit of b, calibrated
like every measure (the null re-pairs images; ``above_null`` takes the MI of a unit with itself,
its entropy, as the perfect value). ``mi/{layer}/same_as_corr``: the fraction of a's units whose
best partner by MI is their best partner by correlation (the paper: qualitatively the same).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from convergent.analysis.calibration import Calibrated, calibrate
from convergent.analysis.mutual_info import marginal_entropies, mi_semi_match, mutual_information
from convergent.analysis.registry import Analysis, Needs, Output, Pair, Result, pair_suffix, register_analysis
from convergent.stats.layer import CountViews


@dataclass
class MutualInfoOptions:
    """Options of mutual information (config group `analysis.mutual_info`)."""

    layers: Any = "conv"  # conv | all | [conv1, fc6]: fc layers have one sample per image, too few for 10 x 10 bins
    positions: int | None = 16  # positions per image (a fixed random subset; null: all)


def mi_semi_match_score(counts: dict[Pair, Tensor], a: int, b: int) -> float:
    return float(mi_semi_match(mutual_information(counts[(a, b)]))[1].mean())


@dataclass
class MutualInfoResult(Result):
    layer: str
    mi: dict[Pair, Tensor] = field(default_factory=dict)  # [C_a, C_b] nats
    best: dict[Pair, Tensor] = field(default_factory=dict)  # a's best partner by MI
    semi_match: Calibrated | None = None
    same_as_corr: dict[Pair, float] = field(default_factory=dict)

    def scalars(self):
        out: dict[str, Any] = {f"mi/{self.layer}/same_as_corr": self.same_as_corr}
        if self.semi_match is not None:
            out[f"mi/{self.layer}/semi_match"] = self.semi_match
        return out

    def arrays(self):
        out: dict[str, np.ndarray] = {}
        for (a, b), mi in self.mi.items():
            out[f"{self.layer}/mi/{pair_suffix(a, b)}"] = mi.cpu().numpy()
            out[f"{self.layer}/mi_semi_index/{pair_suffix(a, b)}"] = self.best[(a, b)].cpu().numpy()
        return out


@register_analysis
class MutualInfo(Analysis):
    name = "mutual_info"
    heavy = True
    needs = Needs(histograms=True)
    requires = ("correlation",)
    options = MutualInfoOptions
    description = "mutual information of binned units, semi-matching on MI, agreement with correlation"

    def layers(self, plan):
        from convergent.analysis.plan import resolve_layers

        return resolve_layers(plan.config.mutual_info.layers, plan.layers, "analysis.mutual_info.layers")

    def check(self, plan) -> None:
        self.layers(plan)

    def outputs(self, plan, layer):
        return [Output(f"mi/{layer}/semi_match", "measure"), Output(f"mi/{layer}/same_as_corr")]

    def run(self, ctx) -> MutualInfoResult:
        counts = ctx.stats.mi
        res = MutualInfoResult(ctx.layer)
        views = CountViews(counts, ctx.plan.interval_groups, ctx.plan.config.null.draws)
        full = views.full()
        entropy = []
        for a, b in ctx.pairs:
            res.mi[(a, b)] = mutual_information(full[(a, b)])
            index, _ = mi_semi_match(res.mi[(a, b)])
            res.best[(a, b)] = index
            corr_index = ctx.deps["correlation"].semi[(a, b)][0]
            res.same_as_corr[(a, b)] = float((index.cpu() == corr_index.cpu()).double().mean())
            entropy.append(float(marginal_entropies(full[(a, b)])[0].mean()))
        null_pairs = ctx.plan.null_pairs_of(ctx.pairs) if counts.null else []
        res.semi_match = calibrate(
            mi_semi_match_score, views, ctx.pairs, null_pairs, ctx.plan.config.interval.level, perfect=float(np.mean(entropy))
        )
        return res
