"""Time budgets for analyses (cooperative): long loops call `check()`.

(Interim version; replaced by the full module with its tests.)
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator


class BudgetExceeded(RuntimeError):
    """An analysis ran past its time budget, or a stop (SIGTERM) was requested."""


_ACTIVE: contextvars.ContextVar[tuple] = contextvars.ContextVar("convergent_budgets", default=())


@contextlib.contextmanager
def budget(seconds: float | None, *, what: str = "", stop: Callable[[], bool] | None = None) -> Iterator[None]:
    deadline = None if seconds is None else time.monotonic() + float(seconds)
    token = _ACTIVE.set((*_ACTIVE.get(), (deadline, what, stop, seconds)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def check() -> None:
    now = None
    for deadline, what, stop, seconds in _ACTIVE.get():
        if stop is not None and stop():
            raise BudgetExceeded(f"{what or 'analysis'} stopped: a stop was requested")
        if deadline is not None:
            now = time.monotonic() if now is None else now
            if now > deadline:
                raise BudgetExceeded(f"{what or 'analysis'} cut short: over its time budget of {seconds:g} s")
