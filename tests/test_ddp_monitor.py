"""The monitor under DDP: 2 gloo processes log the same step-0 analysis as 1 process (the
statistics are sums over the ranks' shards of the probe set; the initial weights are equal), the
null, the intervals and the pair spreads included (the null re-pairs images within whole probe
batches, the same batches in every process layout)."""

import csv

import pytest

pytestmark = pytest.mark.slow


def step0(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["step"] == "0"]
    values = {}
    for row in rows:
        for key, value in row.items():
            if value and key.split("/")[0] in ("align", "cka", "cca", "procrustes", "mi", "sparse", "act"):
                values[key] = float(value)
    return values


def test_ddp_cpu_step0_equals_single_process(tmp_path):
    from tests.support import run_cli

    common = ["debug=tiny", "analysis.products=float64", "trainer.max_steps=2", "logger=csv"]
    run_cli("train", *common, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    run_cli("train", *common, "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path, timeout=900)
    one, two = step0(tmp_path / "one"), step0(tmp_path / "two")
    assert len(one) > 100 and set(one) == set(two)
    assert any(k.endswith("/null_p95") for k in one) and any(k.endswith("/ci_lo") for k in one)
    for key in one:
        assert two[key] == pytest.approx(one[key], abs=1e-9), key
    assert not (tmp_path / "two" / "csv" / "metrics.csv.tmp").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # children made no directories
