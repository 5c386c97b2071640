"""`checkpoints/last.ckpt`, always written atomically: at epoch ends, after every analysis step
(the monitor), and at once on SIGTERM.

SIGTERM (SLURM preemption, scancel, a node being drained): Lightning turns it into a
`SIGTERMException` after the current batch, on every rank; `on_exception` saves the checkpoint,
and `convergent-train` reports it and exits with status 0 so a requeued job (or `resume=`)
continues from it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException


def save_checkpoint_atomic(trainer: pl.Trainer, path: Path) -> None:
    """Every rank calls this; rank 0 writes a temporary file and renames it, so a kill during the
    write never leaves half a checkpoint at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    trainer.save_checkpoint(str(tmp))  # rank 0 writes, then a barrier
    if trainer.is_global_zero:
        os.replace(tmp, path)


class LastCheckpoint(pl.Callback):
    def __init__(self, run_dir: str | Path, every_n_epochs: int = 1) -> None:
        self.last = Path(run_dir) / "checkpoints" / "last.ckpt"
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.sigterm_step: int | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            save_checkpoint_atomic(trainer, self.last)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        save_checkpoint_atomic(trainer, self.last)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            save_checkpoint_atomic(trainer, self.last)
            self.sigterm_step = int(trainer.global_step)
