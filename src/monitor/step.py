"""One analysis step: every analysis and measure of the plan on the statistics of one probe pass.

`analyse(probe, plan, step, full)` returns a `StepReport` of data only: the typed results of every
analysis (by name and layer), the scalars they declare (expanded into their public keys), the
arrays of the step's npz and the tables. Figures are drawn from it by `convergent.monitor.plotting`
and everything is written by `convergent.monitor.writer`. The live monitor and `convergent-analyze`
both run steps through `StepService`, so they log the same keys from the same code.

A failing analysis (an exception, or its time budget spent) is recorded in `report.failures` and
the others go on; a value that is not finite is dropped and recorded the same way.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convergent.analysis import budget
from convergent.analysis.calibration import Calibrated, calibrate
from convergent.analysis.measures import SampleSizeWarning
from convergent.analysis.plan import Plan
from convergent.analysis.registry import Analysis, Pair, Result, key_names, pair_suffix
from convergent.stats.layer import LayerStats, MomentViews, ProbeStats


@dataclass
class LayerContext:
    """What a per-layer analysis's `run` receives."""

    layer: str
    stats: LayerStats
    plan: Plan
    pairs: list[Pair]
    deps: dict[str, Result]  # results of its `requires` / `optional` analyses on this layer
    step: int


@dataclass
class StepContext:
    """What a per-step analysis's `run` receives."""

    probe: ProbeStats
    plan: Plan
    pairs: list[Pair]
    deps: dict[str, dict[str, Result]]  # analysis -> layer -> result
    step: int
    members: Any = None  # the members (analyses with needs.members)
    batches: Callable[[], Any] | None = None  # a fresh iterator over the probe batches


