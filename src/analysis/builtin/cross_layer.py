"""Layer x layer similarity between members, and layer identification (Kornblith et al. 2019): the
fraction of a's layers whose most similar layer of b is the same layer. Conv and fc layers differ
in spatial size, so it works on image-level features: each conv tap averaged over space per image."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from convergent.analysis.measures import SampleSizeWarning
from convergent.analysis.registry import Analysis, Needs, Output, Pair, Result, pair_suffix, register_analysis


def measure_label(name: str) -> str:
    """cka/linear -> cka_linear (the keys' and figures' label of a measure)."""
    return name.replace("/", "_")


@dataclass
class CrossLayerResult(Result):
    layers: list[str]
    matrices: dict[str, dict[Pair, np.ndarray]] = field(default_factory=dict)  # measure label -> pair -> [layers, layers]
    identified: dict[str, dict[Pair, float]] = field(default_factory=dict)

    def scalars(self):
        return {f"layer_id/{label}": values for label, values in self.identified.items()}

    def arrays(self):
        return {
            f"cross_layer/{label}/{pair_suffix(a, b)}": m
            for label, per_pair in self.matrices.items()
            for (a, b), m in per_pair.items()
        }


def _measures(plan):
    return [m for m in plan.measures if m.cross_layer]


@register_analysis
class CrossLayer(Analysis):
    name = "cross_layer"
    heavy = True
    per_layer = False
    needs = Needs(pooled=True)
    description = "layer x layer similarity on image-level features for every cross-layer measure; layer identification"

    def outputs(self, plan, layer):
        return [Output(f"layer_id/{measure_label(m.name)}") for m in _measures(plan)]

    def run(self, ctx) -> CrossLayerResult:
        plan, probe = ctx.plan, ctx.probe
        layers = plan.layers
        res = CrossLayerResult(layers)
        index = probe.pooled_index
        for m in _measures(plan):
            fn, label = m.bind(plan.config), measure_label(m.name)
            res.matrices[label], res.identified[label] = {}, {}
            for a, b in ctx.pairs:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", SampleSizeWarning)
                    mat = np.array([[fn(probe.pooled, index[(la, a)], index[(lb, b)]) for lb in layers] for la in layers])
                res.matrices[label][(a, b)] = mat
                res.identified[label][(a, b)] = float(np.mean(np.argmax(mat, axis=1) == np.arange(len(layers))))
        return res
