"""Run directories built in this process (seconds) that the CLI accepts as its own: the training
of `tests.inprocess.train_in` plus the job config Hydra would have saved (`.hydra/config.yaml`,
what `convergent-train resume=` recomposes)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from tests.support import compose_train, single_thread, train_in


def train_saved(run_dir: Path, *overrides: str) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(compose_train(*overrides), run_dir / ".hydra" / "config.yaml")
    with single_thread():
        return train_in(run_dir, *overrides)


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to, symlinks=True)
    return to


def fingerprint(run_dir: Path) -> dict[str, str]:
    """Every file of a run directory (W&B's included) -> its md5: 'nothing changed' is equality."""
    out = {}
    for path in sorted(Path(run_dir).rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(run_dir))] = hashlib.md5(path.read_bytes()).hexdigest()
    return out
