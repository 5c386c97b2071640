"""ensemble_training and vectorized_speedup_cuda: training K members in one module."""

from __future__ import annotations

import time
from functools import partial

import numpy as np

from benchmarks.common import (
    MAIN_K,
    TRAIN_BATCH,
    Measured,
    Options,
    alternate,
    ensemble_module,
    lightning_fit,
    median,
    spread,
    sync,
)


# --- 6. ensemble_training ------------------------------------------------------------------------
def step_times(k: int, warmup: int, steps: int, device: str = "cpu", vectorize: bool = False) -> float:
    """Median seconds per training step (batch end to batch end, after `warmup` steps) of a
    K-member Ensemble through a real pl.Trainer."""
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync(device)
            self.ends.append(time.perf_counter())

    timer = StepTimer()
    lightning_fit(ensemble_module(k, vectorize), warmup + steps, device, [timer])
    return median(np.diff(timer.ends[warmup - 1 :]).tolist())


def ensemble_training(options: Options, device: str = "cpu") -> Measured:
    warmup, steps = (3, 8) if options.quick else (10, 40)
    t4, t1 = alternate([partial(step_times, k, warmup, steps, device) for k in (MAIN_K, 1)], options.pick(full=3, quick=1))
    per_member_4, alone = MAIN_K * TRAIN_BATCH / median(t4), TRAIN_BATCH / median(t1)  # images/s, all members
    return Measured(
        per_member_4 / alone,
        f"{device}; alexnet_small 0.25, mnist5k, batch {TRAIN_BATCH}, Adam, pl.Trainer; median step time after "
        f"{warmup} warm-up steps ({steps} steps per run): K={MAIN_K} {spread(t4)} ({per_member_4:.0f} member-images/s), "
        f"K=1 {spread(t1)} ({alone:.0f} images/s); value = {MAIN_K} x t(K=1) / t(K={MAIN_K})",
    )


# --- GPU only: the vectorized ensemble and ImageNet-size members ---------------------------------
def vectorized_speedup(options: Options, device: str = "cuda") -> Measured:
    warmup, steps = (3, 8) if options.quick else (10, 60)
    tv, tl = alternate(
        [partial(step_times, MAIN_K, warmup, steps, device, vectorize) for vectorize in (True, False)],
        options.pick(full=3, quick=1),
    )
    return Measured(
        median(tl) / median(tv),
        f"{device}; {MAIN_K} x alexnet_small 0.25, mnist5k, batch {TRAIN_BATCH}, Adam, pl.Trainer; median step time "
        f"ensemble.vectorize=true {spread(tv)} ({MAIN_K * TRAIN_BATCH / median(tv):.0f} member-images/s), the loop "
        f"{spread(tl)} ({MAIN_K * TRAIN_BATCH / median(tl):.0f} member-images/s); value = t(loop) / t(vectorized)",
    )
