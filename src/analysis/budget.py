"""Time budgets for analyses: a long computation calls :func:`check` in its loops; whoever runs it
wraps it in :func:`budget` and gets :class:`BudgetExceeded` once the time is up or a stop is requested.

::

    with budget(30.0, what="sparse prediction conv3 0->1", stop=lambda: sigterm.is_set()):
        sparse_prediction(...)          # its solver loops call budget.check()

* Nestable, through a :class:`contextvars.ContextVar`: an inner budget's deadline is the earlier
  of its own and every enclosing one, and the enclosing budgets' ``stop`` callables still apply,
  so an inner budget never extends an outer one.
* :func:`check` costs one context-variable read outside any budget (a no-op) and one clock read
  plus the ``stop`` calls inside one.
* Context variables are per thread (and per asyncio task): a thread started inside a budget does
  not see it unless it runs in a copy of the context (``contextvars.copy_context().run``).
* :func:`check` is the only place that raises; leaving the ``with`` block late raises nothing.

Pure Python: no torch, Lightning, W&B or Hydra.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["BudgetExceeded", "budget", "check", "remaining"]


class BudgetExceeded(RuntimeError):
    """An analysis was cut short by its time budget or by a stop request.

    ``what``: the innermost budget's label (what was cut short); ``reason``: ``"time"`` or
    ``"stop"``; ``limit_what`` / ``limit_s``: the budget whose deadline or stop ended it (the
    innermost one or an enclosing one) and its seconds; ``elapsed_s``: seconds since the innermost
    budget began."""

    def __init__(self, what: str, reason: str, elapsed_s: float, limit_what: str, limit_s: float | None) -> None:
        self.what, self.reason, self.elapsed_s = what, reason, elapsed_s
        self.limit_what, self.limit_s = limit_what, limit_s
        name = what or "analysis"
        if reason == "stop":
            why = "a stop was requested" + (f" (budget {limit_what!r})" if limit_what != what else "")
        elif limit_what == what:
            why = f"its time budget of {limit_s:g} s ran out"
        else:
            why = f"the enclosing budget {limit_what or '(unnamed)'!r} of {limit_s:g} s ran out"
        super().__init__(f"{name} cut short after {elapsed_s:.2f} s: {why}")


@dataclass(frozen=True)
class _Budget:
    what: str
    start: float
    deadline: float  # the earliest over this budget and every enclosing one (inf: none)
    deadline_what: str
    deadline_s: float | None
    stops: tuple[tuple[Callable[[], bool], str], ...]  # this budget's and every enclosing one's


_ACTIVE: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("convergent_analysis_budget", default=None)


@contextlib.contextmanager
def budget(seconds: float | None, *, what: str = "", stop: Callable[[], bool] | None = None) -> Iterator[None]:
    """Run the block under a budget of ``seconds`` (``None``: no time limit of its own) and an
    optional ``stop()`` callable (true: cut short now, e.g. a pending SIGTERM). Inside it,
    :func:`check` raises :class:`BudgetExceeded` once the earliest deadline of this and every
    enclosing budget has passed, or any of their ``stop()`` is true."""
    if seconds is not None:
        seconds = float(seconds)
        if math.isnan(seconds) or seconds < 0:
            raise ValueError(f"budget seconds must be >= 0 or None (no limit), got {seconds}")
    if stop is not None and not callable(stop):
        raise TypeError(f"stop must be a callable returning bool, got {type(stop).__name__}")
    outer = _ACTIVE.get()
    now = time.monotonic()
    own = now + seconds if seconds is not None else math.inf
    if outer is not None and outer.deadline <= own:
        deadline, deadline_what, deadline_s = outer.deadline, outer.deadline_what, outer.deadline_s
    else:
        deadline, deadline_what, deadline_s = own, what, seconds
    stops = (outer.stops if outer is not None else ()) + (((stop, what),) if stop is not None else ())
    token = _ACTIVE.set(_Budget(what, now, deadline, deadline_what, deadline_s, stops))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def check() -> None:
    """Raise :class:`BudgetExceeded` if the innermost active budget's time is up or a stop is
    requested; a no-op outside any budget. Call it from long loops (every iteration is fine)."""
    b = _ACTIVE.get()
    if b is None:
        return
    now = time.monotonic()
    for stop, owner in b.stops:
        if stop():
            raise BudgetExceeded(b.what, "stop", now - b.start, owner, None)
    if now >= b.deadline:
        raise BudgetExceeded(b.what, "time", now - b.start, b.deadline_what, b.deadline_s)


def remaining() -> float | None:
    """Seconds left in the innermost active budget (0 when past it), or ``None`` outside any budget
    or when no enclosing budget has a time limit."""
    b = _ACTIVE.get()
    if b is None or b.deadline == math.inf:
        return None
    return max(0.0, b.deadline - time.monotonic())
