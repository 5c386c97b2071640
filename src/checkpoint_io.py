"""Checkpoints load without running code: `torch.load(weights_only=True)`, with an explicit allowlist.

A checkpoint is a pickle; unpickling an untrusted one can run anything (PyTorch made
`weights_only=True` its default for this reason). Every load of the project goes through here:
`convergent-analyze`, and `convergent-train` resuming (`resume=`, `ckpt_path=`, a requeued job),
where Lightning's own load (`trainer.fit(ckpt_path=..., weights_only=True)`,
`Ensemble.load_from_checkpoint(..., weights_only=True)`) runs inside `allowed()`.

What our checkpoints hold, measured (`torch.serialization.get_unsafe_globals_in_checkpoint` on the
per-step, epoch-end, end-of-fit and SIGTERM checkpoints of real runs, Adam and SGD, cosine and step
schedules, explicit seeds, gradient clipping, the vectorised ensemble): tensors, dicts, lists,
tuples, strings and numbers only, nothing outside what torch's weights-only unpickler allows by
default (hyperparameters are plain containers: `convergent-train` converts the OmegaConf config
with `OmegaConf.to_container` before it reaches the module). So `SAFE_GLOBALS`, the project's
additions to torch's defaults, is empty; a test holds every checkpoint a run writes to it.

A checkpoint that needs any other global is refused before anything of it is unpickled, with one
line naming the global(s), unless the user says it is trusted: `--trust-checkpoint`
(convergent-analyze) or `trust_checkpoint=true` (convergent-train); then it loads with
`weights_only=False`, as before.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from pathlib import Path

import torch

from convergent.errors import ConfigError

# Globals the project's checkpoints need beyond torch's weights-only defaults (measured: none).
SAFE_GLOBALS: tuple = ()


class UnsafeCheckpoint(ConfigError):
    """A checkpoint whose pickle needs globals outside the allowlist (loading it could run code)."""


@contextlib.contextmanager
def allowed():
    """torch's weights-only unpickler with the project's allowlist (for Lightning's own loads)."""
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        yield


def unsafe_globals(path: str | Path) -> list[str]:
    """The globals in the checkpoint's pickle that weights-only loading does not allow, read
    statically (nothing is unpickled). Raises ConfigError for a file that is not a checkpoint."""
    try:
        with allowed():
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except ValueError as e:  # not a zip checkpoint (torch.save's format since 1.6), or TorchScript
        raise ConfigError(f"{path} is not a checkpoint written by convergent-train ({e})") from None
    except (OSError, RuntimeError, KeyError) as e:
        raise ConfigError(f"{path} could not be read as a checkpoint ({type(e).__name__}: {e})") from None


def refusal(path: str | Path, names: list[str], trust_flag: str) -> UnsafeCheckpoint:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return UnsafeCheckpoint(
        f"refusing to load {path}: its pickle needs {shown}, which no checkpoint of convergent-train holds "
        f"(loading it could run code); pass {trust_flag} only if you trust where it came from"
    )


def check(path: str | Path, trust: bool = False, trust_flag: str = "--trust-checkpoint") -> None:
    """Refuse (UnsafeCheckpoint, one line) a checkpoint that needs globals outside the allowlist."""
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint {path} does not exist; pass a .ckpt written by convergent-train")
    if trust:
        return
    names = unsafe_globals(path)
    if names:
        raise refusal(path, names, trust_flag)


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def load(
    path: str | Path, trust: bool = False, trust_flag: str = "--trust-checkpoint", map_location="cpu", mmap: bool = False
) -> dict:
    """The checkpoint's contents, loaded weights-only (or fully when trusted). `mmap=True` maps the
    tensors instead of reading them (to read a few fields of a large checkpoint)."""
    check(path, trust, trust_flag)
    if trust:
        return torch.load(str(path), map_location=map_location, weights_only=False, mmap=mmap)
    try:
        with allowed():
            return torch.load(str(path), map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # a global the static scan cannot see (pushed at run time)
        found = _UNSUPPORTED_GLOBAL.search(str(e))
        raise refusal(path, [found.group(1) if found else str(e).splitlines()[0]], trust_flag) from None


def step_of(checkpoint: dict) -> int:
    return int(checkpoint.get("global_step", 0))


def load_ensemble(path: str | Path, trust: bool = False, trust_flag: str = "--trust-checkpoint"):
    """(Ensemble, global step) of a checkpoint, through Lightning's `load_from_checkpoint`,
    weights-only unless trusted."""
    from convergent.ensemble import Ensemble

    step = step_of(load(path, trust, trust_flag, mmap=True))
    with allowed():
        ensemble = Ensemble.load_from_checkpoint(str(path), map_location="cpu", weights_only=not trust)
    return ensemble, step


def run_checkpoint_io(trust: bool = False):
    """Lightning's checkpoint reads and writes for `convergent-train` (`Trainer(plugins=[...])`):

    - reads (`trainer.fit(ckpt_path=...)`, on every rank) go through `load`: weights-only, refused
      in one line if the checkpoint needs more, unless `trust_checkpoint=true`;
    - writes are `torch.save` straight into the path given, which `save_checkpoint_atomic` names
      `.tmp-<name>` beside the target and renames. Lightning's default writes into a temporary
      file of the system temp directory and moves it: a killed write there left a checkpoint-sized
      file outside the run directory, and a move across filesystems is a copy."""
    from pytorch_lightning.plugins.io import TorchCheckpointIO

    class RunCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
            if storage_options is not None:
                raise TypeError("convergent's checkpoint IO takes no storage_options")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                torch.save(checkpoint, f)

        def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
            return load(path, trust=trust, trust_flag="trust_checkpoint=true", map_location=map_location or "cpu")

    return RunCheckpointIO()
