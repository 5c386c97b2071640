"""convergent.analysis.budget: time budgets and stop requests for analyses (contextvars, nestable)."""

from __future__ import annotations

import contextvars
import threading
import time

import pytest

from convergent.analysis.budget import BudgetExceeded, budget, check, remaining


def _spin(limit_s: float = 10.0) -> float:
    """Call check() in a tight loop; returns the monotonic time at which it raised."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        check()
    raise AssertionError(f"check() did not raise within {limit_s} s")


def test_loop_stops_shortly_after_the_deadline():
    start = time.monotonic()
    with pytest.raises(BudgetExceeded) as info, budget(0.2, what="sparse prediction conv3 0->1"):
        _spin()
    late = time.monotonic() - start - 0.2
    assert 0.0 <= late < 0.5  # generous: the machine is shared; the notes give the measured figure
    err = info.value
    assert err.reason == "time" and err.what == "sparse prediction conv3 0->1" and err.limit_s == 0.2
    assert err.elapsed_s >= 0.2
    assert str(err).startswith("sparse prediction conv3 0->1 cut short after 0.2")
    assert "its time budget of 0.2 s ran out" in str(err)


def test_check_is_a_no_op_outside_any_budget_and_after_one():
    for _ in range(1000):
        check()
    assert remaining() is None
    with budget(0.0, what="x"), pytest.raises(BudgetExceeded):
        check()
    check()  # the budget is gone once its block is left
    with budget(None, what="unlimited"):
        check()
        assert remaining() is None


def test_inner_budget_never_extends_the_outer_one():
    with budget(0.15, what="analyses at step 10"):
        with pytest.raises(BudgetExceeded) as info, budget(60.0, what="mutual information fc6"):
            assert remaining() <= 0.15
            _spin()
        err = info.value
        assert err.what == "mutual information fc6" and err.limit_what == "analyses at step 10"
        assert "the enclosing budget 'analyses at step 10' of 0.15 s ran out" in str(err)
        with pytest.raises(BudgetExceeded):  # the outer one is spent too
            check()


def test_inner_budget_ends_first_and_the_outer_one_goes_on():
    with budget(30.0, what="outer"):
        with pytest.raises(BudgetExceeded) as info, budget(0.05, what="inner"):
            _spin()
        assert info.value.limit_what == "inner"
        check()  # the outer budget still has time
        assert 25.0 < remaining() <= 30.0


def test_stop_request_cuts_short_and_is_inherited():
    flag = threading.Event()
    calls = []

    def stop() -> bool:
        calls.append(1)
        return flag.is_set()

    with budget(None, what="step 100", stop=stop):
        check()
        with budget(60.0, what="cka conv5"):  # no stop of its own: the outer one still applies
            check()
            flag.set()
            with pytest.raises(BudgetExceeded) as info:
                check()
    err = info.value
    assert err.reason == "stop" and err.what == "cka conv5" and err.limit_what == "step 100"
    assert "a stop was requested" in str(err) and len(calls) == 3


def test_budgets_are_per_thread_unless_the_context_is_copied():
    seen: dict[str, object] = {}

    def worker(key: str) -> None:
        try:
            check()
            seen[key] = "ran"
        except BudgetExceeded:
            seen[key] = "cut"

    with budget(0.0, what="spent"):
        t = threading.Thread(target=worker, args=("plain",))
        t.start()
        t.join()
        ctx = contextvars.copy_context()
        t = threading.Thread(target=ctx.run, args=(worker, "copied"))
        t.start()
        t.join()
    assert seen == {"plain": "ran", "copied": "cut"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="budget seconds must be >= 0 or None"), budget(-1.0):
        pass
    with pytest.raises(ValueError, match="got nan"), budget(float("nan")):
        pass
    with pytest.raises(TypeError, match="stop must be a callable"), budget(1.0, stop=True):  # type: ignore[arg-type]
        pass
