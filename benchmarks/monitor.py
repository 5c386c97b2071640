"""monitor_overhead and alexnet224_monitor_overhead_cuda: whole training jobs with and without the monitor."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.common import (
    MAIN_K,
    Measured,
    Options,
    alternate,
    median,
    paired_ratio,
    python_module,
    spread,
)


# --- 3. monitor_overhead -------------------------------------------------------------------------
def train_job(args: Sequence[str], summaries: list[dict] | None = None, timeout: float = 3600) -> Callable[[], float]:
    """A measurement: the seconds of one whole `convergent-train args...` process in a fresh run
    directory; its summary.json is appended to `summaries`."""

    def measure() -> float:
        with tempfile.TemporaryDirectory(prefix="convergent-bench-") as tmp:
            t = time.perf_counter()
            python_module("convergent.train", f"hydra.run.dir={tmp}/run", *args, cwd=tmp, timeout=timeout)
            elapsed = time.perf_counter() - t
            if summaries is not None:
                summaries.append(json.loads((Path(tmp) / "run" / "summary.json").read_text()))
            return elapsed

    return measure


def monitor_overhead(options: Options) -> Measured:
    extra = ["trainer.max_epochs=1"] if options.quick else []
    summaries: dict[str, list[dict]] = {"on": [], "off": []}
    ta, tb = alternate(
        [train_job(extra, summaries["on"]), train_job([*extra, "callbacks=none"], summaries["off"])],
        options.pick(full=3, quick=1),
    )
    ratio, ratio_text = paired_ratio(ta, tb)
    acc = {side: ", ".join(f"{s['val/acc']:.4f}" for s in runs) for side, runs in summaries.items()}
    return Measured(
        ratio,
        f"{ratio_text}; "
        f"`{' '.join(['convergent-train', *extra])}` (the main job, every analysis) {spread(ta)}, mean member "
        f"val/acc {acc['on']} / the same with callbacks=none {spread(tb)}, val/acc {acc['off']}; "
        "whole subprocesses back to back (A B, B A, ...), W&B offline",
    )


# The GPU main job of ImageNet-size members: 4 x alexnet at 224 px on generated images.
IMAGENET_BATCH = 128
IMAGENET_JOB = (
    "model=alexnet", "data=synthetic", "data.input_size=224", "data.in_channels=3", "data.train_size=2048",
    "data.val_size=512", f"data.batch_size={IMAGENET_BATCH}", "data.val_batch_size=256", "trainer=gpu", "trainer.max_epochs=1000",
    "logger=csv", "analysis.max_units=1024", "analysis.probe_size=500", "analysis.batch_size=100",
)  # fmt: skip


def alexnet224_monitor_overhead(options: Options, device: str = "cuda") -> Measured:
    steps = 60 if options.quick else 400
    args = (*IMAGENET_JOB, f"trainer.max_steps={steps}")
    ta, tb = alternate([train_job(args, timeout=900), train_job([*args, "callbacks=none"], timeout=900)], 1)
    images = steps * IMAGENET_BATCH * MAIN_K
    return Measured(
        median(ta) / median(tb),
        f"{device}; `convergent-train {' '.join(args)}` (4 x alexnet, bf16 training, every analysis, fc layers "
        f"subsampled to 1024 units) {spread(ta)} / the same with callbacks=none {spread(tb)}; whole processes "
        f"(start-up, data generation and validation included): {images / median(tb):.0f} member-images/s without "
        f"the monitor, {images / median(ta):.0f} with it",
    )
