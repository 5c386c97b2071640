"""convergent-bench: the quick figures run and are reported in the documented JSON shape.

No timing assertions: whether a goal is met depends on the machine."""

import json
import math

import pytest

from benchmarks import cli as bench
from benchmarks import common
from convergent import bench as entry

QUICK = ("max_match_4096", "probe_pass_cost")  # stats_memory (fresh processes, ~30 s) runs in the slow test below


def test_quick_figures_json(tmp_path):
    out = tmp_path / "out.json"
    assert bench.main(["--quick", "--only", ",".join(QUICK), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert isinstance(figures, list)
    assert [f["name"] for f in figures] == [s.name for s in bench.REGISTRY if s.name in QUICK]
    for f in figures:
        assert {"name", "value", "goal", "met", "unit", "detail"} <= set(f), f
        assert isinstance(f["value"], float) and math.isfinite(f["value"]) and f["value"] > 0, f
        assert isinstance(f["goal"], (int, float)) and f["goal"] > 0
        assert isinstance(f["met"], bool)
        assert f["op"] in common.COMPARE
        assert f["met"] == common.COMPARE[f["op"]](f["value"], f["goal"])  # no extra condition on these three
        assert isinstance(f["unit"], str) and isinstance(f["detail"], str) and f["detail"]


def test_list_and_unknown_names(capsys):
    assert entry.main(["--list"]) == 0  # the console script finds the checkout's benchmarks/
    listed = capsys.readouterr().out
    for spec in bench.REGISTRY:
        assert spec.name in listed
    with pytest.raises(SystemExit, match="unknown figure"):
        bench.main(["--only", "no_such_figure"])


def test_a_failing_figure_is_reported_not_raised():
    def broken(options):
        raise RuntimeError("boom")

    spec = common.Spec("broken", 1.0, "<=", "x", broken, "always fails")
    figure = common.evaluate(spec, common.Options(quick=True))
    assert figure.value is None and not figure.met and "boom" in figure.detail
    assert figure.as_json()["value"] is None


def test_alternate_interleaves_in_abba_order():
    calls = []

    def measure(name):
        def run():
            calls.append(name)
            return float(len(calls))

        return run

    ta, tb = common.alternate([measure("A"), measure("B")], rounds=4, warmup=1)
    assert calls == ["A", "B", "A", "B", "B", "A", "A", "B", "B", "A"]
    assert len(ta) == len(tb) == 4


def test_the_gpu_figures_run_their_code_path_on_the_cpu():
    """--quick versions of the 224-px figures on the CPU (the figures themselves need CUDA)."""
    from benchmarks import gpu

    options = common.Options(quick=True)
    assert gpu.probe_pass_cost_224(options, device="cpu").value > 0
    assert gpu.stats_memory_224(options, device="cpu").value == 1.0


@pytest.mark.slow
def test_quick_stats_memory_figure(tmp_path):
    out = tmp_path / "out.json"
    assert bench.main(["--quick", "--only", "stats_memory", "--json", str(out)]) == 0
    (figure,) = json.loads(out.read_text())
    assert figure["name"] == "stats_memory" and math.isfinite(figure["value"]) and figure["value"] > 0.5, figure
