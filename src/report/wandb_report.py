"""`convergent-report --wandb`: the report's tables and figures as one W&B run with
`job_type="report"` in the sweep's group (offline without an API key, as training runs are).

Logged: `report/summary` (summary.csv), `report/final` (final.csv), `report/final/<layer>` (the
page's final-value tables), `report/runs` (runs.csv), `report/fig/<chart>` (every figure) and
`report/page` (index.html as W&B HTML). The group: `--group`, else the first run's
`logger.wandb.group`, else the group convergent-train gave it from where it sits (the Hydra
multirun directory's name, the sweep id of an `outputs/sweep-<id>/` folder), else the name of the
first path.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

from convergent.report.build import Report
from convergent.report.html import final_layer_tables
from convergent.sweep import sweep_group_of
from convergent.wandb_mode import resolve_wandb_mode


def _wandb_cfg(report: Report) -> dict:
    config = report.runs[0].config if report.runs else {}
    return dict(((config.get("logger") or {}).get("wandb") or {}), project=config.get("project"))


def default_group(report: Report) -> str:
    group = _wandb_cfg(report).get("group")
    if group:
        return str(group)
    found = sweep_group_of(report.runs[0].path) if report.runs else None
    return found or report.paths[0].resolve().name


def _csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def log_report(
    report: Report, figures: Mapping[str, Path], files: Mapping[str, Path], out: Path, group: str | None = None
) -> Path:
    """Log everything to a new W&B run under `out/wandb`; returns that run's directory."""
    import wandb

    wb = _wandb_cfg(report)
    mode = resolve_wandb_mode(wb.get("mode"))
    group = group or default_group(report)
    run = wandb.init(
        project=wb.get("project") or "convergent",
        entity=wb.get("entity"),
        group=group,
        job_type="report",
        name=f"report:{group}",
        dir=str(out),
        mode=mode,
        config={
            "report.paths": [str(p) for p in report.paths],
            "report.groups": report.group_sizes,
            "report.n_runs": len(report.runs),
        },
        settings=wandb.Settings(silent=True),
    )
    try:
        row: dict = {}
        for name in ("summary", "final", "runs"):
            columns, data = _csv_rows(files[f"{name}.csv"])
            row[f"report/{name}"] = wandb.Table(columns=columns, data=data)
        for title, header, rows in final_layer_tables(report):
            row[f"report/final/{title.removeprefix('layer ')}"] = wandb.Table(columns=header, data=rows)
        for name, path in figures.items():
            row[f"report/fig/{name}"] = wandb.Image(str(path), caption=name)
        if "index.html" in files:
            row["report/page"] = wandb.Html(files["index.html"].read_text(encoding="utf-8"), inject=False)
        run.log(row)
        run_dir = Path(run.dir).parent
    finally:
        run.finish()
    if mode == "offline":
        print(f"W&B: report logged offline under {run_dir}; upload with `wandb sync {run_dir}`")
    return run_dir
