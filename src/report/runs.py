"""Finding run directories under the paths a user gives and reading what the report needs.

A run directory is a directory holding `.hydra/config.yaml` (README "Files in a run directory");
the search does not descend into one. From each: its overrides (`.hydra/overrides.yaml`), its
analysed layers and W&B settings (`.hydra/config.yaml`), whether it finished (`summary.json`,
written at the end of a successful run), and every headline value of `csv/metrics.csv` by key and
step (a key logged twice at one step, as after a resume, keeps the later row).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convergent.report.keys import is_headline

CONFIG = Path(".hydra") / "config.yaml"
OVERRIDES = Path(".hydra") / "overrides.yaml"
METRICS = Path("csv") / "metrics.csv"
SUMMARY = "summary.json"


class ReportError(Exception):
    """Bad input for convergent-report: one line naming the problem and the fix."""


@dataclass
class RunData:
    path: Path
    overrides: tuple[str, ...]
    config: dict[str, Any]
    metrics: dict[str, dict[int, float]]  # headline key -> {step: value}
    finished: bool
    failed_analyses: list[str] = field(default_factory=list)
    problem: str | None = None  # why something could not be read

    @property
    def layers(self) -> list[str]:
        layers = (self.config.get("analysis") or {}).get("layers") or []
        return [str(layer) for layer in layers] if isinstance(layers, list) else []

    @property
    def analysis_steps(self) -> list[int]:
        return sorted({step for values in self.metrics.values() for step in values})


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_run_dirs(path: Path) -> list[Path]:
    """Every run directory at or below `path` (sorted, job 10 after job 9)."""
    if not path.exists():
        raise ReportError(f"{path} does not exist; pass a multirun directory, a run directory or a folder holding them")
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory; pass a multirun directory, a run directory or a folder holding them")
    found = []
    for root, dirs, _files in os.walk(path):
        if (Path(root) / CONFIG).is_file():
            found.append(Path(root))
            dirs[:] = []  # a run directory holds no other runs
        else:
            dirs[:] = [d for d in dirs if d not in ("wandb", ".hydra", "__pycache__")]
    if not found:
        raise ReportError(
            f"{path} holds no run directories (a directory with {CONFIG}); pass a multirun directory, a run directory or a folder holding them"
        )
    return sorted(found, key=_natural)


def read_headline_metrics(path: Path, layers: Sequence[str] = ()) -> dict[str, dict[int, float]]:
    """csv/metrics.csv -> {headline key: {step: value}} (empty cells skipped)."""
    out: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        keys = [k for k in reader.fieldnames or [] if k != "step" and is_headline(k, layers)]
        for row in reader:
            if row.get("step") in (None, ""):
                continue
            step = int(float(row["step"]))
            for key in keys:
                value = row.get(key)
                if value not in (None, ""):
                    out.setdefault(key, {})[step] = float(value)
    return out


def _load_config(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation that needs the run's runtime (${now:...}, ${oc.env:...})
        return OmegaConf.to_container(cfg, resolve=False)


def load_run(path: Path) -> RunData:
    """Read one run directory; what cannot be read is recorded in `problem`, not raised."""
    import yaml

    problem = None
    try:
        config = _load_config(path / CONFIG)
    except Exception as e:  # noqa: BLE001 - a damaged file is reported with the run, the others go on
        config, problem = {}, f"{CONFIG} unreadable ({type(e).__name__})"
    overrides: tuple[str, ...] = ()
    if (path / OVERRIDES).is_file():
        overrides = tuple(str(o) for o in (yaml.safe_load((path / OVERRIDES).read_text()) or []))
    run = RunData(path=path, overrides=overrides, config=config, metrics={}, finished=(path / SUMMARY).is_file(), problem=problem)
    if run.finished:
        try:
            run.failed_analyses = list(json.loads((path / SUMMARY).read_text()).get("failed_analyses") or [])
        except (OSError, ValueError):
            run.problem = run.problem or f"{SUMMARY} unreadable"
    if (path / METRICS).is_file():
        try:
            run.metrics = read_headline_metrics(path / METRICS, run.layers)
        except (OSError, ValueError, csv.Error) as e:
            run.problem = run.problem or f"{METRICS} unreadable ({type(e).__name__}: {e})"
    else:
        run.problem = run.problem or f"no {METRICS}"
    return run
