"""Helpers the tests share: run the real entry points (in a subprocess or in this process) and
read back what a run wrote. Fixtures are in conftest.py."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent.parent

# A fast but complete monitor: every analysis step logs the light analyses, no figures.
LIGHT = (
    "analysis.analyses=[correlation,mean_activation,cka,cca,procrustes]",
    "analysis.layers=[conv1,conv3,fc6]",
    "analysis.figures=none",
    "analysis.save_checkpoints=false",
)


def cli_env(**extra) -> dict:
    """The environment of a CLI run: W&B offline, no API key; `NAME=None` removes NAME."""
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def run_cli(module: str, *args: str, cwd: Path, timeout: float = 600, check: bool = True, **env) -> subprocess.CompletedProcess:
    """`python -m convergent.<module> args...` as a user would run the console script."""
    proc = subprocess.run(
        [sys.executable, "-m", f"convergent.{module}", *args],
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


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
def single_thread():
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


def train_small_member(seed: int, data, steps: int, optimizer, batch: int):
    """The main job's model (alexnet_small 0.25, dropout 0.5, LRN after the pool) trained `steps`
    steps on random batches of `data`'s training tensors (channels_last for speed), seeded by
    `seed`; `optimizer(params)` builds the optimiser. Returned in eval mode."""
    import torch
    import torch.nn.functional as F

    from convergent.models import AlexNet

    x, y = data.train_set.tensors
    x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(seed)
    net = AlexNet.small(num_classes=10, in_channels=1, input_size=28, width=0.25, dropout=0.5, lrn="after_pool")
    net = net.to(memory_format=torch.channels_last)
    opt = optimizer(net.parameters())
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval().to(memory_format=torch.contiguous_format)
