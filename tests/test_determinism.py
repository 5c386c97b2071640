"""Determinism and multirun hygiene: two CPU runs with the same seed log identical alignment values
and npz arrays at every analysis step; the jobs of a multirun leak nothing into each other (global
seeds, environment, W&B runs, figures, process groups), so a job's results equal a run of it alone.

(Member seeds giving different initial weights, and `ensemble.data_order=independent` giving each
member its own reproducible batch sequence, are tested in test_training.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.support import LIGHT, read_metrics, run_cli, single_thread, train_in

TIMING = ("monitor/",)  # wall-clock keys: the only ones allowed to differ between identical runs


def compare_runs(a: Path, b: Path, atol: float = 1e-12) -> int:
    """Every logged value and every npz array of run a equals run b's; returns how many values."""
    ma, mb = read_metrics(a), read_metrics(b)
    keys = sorted(k for k in ma if not k.startswith(TIMING))
    assert keys and keys == sorted(k for k in mb if not k.startswith(TIMING))
    for key in keys:
        assert sorted(ma[key]) == sorted(mb[key]), key
        for step, value in ma[key].items():
            assert abs(value - mb[key][step]) <= atol, (key, step, value, mb[key][step])
    npz_a = sorted(p.name for p in (a / "analysis").glob("step=*.npz"))
    assert npz_a and npz_a == sorted(p.name for p in (b / "analysis").glob("step=*.npz"))
    for name in npz_a:
        with np.load(a / "analysis" / name) as x, np.load(b / "analysis" / name) as y:
            assert x.files == y.files
            for key in x.files:
                if x[key].dtype.kind == "f":
                    np.testing.assert_allclose(x[key], y[key], rtol=0, atol=atol, err_msg=f"{name} {key}")
                else:
                    np.testing.assert_array_equal(x[key], y[key], err_msg=f"{name} {key}")
    return sum(len(ma[k]) for k in keys)


def test_same_seed_gives_identical_alignment_at_every_step(tmp_path):
    """Every analysis at every step (debug=tiny: steps 0, 1, 2 and the end), twice, in one process
    (the global RNGs are in whatever state the first run left)."""
    common = ("debug=tiny", "logger=csv", "trainer.max_steps=3", "analysis.layers=[conv1,conv2,fc6]",
              "analysis.figures=none", "analysis.save_checkpoints=false")  # fmt: skip
    with single_thread():
        train_in(tmp_path / "a", *common)
        train_in(tmp_path / "b", *common)
        train_in(tmp_path / "other_seed", *common, "seed=1", "trainer.max_steps=1", "analysis.analyses=[correlation]")
    compared = compare_runs(tmp_path / "a", tmp_path / "b")
    metrics = read_metrics(tmp_path / "a")
    assert sorted(metrics["align/conv2/max_match"]) == [0, 1, 2, 3] and "sparse/conv1/error/l1=0.001" in metrics
    assert "layer_id/cca_pwcca" in metrics and "mi/conv2/semi_match" in metrics and compared > 500
    other = read_metrics(tmp_path / "other_seed")
    assert other["align/conv2/max_match"][0] != metrics["align/conv2/max_match"][0], "the seed changes nothing"


# --- multirun hygiene ---------------------------------------------------------------------------
LEAKY_ENV = ("WANDB_MODE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK")


def test_jobs_in_one_process_leak_nothing(tmp_path, monkeypatch):
    """Three jobs in one process, as Hydra's basic launcher runs a multirun: A, B, then A again.
    After each: no figure open, no W&B run active, no process group, the DDP/W&B environment as
    before (here a fake DDP launch sets it, as Lightning's launcher does); the third job's results
    equal the first's (global seeds are set per job); each job has its own W&B run id."""
    import matplotlib.pyplot as plt
    import torch
    import wandb

    import convergent.train as train_module

    real = train_module.configure_strategy

    def launch_sets_env(strategy, trainer_cfg):  # what a DDP launcher leaves in the parent process
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", NODE_RANK="0", LOCAL_RANK="0", WORLD_SIZE="2")
        return real(strategy, trainer_cfg)

    monkeypatch.setattr(train_module, "configure_strategy", launch_sets_env)
    for key in LEAKY_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    before = {key: os.environ.get(key) for key in LEAKY_ENV}
    jobs = {"0": "model.width=0.125", "1": "model.width=0.25", "2": "model.width=0.125"}
    with single_thread():
        for name, width in jobs.items():
            train_in(tmp_path / name, "debug=tiny", "trainer.max_steps=2", *LIGHT, "analysis.layers=[conv1,fc6]",
                     "analysis.figures=ends", "logger.wandb.mode=offline", width)  # fmt: skip
            assert plt.get_fignums() == [], f"job {name} left figures open"
            assert wandb.run is None, f"job {name} left its W&B run open"
            assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
            assert {key: os.environ.get(key) for key in LEAKY_ENV} == before, f"job {name} leaked environment variables"
            assert list((tmp_path / name / "figures").rglob("*.png")), "no figures were drawn"
    compare_runs(tmp_path / "0", tmp_path / "2")
    ids = [json.loads((tmp_path / name / "run.json").read_text())["wandb_id"] for name in jobs]
    assert len(set(ids)) == 3
    for name, wandb_id in zip(jobs, ids):
        (run,) = (tmp_path / name / "wandb").glob("offline-run-*")
        assert run.name.endswith(f"-{wandb_id}")


@pytest.mark.slow
def test_cli_multirun_three_jobs_three_runs_and_no_state_between_them(tmp_path):
    """`convergent-train -m` with 3 jobs (the first and last identical): 3 output directories,
    3 W&B runs with 3 ids, and the third job's values equal the first's."""
    sweep = tmp_path / "sweep"
    run_cli("train", "-m", "debug=tiny", "trainer.max_steps=3", *LIGHT, "analysis.figures=ends",
            "model.width=0.125,0.25,0.125", f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2"]
    ids = []
    for job in jobs:
        wandb_id = json.loads((job / "run.json").read_text())["wandb_id"]
        (run,) = (job / "wandb").glob("offline-run-*")
        assert run.name.endswith(f"-{wandb_id}")
        assert json.loads((job / "summary.json").read_text())["global_step"] == 3
        ids.append(wandb_id)
    assert len(set(ids)) == 3
    compare_runs(jobs[0], jobs[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]


@pytest.mark.slow
def test_cli_multirun_of_ddp_jobs_runs_every_job(tmp_path):
    """A DDP job sets MASTER_PORT, LOCAL_RANK, WORLD_SIZE... in the multirun's process and opens a
    process group: left behind, the next job takes its ranks as launched already and fails."""
    sweep = tmp_path / "sweep"
    proc = run_cli("train", "-m", "debug=tiny", "callbacks=none", "trainer=ddp_cpu", "trainer.max_steps=4",
                   "model.width=0.125,0.25", f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=600)  # fmt: skip
    assert (proc.stdout + proc.stderr).count("Initializing distributed: GLOBAL_RANK: 1") == 2
    for job in ("0", "1"):
        assert json.loads((sweep / job / "summary.json").read_text())["global_step"] == 4
