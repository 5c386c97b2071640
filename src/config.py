"""Checks on a composed config, run before anything is built: one clear line per mistake."""

from __future__ import annotations

from omegaconf import DictConfig


class ConfigError(ValueError):
    """A configuration mistake; the message names the key and the fix."""


def _choice(value, choices, key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def validate(cfg: DictConfig) -> None:
    from convergent.data import DATA_ORDERS
    from convergent.ensemble import OPTIMIZERS, SCHEDULES
    from convergent.models.alexnet import LRN_CHOICES

    _choice(cfg.model.name, ("alexnet", "alexnet_small"), "model.name")
    _choice(cfg.model.lrn, LRN_CHOICES, "model.lrn")
    _choice(cfg.model.groups, (1, 2), "model.groups")
    if not cfg.model.width or cfg.model.width <= 0:
        raise ConfigError(f"model.width={cfg.model.width} must be a positive multiplier (e.g. 0.5)")
    _choice(cfg.ensemble.data_order, DATA_ORDERS, "ensemble.data_order")
    if int(cfg.ensemble.k) < 1:
        raise ConfigError(f"ensemble.k={cfg.ensemble.k} must be at least 1")
    _choice(cfg.optim.name, OPTIMIZERS, "optim.name")
    _choice(cfg.optim.get("schedule", "none"), SCHEDULES, "optim.schedule")
    if cfg.callbacks.monitor:
        from omegaconf import OmegaConf

        from convergent.settings import AnalysisSettings

        AnalysisSettings.from_config(OmegaConf.to_container(cfg.analysis, resolve=True), k=int(cfg.ensemble.k))
