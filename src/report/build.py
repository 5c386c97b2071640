"""A report from run directories: read, group, aggregate, and write the CSV files.

Files written to the output directory (README "Reports across runs"):
    summary.csv   group, n_runs, key, step, mean, sd, min, max   (per group, headline key, step)
    final.csv     group, layer, key, n_runs, mean, sd, min, max, last_steps   (each run's last value)
    runs.csv      run_dir, group, status, analysis_steps, last_step, detail   (every run)
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from convergent.report.aggregate import FinalRow, Spread, StepRow, final_values, per_step
from convergent.report.groups import Grouping, RunStatus, group_runs, run_statuses
from convergent.report.keys import Chart, charts, parse_key
from convergent.report.runs import RunData, find_run_dirs, load_run

SUMMARY_COLUMNS = ("group", "n_runs", "key", "step", "mean", "sd", "min", "max")
FINAL_COLUMNS = ("group", "layer", "key", "n_runs", "mean", "sd", "min", "max", "last_steps")
RUNS_COLUMNS = ("run_dir", "group", "status", "analysis_steps", "last_step", "detail")
NO_LAYER = "-"


@dataclass
class Report:
    paths: list[Path]
    runs: list[RunData]
    grouping: Grouping
    statuses: list[RunStatus]
    rows: list[StepRow]
    finals: list[FinalRow]
    charts: list[Chart]
    layers: list[str]  # union of the runs' analysed layers, in config order

    @property
    def group_sizes(self) -> dict[str, int]:
        return {name: len(runs) for name, runs in self.grouping.groups.items()}

    @property
    def problems(self) -> list[RunStatus]:
        return [s for s in self.statuses if s.status != "ok"]

    def layer_of(self, key: str) -> str:
        parsed = parse_key(key, self.layers)
        return (parsed.layer if parsed else None) or NO_LAYER


def build_report(paths: Sequence[Path]) -> Report:
    """Raises ReportError for a path that does not exist or holds no run."""
    dirs: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        for d in find_run_dirs(Path(path)):
            if d.resolve() not in seen:  # a run given twice (a folder and a run inside it) counts once
                seen.add(d.resolve())
                dirs.append(d)
    runs = [load_run(d) for d in dirs]
    grouping = group_runs(runs)
    layers = list(dict.fromkeys(layer for run in runs for layer in run.layers))
    metrics = {name: [run.metrics for run in group] for name, group in grouping.groups.items()}
    rows = per_step(metrics)
    keys = sorted({row.key for row in rows})
    return Report(
        paths=[Path(p) for p in paths],
        runs=runs,
        grouping=grouping,
        statuses=run_statuses(grouping),
        rows=rows,
        finals=final_values(metrics),
        charts=charts(keys, layers),
        layers=layers,
    )


def _cells(s: Spread) -> list:
    return [s.n, repr(s.mean), "" if s.sd is None else repr(s.sd), repr(s.min), repr(s.max)]


def _write(path: Path, columns: Sequence[str], rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def write_tables(report: Report, out: Path) -> dict[str, Path]:
    summary = [[r.group, r.spread.n, r.key, r.step, *_cells(r.spread)[1:]] for r in report.rows]
    final = []
    for r in report.finals:
        n, *rest = _cells(r.spread)
        final.append([r.group, report.layer_of(r.key), r.key, n, *rest, ";".join(map(str, r.steps))])
    runs = []
    for s in report.statuses:
        steps = s.run.analysis_steps
        runs.append([str(s.run.path), s.group, s.status, len(steps), steps[-1] if steps else "", s.detail])
    return {
        "summary.csv": _write(out / "summary.csv", SUMMARY_COLUMNS, summary),
        "final.csv": _write(out / "final.csv", FINAL_COLUMNS, final),
        "runs.csv": _write(out / "runs.csv", RUNS_COLUMNS, runs),
    }
