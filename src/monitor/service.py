"""The step service: one analysis step from the members to the written report, for the live
monitor (`convergent.callbacks.ConvergenceMonitor`) and `convergent-analyze` alike.

    service = StepService(plan, widths, run_dir, loggers, probe_set=..., fields=...)
    probe = service.probe(members, loader, device, full)          # every process
    report = service.analyse_and_write(probe, step, full, ...)    # rank 0

It keeps what a run needs across steps: the over-training history of every pair-averaged scalar,
the last step's scalars (the end-of-run summary), the failures and the seconds spent per part.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from convergent.analysis.budget import BudgetExceeded
from convergent.analysis.plan import Plan
from convergent.errors import ConfigError
from convergent.monitor.probe import PassAbandoned, ProbeRunner
from convergent.monitor.step import StepReport, analyse
from convergent.monitor.writer import Writer
from convergent.stats.layer import ProbeStats

GIB = 1024**3
PER_PAIR = re.compile(r"/m\d+-m\d+$")


class StepAbandoned(RuntimeError):
    """A step stopped before its end because a stop (SIGTERM) was requested; it is run again after
    the resume."""


class StepService:
    def __init__(
        self,
        plan: Plan,
        widths: dict[str, int],
        run_dir: str | Path,
        loggers: Sequence = (),
        *,
        background: bool = True,
        probe_set=None,
        fields: dict | None = None,
        write: bool = True,
    ) -> None:
        self.plan = plan
        self.runner = ProbeRunner(plan, widths)
        self.writer = Writer(run_dir, loggers, background=background, fields=fields, probe_set=probe_set) if write else None
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.last_scalars: dict[str, float] = {}
        self.failures: list[str] = []
        self.seconds: dict[str, float] = defaultdict(float)

    # --- before training ---------------------------------------------------------------------
    def check_memory(self, log: Callable[[str], Any] = print) -> dict[str, int]:
        """Print the statistics' memory estimate; a clear error (before any training) if over the limit."""
        est = self.runner.estimate_bytes()
        parts = ", ".join(f"{k} {v / GIB:.3f}" for k, v in est.items() if k != "total" and v)
        log(f"convergent: statistics will hold {est['total'] / GIB:.3f} GiB per process ({parts} GiB)")
        limit = self.plan.config.memory_limit_gb
        if est["total"] > limit * GIB:
            raise ConfigError(
                f"the statistics need {est['total'] / GIB:.2f} GiB ({parts} GiB), over analysis.memory_limit_gb={limit}; "
                "set analysis.max_units, restrict analysis.pairs, lower analysis.interval.groups or analysis.null.draws, "
                "set analysis.null.enabled=false or drop mutual_info from analysis.analyses, or raise the limit"
            )
        return est

    # --- one step ----------------------------------------------------------------------------
    def probe(self, members, loader, device, full: bool, stop: Callable[[], bool] | None = None) -> ProbeStats:
        """The probe pass (every process). Raises StepAbandoned when `stop()` turns true."""
        t0 = time.perf_counter()
        try:
            return self.runner.run(members, loader, device, full=full, stop=stop)
        except PassAbandoned as e:
            raise StepAbandoned(str(e)) from None
        finally:
            self.seconds["probe"] += time.perf_counter() - t0

    def analyse_and_write(
        self,
        probe: ProbeStats,
        step: int,
        full: bool,
        *,
        figures: bool = True,
        stop: Callable[[], bool] | None = None,
        members=None,
        batches: Callable[[], Any] | None = None,
    ) -> StepReport:
        """Analyse (rank 0), log the scalars at once and hand the rest to the writer. Raises
        StepAbandoned when `stop()` turns true (nothing of the step is logged then)."""
        t0 = time.perf_counter()
        try:
            report = analyse(probe, self.plan, step, full, stop=stop, members=members, batches=batches)
        except BudgetExceeded as e:
            raise StepAbandoned(str(e)) from None
        for part, seconds in report.seconds.items():  # monitor/seconds/<analysis>
            self.seconds[part] += seconds
        report.scalars["monitor/analysis_seconds"] = time.perf_counter() - t0
        self.seconds["analyses"] += time.perf_counter() - t0
        t1 = time.perf_counter()
        if self.writer is not None:
            self.writer.scalars(report.scalars, step)
            self.writer.submit(report, self.plan, figures)
        self.seconds["log"] += time.perf_counter() - t1
        self.failures.extend(report.failures)
        self.last_scalars = dict(report.scalars)
        for key, value in report.scalars.items():
            if not PER_PAIR.search(key):  # the history keeps the pair averages and their calibration
                self.history[key].append((step, value))
        return report

    # --- the end -----------------------------------------------------------------------------
    def finish(self, step: int, figures: bool = True) -> None:
        """Over-training figures, then wait for the writer; its failures join the step failures."""
        if self.writer is None:
            return
        if figures:
            self.writer.submit_over_training(self.history, self.plan, step)
        self.flush()

    def flush(self) -> None:
        if self.writer is not None:
            t0 = time.perf_counter()
            self.writer.flush()
            self.seconds["flush"] += time.perf_counter() - t0
            self.failures.extend(self.writer.failures)
            self.writer.failures.clear()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def timings(self) -> dict[str, float]:
        """Seconds per part (`monitor/seconds/<part>`): probe passes, analyses (and per analysis),
        logging scalars, and the writer's figures and files (on its own thread)."""
        out = dict(self.seconds)
        if self.writer is not None:
            for part, seconds in self.writer.seconds.items():
                out[f"writer/{part}"] = seconds
        return out
