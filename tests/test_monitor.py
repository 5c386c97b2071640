"""A tiny real training through the CLI logs every key, npz and figure; convergent-analyze
reproduces the logged values from the checkpoint."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from convergent.analysis.plan import Plan
from convergent.config import validate


def read_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """CSV mirror -> {key: {step: value}}."""
    out: dict[str, dict[int, float]] = {}
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and value != "":
                    out.setdefault(key, {})
                    assert step not in out[key] or out[key][step] == float(value), f"{key} logged twice at {step}"
                    out[key][step] = float(value)
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tests.support import run_cli

    tmp = tmp_path_factory.mktemp("tiny")
    run_dir = tmp / "run"
    plugins = Path(__file__).resolve().parent / "plugins"  # a module outside the package: toy_measure
    proc = run_cli(
        "train", "debug=tiny", "analysis.plugins=[toy_measure]", f"hydra.run.dir={run_dir}", cwd=tmp, PYTHONPATH=plugins
    )
    return run_dir, proc


def plan_of(run_dir: Path) -> Plan:
    import sys

    plugins = str(Path(__file__).resolve().parent / "plugins")
    if plugins not in sys.path:  # the run's analysis.plugins
        sys.path.insert(0, plugins)
    conf = validate(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
    return Plan.build(conf.analysis, k=conf.ensemble.k)


def test_every_key_is_logged_at_every_analysis_step(tiny_run):
    run_dir, proc = tiny_run
    metrics = read_metrics(run_dir)
    expected = plan_of(run_dir).declared_keys(full=True)
    steps = [0, 1, 2, 5, 10]
    # the toy plugin's null equals its perfect value 1, where no score above chance is defined
    expected = {k for k in expected if not (k.startswith("toy/") and k.endswith("/above_null"))}
    missing = sorted(k for k in expected if k not in metrics)
    assert not missing, f"keys never logged: {missing[:10]}"
    for key in expected:
        assert sorted(metrics[key]) == steps, f"{key} logged at {sorted(metrics[key])}"
        assert all(np.isfinite(v) for v in metrics[key].values())
    unexpected = sorted(
        k
        for k in metrics
        if k.split("/")[0] in {"align", "mi", "sparse", "spectral", "hier", "act", "cka", "cca", "procrustes", "layer_id"}
        and k not in expected
    )
    # every measure is calibrated at every step: an interval around its value, a null below its p95
    measures = [k[: -len("/ci_lo")] for k in expected if k.endswith("/ci_lo")]
    assert measures and any(m.startswith("sparse/") for m in measures) and any(m.startswith("mi/") for m in measures)
    for key in measures:
        for step in steps:
            assert metrics[f"{key}/ci_lo"][step] <= metrics[key][step] + 1e-12 <= metrics[f"{key}/ci_hi"][step] + 2e-12, (
                key,
                step,
            )
            assert f"{key}/pairs_sd" in metrics
            if f"{key}/null" in metrics:
                assert metrics[f"{key}/null"][step] <= metrics[f"{key}/null_p95"][step] + 1e-12, (key, step)
    assert not unexpected, f"logged keys the pipeline does not declare: {unexpected[:10]}"
    for key in ("train/loss", "val/acc", "member0/val/acc", "member2/train/loss"):
        assert key in metrics


def test_files_of_every_step_exist(tiny_run):
    run_dir, _ = tiny_run
    for step in (0, 1, 2, 5, 10):
        npz = np.load(run_dir / "analysis" / f"step={step}.npz")
        assert "conv1/corr/m0-m1" in npz and "fc7/max_index/m1-m2" in npz
        assert all(np.isfinite(npz[k]).all() for k in npz.files if npz[k].dtype.kind == "f")
        assert (run_dir / "checkpoints" / "analysis" / f"step={step}.ckpt").exists()
        for fig in (
            "corr/m0-m1",
            "matching/m0-m1",
            "spectral/m0-m1",
            "hier/m0-m1",
            "patches/m0-m1",
            "cross_layer/m0-m1",
            "act/mean",
            "sparse/error_vs_nnz",
        ):
            assert (run_dir / "figures" / fig / f"step={step}.png").stat().st_size > 1000, fig
        assert (run_dir / "tables" / "pairs" / "conv2" / f"step={step}.csv").exists()
        assert (run_dir / "tables" / "sparse" / f"step={step}.csv").exists()
    assert (run_dir / "figures" / "over_training" / "cka_linear" / "step=10.png").exists()
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1 and list(wandb_runs[0].glob("*.wandb"))


def test_analyze_reproduces_the_logged_values_of_an_analysis_step(tiny_run, tmp_path):
    """`convergent-analyze RUN/checkpoints/analysis/step=5.ckpt` (an existing path, `=` and all),
    same machine and thread count: every logged value within 1e-9 (measured: identical)."""
    from tests.support import run_cli

    run_dir, _ = tiny_run
    out = tmp_path / "posthoc"
    step = 5
    plugins = Path(__file__).resolve().parent / "plugins"
    run_cli(
        "analyze",
        str(run_dir / "checkpoints" / "analysis" / f"step={step}.ckpt"),
        "--out",
        str(out),
        cwd=tmp_path,
        PYTHONPATH=plugins,
    )
    logged = read_metrics(run_dir)
    with open(out / "scalars.csv") as f:
        rows = list(csv.DictReader(f))
    assert {int(r["step"]) for r in rows} == {step}
    compared = 0
    for row in rows:
        live = logged[row["key"]][step]
        assert float(row["value"]) == pytest.approx(live, abs=1e-9, rel=1e-9), row["key"]
        compared += 1
    # every declared key (the toy plugin has no score above chance: its null is its perfect value)
    declared = {k for k in plan_of(run_dir).declared_keys(full=True) if not (k.startswith("toy/") and k.endswith("/above_null"))}
    assert compared == len(declared)
    live_npz, post_npz = np.load(run_dir / "analysis" / f"step={step}.npz"), np.load(out / "analysis" / f"step={step}.npz")
    np.testing.assert_allclose(post_npz["conv3/corr/m0-m2"], live_npz["conv3/corr/m0-m2"], atol=1e-12)
    # last.ckpt: the end step's weights (rewritten at the end of fit with the loops' final state)
    last, end = (torch.load(run_dir / "checkpoints" / p, weights_only=True) for p in ("last.ckpt", "analysis/step=10.ckpt"))
    assert last["global_step"] == end["global_step"] == 10
    assert all(torch.equal(last["state_dict"][k], v) for k, v in end["state_dict"].items())


def test_summary_shows_the_final_alignment_equal_to_the_logged_values(tiny_run):
    import json

    run_dir, proc = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())
    alignment = summary["alignment"]
    metrics = read_metrics(run_dir)
    for layer in plan_of(run_dir).layers:
        for key in (f"align/{layer}/semi_match", f"align/{layer}/max_match", f"cka/{layer}/linear"):
            for suffix in ("", "/null", "/null_p95", "/above_null", "/ci_lo", "/ci_hi"):
                assert alignment[key + suffix] == metrics[key + suffix][max(metrics[key + suffix])], key + suffix
    assert "alignment at the last step" in proc.stdout


def test_a_measure_from_a_plugin_module_is_logged_and_drawn(tiny_run):
    """register_measure("toy/pair_sum", lambda stats, a, b: a + b) in a module outside the package,
    run with analysis.plugins=[that_module]: its keys for every analysed layer, and its figure."""
    run_dir, _ = tiny_run
    metrics = read_metrics(run_dir)
    for layer in plan_of(run_dir).layers:
        key = f"toy/{layer}/pair_sum"
        for step in (0, 1, 2, 5, 10):
            assert metrics[f"{key}/m0-m1"][step] == 1.0 and metrics[f"{key}/m1-m2"][step] == 3.0
            assert metrics[key][step] == pytest.approx(2.0)  # the mean of 1, 2 and 3
    assert (run_dir / "figures" / "over_training" / "toy_pair_sum" / "step=10.png").stat().st_size > 1000
