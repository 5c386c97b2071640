"""Streaming statistics of post-ReLU activations (torchmetrics metrics, exact across processes)."""

from convergent.stats.histogram import JointHistogram, UnitBins
from convergent.stats.moments import Moments, MomentStats, estimate_state_bytes, flatten_samples
from convergent.stats.topk import TopActivations, crop_patch

__all__ = [
    "JointHistogram",
    "MomentStats",
    "Moments",
    "TopActivations",
    "UnitBins",
    "crop_patch",
    "estimate_state_bytes",
    "flatten_samples",
]
