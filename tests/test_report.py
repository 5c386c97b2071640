"""convergent-report across runs, W&B runs that group themselves, and a readable W&B workspace.

The end-to-end tests run a real 2 x 2 tiny multirun (width x seed) through the CLI once (module
fixture) and check the report against numbers computed here from the runs' csv/metrics.csv, and
the runs' offline W&B records (config, group, name, metric definitions)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml

from convergent.report import keys
from convergent.report.aggregate import SD_DDOF
from convergent.report.build import SUMMARY_COLUMNS, build_report
from convergent.report.cli import main as report_main
from convergent.sweep import flat_config, run_name, sweep_group_of, swept_keys
from tests.support import run_cli
from tests.test_training import wandb_records

PAIR = re.compile(r"/m\d+-m\d+$")
# light: two analyses on two layers, no figures or step checkpoints, 5 steps (analysis at 0, 1, 2, 5)
LIGHT = (
    "trainer.max_steps=5",
    "analysis.analyses=[correlation,cka]",
    "analysis.layers=[conv1,fc6]",
    "analysis.figures=none",
    "analysis.save_checkpoints=false",
)


# --- what the test computes itself from a run directory ----------------------------------------
def metrics_csv(run_dir: Path) -> tuple[list[str], list[dict]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def values_of(run_dir: Path, families=("align", "cka")) -> dict[str, dict[int, float]]:
    """Headline values of a run by key and step, read independently of convergent.report."""
    header, rows = metrics_csv(run_dir)
    out: dict[str, dict[int, float]] = {}
    for row in rows:
        for key in header:
            if key.split("/")[0] in families and not PAIR.search(key) and row[key] != "":
                out.setdefault(key, {})[int(row["step"])] = float(row[key])
    return out


def read_summary(out: Path) -> tuple[list[str], list[dict]]:
    with open(out / "summary.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# --- the 2 x 2 multirun and its report -----------------------------------------------------------
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    sweep = tmp / "width_sweep"
    run_cli("train", "-m", "debug=tiny", "model.width=0.25,0.5", "seed=0,1", *LIGHT, f"hydra.sweep.dir={sweep}", cwd=tmp)
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    return tmp, sweep, jobs


@pytest.fixture(scope="module")
def report(sweep):
    tmp, sweep_dir, _jobs = sweep
    proc = run_cli("report", str(sweep_dir), "--wandb", cwd=tmp)
    return sweep_dir / "report", proc


def job_setting(job: Path) -> tuple[str, str]:
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())

    def get(key: str) -> str:
        return next(o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}="))

    return get("model.width"), get("seed")


@pytest.mark.subprocess
def test_report_of_a_2x2_multirun_equals_the_runs_own_numbers(sweep, report):
    _tmp, _sweep_dir, jobs = sweep
    out, proc = report
    assert proc.returncode == 0
    header, rows = read_summary(out)
    assert header == list(SUMMARY_COLUMNS)
    by_group: dict[str, list[Path]] = {}
    for job in jobs:
        by_group.setdefault(f"model.width={job_setting(job)[0]}", []).append(job)
    assert sorted(by_group) == ["model.width=0.25", "model.width=0.5"] and all(len(v) == 2 for v in by_group.values())
    assert {r["group"] for r in rows} == set(by_group)
    assert all(r["n_runs"] == "2" for r in rows)
    expected = {}
    for group, members in by_group.items():
        runs = [values_of(job) for job in members]
        assert set(runs[0]) == set(runs[1]) and runs[0]
        for key in runs[0]:
            assert sorted(runs[0][key]) == sorted(runs[1][key]) == [0, 1, 2, 5], key
            for step in runs[0][key]:
                x = np.array([run[key][step] for run in runs])
                expected[(group, key, step)] = (x.mean(), x.std(ddof=1), x.min(), x.max())
    got = {(r["group"], r["key"], int(r["step"])): r for r in rows}
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))[:10]
    for ident, (mean, sd, lo, hi) in expected.items():
        row = got[ident]
        np.testing.assert_allclose(
            [float(row[c]) for c in ("mean", "sd", "min", "max")], [mean, sd, lo, hi], rtol=1e-12, atol=1e-15, err_msg=str(ident)
        )
    assert any(float(r["sd"]) > 0 for r in rows), "two seeds gave identical values everywhere"
    # figures (one per measure: a panel per layer), the final-value table, every run ok, the page
    for name in ("align_semi_match", "align_max_match", "cka_linear", "cka_linear_debiased"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 5000, name
    with open(out / "runs.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok"] * 4
    with open(out / "final.csv", newline="") as f:
        final = {(r["group"], r["key"]): r for r in csv.DictReader(f)}
    for group, members in by_group.items():
        last = [values_of(job)["cka/fc6/linear"][5] for job in members]
        assert float(final[(group, "cka/fc6/linear")]["mean"]) == pytest.approx(np.mean(last), rel=1e-12)
        assert final[(group, "cka/fc6/linear")]["layer"] == "fc6"
    page = (out / "index.html").read_text()
    figures = sorted((out / "figures").glob("*.png"))
    assert page.count('src="data:image/png;base64,') == len(figures) >= 7
    assert "model.width=0.25" in page and "layer fc6" in page and "<script" not in page and "href=" not in page
    # --wandb: one offline run, job_type=report, in the sweep's group
    (run,) = (out / "wandb").glob("offline-run-*")
    record = next(r.run for r in wandb_records(run) if r.WhichOneof("record_type") == "run")
    assert record.job_type == "report" and record.run_group == "width_sweep"
    logged = {
        item.nested_key[0] if item.nested_key else item.key
        for r in wandb_records(run)
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
    }
    assert {"report/summary", "report/final", "report/runs", "report/fig/align/semi_match", "report/page"} <= logged


def declared_keys(job) -> set[str]:
    """Every scalar key the run's own config declares (the plan of its analyses)."""
    from omegaconf import OmegaConf

    from convergent.analysis.plan import Plan
    from convergent.config import validate

    conf = validate(OmegaConf.load(job / ".hydra" / "config.yaml"))
    return Plan.build(conf.analysis, k=conf.ensemble.k).declared_keys()


