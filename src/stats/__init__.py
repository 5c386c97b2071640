"""Streaming statistics of post-ReLU activations (torchmetrics metrics, exact across processes)."""

from convergent.stats.moments import MomentStats, Moments, estimate_state_bytes, flatten_samples

__all__ = ["Moments", "MomentStats", "estimate_state_bytes", "flatten_samples"]
