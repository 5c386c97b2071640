"""Reusable work buffers for the streaming statistics.

Allocating ~100 MB of temporaries per probe batch costs as much as the arithmetic and, with
glibc's heap, leaves fragments that make the process grow over a long pass. A buffer is used
only inside one `update`, so every accumulator of the process can share it: the work memory is
that of the largest layer, not the sum over every accumulator and split.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch
from torch import Tensor

# One buffer per (name, dtype, device) for the whole process.
_BUFFERS: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}


def scratch(name: str, shape, dtype: torch.dtype, device) -> Tensor:
    """A contiguous tensor of `shape` (contents undefined) backed by the shared buffer `name`;
    valid until the next call with the same name. Grows, never shrinks."""
    numel = 1
    for d in shape:
        numel *= int(d)
    key = (name, dtype, torch.device(device))
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < numel:
        _BUFFERS.pop(key, None)  # free the smaller one first
        buf = _BUFFERS[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(*shape)


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc; elsewhere nothing). A probe pass frees
    hundreds of MB of activations and temporaries; without this, glibc keeps them in a heap
    whose fragments make the process's resident memory creep from one analysis step to the next
    (measured: +140 MiB over 12 passes of the main job's probe set). Costs page faults when the
    memory is used again, so call it between passes, not per batch."""
    if _TRIM is not None:
        _TRIM(0)
