"""Nothing of a run grows outside its directory, and a finished run stays finished.

Two jobs (a multirun) with HOME, WANDB_DATA_DIR and WANDB_CACHE_DIR in a temporary folder, so the
test sees everything W&B writes: the W&B staging area there does not grow, while every analysis
step's npz reaches its artifact (the offline run's records name it: a hard link to the run's own
file) and W&B's own staged copies (tables) stay inside each job's directory. Resuming a finished job
says so in one line and changes nothing; resuming it with a larger trainer.max_epochs continues it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.rundirs import fingerprint
from tests.support import run_cli
from tests.test_reliability import logged_steps, npz_steps, read_csv, wandb_runs
from tests.test_training import wandb_records

pytestmark = pytest.mark.subprocess

# 8 steps (one epoch: finished by trainer.max_epochs=1), analyses at the log-spaced steps 0, 1, 2, 5 and the end
JOB = ("debug=tiny", "trainer.max_steps=-1", "trainer.max_epochs=1", "trainer.limit_val_batches=1",
       "analysis.analyses=[correlation,cka]", "analysis.layers=[conv1,fc7]", "analysis.figures=none",
       "analysis.null.enabled=false")  # fmt: skip
STEPS_1 = [0, 1, 2, 5, 8]


def user_dirs(tmp: Path) -> dict[str, str]:
    home = tmp / "home"
    return {"HOME": str(home), "WANDB_DATA_DIR": str(home / "wandb-data"), "WANDB_CACHE_DIR": str(home / "wandb-cache")}


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


def staging(env: dict[str, str]) -> list[str]:
    return files_under(Path(env["WANDB_DATA_DIR"]) / "artifacts") + files_under(Path(env["WANDB_CACHE_DIR"]) / "artifacts")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("integrity")
    env = user_dirs(tmp)
    Path(env["HOME"]).mkdir()
    before = staging(env)
    run_cli("train", "-m", *JOB, "seed=1,2", f"hydra.sweep.dir={tmp / 'sweep'}", cwd=tmp, **env)
    return tmp, env, before


def analysis_artifacts(run: Path) -> dict[str, list]:
    """alias step-<n> -> the manifest entries of that `analysis` artifact version."""
    out = {}
    for record in wandb_records(run):
        if record.WhichOneof("record_type") == "artifact" and record.artifact.type == "analysis":
            step = next(a for a in record.artifact.aliases if a.startswith("step-"))
            out[step] = list(record.artifact.manifest.contents)
    return out


def test_the_wandb_staging_area_does_not_grow_while_every_npz_reaches_its_artifact(sweep):
    tmp, env, before = sweep
    assert staging(env) == before == [], staging(env)[:10]
    assert not (Path(env["HOME"]) / ".local" / "share" / "wandb").exists()
    assert os.environ.get("WANDB_DATA_DIR") != str(tmp)  # (the test process's own environment is untouched)
    for job in ("0", "1"):
        run_dir = tmp / "sweep" / job
        (run,) = wandb_runs(run_dir)
        artifacts = analysis_artifacts(run)
        assert sorted(artifacts) == sorted(f"step-{s}" for s in STEPS_1)
        for step in STEPS_1:
            (entry,) = artifacts[f"step-{step}"]
            npz = run_dir / "analysis" / f"step={step}.npz"
            assert entry.path == npz.name and entry.size == npz.stat().st_size
            assert os.path.samefile(entry.local_path, npz), (entry.local_path, npz)  # the run's file: no copy
        # W&B's own staged copies (one per logged table) are in this job's directory, none elsewhere
        staged = files_under(run_dir / "wandb" / "artifacts" / "staging")
        tables = files_under(run_dir / "tables")
        assert len(tables) == 2 * len(STEPS_1) and len(staged) >= len(tables), (len(staged), len(tables))


def test_a_finished_run_stays_finished_and_a_larger_max_epochs_continues_it(sweep):
    tmp, env, before = sweep
    run_dir = tmp / "sweep" / "0"
    unchanged = fingerprint(run_dir)
    proc = run_cli("train", f"resume={run_dir}", cwd=tmp, **env)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("convergent:")]
    expected = (
        f"convergent: {run_dir} has finished training (step 8, 1 epoch: trainer.max_epochs=1 reached); nothing changed. "
        f"To train it further: convergent-train resume={run_dir} trainer.max_epochs=<more> (or trainer.max_steps=<more>)"
    )
    assert lines == [expected], proc.stderr[-3000:]
    assert fingerprint(run_dir) == unchanged  # no CSV row, no W&B segment, the checkpoint untouched

    run_cli("train", f"resume={run_dir}", "trainer.max_epochs=2", cwd=tmp, **env)
    rows = read_csv(run_dir)
    assert all(r["step"] not in (None, "") for r in rows)
    assert logged_steps(rows, "align/conv1/max_match") == [*STEPS_1, 10, 16]
    assert logged_steps(rows, "train/loss") == list(range(1, 16, 2)) and logged_steps(rows, "val/acc") == [7, 15]
    assert npz_steps(run_dir) == [*STEPS_1, 10, 16] and len(wandb_runs(run_dir)) == 2
    assert staging(env) == before
