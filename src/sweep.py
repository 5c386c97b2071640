"""Where a job stands in its sweep: its overrides, the keys the sweep varies, the W&B group and
run name that follow from them, and the resolved config as a flat dictionary.

- group: the W&B sweep id under `wandb agent` (`WANDB_SWEEP_ID`), the Hydra multirun directory's
  name (`-m`), else where the run directory sits (`sweep_group_of`: a job of a multirun or of a
  W&B sweep resumed later keeps its group), else none.
- run name: the job's overrides of the keys the sweep varies, each key by its last component
  (`width=0.5,seed=1`); under a W&B agent or in a single run every override (hydra.* left out).
- flat config: `{"model.width": 0.5, "ensemble.data_order": "shared", ...}`, so W&B's group-by
  and filters work on any key (lists stay lists).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MULTIRUN_FILE = "multirun.yaml"
SWEEP_FOLDER = re.compile(r"^sweep-(.+)$")  # outputs/sweep-<W&B sweep id>/<run> (sweeps/*.yaml)
SEED_KEYS = frozenset({"seed", "ensemble.seeds"})


def override_key(override: str) -> str:
    """`+model.width=0.5` -> `model.width` (`~key` and `key@pkg=...` keep their key)."""
    return override.split("=", 1)[0].lstrip("+~")


def is_hydra_override(override: str) -> bool:
    key = override_key(override)
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dictionaries flattened to dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flat_config(value, f"{name}."))
        else:
            flat[name] = dict(value) if isinstance(value, Mapping) else value
    return flat


def swept_keys(multirun_yaml: Path) -> set[str] | None:
    """Keys a Hydra multirun varies (`model.width=0.25,0.5`, `seed=range(3)`), read from the
    sweep's multirun.yaml; None when there is none."""
    if not multirun_yaml.is_file():
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    task = list(OmegaConf.load(multirun_yaml).hydra.overrides.task)
    return {o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()}


def run_name(overrides: Iterable[str], swept: set[str] | None = None) -> str | None:
    """`["debug=tiny", "model.width=0.5", "seed=1"]` with swept {model.width, seed} -> `width=0.5,seed=1`."""
    parts = []
    for override in overrides:
        key = override_key(override)
        if is_hydra_override(override) or (swept is not None and key not in swept):
            continue
        value = override.split("=", 1)[1] if "=" in override else ""
        parts.append(f"{key.split('/')[-1].split('.')[-1]}={value}")
    return ",".join(parts) or None


def multirun_dir_of(run_dir: Path) -> Path | None:
    """The multirun directory a job's directory sits in (its parent holds multirun.yaml)."""
    parent = Path(run_dir).resolve().parent
    return parent if (parent / MULTIRUN_FILE).is_file() else None


def sweep_group_of(run_dir: Path) -> str | None:
    """A run's group from where its directory sits: the name of the Hydra multirun directory, or
    the W&B sweep id of the `sweep-<id>` folder the shipped sweeps (sweeps/*.yaml) write to."""
    multirun = multirun_dir_of(run_dir)
    if multirun is not None:
        return multirun.name
    match = SWEEP_FOLDER.match(Path(run_dir).resolve().parent.name)
    return match.group(1) if match and match.group(1) != "local" else None


@dataclass(frozen=True)
class SweepIdentity:
    group: str | None
    name: str | None
    config: dict[str, Any]


def sweep_identity(config: Mapping[str, Any], run_dir: Path, user_name: str | None = None, fresh: bool = True) -> SweepIdentity:
    """Group, run name and flat config of this job. `fresh=False` (a resumed run) keeps the name
    W&B already has unless the user set one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    multirun = Path(hydra.sweep.dir) if hydra is not None and hydra.mode == RunMode.MULTIRUN else multirun_dir_of(run_dir)
    sweep_id = os.environ.get("WANDB_SWEEP_ID")
    group = sweep_id or (multirun.name if multirun is not None else sweep_group_of(run_dir))
    name = user_name
    if name is None and fresh and hydra is not None:
        swept = swept_keys(multirun / MULTIRUN_FILE) if multirun is not None and not sweep_id else None
        name = run_name(list(hydra.overrides.task), swept)
    return SweepIdentity(group=group, name=name, config=flat_config(config))
