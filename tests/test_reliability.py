"""Faults: a run killed with SIGKILL (in the middle of a checkpoint, a W&B table or an npz write)
resumes (by `resume=` and by itself) with every analysis step logged exactly once; a second
process on a live run directory is refused; SIGTERM checkpoints at once and exits cleanly; a
failing analysis is reported and the rest go on; an unreachable W&B server falls back to the CSV
mirror."""

from __future__ import annotations

import csv
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support import cli_env, run_cli

# A small run with an analysis every 5 steps (light analyses, no figures: ~1 s per analysis step).
STEPS, EVERY = 40, 5
SMALL = (
    "debug=tiny",
    f"trainer.max_steps={STEPS}",
    "trainer.max_epochs=10",  # 8 steps per epoch
    "trainer.limit_val_batches=1",
    "analysis.schedule.kind=every_n_steps",
    f"analysis.schedule.every={EVERY}",
    "analysis.analyses=[correlation,cka]",
    "analysis.layers=[conv1,conv5,fc7]",
    "analysis.figures=none",
    "analysis.null.enabled=false",
)
SCHEDULE = list(range(0, STEPS + 1, EVERY))


def read_csv(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def logged_steps(rows: list[dict], key: str) -> list[int]:
    """Every step at which `key` was logged, in file order (duplicates kept)."""
    return [int(r["step"]) for r in rows if r.get(key) not in (None, "")]


def npz_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("=")[1]) for p in (run_dir / "analysis").glob("step=*.npz"))


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def start(args, cwd: Path, log: Path, **env) -> subprocess.Popen:
    """The CLI in its own session (process group), so a SIGKILL can take the whole job down, W&B's
    service process included, as a node failure or `scancel -s KILL` would."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "convergent.train", *args],
            cwd=cwd,
            env=cli_env(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before {path.name} appeared:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            kill_group(proc)
            raise AssertionError(f"{path.name} did not appear in {timeout} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def kill_when(path: Path, proc: subprocess.Popen, log: Path) -> None:
    """SIGKILL the job as soon as `path` exists (in the middle of writing that analysis step)."""
    try:
        wait_for(path, proc, log)
        kill_group(proc)
        proc.wait(timeout=60)
    finally:
        kill_group(proc)  # whatever happens, nothing of the job stays behind
    assert proc.returncode == -signal.SIGKILL, proc.returncode


class Fifo:
    """A named pipe put where the run is about to write a file (a `.tmp-*` name it writes before
    renaming): the writer blocks in open() until a reader comes, and in write() once the pipe is
    full, so a kill lands in the middle of that write, deterministically (a fast machine finishes a
    3 MB write in milliseconds: no poll catches it). Afterwards the pipe is replaced by what a
    killed writer leaves: a regular file with the bytes written so far."""

    def __init__(self, path: Path, read: bool = True) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK) if read else -1
        self.data = bytearray()

    def read_some(self, proc: subprocess.Popen, log: Path, n: int = 1 << 16, timeout: float = 240) -> None:
        """Read `n` bytes of the write (then the writer is blocked in the middle of it)."""
        deadline = time.monotonic() + timeout
        while len(self.data) < n:
            if proc.poll() is not None or time.monotonic() > deadline:
                kill_group(proc)
                raise AssertionError(f"no write into {self.path.name} ({proc.returncode}):\n{log.read_text()[-4000:]}")
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            chunk = os.read(self.fd, n - len(self.data)) if ready else b""
            self.data += chunk
            if not chunk:
                time.sleep(0.02)  # no writer yet (EOF)

    def leave_what_was_written(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.path.unlink()
        self.path.write_bytes(bytes(self.data))


def kill_now(proc: subprocess.Popen) -> None:
    kill_group(proc)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.returncode


def wandb_segment(run_dir: Path, before: set[Path], proc: subprocess.Popen, log: Path) -> Path:
    """The offline W&B directory of the process just started (created after its temporaries were
    cleaned up: convergent.train removes them before it builds the loggers)."""
    deadline = time.monotonic() + 240
    while True:
        new = set(wandb_runs(run_dir)) - before
        if new:
            return new.pop()
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc)
            raise AssertionError(f"no W&B run directory appeared:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def test_kills_in_every_write_window_sigterm_and_requeue_resume_with_every_analysis_step_once(tmp_path):
    """One run, five processes (the suite's time budget allows no more), each interrupted in
    another window; the whole process group dies, as on a node failure:
    1. SIGKILL in the middle of writing the checkpoint of analysis step 10 (its CSV rows are
       already logged). Meanwhile a second `convergent-train resume=RUN` is refused: exit 2 within
       5 s, one line naming the live holder;
    2. `resume=RUN` takes over the dead process's lock (one notice); SIGKILL during step 20's W&B
       table writes (right as W&B logs pairs/conv1; the next table write is held, so the kill is
       certain to land before the step's other tables, its npz and its last.ckpt);
    3. `resume=RUN`; SIGKILL in the middle of writing step 25's npz;
    4. `resume=RUN`; SIGTERM (preemption) after step 30: it writes `last.ckpt` at once (at the
       step it reached), prints one line and exits with status 0;
    5. a plain rerun into the same fixed run directory (a requeued job, no `resume=`) continues
       by itself and finishes.
    Then every row of the CSV mirror has its step, the analysis rows and npz files hold every
    scheduled step exactly once, every analysis step has its checkpoint, the training rows are at
    the steps of an uninterrupted run, no temporary file is left, and W&B continued one run id."""
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    args = (*SMALL, f"hydra.run.dir={run_dir}")
    host = socket.gethostname()

    # 1. SIGKILL while the checkpoint of step 10 is being written; a second process is refused
    log = tmp_path / "1-killed-in-checkpoint.log"
    proc = start(args, tmp_path, log)
    try:
        wait_for(run_dir / "checkpoints" / "analysis" / "step=5.ckpt", proc, log)
        fifo = Fifo(run_dir / "checkpoints" / "analysis" / ".tmp-step=10.ckpt")  # before step 10 (~1 s away)
        fifo.read_some(proc, log)
        assert 10 in logged_steps(read_csv(run_dir), "align/conv1/max_match")  # the step's rows are out
        t0 = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "convergent.cli", f"resume={run_dir}"],
            cwd=tmp_path,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        took = time.monotonic() - t0
        kill_now(proc)
    finally:
        kill_group(proc)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr[-3000:]
    assert lines[0].startswith(f"error: run directory {run_dir} is in use by pid {proc.pid} on host {host}"), lines[0]
    assert f"`kill {proc.pid}` on {host}" in lines[0]
    assert took < 5, f"the second process took {took:.1f} s to be refused"
    print(f"second process refused in {took:.2f} s")
    fifo.leave_what_was_written()
    assert ckpt_step(ckpt) == 8 and not (run_dir / "checkpoints" / "analysis" / "step=10.ckpt").exists()
    first_id = json.loads((run_dir / "run.json").read_text())["wandb_id"]

    # 2. resume= (stale lock taken over); SIGKILL during step 20's W&B table writes
    log = tmp_path / "2-killed-in-tables.log"
    before = set(wandb_runs(run_dir))
    proc = start([f"resume={run_dir}"], tmp_path, log)
    try:
        wandb_segment(run_dir, before, proc, log)
        held = Fifo(run_dir / "tables" / "pairs" / "conv5" / f".tmp-{proc.pid}-step=20.csv", read=False)
        first_table = run_dir / "tables" / "pairs" / "conv1" / "step=20.csv"  # written just before W&B logs it
        deadline = time.monotonic() + 240
        while not first_table.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        kill_now(proc)
    finally:
        kill_group(proc)
    output = log.read_text()
    assert first_table.exists(), output[-4000:]
    assert f"convergent: taking over the stale lock of {run_dir}: pid" in output and "no longer runs" in output
    assert (
        not (run_dir / "tables" / "pairs" / "fc7" / "step=20.csv").exists()
        and not (run_dir / "analysis" / "step=20.npz").exists()
    )
    # the step's scalars were logged before its background writes; last.ckpt waits for those
    # writes, so it is still before step 20 and the resumed run analyses step 20 again
    assert ckpt_step(ckpt) < 20 and not (run_dir / "checkpoints" / "analysis" / "step=25.ckpt").exists()
    held.leave_what_was_written()  # (nothing: the writer never opened it)

    # 3. resume=; SIGKILL in the middle of writing step 25's npz
    log = tmp_path / "3-killed-in-npz.log"
    before = set(wandb_runs(run_dir))
    proc = start([f"resume={run_dir}"], tmp_path, log)
    try:
        wandb_segment(run_dir, before, proc, log)
        fifo = Fifo(run_dir / "analysis" / f".tmp-{proc.pid}-step=25.npz")
        fifo.read_some(proc, log)
        kill_now(proc)
    finally:
        kill_group(proc)
    fifo.leave_what_was_written()
    assert (run_dir / "analysis" / "step=20.npz").exists() and not (run_dir / "analysis" / "step=25.npz").exists()

    # 4. resume=, then SIGTERM
    log = tmp_path / "4-resumed-then-sigterm.log"
    proc = start([f"resume={run_dir}"], tmp_path, log)
    try:
        wait_for(run_dir / "analysis" / "step=30.npz", proc, log)
        time.sleep(0.5)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)
    finally:
        kill_group(proc)
    output = log.read_text()
    assert "Restored all states from the checkpoint" in output, output[-3000:]
    assert proc.returncode == 0, output[-3000:]
    lines = [line for line in output.splitlines() if "SIGTERM at step" in line]
    assert len(lines) == 1 and lines[0].startswith("convergent: SIGTERM at step"), output[-3000:]
    assert f"resume={run_dir}" in lines[0] and str(ckpt) in lines[0]
    reached = int(lines[0].split("SIGTERM at step ")[1].split(":")[0])
    assert 30 <= reached < STEPS
    # written by the SIGTERM handler (unless `reached` is also an analysis or epoch-end step, whose
    # checkpoint would satisfy this too: then the check is weaker, not wrong)
    assert ckpt_step(ckpt) == reached, "last.ckpt is not at the step the run reached"
    assert ckpt.stat().st_mtime >= sent - 0.01, "last.ckpt was not written after the SIGTERM"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(ckpt)) == []  # loads weights-only

    # 5. a requeued job: the same command again, no resume=
    proc = run_cli("train", *args, cwd=tmp_path)
    assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr

    rows = read_csv(run_dir)
    assert rows and all(r["step"] not in (None, "") for r in rows), "a CSV row without its step"
    for key in ("align/conv1/max_match", "align/fc7/semi_match/m0-m2", "cka/conv5/linear", "align/conv5/dead"):
        assert logged_steps(rows, key) == SCHEDULE, f"{key}: {logged_steps(rows, key)}"
    align_keys = [k for k in rows[0] if k.startswith("align/")]
    assert align_keys and all(logged_steps(rows, k) == SCHEDULE for k in align_keys)
    # Training rows: at the steps of an uninterrupted run (Lightning logs them at global step - 1,
    # every 2nd step; val at each epoch end), never twice. Lightning logs a batch's row just after
    # the batch's callbacks (where the analysis checkpoint is written), so a SIGKILL there loses
    # that one row: at most one per interruption.
    for key, expected in (("train/loss", range(1, STEPS, 2)), ("val/acc", range(7, STEPS, 8))):
        steps = logged_steps(rows, key)
        assert steps == sorted(set(steps)) and set(steps) <= set(expected), f"{key}: {steps}"
        assert len(set(expected) - set(steps)) <= 4, f"{key}: {steps}"
    assert npz_steps(run_dir) == SCHEDULE
    for step in SCHEDULE:
        with np.load(run_dir / "analysis" / f"step={step}.npz") as npz:
            assert np.isfinite(npz["conv1/corr/m0-m1"]).all()
        assert ckpt_step(run_dir / "checkpoints" / "analysis" / f"step={step}.ckpt") == step
    for path in run_dir.rglob("*.ckpt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == [], path
    leftovers = [p for p in run_dir.rglob("*") if p.name.startswith(".tmp-") and "wandb" not in p.parts]
    assert not leftovers, leftovers
    assert not (run_dir / "run.lock").exists()

    assert ckpt_step(ckpt) == STEPS
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == STEPS and not summary.get("failed_analyses")

    wandb_id = json.loads((run_dir / "run.json").read_text())["wandb_id"]
    assert wandb_id == first_id
    runs = wandb_runs(run_dir)
    assert len(runs) == 5 and all(r.name.endswith(f"-{wandb_id}") for r in runs), [r.name for r in runs]


# --- SIGTERM in the middle of an analysis step ------------------------------------------------------
@pytest.mark.subprocess
def test_sigterm_during_an_analysis_step_exits_at_once_with_a_checkpoint_and_the_step_runs_after_resume(tmp_path):
    """A slow measure (0.3 s an evaluation, tests/plugins/slow_measure.py) makes an analysis step take
    seconds; SIGTERM in the middle of step 2's: the step is abandoned at the next check, last.ckpt is
    written and the process exits 0 within 10 s (a cluster's grace period); the resumed run analyses
    step 2 first, and every analysis step is logged exactly once."""
    run_dir = tmp_path / "run"
    marker = tmp_path / "analysing"
    plugins = Path(__file__).resolve().parent / "plugins"
    args = ("debug=tiny", "trainer.max_steps=6", "trainer.limit_val_batches=1", "analysis.schedule.kind=every_n_steps",
            "analysis.schedule.every=2", "analysis.analyses=[mean_activation]", "analysis.plugins=[slow_measure]",
            "analysis.layers=[conv1]", "analysis.interval.groups=2", "analysis.null.draws=1", "analysis.figures=none",
            f"hydra.run.dir={run_dir}")  # fmt: skip
    env = dict(PYTHONPATH=plugins, SLOW_MEASURE_MARKER=marker, SLOW_MEASURE_AFTER=10)  # step 0: 10 evaluations
    log = tmp_path / "1.log"
    proc = start(args, tmp_path, log, **env)
    try:
        wait_for(marker, proc, log)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        kill_group(proc)
    output = log.read_text()
    assert proc.returncode == 0 and took < 10, (proc.returncode, took, output[-3000:])
    assert "analysis step 2 abandoned" in output and "SIGTERM at step 2" in output, output[-3000:]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2
    log = tmp_path / "2.log"
    proc = start([f"resume={run_dir}"], tmp_path, log, PYTHONPATH=plugins)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    rows = read_csv(run_dir)
    assert logged_steps(rows, "slow/conv1/wait") == [0, 2, 4, 6]
    assert logged_steps(rows, "act/conv1/mean") == [0, 2, 4, 6]


# --- resuming from an epoch-end checkpoint ------------------------------------------------------
def test_resume_from_an_epoch_end_checkpoint_logs_at_the_uninterrupted_steps(tmp_path):
    """A checkpoint written at an epoch's end (`last.ckpt`, or the monitor's with the
    every_n_epochs schedule): the resumed run logs every training and validation row at the step
    (and with the value) of the uninterrupted run. (Lightning restores its logging step one too
    high from such a checkpoint; LastCheckpoint puts it back.)"""
    from tests.support import LIGHT, read_metrics, single_thread, train_in

    common = ("debug=tiny", "logger=csv", "trainer.max_steps=16", *LIGHT, "analysis.save_checkpoints=true",
              "analysis.schedule.kind=every_n_epochs", "analysis.schedule.every=1")  # fmt: skip
    with single_thread():
        train_in(tmp_path / "whole", *common)
        epoch_end = tmp_path / "epoch1.ckpt"  # (a path with `=` needs quoting in a Hydra override)
        epoch_end.write_bytes((tmp_path / "whole" / "checkpoints" / "analysis" / "step=8.ckpt").read_bytes())
        assert ckpt_step(epoch_end) == 8
        summary = train_in(tmp_path / "resumed", *common, f"ckpt_path={epoch_end}")
    assert summary["global_step"] == 16 and summary["epochs"] == 2, f"the resumed run skipped training: {summary}"
    whole, resumed = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "resumed")
    for key in ("train/loss", "member1/train/loss", "val/acc", "val/loss", "align/conv1/max_match"):
        after = {step: v for step, v in whole[key].items() if step > 8}
        got = {step: v for step, v in resumed[key].items()}
        assert sorted(got) == sorted(after), f"{key}: resumed at {sorted(got)}, uninterrupted at {sorted(after)}"
        for step in after:
            assert got[step] == pytest.approx(after[step], rel=1e-5, abs=1e-6), (key, step)


# --- a failing analysis -----------------------------------------------------------------------
def tiny_probe(k: int = 2, n: int = 16):
    """The real probe pass of k tiny members on n noise images."""
    from convergent.analysis.builtin.spectral import SpectralOptions
    from convergent.analysis.config import AnalysisConfig
    from convergent.analysis.plan import Plan
    from convergent.models import AlexNet
    from convergent.monitor.probe import ProbeRunner

    members = []
    for i in range(k):
        torch.manual_seed(i)
        members.append(AlexNet.small(width=0.0625, dropout=0.0).eval())
    config = AnalysisConfig(layers=["conv1", "conv3", "fc6"], analyses=["correlation", "spectral", "hierarchical", "cka", "cca"],
                            probe_size=n, batch_size=n, spectral=SpectralOptions(n_clusters=3))  # fmt: skip
    plan = Plan.build(config, k)
    images = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    loader = [(images, torch.zeros(n, dtype=torch.long), torch.arange(n))]
    probe = ProbeRunner(plan, {l: members[0].layer_width(l) for l in plan.layers}).run(members, loader, torch.device("cpu"))
    return probe, plan


def crash_on(monkeypatch, name: str, layer: str) -> None:
    """Analysis `name` raises on one layer (a real exception from inside the analysis)."""
    from convergent.analysis.registry import REGISTRY

    analysis = REGISTRY.analyses[name]
    real = analysis.run

    def run(ctx):
        if ctx.layer == layer:
            raise np.linalg.LinAlgError("SVD did not converge")
        return real(ctx)

    monkeypatch.setattr(analysis, "run", run)


def test_a_failing_analysis_is_reported_with_layer_and_step_and_the_rest_go_on(monkeypatch):
    from convergent.monitor.step import analyse

    probe, plan = tiny_probe()
    crash_on(monkeypatch, "spectral", "conv3")
    report = analyse(probe, plan, step=7)
    assert report.failures == ["step 7: spectral on conv3 failed: LinAlgError: SVD did not converge"]
    expected = plan.declared_keys()
    lost = {k for k in expected if k.startswith("spectral/conv3/")}
    assert lost and set(report.scalars) == expected - lost  # every other analysis of every layer is there
    assert "spectral/conv1/shared_fraction" in report.scalars and "hier/conv3/cross_fraction" in report.scalars
    assert "conv3/linkage/m0-m1" in report.arrays and "conv3/spectral_labels/m0-m1" not in report.arrays


def test_a_failing_analysis_during_training_is_in_the_end_summary(tmp_path, monkeypatch, caplog):
    """In a real (in-process) training: the failure is logged at each analysis step with its layer
    and step, training and the other analyses finish, summary.json lists the failures."""
    import logging

    from tests.support import LIGHT, read_metrics, single_thread, train_in

    crash_on(monkeypatch, "mean_activation", "conv3")
    caplog.set_level(logging.INFO)
    with single_thread():
        summary = train_in(tmp_path, "debug=tiny", "logger=csv", "trainer.max_steps=3", *LIGHT)
    steps = [0, 1, 2, 3]
    failures = [f"step {t}: mean_activation on conv3 failed: LinAlgError: SVD did not converge" for t in steps]
    assert summary["global_step"] == 3 and summary["failed_analyses"] == failures
    assert json.loads((tmp_path / "summary.json").read_text())["failed_analyses"] == failures
    assert all(f"convergent: {f}" in caplog.text for f in failures)
    metrics = read_metrics(tmp_path)
    assert sorted(metrics["act/conv1/mean"]) == steps and sorted(metrics["align/conv3/max_match"]) == steps
    assert sorted(metrics["cka/conv3/linear"]) == steps and "act/conv3/mean" not in metrics
    assert sorted(metrics["train/loss"]) == [1]  # logged every 2nd step, at global step - 1


# --- W&B unreachable ----------------------------------------------------------------------------
@pytest.mark.slow
def test_wandb_unreachable_falls_back_to_the_csv_mirror(tmp_path):
    """An API key but no server (nothing listens on the port): a one-line warning, then training
    and the monitor go on with the CSV mirror."""
    run_dir = tmp_path / "run"
    proc = run_cli(
        "train", "debug=tiny", "trainer.max_steps=4", *SMALL[4:], "logger.wandb.init_timeout=5", f"hydra.run.dir={run_dir}",
        cwd=tmp_path, timeout=300, WANDB_MODE="online", WANDB_API_KEY="0123456789abcdef" * 2 + "01234567",
        WANDB_BASE_URL="http://127.0.0.1:9", WANDB_INIT_TIMEOUT=5,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    warnings_ = [line for line in output.splitlines() if "W&B could not start" in line]
    assert len(warnings_) == 1 and "continuing with the CSV mirror only (csv/metrics.csv)" in warnings_[0], output[-3000:]
    rows = read_csv(run_dir)
    assert logged_steps(rows, "align/conv1/max_match") == [0, 4] and logged_steps(rows, "train/loss") == [1, 3]
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 4
    assert not wandb_runs(run_dir)