@dataclass
class StepReport:
    step: int
    full: bool
    results: dict[str, dict[str | None, Result]] = field(default_factory=dict)  # analysis -> layer (None: per step) -> result
    measures: dict[str, dict[str, Calibrated]] = field(default_factory=dict)  # measure -> layer -> result
    scalars: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    tables: dict[str, tuple[list[str], list[list]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def result(self, analysis: str, layer: str | None = None) -> Result | None:
        return self.results.get(analysis, {}).get(layer)

    def fail(self, what: str, e: BaseException) -> None:
        self.failures.append(f"step {self.step}: {what} failed: {type(e).__name__}: {e}")


def expand(key: str, value: Any) -> dict[str, float]:
    """The logged scalars of one declared output value (see `registry.key_names`)."""
    if isinstance(value, Calibrated):
        return value.scalars(key)
    if isinstance(value, Mapping):
        values = [float(v) for v in value.values()]
        out = {f"{key}/{pair_suffix(a, b)}": float(v) for (a, b), v in value.items()}
        out[key] = float(np.mean(values))
        out[f"{key}/pairs_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return out
    return {key: float(value)}


def _finish(report: StepReport) -> StepReport:
    # Nothing non-finite reaches a dashboard: a failed value is reported as a failure instead.
    for key in [k for k, v in report.scalars.items() if not np.isfinite(v)]:
        report.failures.append(f"step {report.step}: {key} was not finite and was dropped")
        del report.scalars[key]
    # nor the npz (nor a figure drawn from it): activations that overflowed (a diverging member,
    # fp16) give statistics of inf/NaN
    for key in [k for k, v in report.arrays.items() if v.dtype.kind in "fc" and not np.isfinite(v).all()]:
        report.failures.append(f"step {report.step}: array {key} was not finite and was dropped")
        del report.arrays[key]
    return report


class _Budgeted:
    """Runs one piece of work under the analysis time budget and the stop request; a failure is
    recorded, the step goes on (unless a stop was requested: then `budget.BudgetExceeded`
    propagates and the step is abandoned)."""

    def __init__(self, report: StepReport, plan: Plan, stop: Callable[[], bool] | None, deadline: float | None) -> None:
        self.report, self.plan, self.stop, self.deadline = report, plan, stop, deadline

    def __call__(self, what: str, timing: str, fn: Callable[[], Any]) -> Any:
        seconds = self.plan.config.time_budget.analysis
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            seconds = left if seconds is None else min(seconds, left)
        t0 = time.perf_counter()
        try:
            with budget.budget(seconds, what=what, stop=self.stop):
                return fn()
        except budget.BudgetExceeded as e:
            if self.stop is not None and self.stop():
                raise
            self.report.fail(what, e)
        except Exception as e:  # one analysis failing must not stop the others or training
            self.report.fail(what, e)
            traceback.print_exc()
        finally:
            self.report.seconds[timing] += time.perf_counter() - t0
        return None


def analyse(
    probe: ProbeStats,
    plan: Plan,
    step: int,
    full: bool = True,
    *,
    stop: Callable[[], bool] | None = None,
    members: Any = None,
    batches: Callable[[], Any] | None = None,
) -> StepReport:
    """Every analysis and measure of the plan at a full (or light) step; see the module docstring."""
    report = StepReport(step=step, full=full)
    step_budget = plan.config.time_budget.step
    guarded = _Budgeted(report, plan, stop, None if step_budget is None else time.monotonic() + step_budget)
    config = plan.config
    with warnings.catch_warnings():
        warnings.simplefilter("once", SampleSizeWarning)
        analyses = plan.at(full)
        for layer in plan.layers:
            ls = probe.layers[layer]
            for a in analyses:
                if a.per_layer and layer in a.layers(plan):
                    deps = {d: report.results[d][layer] for d in (*a.requires, *a.optional) if layer in report.results.get(d, {})}
                    if any(d not in deps for d in a.requires):
                        report.failures.append(f"step {step}: {a.name} on {layer} skipped: {', '.join(a.requires)} did not run")
                        continue
                    ctx = LayerContext(layer, ls, plan, a.pairs(plan), deps, step)
                    result = guarded(f"{a.name} on {layer}", a.name, lambda a=a, ctx=ctx: a.run(ctx))
                    if result is not None:
                        report.results.setdefault(a.name, {})[layer] = result
            views = MomentViews(ls, config.interval.groups, config.null.draws)
            for m in plan.measures:
                fn = m.bind(config)
                cal = guarded(
                    f"{m.name} on {layer}",
                    m.analysis,
                    lambda fn=fn, m=m, views=views: calibrate(
                        fn, views, plan.member_pairs, plan.null_pairs, config.interval.level, m.perfect
                    ),
                )
                if cal is not None:
                    report.measures.setdefault(m.name, {})[layer] = cal
        for a in analyses:
            if not a.per_layer:
                deps = {d: report.results.get(d, {}) for d in (*a.requires, *a.optional)}
                ctx = StepContext(probe, plan, a.pairs(plan), deps, step, members, batches)
                result = guarded(a.name, a.name, lambda a=a, ctx=ctx: a.run(ctx))
                if result is not None:
                    report.results.setdefault(a.name, {})[None] = result
    _collect(report, plan)
    return _finish(report)


def _collect(report: StepReport, plan: Plan) -> None:
    """Scalars and arrays of every result, checked against what each analysis declares."""
    for name, per_layer in report.results.items():
        analysis = next(a for a in plan.analyses if a.name == name)
        for layer, result in per_layer.items():
            _declared_scalars(report, plan, analysis, layer, result)
            report.arrays.update(result.arrays())
    for name, per_layer in report.measures.items():
        measure = next(m for m in plan.measures if m.name == name)
        for layer, cal in per_layer.items():
            report.scalars.update(cal.scalars(measure.key(layer)))


def _declared_scalars(report: StepReport, plan: Plan, analysis: Analysis, layer: str | None, result: Result) -> None:
    declared = {o.key: o for o in analysis.outputs(plan, layer)}
    values = dict(result.scalars())
    for key in sorted(set(values) - set(declared)):
        report.failures.append(f"step {report.step}: {analysis.name} produced {key}, which it does not declare (dropped)")
    pairs = analysis.pairs(plan)
    for key, output in declared.items():
        if key not in values:
            report.failures.append(f"step {report.step}: {analysis.name} did not produce its declared {key}")
            continue
        scalars = expand(key, values[key])
        expected = set(key_names(output, pairs, bool(plan.null_pairs_of(pairs))))
        missing = expected - set(scalars)
        if output.kind != "measure" or not missing <= {f"{key}/null", f"{key}/null_p95", f"{key}/above_null"}:
            for k in sorted(missing):
                report.failures.append(f"step {report.step}: {analysis.name} did not produce {k}")
        report.scalars.update(scalars)
