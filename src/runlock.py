"""One writer per run directory: the lock file `<run dir>/run.lock`.

The first process of a run takes the lock; a second `convergent-train` on the same directory is
refused with one line naming the holder and how to proceed. The lock file holds the holder as JSON
(pid, host, start time, SLURM job id, and the kernel's start time of that pid, which tells a reused
pid apart); an OS advisory lock (`fcntl.flock`) on it is held as well where the filesystem supports
it, so two processes starting at the same instant cannot both win. The record decides who holds it:

- no record, or a record of this process: taken;
- a record of the same SLURM job (`SLURM_JOB_ID`): taken, with a notice (a requeued job; its
  predecessor may have run on another node);
- a record of a process on this host that no longer runs: taken, with a notice (a stale lock);
- a live process on this host, or any process on another host: refused (`RunDirBusy`). Whether a
  process on another host still runs cannot be checked from here: the message says to delete the
  lock file if it does not.

Only rank 0 takes the lock: DDP ranks (`LOCAL_RANK`, `NODE_RANK`, `RANK`, `SLURM_PROCID` other than
0, set by the launcher, by Lightning for its child processes, by torchrun or by SLURM) write nothing
of their own to the run directory and are never refused. The lock is re-entrant within a process
(the console script takes it before Hydra starts, the job again) and released when the last holder
lets go; a killed process leaves its record, which the next process on the same host takes over.

The standard library only (and `ConfigError`): the console script checks the lock before the
heavy imports (measured: refused 0.4-1.2 s after the start on a loaded 2-core machine).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from convergent.errors import ConfigError

try:
    import fcntl
except ImportError:  # not POSIX: the record alone decides
    fcntl = None

LOCK_FILE = "run.lock"
RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID")
# flock on a filesystem that does not support it (some NFS and Lustre mounts): the record decides
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
_WAIT_FOR_RECORD_S = 2.0  # a process holding the OS lock writes its record within milliseconds


class RunDirBusy(ConfigError):
    """Another process holds the run directory; the message names it and how to proceed."""


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: str
    slurm_job_id: str | None = None
    proc_start: int | None = None  # /proc/<pid>/stat start time (clock ticks since boot)

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"pid {self.pid} on host {self.host} (started {self.started}{job})"

    def same_process(self, other: Holder | None) -> bool:
        return other is not None and (self.pid, self.host, self.proc_start) == (other.pid, other.host, other.proc_start)


def is_rank_zero(env: Mapping[str, str]) -> bool:
    """False in a DDP/SLURM process of rank > 0 (the launcher or SLURM set the rank variables)."""
    for key in RANK_VARIABLES:
        value = env.get(key, "0") or "0"
        try:
            if int(value) != 0:
                return False
        except ValueError:
            return False
    return True


def proc_start(pid: int) -> int | None:
    """The kernel's start time of `pid` (Linux /proc); None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name (field 2) may hold spaces
    except (IndexError, ValueError):
        return None


def this_process(env: Mapping[str, str], host: str | None = None) -> Holder:
    pid = os.getpid()
    return Holder(
        pid=pid,
        host=host or socket.gethostname(),
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        slurm_job_id=env.get("SLURM_JOB_ID") or None,
        proc_start=proc_start(pid),
    )


def alive(holder: Holder, host: str) -> bool | None:
    """Does the holder still run? None when it runs on another host (cannot be checked here)."""
    if holder.host != host:
        return None
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    if holder.proc_start is not None:
        now = proc_start(holder.pid)
        if now is not None and now != holder.proc_start:
            return False  # the pid was reused by another process
    return True


def decide(holder: Holder | None, me: Holder, run_dir: Path) -> tuple[bool, str | None]:
    """(take it?, the one line to print): the rules of the module docstring."""
    if holder is None or me.same_process(holder):
        return True, None
    if me.slurm_job_id and holder.slurm_job_id == me.slurm_job_id:
        return True, (
            f"convergent: {run_dir / LOCK_FILE} was held by {holder.describe()}, of this SLURM job: a requeued job takes it over"
        )
    state = alive(holder, me.host)
    if state is False:
        return True, f"convergent: taking over the stale lock of {run_dir}: {holder.describe()} no longer runs"
    if state is True:
        return False, (
            f"run directory {run_dir} is in use by {holder.describe()}; wait for it to finish, "
            f"or stop it (`kill {holder.pid}` on {holder.host}) and run this again"
        )
    return False, (
        f"run directory {run_dir} is in use by {holder.describe()}; wait for it to finish, or stop it "
        f"(`kill {holder.pid}` on {holder.host}); if it no longer runs, delete {run_dir / LOCK_FILE} and run this again"
    )


