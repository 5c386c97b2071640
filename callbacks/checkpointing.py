"""`checkpoints/last.ckpt`, always written atomically: at epoch ends (after an epoch's last batch,
see `ends_epoch`), after every analysis step (the monitor), and at once on SIGTERM.

SIGTERM (SLURM preemption, scancel, a node being drained): Lightning turns it into a
`SIGTERMException` after the current batch, on every rank; `on_exception` saves the checkpoint,
and `convergent-train` reports it and exits with status 0 so a requeued job (or `resume=`)
continues from it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException


def save_checkpoint_atomic(trainer: pl.Trainer, path: Path) -> None:
    """Every rank calls this; rank 0 writes a temporary file and renames it, so a kill during the
    write never leaves half a checkpoint at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    # weights_only=False: the full training state, said explicitly (Lightning logs a line otherwise)
    trainer.save_checkpoint(str(tmp), weights_only=False)  # rank 0 writes, then a barrier
    if trainer.is_global_zero:
        os.replace(tmp, path)


def save_step_checkpoints(
    trainer: pl.Trainer, ckpt_dir: Path, step: int, keep: bool, after_writes: Callable[[Callable[[], None]], None] | None = None
) -> None:
    """The checkpoints of analysis step `step`: `analysis/step=<step>.ckpt` (when `keep`, else a
    temporary one), written atomically now (every rank calls this), then published as `last.ckpt`.

    `after_writes(job)` runs `job` once everything the step handed to the background writer (its
    npz, tables, figures) is on disk; without it the copy happens at once. So `last.ckpt` never
    passes a step whose outputs are incomplete: a kill before they are written resumes from the
    previous checkpoint, which analyses the step again. In this order a kill between the two files
    also leaves last.ckpt at the previous checkpoint, so every logged step keeps the checkpoint of
    the values logged. (The other order could leave a step logged and resumed past without its own.)"""
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / "last.ckpt"
    kept = ckpt_dir / "analysis" / f"step={step}.ckpt" if keep else ckpt_dir / f".tmp-step={step}.ckpt"
    save_checkpoint_atomic(trainer, kept)
    if not trainer.is_global_zero:
        return

    def publish() -> None:
        if not keep:
            os.replace(kept, last)
            return
        # a copy (not a link: the next analysis step rewrites last.ckpt), renamed atomically
        tmp = last.with_name(f".tmp-{last.name}")
        with open(kept, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, last)

    (after_writes or (lambda job: job()))(publish)


def flush_analysis_writes(trainer: pl.Trainer) -> None:
    """Wait until the monitor's background writer has written every analysis step handed to it
    (and published their last.ckpt), so a last.ckpt written now is not overwritten by an older one."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        flush = getattr(callback, "flush_writes", None)
        if callable(flush):
            flush()


def ends_epoch(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Is this the epoch's last training batch? Epoch-end work that writes a checkpoint runs here,
    in on_train_batch_end: Lightning (2.x) resumes a checkpoint written in on_train_epoch_end one
    epoch too far (it re-runs that epoch's end, then skips the next epoch) and logs every later row
    one step late; from the last batch's end it resumes exactly."""
    total = trainer.num_training_batches
    return total != float("inf") and batch_idx + 1 >= total


class LastCheckpoint(pl.Callback):
    def __init__(self, run_dir: str | Path, every_n_epochs: int = 1) -> None:
        self.last = Path(run_dir) / "checkpoints" / "last.ckpt"
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.sigterm_step: int | None = None
        self._restored = False

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._restored = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        """Lightning (2.x) restores its logging step (`_batches_that_stepped`, the `step` of every
        train/val row) one too high from a checkpoint written after an epoch's end (on_train_epoch_end,
        or on_train_end when fit stopped at an epoch's end), so a resumed run would log every later
        row one step late, one more per resume. Between batches it equals the number of optimizer
        steps, i.e. the global step: put it back once, at the first batch after a restore."""
        if self._restored:
            self._restored = False
            loop = trainer.fit_loop.epoch_loop
            if pl_module.automatic_optimization and isinstance(getattr(loop, "_batches_that_stepped", None), int):
                loop._batches_that_stepped = int(trainer.global_step)

    def _save(self, trainer: pl.Trainer) -> None:
        """last.ckpt now, after the monitor's pending writes (their own last.ckpt copies come first)."""
        flush_analysis_writes(trainer)
        save_checkpoint_atomic(trainer, self.last)

    def _epoch_due(self, trainer: pl.Trainer) -> bool:
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        if ends_epoch(trainer, batch_idx) and self._epoch_due(trainer):
            self._save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.num_training_batches == float("inf") and self._epoch_due(trainer):  # no known last batch
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._save(trainer)
            self.sigterm_step = int(trainer.global_step)
