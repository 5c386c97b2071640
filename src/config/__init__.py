"""Configuration: the typed schema of every group (`convergent.config.schema`), checked once.

    cfg = compose(...)          # Hydra, conf/ (the YAML files choose options and override values)
    conf = validate(cfg)        # a TrainConfig: every value typed and checked, ConfigError otherwise

`validate` also takes the plain saved config of a run (`.hydra/config.yaml`, which `resume=` and DDP
children compose) and renames keys of earlier releases, saying so once (`LEGACY`).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from convergent.config.schema import GROUP_SCHEMAS, TrainConfig, TrainerConfig, register
from convergent.errors import ConfigError

__all__ = ["LEGACY", "TrainConfig", "migrate_argv", "register", "trainer_arguments", "typed", "validate"]

# Keys of earlier releases -> their name now (accepted, with a deprecation message, for one release).
LEGACY = {
    "analysis.permutation_null": "analysis.null.enabled",
    "analysis.null_pairs": "analysis.null.pairs",
}
_TARGETS = {node._target_: node for node in GROUP_SCHEMAS["data"].values()}  # type: ignore[attr-defined]


def _deprecated(old: str, new: str) -> None:
    message = f"convergent: config key {old} is deprecated (it will be refused in the next release); use {new}"
    warnings.warn(message, FutureWarning, stacklevel=3)
    print(message, file=sys.stderr)


def migrate_argv(argv: list[str]) -> list[str]:
    """Command-line overrides with legacy keys renamed (``analysis.permutation_null=false`` ->
    ``analysis.null.enabled=false``)."""
    out = []
    for arg in argv:
        prefix = arg[: len(arg) - len(arg.lstrip("+~"))]
        key, sep, value = arg[len(prefix) :].partition("=")
        if sep and key in LEGACY:
            _deprecated(key, LEGACY[key])
            arg = f"{prefix}{LEGACY[key]}={value}"
        out.append(arg)
    return out


def _migrate(container: dict) -> dict:
    for old, new in LEGACY.items():
        *path, leaf = old.split(".")
        node = container
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            value = node.pop(leaf)
            _deprecated(old, new)
            *new_path, new_leaf = new.split(".")
            target = container
            for part in new_path:
                target = target.setdefault(part, {})
            target[new_leaf] = value
    return container


def trainer_arguments(cfg: DictConfig) -> dict[str, Any]:
    """The `trainer` group as pl.Trainer arguments, including any added with +trainer.<arg>=..."""
    return OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[return-value]


def typed(cfg: DictConfig) -> DictConfig:
    """The config as a structured (typed) config of the schema, whether it was composed with the
    schema or is a run's plain saved config. Unknown keys are a ConfigError naming the key."""
    container = _migrate(OmegaConf.to_container(cfg, resolve=False))  # type: ignore[arg-type]
    container.pop("hydra", None)
    data = container.pop("data", None)
    trainer = container.get("trainer") or {}
    known = set(TrainerConfig.__dataclass_fields__)
    container["trainer"] = {k: v for k, v in trainer.items() if k in known}  # extra Trainer args are not typed
    try:
        out = OmegaConf.merge(OmegaConf.structured(TrainConfig), container)
        if data is not None:
            schema = _TARGETS.get(data.get("_target_")) if isinstance(data, dict) else None
            out.data = OmegaConf.merge(OmegaConf.structured(schema), data) if schema else OmegaConf.create(data)
    except (ConfigKeyError, ValidationError) as e:
        raise ConfigError(str(e).splitlines()[0] + f" (key {getattr(e, 'full_key', '?')})") from None
    return out  # type: ignore[return-value]


def validate(cfg: DictConfig) -> TrainConfig:
    """Check every value (each group's schema) and the checks that span groups; returns the typed
    config. Raises ConfigError with one line naming the key and the fix."""
    try:
        conf = OmegaConf.to_object(typed(cfg))
    except (ConfigKeyError, ValidationError) as e:
        raise ConfigError(str(e).splitlines()[0] + f" (key {getattr(e, 'full_key', '?')})") from None
    assert isinstance(conf, TrainConfig)
    if conf.callbacks.monitor:
        from convergent.analysis.plan import Plan

        Plan.build(conf.analysis, k=int(conf.ensemble.k))
    return conf
