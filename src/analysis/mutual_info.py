"""Mutual information between units of two nets, from joint bin counts (Li et al. 2015, sec. 3).

Pure functions on tensors: the counts come from `convergent.stats.histogram.JointHistogram`
(ten bins per unit: the ReLU zeros and nine equal-count bins of the positive values).

    mi = mutual_information(counts)          # [Ca, Cb] nats
    index, value = mi_semi_match(mi)         # each unit of a's best unit of b by MI
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from convergent.stats.histogram import JointHistogram, UnitBins

# Rows of `counts` turned into float64 temporaries at a time (bounds memory for wide layers).
_ROW_ELEMENTS = 1 << 24


def _plogp_sum(p: Tensor, dims: tuple[int, ...]) -> Tensor:
    """sum p log p over `dims`, with 0 log 0 = 0."""
    return torch.xlogy(p, p).sum(dims)


def mutual_information(counts: Tensor) -> Tensor:
    """MI in nats of the binned units, from joint counts ``[..., B, B]`` -> ``[...]`` float64.

    For counts ``[Ca, Cb, B, B]`` (``counts[u, v, p, q]`` = samples with unit u in bin p and unit v
    in bin q) returns ``[Ca, Cb]``. Computed as ``H(A) + H(B) - H(A, B)`` of the empirical
    distribution in float64 with 0 log 0 = 0: never NaN, 0 for pairs without samples, clamped
    at 0 against rounding.
    """
    if counts.dim() < 2 or counts.shape[-1] < 1 or counts.shape[-2] < 1:
        raise ValueError(f"counts must be [..., B, B], got shape {tuple(counts.shape)}")
    lead = counts.shape[:-2]
    flat = counts.reshape(-1, *counts.shape[-2:])
    out = torch.empty(flat.shape[0], dtype=torch.float64, device=counts.device)
    per_row = max(1, _ROW_ELEMENTS // max(1, flat.shape[-1] * flat.shape[-2]))
    for start in range(0, flat.shape[0], per_row):
        c = flat[start : start + per_row].to(torch.float64)
        n = c.sum((-1, -2))
        p = c / n.clamp_min(1.0)[:, None, None]
        joint = _plogp_sum(p, (-1, -2))
        pa = _plogp_sum(p.sum(-1), (-1,))
        pb = _plogp_sum(p.sum(-2), (-1,))
        mi = joint - pa - pb  # = sum p log p - sum pa log pa - sum pb log pb
        out[start : start + per_row] = torch.where(n > 0, mi, torch.zeros_like(mi)).clamp_min(0.0)
    return out.reshape(lead)


def marginal_entropies(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Entropies (nats, float64) of the binned units of both nets: ``([Ca], [Cb])`` from
    ``[Ca, Cb, B, B]`` counts (read off the first column / row of pairs)."""
    if counts.dim() != 4:
        raise ValueError(f"counts must be [Ca, Cb, B, B], got shape {tuple(counts.shape)}")

    def entropy(m: Tensor) -> Tensor:
        m = m.to(torch.float64)
        p = m / m.sum(-1, keepdim=True).clamp_min(1.0)
        return -_plogp_sum(p, (-1,))

    return entropy(counts[:, 0].sum(-1)), entropy(counts[0].sum(-2))


def mi_semi_match(mi: Tensor) -> tuple[Tensor, Tensor]:
    """Each row unit's best column unit by MI: ``(index [Ca] int64, value [Ca])``.

    Ties go to the lowest column index (deterministic on every device).
    """
    if mi.dim() != 2 or mi.shape[1] < 1:
        raise ValueError(f"mi must be [Ca, Cb] with Cb >= 1, got shape {tuple(mi.shape)}")
    value = mi.max(dim=1).values
    cols = torch.arange(mi.shape[1], device=mi.device).expand_as(mi)
    index = torch.where(mi == value[:, None], cols, torch.full_like(cols, mi.shape[1])).min(dim=1).values
    return index, value


def mutual_information_from_arrays(
    xa: Tensor | np.ndarray,
    xb: Tensor | np.ndarray,
    batch_size: int = 256,
    n_fine: int | None = None,
    n_positive_bins: int | None = None,
    zero_threshold: float | None = None,
    product_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """MI ``[Ca, Cb]`` (nats, float64) between the units of two activation arrays in memory.

    ``xa``, ``xb``: ``[N, C]`` or ``[N, C, H, W]`` (numpy or torch; same N and spatial shape;
    every position of every image a sample). Runs both passes (`UnitBins` then `JointHistogram`)
    over batches of ``batch_size`` images on the arrays' device. The optional binning arguments
    default to those of `UnitBins`.
    """
    xa = torch.as_tensor(xa)
    xb = torch.as_tensor(xb)
    if xa.shape[0] != xb.shape[0]:
        raise ValueError(f"xa and xb need the same number of samples, got {xa.shape[0]} and {xb.shape[0]}")
    options = {
        key: value
        for key, value in (("n_fine", n_fine), ("n_positive_bins", n_positive_bins), ("zero_threshold", zero_threshold))
        if value is not None
    }
    sizes: Sequence[int] = (xa.shape[1], xb.shape[1])
    bins = UnitBins(sizes, **options).to(xa.device)
    for start in range(0, xa.shape[0], batch_size):
        bins.update(xa[start : start + batch_size], xb[start : start + batch_size])
    edges = bins.compute()
    joint = JointHistogram(sizes, edges, product_dtype=product_dtype).to(xa.device)
    for start in range(0, xa.shape[0], batch_size):
        joint.update(xa[start : start + batch_size], xb[start : start + batch_size])
    return mutual_information(joint.compute()[(0, 1)])