@pytest.mark.subprocess
def test_the_runs_wandb_configs_are_flat_grouped_named_and_per_pair_keys_hidden(sweep):
    _tmp, sweep_dir, jobs = sweep
    for job in jobs:
        width, seed = job_setting(job)
        (run,) = (job / "wandb").glob("offline-run-*")
        records = list(wandb_records(run))
        record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert record.run_group == sweep_dir.name and record.job_type == "train"
        assert record.display_name == f"width={width},seed={seed}"
        config = {item.key: json.loads(item.value_json) for item in record.config.update if item.key}
        for r in records:
            if r.WhichOneof("record_type") == "config":
                config.update({item.key: json.loads(item.value_json) for item in r.config.update if item.key})
        assert config["model.width"] == float(width) and config["seed"] == int(seed)
        assert config["ensemble.data_order"] == "shared" and config["analysis.layers"] == ["conv1", "fc6"]
        assert config["module.model.width"] == float(width)  # Lightning's hparams, flat too
        nested = [k for k, v in config.items() if isinstance(v, dict) and v and k != "_wandb"]
        assert not nested, f"config values that are dictionaries: {nested}"
        # metric definitions: every per-pair key hidden, every headline key against analysis/step
        defined = {r.metric.name: r.metric for r in records if r.WhichOneof("record_type") == "metric" and r.metric.name}
        header, _ = metrics_csv(job)
        per_pair = [k for k in header if PAIR.search(k)]
        headline = [k for k in header if k.split("/")[0] in ("align", "cka") and not PAIR.search(k)]
        declared = declared_keys(job)
        assert set(per_pair) == {k for k in declared if PAIR.search(k) and k.split("/")[0] in ("align", "cka")}
        assert set(headline) == {k for k in declared if not PAIR.search(k) and k.split("/")[0] in ("align", "cka")}
        for key in per_pair:
            assert key in defined and defined[key].options.hidden, key
        for key in headline:
            assert key in defined and not defined[key].options.hidden and defined[key].step_metric == "analysis/step", key
        for key in ("train/loss", "val/acc"):
            assert key not in defined or not defined[key].options.hidden
        steps = [
            json.loads(item.value_json)
            for r in records
            if r.WhichOneof("record_type") == "history"
            for item in r.history.item
            if list(item.nested_key) == ["analysis/step"]
        ]
        assert steps == [0, 1, 2, 5]
        # the native over-training charts: one per measure (7), a line per layer and null
        charts = {
            item.nested_key[2]
            for r in records
            if r.WhichOneof("record_type") == "config"
            for item in r.config.update
            if list(item.nested_key[:2]) == ["_wandb", "visualize"]
        }
        measures = {f"over_training/{k.split('/')[0]}/{k.split('/')[2]}" for k in headline if len(k.split("/")) == 3}
        # the score above chance has a chart of its own (convergent.report.keys: its role is "score")
        measures |= {
            f"over_training/{k.split('/')[0]}/{k.split('/')[2]}/above_null" for k in headline if k.endswith("/above_null")
        }
        assert {"over_training/align/semi_match", "over_training/cka/linear"} <= charts and charts == measures
    # the chart's points are the run's own values (last job)
    table = next(run.glob("files/media/table/over_training/align/semi_match_table_*.table.json"))
    points = json.loads(table.read_text())["data"]
    assert {line for _, line, _ in points} == {"conv1", "fc6", "conv1 null", "fc6 null", "conv1 null_p95", "fc6 null_p95"}
    logged = values_of(job)
    for step, line, value in points:
        layer, *null = line.split(" ")
        assert value == pytest.approx(logged[f"align/{layer}/semi_match" + (f"/{null[0]}" if null else "")][step], rel=1e-12)


