"""Functional convergence (`convergent.functional`): do two members compute the same function once
their units are matched? For the heavy pairs at full analysis steps: the loss barrier and midpoint
accuracy of the linear interpolation between them - naive, after matching b's units to a's by
activations, matched + REPAIR, and matched by weights (Git Re-Basin) - and the accuracy of a's
lower layers stitched into b's upper ones at every analysed layer (by the matching permutation and
by the least-squares map from the moments this step already holds).

``func/barrier/{method}``, ``func/mid_acc/{method}``, ``func/{layer}/stitch_acc/{map}`` and
``func/{layer}/stitch_penalty/{map}`` (b's own accuracy minus the stitched one), each per pair and
pair-averaged; the loss and accuracy along t in the npz (``func/curve/...``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convergent.analysis.registry import Analysis, Needs, Output, Pair, Result, pair_suffix, register_analysis
from convergent.errors import ConfigError

METHODS = ("naive", "matched", "repair", "weight")
MAPS = ("perm", "lstsq", "trained")


@dataclass
class FunctionalOptions:
    """Options of the functional analyses (config group `analysis.functional`)."""

    points: int = 11  # values of t in [0, 1] where the interpolated nets are evaluated (0.5 always among them)
    methods: list[str] = field(default_factory=lambda: list(METHODS))  # interpolations: naive, matched, repair, weight
    stitch_maps: list[str] = field(default_factory=lambda: ["perm", "lstsq"])  # perm, lstsq (trained: with trained_steps)
    trained_steps: int = 0  # > 0: also a stitching map fitted with that many Adam steps (off by default: slow)

    def __post_init__(self) -> None:
        if self.points < 3:
            raise ConfigError(f"analysis.functional.points={self.points} must be >= 3 (the ends and the midpoint)")
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(f"analysis.functional.methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
        for m in self.stitch_maps:
            if m not in MAPS:
                raise ConfigError(f"analysis.functional.stitch_maps: unknown map {m!r}; choose from {', '.join(MAPS)}")
        if self.trained_steps < 0:
            raise ConfigError(f"analysis.functional.trained_steps={self.trained_steps} must be >= 0")
        if "trained" in self.stitch_maps and self.trained_steps == 0:
            raise ConfigError("analysis.functional.stitch_maps has 'trained': set analysis.functional.trained_steps > 0")

    def maps(self) -> list[str]:
        return list(self.stitch_maps) + (["trained"] if self.trained_steps > 0 and "trained" not in self.stitch_maps else [])


@dataclass
class FunctionalStepResult(Result):
    results: dict[Pair, Any] = field(default_factory=dict)  # pair -> convergent.functional.FunctionalResult

    def scalars(self) -> dict[str, dict[Pair, float]]:
        out: dict[str, dict[Pair, float]] = {}
        for pair, r in self.results.items():
            for key, value in r.scalars().items():
                out.setdefault(key, {})[pair] = value
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"{k}/{pair_suffix(*pair)}": v for pair, r in self.results.items() for k, v in r.arrays().items()}

    @property
    def seconds(self) -> float:
        return float(sum(sum(r.seconds.values()) for r in self.results.values()))


@register_analysis
class Functional(Analysis):
    name = "functional"
    heavy = True
    per_layer = False
    needs = Needs(members=True)
    options = FunctionalOptions
    description = "loss barriers of interpolated members (naive, matched, REPAIR, weight-matched) and stitching at every layer"

    def outputs(self, plan, layer):
        o = plan.config.functional
        out = [Output(f"func/{kind}/{m}") for m in o.methods for kind in ("barrier", "mid_acc")]
        for l in plan.layers:
            for m in o.maps():
                out += [Output(f"func/{l}/stitch_acc/{m}"), Output(f"func/{l}/stitch_penalty/{m}")]
        return out

    def run(self, ctx) -> FunctionalStepResult:
        from convergent.functional import evaluate_pair

        if ctx.members is None or ctx.batches is None:
            raise ValueError("functional needs the members and their probe batches: analyse(..., members=, batches=)")
        o = ctx.plan.config.functional
        res = FunctionalStepResult()
        # the monitor's moments over the same probe images (layers kept whole: no max_units subset)
        stats = {layer: ls.all for layer, ls in ctx.probe.layers.items() if ls.units is None}
        for a, b in ctx.pairs:
            res.results[(a, b)] = evaluate_pair(
                ctx.members[a],
                ctx.members[b],
                ctx.batches(),
                points=o.points,
                layers=ctx.plan.layers,
                stats=stats,
                pair=(a, b),
                methods=o.methods,
                stitch_maps=[m for m in o.stitch_maps if m != "trained"],
                trained_steps=o.trained_steps,
                seed=ctx.plan.config.seed,
            )
        return res
