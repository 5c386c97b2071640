"""Writing analysis steps without holding up training.

Scalars go to the loggers at once, on the caller's thread (they are cheap, and W&B's history and
the CSV mirror get them in step order). Everything else a step produces - its figures, tables, npz
file and their W&B media and artifact - is made by one background thread, in submission order,
from the step's report: nothing in training waits for it. At most `queue_size` steps wait
(back-pressure beyond: `submit` blocks), `flush()` waits until everything submitted is written
(end of fit, SIGTERM), and a failure of the writer is reported like an analysis failure
(`failures`). `background=False` does the same work synchronously in `submit`.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from convergent.monitor.plotting import collecting_young_garbage, end_figures, step_figures
from convergent.monitor.sinks import RunSinks
from convergent.monitor.step import StepReport
from convergent.monitor.tables import step_tables

_STOP = object()


class Writer:
    def __init__(
        self,
        run_dir: str | Path,
        loggers: Sequence = (),
        *,
        background: bool = True,
        queue_size: int = 2,
        fields: dict | None = None,
        probe_set=None,
    ) -> None:
        self.sinks = RunSinks(Path(run_dir), loggers)
        self.fields, self.probe_set = fields, probe_set
        self.failures: list[str] = []
        self.seconds = {"figures": 0.0, "write": 0.0}
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.Queue(maxsize=max(1, int(queue_size)))
            self._thread = threading.Thread(target=self._work, name="convergent-writer", daemon=True)
            self._thread.start()

    # --- on the caller's thread ----------------------------------------------------------------
    def scalars(self, values: dict[str, float], step: int) -> None:
        self.sinks.scalars(values, step)

    def submit(self, report: StepReport, plan, figures: bool) -> None:
        """Figures (if `figures`), tables and the npz of a step, in the background."""
        self._put(lambda: self._write_step(report, plan, figures), f"step {report.step}")

    def submit_over_training(self, history: dict, plan, step: int) -> None:
        """The over-training figures at the end of fit (`plotting.end_figures`)."""
        snapshot = {k: list(v) for k, v in history.items()}
        self._put(lambda: self._write_over_training(snapshot, plan, step), f"over-training figures at step {step}")

    def after_writes(self, job: Callable[[], None], what: str) -> None:
        """Run `job` once everything submitted so far is written (in the background, in order)."""
        self._put(job, what)

    def flush(self) -> None:
        """Wait until everything submitted is written."""
        if self._queue is not None:
            self._queue.join()

    def close(self) -> None:
        if self._thread is not None and self._queue is not None:
            self.flush()
            self._queue.put(_STOP)
            self._thread.join()
            self._thread, self._queue = None, None  # anything submitted later runs at once

    # --- the work ------------------------------------------------------------------------------
    def _put(self, job: Callable[[], None], what: str) -> None:
        if self._queue is None:
            self._run(job, what)
        else:
            self._queue.put((job, what))  # blocks while queue_size steps wait: back-pressure

    def _work(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                self._run(*item)
            finally:
                self._queue.task_done()

    def _run(self, job: Callable[[], None], what: str) -> None:
        try:
            job()
        except Exception as e:  # the writer failing must not stop training: reported like an analysis failure
            traceback.print_exc()
            self.failures.append(f"{what}: writing failed: {type(e).__name__}: {e}")

    def _write_step(self, report: StepReport, plan, figures: bool) -> None:
        step = report.step
        t0 = time.perf_counter()
        if figures:
            with collecting_young_garbage():
                for key, fig in step_figures(report, plan, self.fields, self.probe_set):
                    self.sinks.figure(key, fig, step)
            # failures of single figures are recorded on the report by step_figures
            self.failures.extend(f for f in report.failures if f.startswith(f"step {step}: figure "))
        t1 = time.perf_counter()
        for key, (columns, rows) in step_tables(report, plan.layers).items():
            self.sinks.table(key, columns, rows, step)
        self.sinks.arrays(report.arrays, step)
        self.seconds["figures"] += t1 - t0
        self.seconds["write"] += time.perf_counter() - t1

    def _write_over_training(self, history: dict, plan, step: int) -> None:
        t0 = time.perf_counter()
        with collecting_young_garbage():
            for key, draw in end_figures(history, plan):
                fig = draw()
                if fig is not None:
                    self.sinks.figure(key, fig, step)
        self.seconds["figures"] += time.perf_counter() - t0