@pytest.mark.subprocess
def test_a_failed_run_is_listed_and_its_steps_counted_where_it_has_them(sweep, tmp_path, capsys):
    _tmp, _sweep_dir, jobs = sweep
    folder = tmp_path / "partial"
    shutil.copytree(jobs[0], folder / "a", ignore=shutil.ignore_patterns("wandb"))
    shutil.copytree(jobs[1], folder / "b", ignore=shutil.ignore_patterns("wandb"))  # same width, seed 1
    killed = folder / "b"
    (killed / "summary.json").unlink()
    header, rows = metrics_csv(killed)
    with open(killed / "csv" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["step"]) <= 1)  # killed after the step-1 analysis
    assert report_main([str(folder), "--out", str(tmp_path / "out")]) == 0
    assert "failed or are incomplete" in capsys.readouterr().err
    with open(tmp_path / "out" / "runs.csv", newline="") as f:
        status = {Path(r["run_dir"]).name: r for r in csv.DictReader(f)}
    assert status["a"]["status"] == "ok" and status["b"]["status"] == "failed"
    assert status["b"]["last_step"] == "1" and "2, 5" in status["b"]["detail"]
    page = (tmp_path / "out" / "index.html").read_text()
    section = page[page.index("Runs that failed") : page.index("Final values")]
    assert str(killed) in section and "failed" in section
    _, summary = read_summary(tmp_path / "out")
    a, b = values_of(folder / "a"), values_of(killed)
    assert {r["group"] for r in summary} == {"all"}  # only the seed differs
    for row in summary:
        key, step = row["key"], int(row["step"])
        if step <= 1:
            assert row["n_runs"] == "2" and float(row["mean"]) == pytest.approx((a[key][step] + b[key][step]) / 2, rel=1e-12)
        else:
            assert (
                row["n_runs"] == "1"
                and row["sd"] == ""
                and float(row["mean"]) == a[key][step] == float(row["min"]) == float(row["max"])
            )


