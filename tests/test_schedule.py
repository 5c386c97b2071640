"""The analysis schedule: which global steps the monitor analyses."""

import pytest

from convergent.analysis.config import ScheduleConfig
from convergent.callbacks import Schedule, log_spaced_steps


@pytest.mark.parametrize(("points", "first"), [(3, 1), (3, 10), (2, 5), (5, 1)])
def test_log_schedule_is_the_enumerated_log_spaced_steps(points, first):
    schedule = Schedule("log", points, 1, first)
    due = [s for s in range(0, 5001) if schedule.due_after_step(s)]
    assert due == log_spaced_steps(5000, points, first)
    assert due[0] >= first and all(s >= 1 for s in due)


def test_default_schedule_starts_at_step_10():
    c = ScheduleConfig()
    schedule = Schedule(c.kind, c.points_per_decade, c.every, c.first)
    assert [s for s in range(1001) if schedule.due_after_step(s)] == [10, 22, 46, 100, 215, 464, 1000]


def test_every_n_steps():
    schedule = Schedule("every_n_steps", 3, 4, 10)
    assert [s for s in range(13) if schedule.due_after_step(s)] == [4, 8, 12]
