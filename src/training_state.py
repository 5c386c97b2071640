"""Is a checkpoint at the end of training? Lightning's own stopping rule, read off the checkpoint.

Resuming a finished run must change nothing (no W&B segment, no CSV rewrite, no new checkpoint),
so `convergent-train` decides before it builds loggers or a Trainer, with the rule of
`pytorch_lightning.loops.fit_loop._FitLoop.done` (Lightning 2.x): training stops when
`global_step >= max_steps` (unless -1) or when the processed epochs reach `max_epochs` (unless -1;
None means 1000 when max_steps is -1 too, else no limit). A `trainer.max_time` limit, early
stopping and `limit_train_batches=0` are left to Lightning (never "finished" here).
"""

from __future__ import annotations

from pathlib import Path


def epochs_processed(checkpoint: dict) -> int:
    """Epochs whose end Lightning processed (the counter its stopping rule reads)."""
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(checkpoint.get("epoch", 0))


def limits(trainer_cfg: dict) -> tuple[int, int]:
    """(max_steps, max_epochs) as Lightning resolves them (-1: no limit)."""
    max_steps = trainer_cfg.get("max_steps")
    max_steps = -1 if max_steps is None else int(max_steps)
    max_epochs = trainer_cfg.get("max_epochs")
    if max_epochs is None:
        max_epochs = 1000 if max_steps == -1 and trainer_cfg.get("max_time") is None else -1
    return max_steps, int(max_epochs)


def finished(checkpoint: dict, trainer_cfg: dict) -> str | None:
    """Why training from this checkpoint would stop at once ('trainer.max_steps=10 reached'), or None."""
    if trainer_cfg.get("max_time") is not None:
        return None
    max_steps, max_epochs = limits(trainer_cfg)
    step, epochs = int(checkpoint.get("global_step", 0)), epochs_processed(checkpoint)
    if max_steps != -1 and step >= max_steps:
        return f"trainer.max_steps={max_steps} reached"
    if max_epochs != -1 and epochs >= max_epochs:
        return f"trainer.max_epochs={max_epochs} reached"
    return None


def finished_message(checkpoint: dict, trainer_cfg: dict, run_dir: Path, resumed: bool) -> str | None:
    """The one line `convergent-train` prints instead of training, or None when there is training left."""
    reason = finished(checkpoint, trainer_cfg)
    if reason is None:
        return None
    epochs = epochs_processed(checkpoint)
    at = f"step {int(checkpoint.get('global_step', 0))}, {epochs} epoch{'' if epochs == 1 else 's'}"
    more = "trainer.max_epochs=<more> (or trainer.max_steps=<more>)"
    if resumed:
        return (
            f"convergent: {run_dir} has finished training ({at}: {reason}); nothing changed. "
            f"To train it further: convergent-train resume={run_dir} {more}"
        )
    return f"convergent: the checkpoint is at the end of training ({at}: {reason}); nothing to train. Raise {more}"


def resumed_run_finished(run_dir: Path, overrides: list[str]) -> str | None:
    """For `convergent-train resume=<run_dir> <overrides>`, before Hydra writes anything into the
    run directory: the finished-run line when its last.ckpt is at the end of training under the
    recomposed config, else None (also when the config does not compose: Hydra then says why).
    Raises UnsafeCheckpoint for a last.ckpt that would need trust_checkpoint=true."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from convergent.checkpoint_io import load

    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    job_overrides = [o for o in overrides if not o.startswith("-") and not o.lstrip("+~").startswith("hydra.")]
    try:
        with initialize_config_dir(config_dir=str(Path(run_dir) / ".hydra"), version_base="1.3"):
            cfg = compose("config", overrides=job_overrides)
    except (HydraException, OmegaConfBaseException, ValueError):  # Hydra reports it when it composes the same config
        return None
    trust = bool(OmegaConf.select(cfg, "trust_checkpoint", default=False))
    checkpoint = load(last, trust=trust, trust_flag="trust_checkpoint=true", mmap=True)
    return finished_message(checkpoint, OmegaConf.to_container(cfg.trainer, resolve=True), Path(run_dir), resumed=True)
