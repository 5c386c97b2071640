"""`convergent-train`: train K members and monitor their convergence, configured by Hydra.

    convergent-train                                   # the main job: 4 x alexnet_small on mnist5k
    convergent-train -m model.width=0.25,0.5           # a multirun, one W&B run per job
    convergent-train resume=outputs/2026-11-26/10-00-00   # continue a killed run

Order of work: every check that can fail on bad input (config values, data paths, model size,
probe size, statistics memory) runs before anything is written to the run directory.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import SIGTERMException

from convergent import checkpoint_io, runlock, training_state
from convergent.config import TrainConfig, migrate_argv, trainer_arguments, validate
from convergent.distributed import configure_strategy
from convergent.ensemble import Ensemble
from convergent.errors import ConfigError
from convergent.loggers import WANDB_ENV, build_loggers
from convergent.runinfo import RunInfo, finished_summary, resume_argv, resume_overrides, resume_target, summarize
from convergent.sweep import sweep_identity

log = logging.getLogger("convergent")


@dataclass
class Job:
    """Everything built from the config before training starts."""

    cfg: DictConfig
    conf: TrainConfig  # the typed, checked config
    run_dir: Path
    datamodule: pl.LightningDataModule
    ensemble: Ensemble
    callbacks: list[pl.Callback]
    monitor: Any = None  # the ConvergenceMonitor, when on


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(os.getcwd())


def prepare(cfg: DictConfig, run_dir: Path) -> Job:
    """Build data, members and callbacks, checking everything a user can get wrong.
    Raises ConfigError (one line naming the problem and the fix); writes nothing."""
    from convergent.callbacks import ConvergenceMonitor, LastCheckpoint

    conf = validate(cfg)
    if conf.ckpt_path and not Path(conf.ckpt_path).exists():
        raise ConfigError(f"ckpt_path={conf.ckpt_path} does not exist; pass a checkpoint written by convergent-train")
    if conf.torch_threads:
        torch.set_num_threads(int(conf.torch_threads))
    pl.seed_everything(int(conf.seed), workers=True, verbose=False)
    datamodule = instantiate(OmegaConf.create(asdict(conf.data)) if is_dataclass(conf.data) else conf.data)
    datamodule.setup()
    model_cfg = asdict(conf.model)
    in_channels = model_cfg.pop("in_channels", None) or datamodule.in_channels
    ensemble = Ensemble(
        model=model_cfg,
        num_classes=datamodule.num_classes,
        in_channels=in_channels,
        input_size=datamodule.input_size,
        k=int(conf.ensemble.k),
        seeds=list(conf.ensemble.seeds) if conf.ensemble.seeds else None,
        seed=int(conf.seed),
        data_order=conf.ensemble.data_order,
        optim=asdict(conf.optim),
        clip_grad_norm=conf.ensemble.clip_grad_norm,
        vectorize=bool(conf.ensemble.vectorize),
    )
    datamodule.set_order(conf.ensemble.data_order, ensemble.seeds)
    callbacks: list[pl.Callback] = [LastCheckpoint(run_dir, conf.callbacks.checkpoint.every_n_epochs)]
    monitor = None
    if conf.callbacks.monitor:
        monitor = ConvergenceMonitor(conf.analysis, run_dir=run_dir, datamodule=datamodule, k=ensemble.k)
        monitor.prepare(ensemble)  # probe size, layer widths and the statistics' memory
        callbacks.append(monitor)
    return Job(cfg, conf, run_dir, datamodule, ensemble, callbacks, monitor)


def train(cfg: DictConfig) -> dict:
    """Run one job, holding its run directory's lock (a second process there is refused: RunDirBusy);
    returns the end-of-run summary (also printed)."""
    run_dir = run_dir_of(cfg)
    lock = runlock.acquire(run_dir)  # None on DDP ranks > 0
    try:
        if lock is not None:
            runlock.remove_stale_temporaries(run_dir)  # what writers killed before us left behind
        return _train(cfg, run_dir)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: DictConfig, run_dir: Path) -> dict:
    start = time.time()
    trust = bool(cfg.get("trust_checkpoint", False))
    ckpt_path = cfg.ckpt_path or RunInfo.existing_checkpoint(run_dir)
    if ckpt_path and Path(ckpt_path).is_file():  # first: a refusal is the only line printed
        checkpoint_io.check(ckpt_path, trust=trust, trust_flag="trust_checkpoint=true")
    job = prepare(cfg, run_dir)

    resume_step = -1
    if ckpt_path:  # weights-only (refused in one line if it needs more) unless trust_checkpoint=true
        state = checkpoint_io.load(ckpt_path, trust=trust, trust_flag="trust_checkpoint=true", mmap=True)
        resume_step = checkpoint_io.step_of(state)
        trainer_limits = OmegaConf.to_container(cfg.trainer, resolve=True)
        done = training_state.finished_message(state, trainer_limits, run_dir, resumed=not cfg.ckpt_path)
        del state
        if done:  # nothing to train: no loggers, no Trainer, nothing written
            print(done, file=sys.stderr, flush=True)
            return finished_summary(run_dir)
    info = RunInfo.load_or_create(run_dir)
    # W&B group (the sweep), run name (what the sweep varies) and the config as a flat dict
    sweep = sweep_identity(OmegaConf.to_container(cfg, resolve=True), run_dir, cfg.run_name, fresh=info.last_checkpoint() is None)
    launch_env = {key: os.environ.get(key) for key in (*DDP_ENV, *WANDB_ENV)}
    loggers = build_loggers(
        asdict(job.conf.logger),
        run_dir,
        sweep.config,
        sweep.group,
        sweep.name,
        run_id=info.wandb_id,
        resume_step=resume_step,
        job_type="train",
    )
    trainer_cfg = trainer_arguments(cfg)
    trainer_cfg["strategy"] = configure_strategy(trainer_cfg.get("strategy", "auto"), trainer_cfg)
    trainer = pl.Trainer(
        **trainer_cfg,
        logger=loggers or False,
        callbacks=job.callbacks,
        default_root_dir=str(run_dir),
        enable_checkpointing=False,  # checkpoints/last.ckpt is written atomically by LastCheckpoint
        enable_model_summary=False,
        plugins=[checkpoint_io.run_checkpoint_io(trust)],  # loads ckpt_path weights-only unless trusted
    )
    try:
        trainer.fit(job.ensemble, datamodule=job.datamodule, ckpt_path=ckpt_path, weights_only=not trust)
    except SIGTERMException:
        if trainer.is_global_zero:
            print(
                f"convergent: SIGTERM at step {trainer.global_step}: saved {run_dir / 'checkpoints' / 'last.ckpt'}; "
                f"continue with `convergent-train resume={run_dir}`",
                file=sys.stderr,
            )
        return {"preempted_at": int(trainer.global_step), "run_dir": str(run_dir)}
    else:  # before W&B is closed: the summary goes to the W&B run's summary too
        return summarize(trainer, job.ensemble, run_dir, time.time() - start, job.monitor)
    finally:
        finish_run(launch_env)


# Set in this process by a DDP launch (Lightning's launcher, convergent.distributed): left behind,
# the next job of a multirun takes its ranks as launched already and joins a dead process group.
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK")


def finish_run(launch_env: dict[str, str | None] | None = None) -> None:
    """Close W&B and matplotlib, end the process group and put the DDP environment variables back
    as they were before the job (`launch_env`), so the next job of a multirun starts clean."""
    import matplotlib.pyplot as plt

    try:
        try:
            import wandb
        except ImportError:  # W&B is optional at run time (logger=csv)
            wandb = None
        if wandb is not None and wandb.run is not None:
            wandb.finish()
    finally:
        plt.close("all")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in (launch_env or {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@hydra.main(version_base="1.3", config_path="pkg://convergent.conf", config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    try:
        summary = train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:  # a member's loss became NaN/inf: the last good checkpoint is kept
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    return summary.get("val/acc")


def main() -> None:
    """Console entry point: `resume=<run dir>` is rewritten into a Hydra call on the run's saved
    config before Hydra starts (so the run continues in its own directory). Before Hydra writes
    into that directory: its lock is taken (a live holder: exit 2), and a finished run says so and
    exits 0 unchanged."""
    lock = None
    try:
        argv = migrate_argv(sys.argv[1:])
        sys.argv = [sys.argv[0], *resume_argv(argv)]
        target = resume_target(argv)
        if target is not None:
            lock = runlock.acquire(target)
            done = training_state.resumed_run_finished(target, resume_overrides(argv))
            if done:
                print(done, file=sys.stderr, flush=True)
                lock.release()
                return
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        if lock is not None:
            lock.release()
        sys.exit(2)
    try:
        hydra_main()
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    main()
