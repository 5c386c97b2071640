"""Report figures: per measure, a panel per layer, one curve per group over training.

Each curve is the mean over the group's runs at each analysis step; the band spans the min to the
max over those runs (with 2 to 5 seeds the range shows every run, where mean +- sd would hide
some); baselines (the null's mean, its p95) are drawn dashed / dotted in the group's
colour. The step axis is logarithmic with step 0 drawn at 0.5, as in the run's own
`over_training` figures (`convergent.plotting.over_training_figure`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from convergent.report.aggregate import StepRow
from convergent.report.keys import Chart

BASELINE_STYLE = {"null": "--", "null_p95": ":"}
STYLE_WORD = {"--": "dashed", ":": "dotted", "-.": "dash-dot"}
BAND = "band: min to max over runs"


def figure_name(chart: Chart) -> str:
    """`align/semi_match` -> `align_semi_match` (a file name)."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", chart.name.replace("/", "_"))


def curves(rows: Sequence[StepRow]) -> dict[tuple[str, str], tuple[np.ndarray, ...]]:
    """(group, key) -> (steps, mean, min, max, n) arrays from summary rows."""
    collected: dict[tuple[str, str], list[StepRow]] = {}
    for row in rows:
        collected.setdefault((row.group, row.key), []).append(row)
    out = {}
    for ident, rs in collected.items():
        rs = sorted(rs, key=lambda r: r.step)
        out[ident] = (
            np.array([r.step for r in rs], dtype=float),
            np.array([r.spread.mean for r in rs]),
            np.array([r.spread.min for r in rs]),
            np.array([r.spread.max for r in rs]),
            np.array([r.spread.n for r in rs]),
        )
    return out


def chart_figure(
    chart: Chart, data: Mapping[tuple[str, str], tuple[np.ndarray, ...]], groups: Mapping[str, int]
) -> Figure | None:
    """`groups`: name -> number of runs (legend). None when no group has any of the chart's keys."""
    panels = [p for p in chart.panels if any((g, s.key) in data for g in groups for s in chart.in_panel(p))]
    if not panels:
        return None
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(3.2 * ncols + 0.4, 2.6 * nrows + 0.7))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colours = [f"C{i % 10}" for i in range(len(groups))]
    for ax, panel in zip(axes.flat, panels):
        for colour, (group, n_runs) in zip(colours, groups.items()):
            for series in chart.in_panel(panel):
                if (group, series.key) not in data:
                    continue
                steps, mean, lo, hi, _n = data[(group, series.key)]
                x = np.maximum(steps, 0.5)
                if series.role == "baseline":
                    ax.plot(x, mean, BASELINE_STYLE.get(series.stat, "-."), lw=0.9, color=colour)
                    continue
                ax.plot(x, mean, "o-", ms=2.5, lw=1.2, color=colour, label=f"{group} (n={n_runs})")
                ax.fill_between(x, lo, hi, color=colour, alpha=0.2, lw=0)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(LogFormatter())
        ax.set_title(panel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("global step (step 0 at 0.5)", fontsize=7)
    baselines = sorted({s.stat for s in chart.series if s.role == "baseline"})
    note = ", ".join(f"{STYLE_WORD[BASELINE_STYLE.get(b, '-.')]}: {b}" for b in baselines)
    fig.suptitle(f"{chart.name}: mean over runs, {BAND}" + (f"; {note} (mean over runs)" if note else ""), fontsize=9)
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    order = [f"{group} (n={n_runs})" for group, n_runs in groups.items()]
    legend = {label: legend[label] for label in order if label in legend}
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(4, len(legend)), fontsize=7, frameon=False)
    fig.subplots_adjust(
        left=0.08, right=0.98, top=1 - 0.45 / fig.get_figheight(), bottom=0.75 / fig.get_figheight(), wspace=0.3, hspace=0.5
    )
    return fig


def write_figures(charts: Sequence[Chart], rows: Sequence[StepRow], groups: Mapping[str, int], out: Path) -> dict[str, Path]:
    """PNG per chart under `out`; name -> path, in chart order."""
    out.mkdir(parents=True, exist_ok=True)
    data = curves(rows)
    written = {}
    for chart in charts:
        fig = chart_figure(chart, data, groups)
        if fig is None:
            continue
        path = out / f"{figure_name(chart)}.png"
        fig.savefig(path, dpi=100, format="png")
        written[chart.name] = path
    return written
