"""What every benchmark shares: the figure types, A/B alternation, and the main job's set-up."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")  # the default analysis.layers
# The main job's model and probe pass (conf/model/alexnet_small.yaml, analysis batch size).
MAIN_MODEL = {"name": "alexnet_small", "width": 0.25}
MAIN_K = 4
PROBE_SIZE = 1000  # the whole mnist5k validation split
PROBE_BATCH = 250
TRAIN_BATCH = 64  # conf/data/mnist5k.yaml


# --- results and the registry --------------------------------------------------------------------
@dataclass
class Measured:
    """What a figure function returns: the value, a note on how it was measured, and `ok` for
    any condition besides the goal (e.g. the two methods agree)."""

    value: float
    detail: str = ""
    ok: bool = True


@dataclass(frozen=True)
class Options:
    quick: bool = False
    rounds: int | None = None  # --repeat: A/B rounds of every alternated figure (None: per figure)

    def pick(self, full: int, quick: int) -> int:
        return self.rounds if self.rounds else (quick if self.quick else full)


@dataclass(frozen=True)
class Spec:
    name: str
    goal: float
    op: str  # "<=", "<" or ">="
    unit: str
    run: Callable[[Options], Measured]
    about: str


@dataclass
class Figure:
    name: str
    value: float | None
    goal: float
    op: str
    met: bool
    unit: str
    detail: str = ""
    seconds: float = 0.0

    @property
    def shown(self) -> str:
        """The value as the table and the progress lines print it."""
        return "error" if self.value is None else f"{self.value:.3g} {self.unit}"

    def as_json(self) -> dict:
        return {
            "name": self.name,
            "value": self.value if self.value is not None and math.isfinite(self.value) else None,
            "goal": self.goal,
            "op": self.op,
            "met": self.met,
            "unit": self.unit,
            "detail": self.detail,
        }


COMPARE = {"<=": lambda v, g: v <= g, "<": lambda v, g: v < g, ">=": lambda v, g: v >= g}


def evaluate(spec: Spec, options: Options) -> Figure:
    """Run one figure; an exception becomes a failed figure (value None) and the suite goes on."""
    t0 = time.perf_counter()
    try:
        m = spec.run(options)
    except Exception as e:  # a benchmark that cannot run must not hide the others
        failed = f"failed: {type(e).__name__}: {e}"
        return Figure(spec.name, None, spec.goal, spec.op, False, spec.unit, failed, time.perf_counter() - t0)
    value = float(m.value)
    met = math.isfinite(value) and COMPARE[spec.op](value, spec.goal) and m.ok
    return Figure(spec.name, value, spec.goal, spec.op, bool(met), spec.unit, m.detail, time.perf_counter() - t0)


# --- shared helpers ------------------------------------------------------------------------------
def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def stopwatch(fn: Callable[[], object], device: str = "cpu") -> Callable[[], float]:
    """A measurement: the seconds one call of `fn` takes (GPU work included)."""

    def measure() -> float:
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t

    return measure


def alternate(measures: Sequence[Callable[[], float]], rounds: int, warmup: int = 0) -> list[list[float]]:
    """Measurements of A, B, ... in the order A B, B A, A B, ... (after `warmup` untimed rounds),
    so that drifting load hits all alike. Each measure returns one measurement (seconds)."""
    for _ in range(warmup):
        for measure in measures:
            measure()
    out: list[list[float]] = [[] for _ in measures]
    for r in range(rounds):
        order = range(len(measures)) if r % 2 == 0 else reversed(range(len(measures)))
        for i in order:
            out[i].append(measures[i]())
    return out


def spread(ts: Sequence[float]) -> str:
    """`median s (min-max, n)` of a list of timings."""
    return f"{median(ts):.3g} s ({min(ts):.3g}-{max(ts):.3g}, n={len(ts)})"


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> tuple[float, str]:
    """The median of the per-round ratios a[i] / b[i] of two `alternate`d measurements, and a text
    with their range and the ratio of medians. The two of a round run back to back, so their ratio
    follows the machine's drifting load better than a ratio of medians."""
    ratios = [x / y for x, y in zip(a, b)]
    text = (
        f"median of {len(ratios)} per-round ratios ({min(ratios):.3g}-{max(ratios):.3g}; "
        f"ratio of medians {median(a) / median(b):.3g})"
    )
    return median(ratios), text


