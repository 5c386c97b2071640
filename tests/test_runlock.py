"""The run-directory lock (convergent.runlock) against real processes: a live holder is refused
with its pid, host and how to proceed; a dead one is taken over; a requeued SLURM job and DDP ranks
other than 0 are never refused; two processes starting at once cannot both win."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convergent.runlock import LOCK_FILE, RunDirBusy, acquire, proc_start, remove_stale_temporaries

pytestmark = pytest.mark.subprocess

HOLD = """
import sys, time
from convergent.runlock import acquire, RunDirBusy
try:
    lock = acquire(sys.argv[1])
except RunDirBusy as e:
    print("busy", e, flush=True)
    sys.exit(2)
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
"""


def holder(run_dir: Path, seconds: float = 60, **env) -> subprocess.Popen:
    """A real process that takes the lock and keeps it for `seconds` (or is refused)."""
    environ = {
        k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID")
    }
    environ.update(env)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), str(seconds)], env=environ, stdout=subprocess.PIPE, text=True
    )
    return proc


def wait_holding(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line.startswith("holding"), line


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / LOCK_FILE).read_text())


@pytest.fixture
def clean_env(monkeypatch):
    for key in ("SLURM_JOB_ID", "LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    return dict(os.environ)


def test_a_live_holder_is_refused_naming_pid_host_and_how_to_proceed(tmp_path, clean_env):
    other = holder(tmp_path)
    try:
        wait_holding(other)
        assert record(tmp_path)["pid"] == other.pid and record(tmp_path)["host"] == socket.gethostname()
        with pytest.raises(RunDirBusy) as err:
            acquire(tmp_path, clean_env)
        message = str(err.value)
        assert "\n" not in message
        assert f"in use by pid {other.pid} on host {socket.gethostname()}" in message
        assert "wait for it to finish" in message and f"`kill {other.pid}` on {socket.gethostname()}" in message
    finally:
        other.kill()
        other.wait()


def test_the_lock_of_a_killed_process_is_taken_over_with_a_notice(tmp_path, clean_env, capsys):
    other = holder(tmp_path)
    wait_holding(other)
    other.send_signal(signal.SIGKILL)  # leaves its record behind
    other.wait()
    before = record(tmp_path)
    assert before["pid"] == other.pid
    lock = acquire(tmp_path, clean_env)
    notice = capsys.readouterr().err.strip()
    assert notice == (
        f"convergent: taking over the stale lock of {tmp_path.resolve()}: pid {other.pid} on host {socket.gethostname()} "
        f"(started {before['started']}) no longer runs"
    )
    assert record(tmp_path)["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path, clean_env, capsys):
    """The record names a live pid whose kernel start time differs: another process got that pid."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        start = proc_start(other.pid)
        assert start is not None
        (tmp_path / LOCK_FILE).write_text(
            json.dumps({"pid": other.pid, "host": socket.gethostname(), "started": "then", "proc_start": start - 1})
        )
        lock = acquire(tmp_path, clean_env)
        assert "no longer runs" in capsys.readouterr().err
        lock.release()
        (tmp_path / LOCK_FILE).write_text(
            json.dumps({"pid": other.pid, "host": socket.gethostname(), "started": "then", "proc_start": start})
        )
        with pytest.raises(RunDirBusy, match=f"pid {other.pid}"):
            acquire(tmp_path, clean_env)
    finally:
        other.kill()
        other.wait()


def test_another_hosts_holder_is_refused_unless_it_is_this_slurm_job(tmp_path, clean_env, capsys):
    """A requeued SLURM job keeps its SLURM_JOB_ID; its predecessor may have run on another node."""
    (tmp_path / LOCK_FILE).write_text(
        json.dumps({"pid": 4321, "host": "node-a", "started": "2026-11-30 10:00:00", "slurm_job_id": "4242"})
    )
    with pytest.raises(RunDirBusy) as err:
        acquire(tmp_path, clean_env)  # no SLURM job: a process on another host cannot be checked
    assert "pid 4321 on host node-a" in str(err.value) and f"delete {tmp_path.resolve() / LOCK_FILE}" in str(err.value)
    with pytest.raises(RunDirBusy):
        acquire(tmp_path, {**clean_env, "SLURM_JOB_ID": "999"})  # another job
    lock = acquire(tmp_path, {**clean_env, "SLURM_JOB_ID": "4242"})
    assert "of this SLURM job: a requeued job takes it over" in capsys.readouterr().err
    assert record(tmp_path)["slurm_job_id"] == "4242" and record(tmp_path)["pid"] == os.getpid()
    lock.release()


def test_a_requeued_job_is_not_refused_while_its_predecessor_lingers(tmp_path, clean_env):
    other = holder(tmp_path, SLURM_JOB_ID="77")
    try:
        wait_holding(other)
        lock = acquire(tmp_path, {**clean_env, "SLURM_JOB_ID": "77"})
        assert record(tmp_path)["pid"] == os.getpid()
        lock.release()
    finally:
        other.kill()
        other.wait()


def test_ranks_other_than_zero_take_no_lock_and_are_never_refused(tmp_path, clean_env):
    other = holder(tmp_path)
    try:
        wait_holding(other)
        for variable in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"):
            assert acquire(tmp_path, {**clean_env, variable: "1"}) is None, variable
            assert record(tmp_path)["pid"] == other.pid  # untouched
            with pytest.raises(RunDirBusy):
                acquire(tmp_path, {**clean_env, variable: "0"})  # rank 0 is
    finally:
        other.kill()
        other.wait()


def test_re_entrant_and_the_last_release_removes_the_file(tmp_path, clean_env):
    first = acquire(tmp_path, clean_env)
    second = acquire(tmp_path, clean_env)
    assert first is second
    second.release()
    assert record(tmp_path)["pid"] == os.getpid()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_of_processes_starting_at_once_exactly_one_wins(tmp_path):
    for attempt in range(2):
        run_dir = tmp_path / f"run{attempt}"
        procs = [holder(run_dir, seconds=3) for _ in range(3)]
        lines = [p.stdout.readline() for p in procs]
        for p in procs:
            p.kill()
            p.wait()
        assert sorted(line.split()[0] for line in lines) == ["busy", "busy", "holding"], lines


def test_without_os_locks_the_record_still_decides(tmp_path, clean_env, monkeypatch):
    """A filesystem without flock (some NFS/Lustre mounts): ENOLCK, the record alone decides."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    other = holder(tmp_path)
    try:
        wait_holding(other)
        monkeypatch.setattr(fcntl, "flock", no_locks)
        with pytest.raises(RunDirBusy, match=f"pid {other.pid}"):
            acquire(tmp_path, clean_env)
    finally:
        other.kill()
        other.wait()
    lock = acquire(tmp_path, clean_env)  # dead now: taken over, flock or not
    assert lock.os_lock is None and record(tmp_path)["pid"] == os.getpid()
    lock.release()


def test_stale_temporaries_are_removed_and_wandb_is_left_alone(tmp_path):
    keep = [tmp_path / "analysis" / "step=5.npz", tmp_path / "wandb" / "run" / ".tmp-x", tmp_path / "csv" / "metrics.csv"]
    stale = [
        tmp_path / "analysis" / ".tmp-123-step=10.npz",
        tmp_path / "checkpoints" / ".tmp-last.ckpt",
        tmp_path / "csv" / "metrics.csv.tmp",
    ]
    for path in keep + stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
