"""`convergent-train`: train K members and monitor their convergence, configured by Hydra.

    convergent-train                                   # the main job: 4 x alexnet_small on mnist5k
    convergent-train -m model.width=0.25,0.5           # a multirun, one W&B run per job
    convergent-train resume=outputs/2026-11-26/10-00-00   # continue a killed run
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from convergent.config import ConfigError, validate
from convergent.distributed import configure_strategy
from convergent.ensemble import Ensemble
from convergent.loggers import build_loggers
from convergent.runinfo import RunInfo, resume_argv, summarize

log = logging.getLogger("convergent")


def build_callbacks(cfg: DictConfig, run_dir: Path, datamodule, ensemble: Ensemble) -> list[pl.Callback]:
    from pytorch_lightning.callbacks import ModelCheckpoint

    callbacks: list[pl.Callback] = [
        ModelCheckpoint(
            dirpath=str(run_dir / "checkpoints"),
            filename="epoch={epoch}-step={step}",
            auto_insert_metric_name=False,
            save_last=True,
            save_top_k=0,
            every_n_epochs=int(cfg.callbacks.checkpoint.every_n_epochs),
        )
    ]
    if cfg.callbacks.monitor:
        from convergent.callbacks import ConvergenceMonitor

        monitor = ConvergenceMonitor.from_config(cfg.analysis, run_dir=run_dir, datamodule=datamodule, k=ensemble.k)
        monitor.prepare(ensemble)  # probe size, widths and memory checked before any training
        callbacks.append(monitor)
    return callbacks


def train(cfg: DictConfig) -> dict:
    """Run one job; returns the end-of-run summary (also printed)."""
    start = time.time()
    validate(cfg)
    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    run_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(os.getcwd())
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)

    datamodule = instantiate(cfg.data)
    datamodule.setup()
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    in_channels = model_cfg.pop("in_channels", None) or datamodule.in_channels
    ensemble = Ensemble(
        model=model_cfg,
        num_classes=datamodule.num_classes,
        in_channels=in_channels,
        input_size=datamodule.input_size,
        k=int(cfg.ensemble.k),
        seeds=list(cfg.ensemble.seeds) if cfg.ensemble.seeds else None,
        seed=int(cfg.seed),
        data_order=cfg.ensemble.data_order,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        clip_grad_norm=cfg.ensemble.clip_grad_norm,
        vectorize=bool(cfg.ensemble.vectorize),
    )
    datamodule.set_order(cfg.ensemble.data_order, ensemble.seeds)

    info = RunInfo.load_or_create(run_dir)
    ckpt_path = cfg.ckpt_path or info.last_checkpoint()
    group = None
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        group = Path(HydraConfig.get().sweep.dir).name
    resolved = OmegaConf.to_container(cfg, resolve=True)
    loggers = build_loggers(
        OmegaConf.to_container(cfg.logger, resolve=True), run_dir, resolved, group, cfg.run_name, run_id=info.wandb_id
    )
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["strategy"] = configure_strategy(trainer_cfg.get("strategy", "auto"), trainer_cfg)
    trainer = pl.Trainer(
        **trainer_cfg,
        logger=loggers or False,
        callbacks=build_callbacks(cfg, run_dir, datamodule, ensemble),
        default_root_dir=str(run_dir),
        enable_model_summary=False,
    )
    try:
        trainer.fit(ensemble, datamodule=datamodule, ckpt_path=ckpt_path)
        summary = summarize(trainer, ensemble, run_dir, time.time() - start)
    finally:
        finish_run(loggers)
    return summary


def finish_run(loggers) -> None:
    """Close W&B and matplotlib so the next job of a multirun starts clean."""
    import matplotlib.pyplot as plt

    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    finally:
        plt.close("all")


@hydra.main(version_base="1.3", config_path="pkg://convergent.conf", config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    try:
        summary = train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return summary.get("val/acc")


def main() -> None:
    """Console entry point: `resume=<run dir>` is rewritten into a Hydra call on the run's saved
    config before Hydra starts (so the run continues in its own directory)."""
    try:
        sys.argv = [sys.argv[0], *resume_argv(sys.argv[1:])]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


if __name__ == "__main__":
    main()
