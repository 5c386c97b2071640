"""The plan of a step: analyses in dependency order whatever the config's order, required analyses
switched on, measures from plugins, and clear errors for names that do not exist."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from convergent.analysis.config import AnalysisConfig, NullConfig
from convergent.analysis.plan import Plan
from convergent.analysis.registry import REGISTRY
from convergent.errors import ConfigError
from convergent.models import AlexNet
from convergent.monitor.probe import ProbeRunner
from convergent.monitor.step import analyse

PLUGINS = str(Path(__file__).resolve().parent / "plugins")
pytestmark = pytest.mark.usefixtures("one_thread")
ANALYSES = [
    "correlation",
    "mutual_info",
    "sparse",
    "spectral",
    "hierarchical",
    "mean_activation",
    "cka",
    "cca",
    "procrustes",
    "cross_layer",
]


def probe(plan: Plan, n: int = 24):
    members = []
    for i in range(plan.k):
        torch.manual_seed(i)
        members.append(AlexNet.small(width=0.0625, dropout=0.0).eval())
    images = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    loader = [(images[i : i + 12], torch.zeros(12), torch.arange(i, i + 12)) for i in range(0, n, 12)]
    return ProbeRunner(plan, {l: members[0].layer_width(l) for l in plan.layers}).run(members, loader, "cpu")


def config(analyses, **kw) -> AnalysisConfig:
    from convergent.analysis.builtin.spectral import SpectralOptions

    kw.setdefault("null", NullConfig(draws=2))
    return AnalysisConfig(layers=["conv1", "conv3", "fc6"], analyses=analyses, probe_size=24, batch_size=12,
                          spectral=SpectralOptions(n_clusters=3), **kw)  # fmt: skip


def test_the_order_of_the_analyses_does_not_matter():
    shuffled = list(ANALYSES)
    random.Random(5).shuffle(shuffled)
    assert shuffled != ANALYSES
    one, two = Plan.build(config(ANALYSES), 3), Plan.build(config(shuffled), 3)
    assert [a.name for a in one.analyses] == [a.name for a in two.analyses]
    stats = probe(one)
    a, b = analyse(stats, one, step=0), analyse(stats, two, step=0)
    assert a.failures == b.failures == []
    assert a.scalars.keys() == b.scalars.keys() and len(a.scalars) > 100
    for key, value in a.scalars.items():
        assert b.scalars[key] == value, key
    for key, value in a.arrays.items():
        np.testing.assert_array_equal(b.arrays[key], value)


def test_a_dependency_runs_before_its_user_and_is_switched_on():
    plan = Plan.build(config(["mutual_info"]), 2)
    assert [a.name for a in plan.analyses] == ["correlation", "mutual_info"]  # correlation first, added
    report = analyse(probe(plan), plan, step=0)
    assert report.failures == [] and "mi/conv1/same_as_corr" in report.scalars and "align/conv1/semi_match" in report.scalars


def test_a_measure_registered_from_outside_is_computed_and_calibrated(monkeypatch):
    monkeypatch.syspath_prepend(PLUGINS)
    monkeypatch.delitem(sys.modules, "toy_measure", raising=False)
    plan = Plan.build(config(["correlation"], plugins=["toy_measure"]), 3)
    assert "toy/pair_sum" in REGISTRY.measures and any(m.name == "toy/pair_sum" for m in plan.measures)
    report = analyse(probe(plan), plan, step=0)
    for layer in plan.layers:
        key = f"toy/{layer}/pair_sum"
        assert report.scalars[f"{key}/m0-m1"] == 1.0 and report.scalars[f"{key}/m1-m2"] == 3.0
        assert report.scalars[key] == pytest.approx((1 + 2 + 3) / 3)
        assert report.scalars[f"{key}/ci_lo"] == report.scalars[f"{key}/ci_hi"] == report.scalars[key]  # no sampling variance
        assert report.scalars[f"{key}/null"] == 1.0  # the null's pair is nets (0, 1) of its own stats
    only = Plan.build(config(["correlation"], plugins=["toy_measure"], measures=["toy"]), 3)
    assert [m.name for m in only.measures] == ["toy/pair_sum"]


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(analyses=["correlation", "nope"]), "analysis.analyses: unknown analysis 'nope'"),
        (dict(measures=["cka/lineer"]), "analysis.measures: unknown measure 'cka/lineer'"),
        (dict(plugins=["no_such_module_here"]), "analysis.plugins: cannot import 'no_such_module_here'"),
        (dict(null=NullConfig(pairs=[[0, 0]])), "analysis.null.pairs: pair [0, 0] is not two different members"),
    ],
)
def test_names_that_do_not_exist_are_one_line_errors(kw, message):
    kw = {"analyses": ["correlation", "cka"], **kw}
    with pytest.raises(ConfigError) as err:
        Plan.build(config(**kw), 3)
    assert message in str(err.value) and "\n" not in str(err.value)
