"""Shared helpers: run the real command-line entry points in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
        raise AssertionError(f"{module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def run_cli_in(tmp_path):
    def run(module, *args, **kw):
        return run_cli(module, *args, cwd=tmp_path, **kw)

    return run
