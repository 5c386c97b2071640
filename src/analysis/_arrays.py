"""Analyses accept torch tensors or numpy arrays and answer in the same kind."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def as_tensor(x) -> Tensor:
    if isinstance(x, Tensor):
        return x
    return torch.as_tensor(np.asarray(x))


def like_input(reference, result: Tensor):
    """`result` as a numpy array when the caller passed numpy, else as a tensor."""
    if isinstance(reference, Tensor):
        return result
    return result.detach().cpu().numpy()
