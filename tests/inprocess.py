"""Helpers for tests that compose the real config and run `convergent.train` in this process
(seconds instead of a CLI start-up), and read back what a run wrote."""

from __future__ import annotations

import csv
import os
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

# A fast but complete monitor: every analysis step logs the light analyses, no figures.
LIGHT = (
    "analysis.analyses=[correlation,mean_activation,cka,cca,procrustes]",
    "analysis.layers=[conv1,conv3,fc6]",
    "analysis.figures=none",
    "analysis.save_checkpoints=false",
)


def compose_train(*overrides: str) -> DictConfig:
    """`convergent-train <overrides>` composed as the CLI composes it (no Hydra run dir)."""
    with initialize_config_module(config_module="convergent.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


@contextmanager
def cwd(path: Path):
    old = os.getcwd()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)


def train_in(run_dir: Path, *overrides: str) -> dict:
    """`convergent.train.train` on the composed config; without Hydra's runtime the run directory
    is the working directory."""
    from convergent.train import train

    cfg = compose_train(*overrides)
    with cwd(run_dir):
        return train(cfg)


def read_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """csv/metrics.csv -> {key: {step: value}}; a key logged twice at one step fails (except
    `epoch`, which Lightning adds to every row)."""
    out: dict[str, dict[int, float]] = {}
    with open(Path(run_dir) / "csv" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                assert step not in out.setdefault(key, {}), f"{key} logged twice at step {step}"
                out[key][step] = float(value)
    return out


@contextmanager
def one_thread():
    """Tiny nets and matrices: on a busy 2-core machine threads only cost (up to 10x)."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)