@pytest.mark.subprocess
def test_a_path_without_runs_exits_2_with_one_line(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    for path in (tmp_path / "empty", tmp_path / "missing"):
        proc = run_cli("report", str(path), cwd=tmp_path, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("error: ") and str(path) in lines[0] and "pass a multirun directory" in lines[0]
    assert not (tmp_path / "empty" / "report").exists()


# --- unit tests: keys, grouping, aggregation on hand-made runs, sweep identity -----------------
def test_keys_are_classified_by_rules():
    parse = keys.parse_key
    k = parse("align/conv1/semi_match")
    assert (k.family, k.layer, k.measure, k.stat, k.pair, k.headline) == ("align", "conv1", "semi_match", "value", None, True)
    k = parse("sparse/conv2/error/l1=0.001/null")
    assert (k.layer, k.measure, k.stat, k.role, k.base) == (
        "conv2",
        "error/l1=0.001",
        "null",
        "baseline",
        "sparse/conv2/error/l1=0.001",
    )
    k = parse("cka/fc6/linear/m0-m2")
    assert k.pair == "m0-m2" and not k.headline and keys.is_per_pair("cka/fc6/linear/m0-m2")
    assert parse("align/conv1/max_match/above_null").role == "score"
    assert parse("cca/conv3/svcca/ci_hi").role == "spread"
    k = parse("layer_id/cka_linear")
    assert (k.layer, k.measure) == (None, "cka_linear")
    k = parse("func/barrier/linear/m0-m1")
    assert (k.family, k.layer, k.measure, k.pair) == ("func", None, "barrier/linear", "m0-m1")
    k = parse("func/fc6/stitch_acc/linear")
    assert (k.layer, k.measure) == ("fc6", "stitch_acc/linear")
    assert parse("newfam/block3/score", layers=["block3"]).layer == "block3"  # a custom layer from the config
    assert parse("newfam/block3/score").layer is None  # ... and without it, block3 is part of the measure
    for key in (
        "train/loss",
        "val/acc",
        "member2/val/acc",
        "monitor/seconds/probe",
        "epoch",
        "analysis/step",
        "lr-Adam",
        "_step",
    ):
        assert parse(key) is None and not keys.is_headline(key), key


def test_charts_put_baselines_with_their_value_and_layers_in_panels():
    names = [
        "align/conv1/semi_match", "align/fc6/semi_match", "align/conv1/semi_match/null", "align/conv1/semi_match/null_p95",
        "align/conv1/semi_match/above_null", "align/conv1/semi_match/ci_lo", "align/conv1/semi_match/m0-m1",
        "layer_id/cka_linear", "layer_id/cca_svcca", "cka/fc6/linear/null",
    ]  # fmt: skip
    charts = {c.name: c for c in keys.charts(names, layers=["conv1", "fc6"])}
    assert sorted(charts) == ["align/semi_match", "align/semi_match/above_null", "layer_id"]
    semi = charts["align/semi_match"]
    assert semi.panels == ["conv1", "fc6"]
    assert [(s.key, s.role) for s in semi.in_panel("conv1")] == [
        ("align/conv1/semi_match", "value"), ("align/conv1/semi_match/null", "baseline"), ("align/conv1/semi_match/null_p95", "baseline"),
    ]  # fmt: skip
    assert charts["layer_id"].panels == ["cca_svcca", "cka_linear"]


def write_run(path: Path, overrides: list[str], rows: list[dict], finished: bool = True) -> Path:
    """A hand-made run directory: saved config and overrides, metrics.csv, summary.json."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"project": "convergent", "analysis": {"layers": ["conv1", "fc6"]}})
    )
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    header = sorted({k for r in rows for k in r} | {"step"})
    (path / "csv").mkdir()
    with open(path / "csv" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    if finished:
        (path / "summary.json").write_text("{}")
    return path


def test_aggregation_over_hand_made_runs_matches_a_brute_force_count(tmp_path):
    rng = np.random.default_rng(0)
    setting = {
        "a": ["model.width=0.5", "seed=0", "+hydra.job.x=1"],
        "b": ["model.width=0.5", "seed=1"],
        "c": ["seed=2", "model.width=0.5"],
    }
    setting |= {"d": ["model.width=1.0", "ensemble.seeds=[1,2]"]}
    data: dict[str, dict[str, dict[int, float]]] = {}
    for name, overrides in setting.items():
        steps = [0, 1, 5] if name != "c" else [0, 1]  # c has no step 5: aggregated over a and b there
        rows, data[name] = [], {}
        for step in steps:
            row = {"step": step, "epoch": 0}
            for key in ("align/conv1/semi_match", "align/conv1/semi_match/null", "cka/fc6/linear/ci_lo", "layer_id/cka_linear"):
                value = float(rng.normal())
                row[key] = repr(value)
                data[name].setdefault(key, {})[step] = value
            row["align/conv1/semi_match/m0-m1"] = "0.5"
            rows.append(row)
            rows.append({"step": step, "train/loss": "1.0", "epoch": 0})
        if name == "a":  # the same step logged again (a resumed run): the later row counts
            data[name]["layer_id/cka_linear"][5] = 7.0
            rows.append({"step": 5, "layer_id/cka_linear": "7.0"})
        write_run(tmp_path / name, overrides, rows)
    report = build_report([tmp_path])
    assert list(report.group_sizes.items()) == [("model.width=0.5", 3), ("model.width=1.0", 1)]
    assert report.grouping.common == ()
    groups = {"model.width=0.5": ["a", "b", "c"], "model.width=1.0": ["d"]}
    seen = 0
    for row in report.rows:
        runs = [data[n][row.key] for n in groups[row.group]]
        values = [r[row.step] for r in runs if row.step in r]
        assert row.spread.n == len(values) and row.spread.mean == pytest.approx(statistics.fmean(values), rel=1e-12)
        assert row.spread.min == min(values) and row.spread.max == max(values)
        if len(values) > SD_DDOF:
            assert row.spread.sd == pytest.approx(statistics.stdev(values), rel=1e-12)  # sample sd, ddof 1
        else:
            assert row.spread.sd is None
        assert "/m0-m1" not in row.key and row.key != "train/loss"
        seen += 1
    assert seen == 4 * (3 + 3)  # 4 headline keys x 3 steps in each of the 2 groups
    assert {(r.group, r.step): r.spread.n for r in report.rows if r.key == "cka/fc6/linear/ci_lo"} == {
        ("model.width=0.5", 0): 3, ("model.width=0.5", 1): 3, ("model.width=0.5", 5): 2,
        ("model.width=1.0", 0): 1, ("model.width=1.0", 1): 1, ("model.width=1.0", 5): 1,
    }  # fmt: skip
    final = {(r.group, r.key): r for r in report.finals}
    f = final[("model.width=0.5", "layer_id/cka_linear")]
    assert f.steps == (1, 5) and f.spread.mean == pytest.approx(
        statistics.fmean([7.0, data["b"]["layer_id/cka_linear"][5], data["c"]["layer_id/cka_linear"][1]])
    )
    status = {s.run.path.name: s.status for s in report.statuses}
    assert status == {"a": "ok", "b": "ok", "c": "incomplete", "d": "ok"}


def test_groups_drop_the_seed_and_what_every_run_shares(tmp_path):
    row = [{"step": 0, "align/conv1/semi_match": "0.1"}]
    for i, (width, seed) in enumerate([("0.25", 0), ("0.25", 1), ("0.5", 0)]):
        write_run(tmp_path / str(i), ["debug=tiny", f"model.width={width}", f"seed={seed}"], row)
    report = build_report([tmp_path])
    assert report.group_sizes == {"model.width=0.25": 2, "model.width=0.5": 1}
    assert report.grouping.common == ("debug=tiny",)
    assert build_report([tmp_path, tmp_path / "0"]).group_sizes == report.group_sizes  # a run given twice counts once
    only_seeds = tmp_path / "seeds"
    for seed in (0, 1):
        write_run(only_seeds / str(seed), ["debug=tiny", f"seed={seed}"], row, finished=seed == 0)
    report = build_report([only_seeds])
    assert report.group_sizes == {"all": 2}
    assert [s.status for s in report.statuses] == ["ok", "failed"]


def test_sweep_identity_helpers(tmp_path):
    assert run_name(["debug=tiny", "model.width=0.5", "seed=1", "hydra.run.dir=x"], {"model.width", "seed"}) == "width=0.5,seed=1"
    assert run_name(["+ensemble.data_order=shared", "hydra/launcher=basic"]) == "data_order=shared"
    assert run_name(["hydra.run.dir=x"]) is None
    assert flat_config({"model": {"width": 0.5, "lrn": None}, "analysis": {"layers": ["conv1"], "mi": {}}, "seed": 1}) == {
        "model.width": 0.5, "model.lrn": None, "analysis.layers": ["conv1"], "analysis.mi": {}, "seed": 1,
    }  # fmt: skip
    (tmp_path / "multirun.yaml").write_text(
        yaml.safe_dump({"hydra": {"overrides": {"task": ["debug=tiny", "model.width=0.25,0.5", "seed=range(3)"]}}})
    )
    assert swept_keys(tmp_path / "multirun.yaml") == {"model.width", "seed"}
    assert swept_keys(tmp_path / "missing.yaml") is None
    # the group from where a run dir sits: a multirun dir, or the shipped sweeps' outputs/sweep-<id>/
    assert sweep_group_of(tmp_path / "0") == tmp_path.name
    assert sweep_group_of(tmp_path / "outputs" / "sweep-ab12cd" / "2026-12-01_10-00-00-x1") == "ab12cd"
    assert sweep_group_of(tmp_path / "outputs" / "sweep-local" / "r") is None  # not under an agent
    assert sweep_group_of(tmp_path / "outputs" / "2026-12-01" / "10-00-00") is None
