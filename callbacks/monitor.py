"""ConvergenceMonitor: the probe pass and the analyses at scheduled steps during training.

Thin Lightning glue: *when* (step 0 before any update, the `analysis.schedule`, the end of fit),
*what* (`convergent.probe` on every rank, `convergent.pipeline.analyze` on rank 0) and *where*
(`convergent.sinks`). Each analysis step saves `checkpoints/analysis/step=<step>.ckpt` (and
refreshes `checkpoints/last.ckpt`), so every logged point can be reproduced with
`convergent-analyze` and a killed run resumes after its last analysis step: no step is logged twice.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from convergent.callbacks.checkpointing import ends_epoch, save_step_checkpoints
from convergent.callbacks.schedule import Schedule
from convergent.config import ConfigError
from convergent.pipeline import analyze
from convergent.plotting import OVER_TRAINING, collecting_young_garbage, over_training_figure, step_figures
from convergent.probe import ProbeOptions, ProbeRunner
from convergent.settings import AnalysisSettings
from convergent.sinks import RunSinks

GIB = 1024**3
PER_PAIR = re.compile(r"/m\d+-m\d+$")


def probe_runner(settings: AnalysisSettings, widths: dict[str, int]) -> ProbeRunner:
    options = ProbeOptions(
        layers=settings.layers,
        pairs=settings.pairs,
        null_pairs=settings.baseline_pairs,
        heavy_pairs=settings.plotted_pairs,
        null=settings.null,
        mutual_info=settings.on("mutual_info"),
        top_k=settings.top_k if settings.on("patches") else 0,
        pooled=settings.on("cross_layer"),
        product_dtype=None if settings.products == "auto" else settings.product_dtype(),
        max_units=settings.max_units,
        mi_layers=settings.mi_layers,
        mi_positions=settings.mi_positions,
    )
    return ProbeRunner(options, widths, settings.k)


def check_memory(runner: ProbeRunner, settings: AnalysisSettings) -> dict[str, int]:
    """Print the statistics' memory estimate; a clear error (before any training) if over the limit."""
    est = runner.estimate_bytes()
    parts = ", ".join(f"{k} {v / GIB:.3f}" for k, v in est.items() if k != "total" and v)
    rank_zero_info(f"convergent: statistics will hold {est['total'] / GIB:.3f} GiB per process ({parts} GiB)")
    if est["total"] > settings.memory_limit_gb * GIB:
        raise ConfigError(
            f"the statistics need {est['total'] / GIB:.2f} GiB ({parts} GiB), over analysis.memory_limit_gb="
            f"{settings.memory_limit_gb}; set analysis.max_units, restrict analysis.pairs, set analysis.permutation_null=false "
            "or drop mutual_info from analysis.analyses, or raise the limit"
        )
    return est


