"""ConvergenceMonitor: schedules analysis steps during training and hands them to the step service.

*When*: step 0 before any update, the `analysis.schedule`, the end of fit. *What*: the probe pass
on every rank, the analyses and the writing on rank 0 (`convergent.monitor.service.StepService`).
Each analysis step saves `checkpoints/analysis/step=<step>.ckpt` (and refreshes
`checkpoints/last.ckpt`), so every logged point can be reproduced with `convergent-analyze` and a
killed run resumes after its last analysis step: no step is logged twice. A SIGTERM during a step
abandons it at the next check (within seconds); Lightning then saves `last.ckpt`, and the resumed
run analyses that step first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException

from convergent.analysis.config import AnalysisConfig
from convergent.analysis.plan import Plan
from convergent.callbacks.checkpointing import ends_epoch, save_step_checkpoints
from convergent.callbacks.schedule import Schedule
from convergent.models import receptive_field
from convergent.monitor.service import StepAbandoned, StepService
from convergent.wandb_workspace import log_over_training_charts


class ConvergenceMonitor(pl.Callback):
    def __init__(self, config: AnalysisConfig, run_dir: str | Path, datamodule, k: int) -> None:
        self.config = config
        self.plan = Plan.build(config, k)
        self.run_dir = Path(run_dir)
        self.datamodule = datamodule
        s = config.schedule
        self.schedule = Schedule(s.kind, s.points_per_decade, s.every, s.first)
        self.done: list[int] = []  # analysed global steps (restored on resume)
        self.pending: int | None = None  # a step abandoned by a SIGTERM, analysed first after the resume
        self.widths: dict[str, int] | None = None
        self.service: StepService | None = None
        self._restored: dict[str, Any] = {}
        self._at_end = False

    # --- checks before training --------------------------------------------------------------
    def prepare(self, ensemble) -> None:
        """Checks that need the model and data: probe size, layer widths, memory (before training)."""
        self.datamodule.probe_indices(self.config.probe_size, self.config.probe_seed)
        member = ensemble.members[0]
        self.widths = {layer: member.layer_width(layer) for layer in self.plan.layers}
        self.plan.check_widths(self.widths)
        StepService(self.plan, self.widths, self.run_dir, write=False).check_memory(rank_zero_info)

    def _service(self, trainer: pl.Trainer, pl_module) -> StepService:
        if self.service is None:
            if self.widths is None:
                self.prepare(pl_module)
            rank0 = trainer.is_global_zero
            member = pl_module.members[0]
            fields = {layer: receptive_field(member, layer) for layer in self.plan.conv_layers}
            probe_set = self.datamodule.probe_set(self.config.probe_size, self.config.probe_seed)
            self.service = StepService(
                self.plan,
                self.widths,
                self.run_dir,
                trainer.loggers if rank0 else (),
                background=self.config.background_writes,
                probe_set=probe_set,
                fields=fields,
                write=rank0,
            )
            self.service.history.update({k: list(v) for k, v in self._restored.get("history", {}).items()})
            self.service.failures.extend(self._restored.get("failures", []))
        return self.service

    # --- Lightning hooks ---------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._service(trainer, pl_module)
        if self.pending is not None and self.pending == trainer.global_step:
            self.analyse(trainer, pl_module)  # the step a SIGTERM cut short
        elif trainer.global_step == 0:
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
        service = self._service(trainer, pl_module)
        service.finish(int(trainer.global_step), figures=self.config.figures != "none")
        if trainer.is_global_zero and service.writer is not None:
            timings = {f"monitor/seconds/{k}": v for k, v in service.timings().items()}
            service.writer.scalars(timings, int(trainer.global_step))
            rank_zero_info("convergent: monitor time " + ", ".join(f"{k} {v:.1f}s" for k, v in service.timings().items()))
            # native W&B line charts of the over-training curves (convergent.wandb_workspace)
            log_over_training_charts(trainer.loggers, service.history, self.plan.layers, int(trainer.global_step))
        service.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.service is not None:  # what was analysed before the exception is written out
            self.service.flush()

    def state_dict(self) -> dict[str, Any]:
        service = self.service
        history = {k: list(v) for k, v in service.history.items()} if service else self._restored.get("history", {})
        failures = list(service.failures) if service else self._restored.get("failures", [])
        return {"done": list(self.done), "pending": self.pending, "history": history, "failures": failures}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = list(state.get("done", []))
        self.pending = state.get("pending")
        self._restored = {
            "history": {k: [tuple(p) for p in v] for k, v in state.get("history", {}).items()},
            "failures": list(state.get("failures", [])),
        }

    # --- results for the end-of-run summary -------------------------------------------------
    @property
    def failures(self) -> list[str]:
        return list(self.service.failures) if self.service else list(self._restored.get("failures", []))

    @property
    def final_scalars(self) -> dict[str, float]:
        """The scalars of the last analysis step (equal to the last values logged)."""
        return dict(self.service.last_scalars) if self.service else {}

    # --- one analysis step -------------------------------------------------------------------
    def analyse(self, trainer: pl.Trainer, pl_module) -> None:
        step = int(trainer.global_step)
        if step in self.done or trainer.sanity_checking:
            return
        service = self._service(trainer, pl_module)
        c = self.config

        def loader():
            return self.datamodule.probe_dataloader(
                c.probe_size, c.batch_size, rank=trainer.global_rank, world_size=trainer.world_size, seed=c.probe_seed
            )

        # A SIGTERM (Lightning sets received_sigterm) abandons the step at the next check. Under
        # DDP the probe pass is collective, so only rank 0's analyses check.
        def stop() -> bool:
            return bool(getattr(trainer, "received_sigterm", False))

        full = self._full_step(step)
        members = list(pl_module.members)
        abandoned = False
        try:
            probe = service.probe(members, loader(), pl_module.device, full, stop=stop if trainer.world_size == 1 else None)
            if trainer.is_global_zero:
                report = service.analyse_and_write(
                    probe, step, full, figures=self._figures_due(step, full), stop=stop, members=members, batches=loader
                )
                for failure in report.failures:
                    rank_zero_info(f"convergent: {failure}")
        except StepAbandoned as e:
            abandoned = True
            self.pending = step
            rank_zero_info(f"convergent: analysis step {step} abandoned ({e}); it runs again after the resume")
        if not abandoned:
            self.done.append(step)
            self.pending = None
        if abandoned and trainer.world_size == 1:
            # act on the SIGTERM now, not after the next batch: Lightning saves last.ckpt (this step,
            # pending) in on_exception and convergent-train exits cleanly; the resumed run analyses it first
            raise SIGTERMException()
        self.save_checkpoints(trainer, step)

    def _figures_due(self, step: int, full: bool) -> bool:
        if self.config.figures == "full":
            return full
        return self.config.figures == "ends" and (step == 0 or self._at_end)

    def _full_step(self, step: int) -> bool:
        """Step 0, every `full_every`-th analysis step, and the end of fit run every analysis."""
        return step == 0 or self._at_end or len(self.done) % self.config.full_every == 0

    def save_checkpoints(self, trainer, step: int) -> None:
        """The checkpoint of this analysis step, also as last.ckpt (resume after this step) once
        the step's background writes are done (see save_step_checkpoints)."""
        writer = self.service.writer if self.service is not None else None
        after_writes = None if writer is None else (lambda job: writer.after_writes(job, f"last.ckpt of step {step}"))
        save_step_checkpoints(trainer, self.run_dir / "checkpoints", step, self.config.save_checkpoints, after_writes)

    def flush_writes(self) -> None:
        """Wait for the background writer (LastCheckpoint calls this before it writes last.ckpt)."""
        if self.service is not None:
            self.service.flush()
