"""A W&B workspace a person can read (README "The W&B workspace").

- per-pair keys (`.../m{a}-m{b}`) stay in the history but are hidden from W&B's automatic panels;
- headline keys (pair averages, nulls, calibrated scores, functional values) are drawn against
  `analysis/step` (the global step of the analysis step, logged with its scalars);
- at the end of fit, the over-training curves as native multi-line charts
  (`over_training/<family>/<measure>`: a line per layer, with the null mean and p95 when logged).

W&B's `define_metric` takes a glob only as a suffix (`align/*`), matched as a prefix, and when
several globs match a key wandb-core takes whichever its map yields first: Lightning's own
`define_metric("*", step_metric="trainer/global_step")` matches every key, so a glob of ours would
win only by chance, and a per-pair key (`/m0-m1` at the end) has no prefix of its own. Every
analysis key is therefore defined by its exact name the first time it is logged, which takes
precedence over any glob (~0.25 ms a key; about 900 keys once in the main job).
The sinks call `wandb_scalars` (one line) and the monitor `log_over_training_charts` (one line).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence

from convergent.report.keys import charts, parse_key

STEP_METRIC = "analysis/step"
CHART_PREFIX = "over_training"

# keys already defined, per W&B logger (a multirun's jobs each have their own logger)
_defined: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def define_new_metrics(run, keys, owner=None) -> int:
    """Define, once per run, each analysis key not yet defined: per-pair ones hidden, all drawn
    against `analysis/step`. Returns how many were defined now."""
    owner = run if owner is None else owner
    done = _defined.setdefault(owner, set())
    define = getattr(run, "define_metric", None)
    if define is None:
        return 0
    if not done:
        define(STEP_METRIC, hidden=True)  # the x-axis itself needs no panel
    new = 0
    for key in keys:
        if key in done:
            continue
        done.add(key)
        parsed = parse_key(key)
        if parsed is None:
            continue
        define(key, step_metric=STEP_METRIC, hidden=True if not parsed.headline else None)
        new += 1
    return new


def wandb_scalars(logger, values: Mapping[str, float], step: int) -> dict[str, float]:
    """What the W&B logger gets for a `RunSinks.scalars` call: the same values, their metrics
    defined first, plus `analysis/step` when they hold analysis keys."""
    out = dict(values)
    run = getattr(logger, "experiment", None)
    if run is None or not any(parse_key(k) is not None for k in out):
        return out
    define_new_metrics(run, out, owner=logger)
    out[STEP_METRIC] = int(step)
    return out


def over_training_series(
    history: Mapping[str, Sequence[tuple[int, float]]], layers: Sequence[str]
) -> dict[str, tuple[list, list, list]]:
    """`over_training/<chart>` -> (xs per line, ys per line, line names) from the monitor's
    history of headline keys (step, value); a line per layer (or measure), baselines labelled."""
    out: dict[str, tuple[list, list, list]] = {}
    for chart in charts(list(history), layers):
        xs, ys, names = [], [], []
        for series in chart.series:
            points = sorted(history[series.key])
            if not points:
                continue
            xs.append([int(s) for s, _ in points])
            ys.append([float(v) for _, v in points])
            names.append(series.panel if series.role != "baseline" else f"{series.panel} {series.stat}")
        if xs:
            out[f"{CHART_PREFIX}/{chart.name}"] = (xs, ys, names)
    return out


def log_over_training_charts(loggers, history, layers: Sequence[str], step: int) -> int:
    """Log the over-training curves as `wandb.plot.line_series` charts to the W&B logger among
    `loggers` (none: nothing). Returns the number of charts."""
    from convergent.loggers import wandb_logger

    logger = wandb_logger(loggers)
    run = getattr(logger, "experiment", None) if logger is not None else None
    if run is None or not hasattr(run, "log"):
        return 0
    import wandb
    from pytorch_lightning.utilities import rank_zero_warn

    series = over_training_series(history, layers)
    if not series:
        return 0
    try:
        row = {
            key: wandb.plot.line_series(xs=xs, ys=ys, keys=names, title=key.removeprefix(f"{CHART_PREFIX}/"), xname="global step")
            for key, (xs, ys, names) in series.items()
        }
        row["trainer/global_step"] = int(step)
        run.log(row)
    except Exception as e:  # noqa: BLE001 - a chart must never end a finished training
        rank_zero_warn(f"W&B over-training charts were not logged ({type(e).__name__}: {e})")
        return 0
    return len(series)
