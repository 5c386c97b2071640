"""Where an analysis step goes: the run's loggers (W&B, CSV) and local mirrors in the run dir.

Local layout (README "Files in a run directory"):
    csv/metrics.csv                    every scalar (Lightning CSVLogger), with `step`
    analysis/step=<global_step>.npz    raw arrays of the step (keys in README)
    figures/<key>/step=<global_step>.png
    tables/<key>/step=<global_step>.csv
W&B gets the same scalars (x-axis `trainer/global_step`), figures as images under `fig/<key>`,
tables under `table/<key>`, and each npz as a version of the artifact `analysis-<run id>` (a hard
link in the W&B run's directory: no copy, see `convergent.wandb_files`).
Writes are atomic (temp file, then rename): a killed run never leaves a half-written file.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from convergent.loggers import wandb_logger
from convergent.wandb_workspace import wandb_scalars


def _atomic_path(path: Path) -> Path:
    """`.tmp-<pid>-<name>` beside `path`: one writer per run directory (its lock), one name per
    process; what a killed writer leaves is removed by the next lock holder (runlock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = _atomic_path(path)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)  # uncompressed: compressing costs more time than the disk it saves
    tmp.replace(path)


def save_csv(path: Path, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
    tmp = _atomic_path(path)
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    tmp.replace(path)


def save_png(path: Path, fig: Figure) -> None:
    tmp = _atomic_path(path)
    # zlib level 1: the files ~7 % larger than at the default level 6, their encoding 0.39 -> 0.23 s
    # for the eight figures of a full step
    fig.savefig(tmp, dpi=110, format="png", pil_kwargs={"compress_level": 1})
    tmp.replace(path)


def step_name(step: int) -> str:
    return f"step={step}"


class RunSinks:
    """Writes reports of analysis steps to the loggers and the run directory (rank 0 only)."""

    def __init__(self, run_dir: Path, loggers: Sequence = ()) -> None:
        self.run_dir = Path(run_dir)
        self.loggers = list(loggers)
        self.wandb = wandb_logger(self.loggers)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(wandb_scalars(logger, values, step) if logger is self.wandb else dict(values), step=step)
        for logger in self.loggers:
            logger.save()

    def figure(self, key: str, fig: Figure, step: int) -> Path:
        import matplotlib.pyplot as plt

        path = self.run_dir / "figures" / key / f"{step_name(step)}.png"
        try:
            save_png(path, fig)
        finally:
            plt.close(fig)
        if self.wandb is not None:
            self.wandb.log_image(key=f"fig/{key}", images=[str(path)], step=step)
        return path

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        save_csv(self.run_dir / "tables" / key / f"{step_name(step)}.csv", columns, rows)
        if self.wandb is not None:
            self.wandb.log_table(key=f"table/{key}", columns=list(columns), data=[list(r) for r in rows], step=step)

    def arrays(self, arrays: dict[str, np.ndarray], step: int) -> Path:
        path = self.run_dir / "analysis" / f"{step_name(step)}.npz"
        save_npz(path, arrays)
        if self.wandb is not None and self.wandb.experiment is not None and hasattr(self.wandb.experiment, "log_artifact"):
            import wandb

            from convergent.wandb_files import add_immutable_file

            artifact = wandb.Artifact(f"analysis-{self.wandb.experiment.id}", type="analysis")
            add_immutable_file(artifact, path, Path(self.wandb.experiment.dir).parent)  # no copy outside the run dir
            self.wandb.experiment.log_artifact(artifact, aliases=[step_name(step).replace("=", "-")])
        return path