class ConvergenceMonitor(pl.Callback):
    def __init__(self, settings: AnalysisSettings, run_dir: str | Path, datamodule) -> None:
        self.settings = settings
        self.run_dir = Path(run_dir)
        self.datamodule = datamodule
        self.schedule = Schedule(settings.schedule_kind, settings.points_per_decade, settings.every)
        self.done: list[int] = []  # analysed global steps (restored on resume)
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.failures: list[str] = []
        self.timings: dict[str, float] = defaultdict(float)
        self.runner: ProbeRunner | None = None
        self._at_end = False

    @classmethod
    def from_config(cls, cfg, run_dir, datamodule, k: int) -> ConvergenceMonitor:
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
        return cls(AnalysisSettings.from_config(raw, k), run_dir, datamodule)

    # --- checks before training --------------------------------------------------------------
    def prepare(self, ensemble) -> None:
        """Checks that need the model and data: probe size, layer widths, memory."""
        self.datamodule.probe_set(self.settings.probe_size)
        member = ensemble.members[0]
        widths = {layer: member.layer_width(layer) for layer in self.settings.layers}
        self.settings.check_model(widths)
        self.runner = probe_runner(self.settings, widths)
        check_memory(self.runner, self.settings)

    # --- Lightning hooks ---------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.runner is None:
            self.prepare(pl_module)
        if trainer.global_step == 0:
            self.analyse(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # every_n_epochs: after the epoch's last batch (its checkpoint resumes exactly; see ends_epoch)
        epoch_end = ends_epoch(trainer, batch_idx) and self.schedule.due_after_epoch(trainer.current_epoch)
        if epoch_end or self.schedule.due_after_step(trainer.global_step):
            self.analyse(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.schedule.due_after_epoch(trainer.current_epoch):  # a no-op when done after the last batch
            self.analyse(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._at_end = True
        self.analyse(trainer, pl_module)
        if trainer.is_global_zero and self.settings.figures != "none":
            self.write_over_training(trainer)
        trainer.convergent_failures = list(self.failures)

    def state_dict(self) -> dict[str, Any]:
        return {"done": list(self.done), "history": {k: list(v) for k, v in self.history.items()}, "failures": list(self.failures)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = list(state.get("done", []))
        self.history = defaultdict(list, {k: [tuple(p) for p in v] for k, v in state.get("history", {}).items()})
        self.failures = list(state.get("failures", []))

    # --- one analysis step -------------------------------------------------------------------
    def analyse(self, trainer: pl.Trainer, pl_module) -> None:
        step = int(trainer.global_step)
        if step in self.done or trainer.sanity_checking:
            return
        t0 = time.perf_counter()
        loader = self.datamodule.probe_dataloader(
            self.settings.probe_size, self.settings.batch_size, rank=trainer.global_rank, world_size=trainer.world_size
        )
        full = self._full_step(trainer, step)
        probe = self.runner.run(list(pl_module.members), loader, pl_module.device, full=full)
        self.timings["probe"] += time.perf_counter() - t0
        self.done.append(step)
        if trainer.is_global_zero:
            self.write_step(trainer, probe, step, full)
        self.save_checkpoints(trainer, step)
        self.timings["total"] += time.perf_counter() - t0

    def write_step(self, trainer, probe, step: int, full: bool) -> None:
        sinks = RunSinks(self.run_dir, trainer.loggers)
        t = time.perf_counter()
        report = analyze(probe, self.settings, step, timings=self.timings, full=full)
        t_fig = time.perf_counter()
        report.scalars["monitor/analysis_seconds"] = t_fig - t
        if self._figures_due(step, full):
            probe_set = self.datamodule.probe_set(self.settings.probe_size)
            with collecting_young_garbage():
                for key, fig in step_figures(report, self.settings, list(trainer.lightning_module.members), probe_set):
                    sinks.figure(key, fig, step)
        self.timings["figures"] += time.perf_counter() - t_fig
        for key, (columns, rows) in report.tables.items():
            sinks.table(key, columns, rows, step)
        sinks.arrays(report.arrays, step)
        for failure in report.failures:
            rank_zero_info(f"convergent: {failure}")
        self.failures.extend(report.failures)
        sinks.scalars(report.scalars, step)
        for key, value in report.scalars.items():
            if not PER_PAIR.search(key):  # history keeps the pair averages and nulls
                self.history[key].append((step, value))
        self.timings["write"] += time.perf_counter() - t

    def _figures_due(self, step: int, full: bool) -> bool:
        if self.settings.figures == "full":
            return full
        return self.settings.figures == "ends" and (step == 0 or self._at_end)

    def _full_step(self, trainer, step: int) -> bool:
        """Step 0, every `full_every`-th analysis step, and the end of fit run every analysis."""
        return step == 0 or self._at_end or len(self.done) % self.settings.full_every == 0

    def save_checkpoints(self, trainer, step: int) -> None:
        """The checkpoint of this analysis step, also as last.ckpt (resume after this step)."""
        save_step_checkpoints(trainer, self.run_dir / "checkpoints", step, self.settings.save_checkpoints)

    def write_over_training(self, trainer) -> None:
        sinks = RunSinks(self.run_dir, trainer.loggers)
        with collecting_young_garbage():
            for family, name in OVER_TRAINING:
                fig = over_training_figure(self.history, family, name, self.settings.layers)
                if fig is not None:
                    sinks.figure(f"over_training/{family}_{name}", fig, int(trainer.global_step))
        timings = {f"monitor/seconds/{k}": v for k, v in self.timings.items()}
        sinks.scalars(timings, int(trainer.global_step))
        rank_zero_info("convergent: monitor time " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
