"""Mean, standard deviation, min and max of every headline key over the runs of a group.

- per analysis step: over the runs that logged the key at that step (`n` says how many), so a
  step some runs lack is still reported;
- final: each run's value at the last step it logged the key (a killed run's last value counts).
The standard deviation is the sample one (ddof = 1: the spread between seeds as an estimate of
the spread of the setting); for a single run it is undefined: None here, an empty cell in CSV.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SD_DDOF = 1

Metrics = Mapping[str, Mapping[int, float]]  # key -> {step: value}, one run


@dataclass(frozen=True)
class Spread:
    n: int
    mean: float
    sd: float | None
    min: float
    max: float


def spread(values: Sequence[float]) -> Spread:
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("spread of no values")
    sd = float(np.std(x, ddof=SD_DDOF)) if x.size > SD_DDOF else None
    return Spread(n=int(x.size), mean=float(np.mean(x)), sd=sd, min=float(np.min(x)), max=float(np.max(x)))


@dataclass(frozen=True)
class StepRow:
    """One row of summary.csv."""

    group: str
    key: str
    step: int
    spread: Spread


@dataclass(frozen=True)
class FinalRow:
    group: str
    key: str
    steps: tuple[int, ...]  # the distinct last steps of the runs (one unless some stopped early)
    spread: Spread


def per_step(groups: Mapping[str, Sequence[Metrics]]) -> list[StepRow]:
    """Rows sorted by group (as given), key, step."""
    rows = []
    for group, runs in groups.items():
        for key in sorted({k for run in runs for k in run}):
            steps = sorted({s for run in runs for s in run.get(key, {})})
            for step in steps:
                values = [run[key][step] for run in runs if step in run.get(key, {})]
                rows.append(StepRow(group, key, step, spread(values)))
    return rows


def final_values(groups: Mapping[str, Sequence[Metrics]]) -> list[FinalRow]:
    rows = []
    for group, runs in groups.items():
        for key in sorted({k for run in runs for k in run}):
            last = [(max(run[key]), run[key][max(run[key])]) for run in runs if run.get(key)]
            rows.append(FinalRow(group, key, tuple(sorted({s for s, _ in last})), spread([v for _, v in last])))
    return rows
