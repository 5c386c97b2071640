"""The statistics' memory: the estimate matches what is allocated, the options shrink it, and a
request that will not fit fails before anything is allocated, with the estimate in the message."""

import pytest
import torch

from convergent.callbacks.monitor import check_memory, probe_runner
from convergent.config import ConfigError
from convergent.settings import AnalysisSettings

WIDTHS = {"conv1": 8, "conv2": 12, "fc6": 20}


def settings(**overrides) -> AnalysisSettings:
    cfg = {"layers": list(WIDTHS), "analyses": ["correlation", "cka", "cross_layer"], "probe_size": 8, "batch_size": 4}
    cfg.update(overrides)
    return AnalysisSettings.from_config(cfg, k=4)


def allocated(runner) -> dict[str, int]:
    acc = runner.accumulators(torch.device("cpu"))

    def size(metrics):
        return sum(m.state_bytes() for m in metrics)

    return {
        "moments": size(list(acc["fit"].values()) + list(acc["held"].values())),
        "null": size(list(acc["null_fit"].values()) + list(acc["null_held"].values())),
        "pooled": size([acc["pooled"]]) if acc["pooled"] is not None else 0,
    }


@pytest.mark.parametrize(
    "overrides",
    [{}, {"pairs": [[0, 1], [2, 3]]}, {"null_pairs": "all"}, {"permutation_null": False}, {"max_units": 10}, {"heavy_pairs": "all"}],
)
def test_estimate_matches_the_allocated_states(overrides):
    s = settings(**overrides)
    runner = probe_runner(s, WIDTHS)
    est, got = runner.estimate_bytes(), allocated(runner)
    for kind in ("moments", "null", "pooled"):
        assert est[kind] == got[kind], kind


def test_options_shrink_the_statistics():
    full = probe_runner(settings(pairs="all", null_pairs="all"), WIDTHS).estimate_bytes()
    pairs = probe_runner(settings(pairs="first", null_pairs="first"), WIDTHS).estimate_bytes()
    sub = probe_runner(settings(pairs="all", null_pairs="all", max_units=6), WIDTHS).estimate_bytes()
    assert pairs["moments"] < full["moments"] and pairs["null"] < full["null"]
    assert sub["total"] < full["total"]


def test_imagenet_fc_layers_fail_fast_with_the_estimate():
    """4 members x fc6/fc7 of 4,096 units, all pairs: ~2 GiB per accumulator; over an 8 GiB limit."""
    s = AnalysisSettings.from_config({"layers": ["fc6", "fc7"], "analyses": ["correlation"], "permutation_null": True, "null_pairs": "all"}, k=4)
    runner = probe_runner(s, {"fc6": 4096, "fc7": 4096})
    with pytest.raises(ConfigError, match=r"need \d+\.\d+ GiB .*analysis\.max_units"):
        check_memory(runner, s)
    assert runner._acc is None  # nothing was allocated
    s.max_units = 1024  # the documented way out
    check_memory(probe_runner(s, {"fc6": 4096, "fc7": 4096}), s)
