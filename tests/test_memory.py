"""The statistics' memory: the estimate matches what is allocated, the options shrink it, and a
request that will not fit fails before anything is allocated, with the estimate in the message."""

import pytest
import torch

from convergent.analysis.config import AnalysisConfig, IntervalConfig, NullConfig
from convergent.analysis.plan import Plan
from convergent.errors import ConfigError
from convergent.monitor.probe import ProbeRunner
from convergent.monitor.service import StepService

WIDTHS = {"conv1": 8, "conv2": 12, "fc6": 20}


def runner(widths=WIDTHS, **overrides) -> ProbeRunner:
    config = dict(layers=list(widths), analyses=["correlation", "cka", "cross_layer"], probe_size=8, batch_size=4)
    config.update(overrides)
    return ProbeRunner(Plan.build(AnalysisConfig(**config), k=4), widths)


def allocated(r: ProbeRunner) -> dict[str, int]:
    acc = r.accumulators(torch.device("cpu"))

    def size(metrics):
        return sum(m.state_bytes() for m in metrics)

    return {
        "moments": size(acc["moments"].values()),
        "null": size(acc["null"].values()),
        "pooled": size([acc["pooled"]]) if acc["pooled"] is not None else 0,
    }


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"pairs": [[0, 1], [2, 3]]},
        {"null": NullConfig(pairs="all")},
        {"null": NullConfig(enabled=False)},
        {"null": NullConfig(draws=2)},
        {"interval": IntervalConfig(groups=4)},
        {"max_units": 10},
        {"heavy_pairs": "all"},
    ],
)
def test_estimate_matches_the_allocated_states(overrides):
    r = runner(**overrides)
    est, got = r.estimate_bytes(), allocated(r)
    for kind in ("moments", "null", "pooled"):
        assert est[kind] == got[kind], kind


def test_options_shrink_the_statistics():
    full = runner(pairs="all", null=NullConfig(pairs="all")).estimate_bytes()
    pairs = runner(pairs="first", null=NullConfig(pairs="first")).estimate_bytes()
    sub = runner(pairs="all", null=NullConfig(pairs="all"), max_units=6).estimate_bytes()
    fewer = runner(interval=IntervalConfig(groups=2), null=NullConfig(draws=1)).estimate_bytes()
    assert pairs["moments"] < full["moments"] and pairs["null"] < full["null"]
    assert sub["total"] < full["total"] and fewer["total"] < runner().estimate_bytes()["total"]


def test_imagenet_fc_layers_fail_fast_with_the_estimate():
    """4 members x fc6/fc7 of 4,096 units, all pairs, the default image groups: several GiB per layer; over an 8 GiB limit."""
    widths = {"fc6": 4096, "fc7": 4096}
    config = AnalysisConfig(layers=["fc6", "fc7"], analyses=["correlation"], null=NullConfig(pairs="all"))
    plan = Plan.build(config, k=4)
    service = StepService(plan, widths, "unused", write=False)
    with pytest.raises(ConfigError, match=r"need \d+\.\d+ GiB .*analysis\.max_units"):
        service.check_memory()
    assert service.runner._acc is None  # nothing was allocated
    config.max_units = 1024  # the documented way out
    StepService(Plan.build(config, k=4), widths, "unused", write=False).check_memory()
