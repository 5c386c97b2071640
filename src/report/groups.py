"""Runs grouped by their Hydra overrides with the seed removed, and each run's status.

The grouping key of a run is its overrides without the seed keys (`seed`, `ensemble.seeds`) and
without `hydra.*`; runs with the same key are seeds of one setting. A group's name is the part of
its key that is not common to every run reported (`model.width=0.5`), or `all` when nothing
remains (a sweep over seeds only). The overrides common to every run are reported once.

Status of a run: `ok`; `failed` (no summary.json: killed, crashed or still running); `incomplete`
(finished but with fewer analysis steps than the most complete run of its group); `empty` (no
headline value could be read). Every run is listed with its status; the values of failed and
incomplete runs still count at the steps they have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from convergent.report.runs import RunData
from convergent.sweep import SEED_KEYS, is_hydra_override, override_key

ALL = "all"


def grouping_overrides(overrides: Sequence[str]) -> tuple[str, ...]:
    return tuple(o for o in overrides if not is_hydra_override(o) and override_key(o) not in SEED_KEYS)


@dataclass(frozen=True)
class Grouping:
    groups: dict[str, list[RunData]]  # name -> runs, in the order first seen
    common: tuple[str, ...]  # overrides every run shares (seed and hydra.* left out)


def group_runs(runs: Sequence[RunData]) -> Grouping:
    keys = [grouping_overrides(r.overrides) for r in runs]
    common = tuple(o for o in (keys[0] if keys else ()) if all(o in k for k in keys))
    groups: dict[str, list[RunData]] = {}
    by_key: dict[frozenset, str] = {}
    for run, key in zip(runs, keys):
        ident = frozenset(key)
        if ident not in by_key:
            by_key[ident] = ",".join(o for o in key if o not in common) or ALL
        groups.setdefault(by_key[ident], []).append(run)
    return Grouping(groups=groups, common=common)


@dataclass(frozen=True)
class RunStatus:
    run: RunData
    group: str
    status: str  # ok | failed | incomplete | empty
    detail: str


def run_statuses(grouping: Grouping) -> list[RunStatus]:
    out = []
    for name, runs in grouping.groups.items():
        everywhere = sorted({step for run in runs for step in run.analysis_steps})
        most = max((len(run.analysis_steps) for run in runs), default=0)
        for run in runs:
            steps = run.analysis_steps
            missing = [s for s in everywhere if s not in steps]
            notes = []
            if run.problem:
                notes.append(run.problem)
            if missing:
                notes.append(f"no analysis at step {', '.join(map(str, missing))} (other runs of the group have it)")
            if run.failed_analyses:
                notes.append(f"{len(run.failed_analyses)} failed analyses (summary.json)")
            if not run.metrics:
                status = "empty"
            elif not run.finished:
                status = "failed"
                notes.insert(0, "no summary.json (killed, crashed or still running)")
            elif len(steps) < most:
                status = "incomplete"
            else:
                status = "ok"
            out.append(RunStatus(run=run, group=name, status=status, detail="; ".join(notes)))
    return out
