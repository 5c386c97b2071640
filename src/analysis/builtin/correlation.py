"""Correlation and one-to-one matching (the paper's analyses 1-3).

Per layer and member pair: the between-net correlation, semi-matching (row argmax) and max
(Hungarian) matching; the within-net baseline and dead units. The matching scores are registered
measures (calibrated like every measure): ``align/{layer}/semi_match``, ``max_match`` and their
live-unit versions ``semi_match_live``, ``max_match_live`` (dead units of either net left out, so
a unit that never fires does not read as disagreement).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from convergent.analysis.matching import max_match, same_pair_fraction, semi_match, within_max
from convergent.analysis.registry import Analysis, Output, Pair, Result, pair_suffix, register_analysis, register_measure
from convergent.stats import MomentStats

_CORR_INVARIANCES = frozenset({"permutation", "isotropic_scaling", "translation"})


def semi_matching(stats: MomentStats, a: int, b: int) -> tuple[Tensor, Tensor]:
    """(index, value) of every unit of a's best partner in b (memoised on the stats)."""
    return stats.memo(("semi_match", a, b), lambda: semi_match(stats.corr(a, b)))


def max_matching(stats: MomentStats, a: int, b: int) -> tuple[Tensor, Tensor]:
    """(index, value) of the max matching of a's units to b's (-1: unmatched; memoised)."""
    return stats.memo(("max_match", a, b), lambda: max_match(stats.corr(a, b)))


def _live_corr(stats: MomentStats, a: int, b: int) -> Tensor:
    corr = stats.corr(a, b)
    return corr[~stats.dead(a)][:, ~stats.dead(b)]


def semi_match_score(stats: MomentStats, a: int, b: int) -> float:
    """Mean over a's units of the best correlation with any unit of b."""
    return float(semi_matching(stats, a, b)[1].mean())


def max_match_score(stats: MomentStats, a: int, b: int) -> float:
    """Mean matched correlation of the one-to-one (Hungarian) matching."""
    index, value = max_matching(stats, a, b)
    return float(value[index >= 0].mean())


def semi_match_live(stats: MomentStats, a: int, b: int) -> float:
    """Semi-matching over live units only: a's live units, each with its best live unit of b
    (0 when either net has no live unit)."""
    corr = _live_corr(stats, a, b)
    if corr.numel() == 0:
        return 0.0
    return float(corr.max(dim=1).values.mean())


def max_match_live(stats: MomentStats, a: int, b: int) -> float:
    """Max matching over live units only (0 when either net has no live unit)."""
    corr = _live_corr(stats, a, b)
    if corr.numel() == 0:
        return 0.0
    index, value = max_match(corr)
    return float(value[index >= 0].mean())


_MATCH = dict(analysis="correlation", invariances=_CORR_INVARIANCES, symmetric=False, value_range=(-1.0, 1.0))
# semi_match and max_match count a dead unit as a unit with correlation 0 (the paper's definition);
# the _live versions leave dead units out
register_measure(
    "align/semi_match",
    semi_match_score,
    description="mean over a's units of the best correlation with any unit of b (row argmax)",
    **{**_MATCH, "ignores_dead": False},
)
register_measure(
    "align/max_match",
    max_match_score,
    description="mean matched correlation of the one-to-one (Hungarian) matching",
    **{**_MATCH, "symmetric": True, "ignores_dead": False},
)
register_measure(
    "align/semi_match_live",
    semi_match_live,
    description="semi_match over live units of both nets (dead units left out)",
    **_MATCH,
)
register_measure(
    "align/max_match_live",
    max_match_live,
    description="max_match over live units of both nets (dead units left out)",
    **{**_MATCH, "symmetric": True},
)


@dataclass
class CorrelationResult(Result):
    layer: str
    corr: dict[Pair, Tensor] = field(default_factory=dict)
    semi: dict[Pair, tuple[Tensor, Tensor]] = field(default_factory=dict)  # index, value
    best: dict[Pair, tuple[Tensor, Tensor]] = field(default_factory=dict)  # max matching index (-1: none), value
    within: dict[int, Tensor] = field(default_factory=dict)  # within-net correlation (heavy pairs' members)
    dead: dict[int, Tensor] = field(default_factory=dict)
    std: dict[int, Tensor] = field(default_factory=dict)
    within_max: dict[Pair, float] = field(default_factory=dict)
    same_pair: dict[Pair, float] = field(default_factory=dict)
    dead_fraction: dict[Pair, float] = field(default_factory=dict)

    def scalars(self):
        key = f"align/{self.layer}"
        return {f"{key}/within_max": self.within_max, f"{key}/same_pair": self.same_pair, f"{key}/dead": self.dead_fraction}

    def arrays(self):
        out: dict[str, np.ndarray] = {}
        layer = self.layer
        for i in self.dead:
            out[f"{layer}/dead/m{i}"] = self.dead[i].cpu().numpy()
            out[f"{layer}/std/m{i}"] = self.std[i].cpu().numpy()
        for i, w in self.within.items():
            out[f"{layer}/within/m{i}"] = w.cpu().numpy()
        for (a, b), corr in self.corr.items():
            tag = pair_suffix(a, b)
            out[f"{layer}/corr/{tag}"] = corr.cpu().numpy()
            out[f"{layer}/semi_index/{tag}"] = self.semi[(a, b)][0].cpu().numpy()
            out[f"{layer}/semi_value/{tag}"] = self.semi[(a, b)][1].cpu().numpy()
            out[f"{layer}/max_index/{tag}"] = self.best[(a, b)][0].cpu().numpy()
            out[f"{layer}/max_value/{tag}"] = self.best[(a, b)][1].cpu().numpy()
        return out


@register_analysis
class Correlation(Analysis):
    name = "correlation"
    description = "correlation within and between nets, semi and max matching, within-net baseline, dead units"

    def outputs(self, plan, layer):
        return [Output(f"align/{layer}/{n}") for n in ("within_max", "same_pair", "dead")]

    def run(self, ctx) -> CorrelationResult:
        stats = ctx.stats.all
        res = CorrelationResult(ctx.layer)
        members = sorted({i for p in ctx.pairs for i in p})
        for i in members:
            res.dead[i] = stats.dead(i)
            res.std[i] = stats.std(i)
        for i in ctx.plan.heavy_members:
            res.within[i] = stats.corr(i, i)
        within = {i: within_max(stats.corr(i, i)) for i in members}
        for a, b in ctx.pairs:
            res.corr[(a, b)] = stats.corr(a, b)
            res.semi[(a, b)] = semi_matching(stats, a, b)
            res.best[(a, b)] = max_matching(stats, a, b)
            res.within_max[(a, b)] = float(within[a].mean())
            res.same_pair[(a, b)] = same_pair_fraction(res.semi[(a, b)][0], res.best[(a, b)][0])
            res.dead_fraction[(a, b)] = float(torch.cat([stats.dead(a), stats.dead(b)]).double().mean())
        return res
