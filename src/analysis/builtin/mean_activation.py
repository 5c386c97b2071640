"""Mean activations (the paper's analysis 8): each unit's mean over the probe set, per member."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from convergent.analysis.registry import Analysis, Output, Result, register_analysis


@dataclass
class MeanActivationResult(Result):
    layer: str
    means: dict[int, Tensor] = field(default_factory=dict)  # member -> [C]

    def scalars(self):
        means = torch.stack(list(self.means.values()))
        return {
            f"act/{self.layer}/mean": float(means.mean()),
            f"act/{self.layer}/top_unit_mean": float(means.max(dim=1).values.mean()),
        }

    def arrays(self):
        return {f"{self.layer}/mean/m{i}": m.cpu().numpy() for i, m in self.means.items()}


@register_analysis
class MeanActivation(Analysis):
    name = "mean_activation"
    description = "mean activation per unit and member; the most active unit's mean"

    def outputs(self, plan, layer):
        return [Output(f"act/{layer}/mean", "value"), Output(f"act/{layer}/top_unit_mean", "value")]

    def run(self, ctx) -> MeanActivationResult:
        stats = ctx.stats.all
        return MeanActivationResult(ctx.layer, {i: stats.mean(i) for i in range(ctx.plan.k)})
