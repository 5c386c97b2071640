"""One-to-one alignment of two nets' units from their correlation matrix (paper analyses 2-3)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from convergent.analysis._arrays import as_tensor, like_input


def semi_match(corr) -> tuple:
    """Each row unit's best column unit (row argmax); several rows may share a column.

    Returns ``(index, value)``: index[i] is the column matched to row i, value[i] its correlation.
    """
    c = as_tensor(corr)
    _check_matrix(c)
    value, index = c.max(dim=1)
    return like_input(corr, index), like_input(corr, value)


def max_match(corr) -> tuple:
    """One-to-one assignment maximising the total correlation (Hungarian algorithm).

    Rectangular matrices match min(rows, cols) units. Returns ``(index, value)`` over rows:
    index[i] is row i's partner column, or -1 for rows left unmatched (value 0 there).
    """
    c = as_tensor(corr)
    _check_matrix(c)
    rows, cols = linear_sum_assignment(c.detach().cpu().numpy(), maximize=True)
    index = torch.full((c.shape[0],), -1, dtype=torch.long)
    index[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    value = torch.zeros(c.shape[0], dtype=c.dtype)
    value[torch.from_numpy(rows)] = c.cpu()[torch.from_numpy(rows), torch.from_numpy(cols)]
    return like_input(corr, index.to(c.device)), like_input(corr, value.to(c.device))


def within_max(corr_within) -> Tensor:
    """Within-net baseline: each unit's highest correlation with another unit of its own net.

    Dead units (all-zero rows) score 0."""
    c = as_tensor(corr_within).clone()
    _check_matrix(c)
    if c.shape[0] != c.shape[1]:
        raise ValueError(f"within-net correlation must be square, got {tuple(c.shape)}")
    if c.shape[0] < 2:
        return like_input(corr_within, torch.zeros(c.shape[0], dtype=c.dtype))
    c.fill_diagonal_(-np.inf)
    return like_input(corr_within, c.max(dim=1).values)


def same_pair_fraction(semi_index, max_index) -> float:
    """Fraction of rows whose semi-matching partner is also their max-matching partner."""
    a, b = as_tensor(semi_index), as_tensor(max_index)
    return float((a == b).double().mean()) if a.numel() else 0.0


def permute_to_matching(corr, max_index) -> Tensor:
    """Columns reordered so that each row's max-matching partner sits on the diagonal
    (rows without a partner keep the leftover columns, in order)."""
    c = as_tensor(corr)
    idx = as_tensor(max_index).cpu()
    matched = [int(j) for j in idx if j >= 0]
    taken = set(matched)
    rest = [j for j in range(c.shape[1]) if j not in taken]
    order = torch.tensor(matched + rest, dtype=torch.long)
    rows = torch.cat([torch.nonzero(idx >= 0).flatten(), torch.nonzero(idx < 0).flatten()])
    return like_input(corr, c[rows.to(c.device)][:, order.to(c.device)])


def _check_matrix(c: Tensor) -> None:
    if c.dim() != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"expected a non-empty 2-D correlation matrix, got shape {tuple(c.shape)}")
    if not torch.isfinite(c).all():
        raise ValueError("correlation matrix has NaN or inf entries; compute it with MomentStats.corr (dead units -> 0)")
