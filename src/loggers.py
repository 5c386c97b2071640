"""W&B and CSV loggers from the `logger` config group.

With no W&B API key configured, W&B logs offline (and says so once) instead of prompting.
The mode is passed to `wandb.init` directly, never through the environment, so nothing leaks
between the jobs of a multirun.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_info

WANDB_MODES = ("online", "offline", "disabled")


def has_wandb_key() -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
    try:
        auth = netrc.netrc(path).authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1])
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode(requested: str | None) -> str:
    """Config first, then WANDB_MODE, then online only when a key is configured."""
    mode = requested or os.environ.get("WANDB_MODE") or ("online" if has_wandb_key() else "offline")
    if mode == "dryrun":
        mode = "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode={mode!r} is not one of {WANDB_MODES}")
    return mode


def build_loggers(cfg: dict, run_dir: Path, config: dict, group: str | None, run_name: str | None, run_id: str | None = None) -> list[Logger]:
    """CSV mirror (run_dir/metrics.csv) and W&B (run_dir/wandb/)."""
    loggers: list[Logger] = []
    if cfg.get("csv"):
        loggers.append(CSVLogger(save_dir=str(run_dir), name="", version="csv"))
    wb = cfg.get("wandb")
    if wb:
        mode = resolve_wandb_mode(wb.get("mode"))
        logger = WandbLogger(
            project=wb.get("project") or "convergent",
            entity=wb.get("entity"),
            group=wb.get("group") or group,
            tags=list(wb.get("tags") or []),
            name=run_name,
            id=run_id,
            resume="allow" if run_id else None,
            save_dir=str(run_dir),
            mode=mode,
            config=config,
        )
        if mode == "offline" and not wb.get("mode") and not os.environ.get("WANDB_MODE"):
            rank_zero_info(
                f"W&B: no API key found, logging offline under {run_dir / 'wandb'}; "
                f"upload later with `wandb sync {run_dir / 'wandb'}/offline-run-*`"
            )
        loggers.append(logger)
    return loggers


def wandb_logger(loggers) -> WandbLogger | None:
    for logger in loggers or []:
        if isinstance(logger, WandbLogger):
            return logger
    return None
