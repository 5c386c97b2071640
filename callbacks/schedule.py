"""When the monitor analyses: step 0, a schedule, and the end of fit."""

from __future__ import annotations

import math
from dataclasses import dataclass

from convergent.analysis.config import SCHEDULE_KINDS


def log_spaced_steps(max_step: int, points_per_decade: int, first: int = 1) -> list[int]:
    """Global steps 10**(i / points_per_decade), rounded, unique, from `first` up to `max_step`
    (3 per decade: 1, 2, 5, 10, 22, 46, 100, ...)."""
    steps, i = set(), 0
    while True:
        s = int(round(10 ** (i / points_per_decade)))
        if s > max_step:
            return sorted(steps)
        if s >= first:
            steps.add(s)
        i += 1


@dataclass(frozen=True)
class Schedule:
    """`analysis.schedule` (its keys and defaults: `convergent.analysis.config.ScheduleConfig`)."""

    kind: str
    points_per_decade: int
    every: int
    first: int

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"analysis.schedule.kind={self.kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}")
        if self.points_per_decade < 1 or self.every < 1 or self.first < 1:
            raise ValueError("analysis.schedule.points_per_decade, every and first must be >= 1")

    def due_after_step(self, step: int) -> bool:
        """After an optimiser step that brought the global step to `step`."""
        if self.kind == "log":
            if step < self.first:
                return False
            x = self.points_per_decade * math.log10(step)
            candidates = (math.floor(x), math.ceil(x))
            return any(int(round(10 ** (i / self.points_per_decade))) == step for i in candidates)
        if self.kind == "every_n_steps":
            return step > 0 and step % self.every == 0
        return False

    def due_after_epoch(self, epoch: int) -> bool:
        """At the end of (0-based) training epoch `epoch`."""
        return self.kind == "every_n_epochs" and (epoch + 1) % self.every == 0
