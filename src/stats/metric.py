"""The base of every streaming statistic: a torchmetrics Metric that is not a score (no
gradient, no direction, states merged by their reductions only), and `SumStates`, whose states are
sums of fixed shape."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class StreamingMetric(Metric):
    """A Metric used as an accumulator of exact sums (torchmetrics' flags for that, in one place)."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = None


class SumStates(StreamingMetric):
    """A Metric whose states are sums of fixed shape.

    torchmetrics keeps a deep copy of every state as its reset value; for moment matrices that
    doubles the memory. Here the reset values are 0-dim zeros and `reset()` zeroes in place."""

    def add_sum_state(self, name: str, shape, dtype: torch.dtype = torch.float64, reduce: str = "sum") -> None:
        self.add_state(name, torch.zeros((), dtype=dtype), dist_reduce_fx=reduce)
        setattr(self, name, torch.zeros(shape, dtype=dtype, device=self.device))

    def reset(self) -> None:
        self._update_count = 0
        self._forward_cache = None
        self._computed = None
        self._cache = None
        self._is_synced = False
        for name in self._defaults:
            getattr(self, name).zero_()

    def state_bytes(self) -> int:
        """Bytes held by this accumulator's states."""
        return sum(t.numel() * t.element_size() for t in self.metric_state.values() if isinstance(t, Tensor))
