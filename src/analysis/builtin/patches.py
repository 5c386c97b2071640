"""Unit visualisations: each conv unit's top activations and where they are (probe image, y, x),
for the heavy pairs' members; the figure shows the max-matched pairs' receptive-field patches."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from convergent.analysis.registry import Analysis, Needs, Result, register_analysis
from convergent.errors import ConfigError


@dataclass
class PatchesOptions:
    """Options of the unit visualisations (config group `analysis.patches`)."""

    top_k: int = 9  # top activating positions kept per unit
    pairs: int = 8  # top and bottom max-matched pairs drawn

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.pairs < 1:
            raise ConfigError(f"analysis.patches.top_k={self.top_k} and analysis.patches.pairs={self.pairs} must be >= 1")


@dataclass
class PatchesResult(Result):
    layer: str
    top: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # member -> (values [C, k], (image, y, x) [C, k, 3])

    def arrays(self):
        out: dict[str, np.ndarray] = {}
        for i, (values, index) in self.top.items():
            out[f"{self.layer}/top_value/m{i}"] = values.cpu().numpy()
            out[f"{self.layer}/top_index/m{i}"] = index.cpu().numpy()
        return out


@register_analysis
class Patches(Analysis):
    name = "patches"
    heavy = True
    needs = Needs(top=True)
    options = PatchesOptions
    description = "top activations of every conv unit (the patches figure of max-matched pairs)"

    def layers(self, plan):
        return plan.conv_layers

    def run(self, ctx) -> PatchesResult:
        return PatchesResult(ctx.layer, dict(ctx.stats.top or {}))