def _flock(fd: int) -> bool | None:
    """True: this process holds the OS lock; False: another does; None: not supported here."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in _UNSUPPORTED:
            return None
        raise
    return True


def _read(fd: int) -> Holder | None:
    data = os.pread(fd, 1 << 16, 0)
    if not data.strip():
        return None
    try:
        fields = json.loads(data)
        return Holder(**{k: fields.get(k) for k in Holder.__dataclass_fields__})
    except (ValueError, TypeError):
        return None  # a half-written record (its writer was killed while writing it)


def _write(fd: int, holder: Holder) -> None:
    data = (json.dumps(asdict(holder), indent=1) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


class RunLock:
    """The lock of one run directory, held by this process (`acquire`)."""

    def __init__(self, run_dir: Path, fd: int, holder: Holder, os_lock: bool | None) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self.fd = fd
        self.holder = holder
        self.os_lock = os_lock  # True: flock held; False: held by a dead holder's leftover; None: unsupported
        self.count = 1

    def release(self) -> None:
        """Let go once; the last release removes the lock file (if its record is still ours)."""
        self.count -= 1
        if self.count > 0 or self.fd < 0:
            return
        _HELD.pop(str(self.run_dir), None)
        try:
            if self.holder.same_process(_read(self.fd)) and _same_file(self.fd, self.path):
                self.path.unlink()  # before closing: a waiting process then finds no file or a new one
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = -1


_HELD: dict[str, RunLock] = {}


def acquire(run_dir: str | Path, env: Mapping[str, str] | None = None, host: str | None = None) -> RunLock | None:
    """Take the lock of `run_dir` (created if missing) for this process, or raise RunDirBusy.
    None on a rank other than 0 (nothing to lock). A takeover prints its one-line notice."""
    env = os.environ if env is None else env
    if not is_rank_zero(env):
        return None
    run_dir = Path(run_dir).expanduser().resolve()
    held = _HELD.get(str(run_dir))
    if held is not None:
        held.count += 1
        return held
    me = this_process(env, host)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    deadline = time.monotonic() + _WAIT_FOR_RECORD_S
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os_lock = _flock(fd)
        if os_lock and not _same_file(fd, path):  # its holder removed the file between our open and flock
            os.close(fd)
            continue
        holder = _read(fd)
        if holder is None and os_lock is False and time.monotonic() < deadline:
            os.close(fd)  # held by a process that has not written its record yet
            time.sleep(0.05)
            continue
        break
    if holder is None and os_lock is False:
        os.close(fd)
        raise RunDirBusy(
            f"run directory {run_dir} is locked by another process that wrote no record in {path}; "
            "wait for it to finish, then run this again"
        )
    take, line = decide(holder, me, run_dir)
    if not take:
        os.close(fd)
        raise RunDirBusy(line)
    if line:
        print(line, file=sys.stderr, flush=True)
    _write(fd, me)
    if os_lock is None:  # no OS lock: the last writer of the record wins; make sure it is us
        time.sleep(0.1)
        if not me.same_process(_read(fd)):
            other = _read(fd)
            os.close(fd)
            raise RunDirBusy(decide(other, me, run_dir)[1] or f"run directory {run_dir} was taken by another process")
    lock = RunLock(run_dir, fd, me, os_lock)
    _HELD[str(run_dir)] = lock
    return lock


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files killed writers left (`.tmp-*`, `*.tmp`) in the run directory
    (W&B's own `wandb/` excepted). Only the lock holder may call this: nobody else writes there."""
    removed = []
    root = Path(run_dir)
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and "wandb" in dirnames:
            dirnames.remove("wandb")
        for name in filenames:
            if name.startswith(".tmp-") or name.endswith(".tmp"):
                path = Path(dirpath) / name
                try:
                    path.unlink()
                    removed.append(path)
                except OSError:
                    pass
    return removed
