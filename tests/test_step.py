"""One analysis step's bookkeeping: an analysis past its time budget is cut short and reported while
the others finish; the background writer writes in order, waits when full, and reports its errors."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from convergent.analysis.config import AnalysisConfig, NullConfig, TimeBudgetConfig
from convergent.analysis.plan import Plan
from convergent.analysis.registry import REGISTRY, Measure
from convergent.models import AlexNet
from convergent.monitor.probe import ProbeRunner
from convergent.monitor.step import StepReport, analyse
from convergent.monitor.writer import Writer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_probe(plan: Plan, n: int = 16):
    members = []
    for i in range(plan.k):
        torch.manual_seed(i)
        members.append(AlexNet.small(width=0.0625, dropout=0.0).eval())
    images = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    loader = [(images, torch.zeros(n), torch.arange(n))]
    return ProbeRunner(plan, {l: members[0].layer_width(l) for l in plan.layers}).run(members, loader, "cpu")


def test_an_analysis_past_its_budget_is_cut_short_and_reported_the_others_finish(monkeypatch):
    slow_calls = []

    def slow(stats, a, b):  # a measure slower than its budget allows (its calibration checks between calls)
        slow_calls.append(time.monotonic())
        time.sleep(0.05)
        return 0.0

    original = REGISTRY.measures["procrustes/similarity"]
    monkeypatch.setitem(REGISTRY.measures, "procrustes/similarity", Measure("procrustes/similarity", slow))
    config = AnalysisConfig(layers=["conv1", "fc6"], analyses=["correlation", "cka", "procrustes"], probe_size=16, batch_size=16,
                            null=NullConfig(draws=2), time_budget=TimeBudgetConfig(analysis=0.2))  # fmt: skip
    plan = Plan.build(config, 2)
    t0 = time.monotonic()
    report = analyse(tiny_probe(plan), plan, step=3)
    failures = [f for f in report.failures if "procrustes/similarity" in f]
    assert len(failures) == 2 and all("its time budget of 0.2 s ran out" in f and f.startswith("step 3: ") for f in failures), (
        report.failures
    )
    assert len(slow_calls) < 2 * 8  # cut short: a full calibration is 1 + 10 + 2 evaluations per layer
    assert "procrustes/conv1/similarity" not in report.scalars
    assert "cka/conv1/linear" in report.scalars and "align/fc6/max_match/ci_lo" in report.scalars  # the others finished
    assert time.monotonic() - t0 < 60
    assert REGISTRY.measures["procrustes/similarity"] is not original


def report_with(step: int, value: float) -> StepReport:
    r = StepReport(step=step, full=False)
    r.arrays = {"x": np.full(3, value)}
    return r


class Plan1:
    layers: list[str] = []

    def on(self, name, full=True):
        return False

    heavy_pairs: list = []


def test_the_writer_writes_in_order_in_the_background_with_back_pressure(tmp_path):
    writer = Writer(tmp_path, [], background=True, queue_size=1)
    gate = threading.Event()
    original = writer.sinks.arrays
    order = []

    def arrays(values, step):
        gate.wait(10)  # the first write blocks until the test lets it go
        order.append(step)
        return original(values, step)

    writer.sinks.arrays = arrays
    writer.submit(report_with(0, 0.0), Plan1(), figures=False)  # taken by the thread, blocked
    writer.submit(report_with(1, 1.0), Plan1(), figures=False)  # queued (queue_size 1)
    third = threading.Thread(target=writer.submit, args=(report_with(2, 2.0), Plan1(), False))
    third.start()
    third.join(0.5)
    assert third.is_alive(), "a full queue must make submit wait (back-pressure)"
    gate.set()
    third.join(10)
    writer.flush()
    assert order == [0, 1, 2]
    for step in (0, 1, 2):
        assert np.load(tmp_path / "analysis" / f"step={step}.npz")["x"][0] == step
    writer.close()


def test_a_failing_write_is_reported_not_raised(tmp_path):
    writer = Writer(tmp_path, [], background=True)

    def broken(values, step):
        raise OSError("disk full")

    writer.sinks.arrays = broken
    writer.submit(report_with(5, 0.0), Plan1(), figures=False)
    writer.flush()
    assert writer.failures == ["step 5: writing failed: OSError: disk full"]
    writer.close()


def test_a_job_after_writes_runs_once_the_steps_files_exist_and_nothing_hangs_after_close(tmp_path):
    """The monitor publishes last.ckpt through `after_writes`: it must not run before the step's npz."""
    writer = Writer(tmp_path, [], background=True)
    gate = threading.Event()
    original = writer.sinks.arrays
    seen = []

    def arrays(values, step):
        gate.wait(10)
        return original(values, step)

    writer.sinks.arrays = arrays
    writer.submit(report_with(7, 7.0), Plan1(), figures=False)
    writer.after_writes(lambda: seen.append((tmp_path / "analysis" / "step=7.npz").exists()), "publish step 7")
    time.sleep(0.3)
    assert seen == [], "the job ran while the step's writes were pending"
    gate.set()
    writer.flush()
    assert seen == [True]
    writer.close()
    writer.after_writes(lambda: seen.append("after close"), "late")  # runs at once, no consumer needed
    writer.flush()
    assert seen == [True, "after close"]