@contextlib.contextmanager
def quiet_lightning():
    """No Lightning banners or data-loader hints in the middle of the table."""
    names = ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning")
    saved = {n: logging.getLogger(n).level for n in names}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def optim_config() -> dict:
    """The main job's optimiser (the optim schema's defaults)."""
    from dataclasses import asdict

    from convergent.config.schema import OptimConfig

    return asdict(OptimConfig())


def plan(k: int = MAIN_K, **overrides):
    """The plan of the default analysis config (the schema's defaults) with overrides (its fields)."""
    from convergent.analysis.config import AnalysisConfig
    from convergent.analysis.plan import Plan

    return Plan.build(AnalysisConfig(**overrides), k=k)


def mnist5k():
    from convergent.data import MNIST5k

    dm = MNIST5k(batch_size=TRAIN_BATCH)
    dm.setup()
    return dm


def probe_batches(n: int, batch: int = PROBE_BATCH) -> list:
    """The first n mnist5k validation images as the monitor's probe batches (image, label,
    index), loaded once so that data loading is in neither side of a ratio."""
    return list(mnist5k().probe_dataloader(n, batch))


def build_members(k: int = MAIN_K, model: dict | None = None, seed: int = 0) -> list[nn.Module]:
    """K members as the main job builds them (seeds seed*1000 + i), random init."""
    from convergent.ensemble import build_member, member_seeds

    model = dict(model or MAIN_MODEL)
    return [build_member(model, s, 10, 1, 28) for s in member_seeds(seed, k)]


def ensemble_module(k: int, vectorize: bool = False):
    from convergent.ensemble import Ensemble

    return Ensemble(
        model=dict(MAIN_MODEL), num_classes=10, in_channels=1, input_size=28, k=k, optim=optim_config(), vectorize=vectorize
    )


def lightning_fit(module, max_steps: int, device: str = "cpu", callbacks: Sequence = ()) -> None:
    """`max_steps` training steps of the main job's set-up (mnist5k, batch 64, Adam) through a
    real `pl.Trainer`; no validation, checkpoints or loggers."""
    import pytorch_lightning as pl

    with quiet_lightning():
        trainer = pl.Trainer(
            accelerator="gpu" if torch.device(device).type == "cuda" else "cpu",
            devices=1,
            max_steps=max_steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=list(callbacks),
        )
        trainer.fit(module, datamodule=mnist5k())


def widths_of(member: nn.Module, layers: Sequence[str] = LAYERS) -> dict[str, int]:
    return {layer: member.layer_width(layer) for layer in layers}


def python_module(
    module: str, *args: str, cwd: str | Path | None = None, timeout: float = 3600, env: dict[str, str] | None = None
):
    """`python -m <module> args` in a subprocess (W&B offline, plus `env`), failing loudly."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"python -m {module} {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


class GeneratedProbe:
    """Probe batches (image, label, index) generated one at a time from a seed: nothing of the
    data is held, so memory can only grow with the statistics. Iterable again and again (the
    mutual-information pass reads the probe set twice)."""

    def __init__(self, n: int, batch: int = PROBE_BATCH) -> None:
        self.n, self.batch = n, batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for lo in range(0, self.n, self.batch):
            hi = min(self.n, lo + self.batch)
            g = torch.Generator().manual_seed(lo)
            yield torch.randn(hi - lo, 1, 28, 28, generator=g), torch.zeros(hi - lo, dtype=torch.long), torch.arange(lo, hi)


def run_members_and_probe(run):
    """The members of a run directory's checkpoints/last.ckpt, its step, and the run's probe set
    (its saved config's data set, probe size and seed): what the independent checks recompute on."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from convergent.analyze import load_members

    torch.set_num_threads(1)
    cfg = OmegaConf.load(Path(run) / ".hydra" / "config.yaml")
    members, step = load_members([Path(run) / "checkpoints" / "last.ckpt"])
    data = instantiate(cfg.data)
    data.setup()
    return members, step, data.probe_set(cfg.analysis.probe_size, cfg.analysis.get("probe_seed", 0))
