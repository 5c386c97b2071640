"""Numerical safety of one analysis step on degenerate input: dead units, constant images, an
all-zero layer or net, bf16/fp16 activations, huge or tiny weights, identical members, a probe set
of one batch. Every analysis runs (the real probe pass and pipeline); nothing may fail, no value
may be dropped as non-finite, every float array of the npz and every table cell is finite, and
the figures render."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from convergent.analysis.builtin.mutual_info import MutualInfoOptions
from convergent.analysis.builtin.patches import PatchesOptions
from convergent.analysis.builtin.spectral import SpectralOptions
from convergent.analysis.config import AnalysisConfig, NullConfig
from convergent.analysis.measures import SampleSizeWarning
from convergent.analysis.plan import Plan
from convergent.models import AlexNet
from convergent.monitor.probe import ProbeRunner
from convergent.monitor.step import StepReport, analyse

LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]
HYPOTHESIS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
pytestmark = pytest.mark.usefixtures("one_thread")


def make_plan(k: int, n: int, layers=LAYERS, null: bool = True, n_clusters: int = 3, analyses="all") -> Plan:
    config = AnalysisConfig(
        layers=list(layers),
        analyses=analyses,
        probe_size=n,
        batch_size=n,  # the probe set is one batch
        heavy_pairs="all",
        null=NullConfig(enabled=null, draws=3),
        spectral=SpectralOptions(n_clusters=n_clusters),
        mutual_info=MutualInfoOptions(layers="conv", positions=4),
        patches=PatchesOptions(top_k=3, pairs=2),
    )
    return Plan.build(config, k)


def probe_loader(images: torch.Tensor, batch_size: int):
    """Batches as the data module's probe loader gives them: (images, labels, probe index)."""
    n = images.shape[0]
    return [
        (
            images[i : i + batch_size],
            torch.zeros(min(batch_size, n - i), dtype=torch.long),
            torch.arange(i, min(i + batch_size, n)),
        )
        for i in range(0, n, batch_size)
    ]


def one_step(members, images, plan: Plan, full: bool = True) -> StepReport:
    widths = {layer: members[0].layer_width(layer) for layer in plan.layers}
    loader = probe_loader(images, plan.config.batch_size)
    probe = ProbeRunner(plan, widths).run(list(members), loader, torch.device("cpu"), full=full)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleSizeWarning)  # CCA with fewer samples than units: warned, still finite
        return analyse(probe, plan, step=0, full=full, members=list(members), batches=lambda: loader)


def assert_all_finite(report: StepReport, plan: Plan, full: bool) -> None:
    assert report.failures == [], report.failures[:5]
    assert report.scalars and all(np.isfinite(v) for v in report.scalars.values())
    # nothing declared went missing (the score above chance is undefined when the null is perfect)
    missing = plan.declared_keys(full=full) - set(report.scalars)
    assert all(k.endswith("/above_null") for k in missing), sorted(missing)[:10]
    assert not set(report.scalars) - plan.declared_keys(full=full) - {"monitor/analysis_seconds"}
    for key, value in report.arrays.items():
        if value.dtype.kind in "fc":
            assert np.isfinite(value).all(), key
    for key, (_columns, rows) in report.tables.items():
        for row in rows:
            for cell in row:
                if isinstance(cell, float):
                    assert np.isfinite(cell), (key, row)


# --- real members with degenerate weights or inputs --------------------------------------------
def member(seed: int, width: float = 0.0625) -> AlexNet:
    torch.manual_seed(seed)
    return AlexNet.small(width=width, dropout=0.0).eval()


def stage(net: AlexNet, layer: str):
    return net.conv_stages[layer] if layer in net.conv_stages else net.fc_stages[layer]


def kill_units(net: AlexNet, fraction: float) -> None:
    """Zero weights and a negative bias: the unit's ReLU output is 0 on every input (dead)."""
    with torch.no_grad():
        for layer in LAYERS:
            lin = stage(net, layer).pre[0]
            dead = int(round(fraction * lin.weight.shape[0]))
            lin.weight[:dead] = 0
            lin.bias[:dead] = -1


def zero_layer(net: AlexNet, layer: str) -> None:
    """Every unit of `layer` outputs 0; the layers above it see constant input."""
    with torch.no_grad():
        for p in stage(net, layer).parameters():
            p.zero_()


DEGENERATE = st.fixed_dictionaries(
    {
        "k": st.sampled_from([2, 3]),
        "n": st.integers(4, 20),
        "images": st.sampled_from(["noise", "constant", "zeros"]),
        "dead": st.sampled_from([0.0, 0.5, 1.0]),
        "dead_members": st.sampled_from(["first", "all"]),
        "zero_layer": st.sampled_from([None, "conv1", "conv3", "fc6", "fc7"]),
        "scale": st.sampled_from([1.0, 1e-4, 1e3]),
        "dtype": st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
        "identical": st.booleans(),
        "full": st.booleans(),
        "null": st.booleans(),
    }
).filter(lambda case: not (case["dtype"] == torch.float16 and case["scale"] > 1))  # overflow: see below


def degenerate_members(case: dict):
    members = [member(i) for i in range(case["k"])]
    if case["identical"]:
        members[1].load_state_dict(members[0].state_dict())
    hit = members[:1] if case["dead_members"] == "first" else members
    for net in hit:
        if case["dead"]:
            kill_units(net, case["dead"])
        if case["zero_layer"]:
            zero_layer(net, case["zero_layer"])
    with torch.no_grad():
        for net in members:
            for p in net.parameters():
                p.mul_(case["scale"])
    return [net.to(case["dtype"]) for net in members]


def degenerate_images(case: dict) -> torch.Tensor:
    n = case["n"]
    if case["images"] == "noise":
        images = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(n))
    elif case["images"] == "constant":
        images = torch.full((n, 1, 28, 28), 0.7)
    else:
        images = torch.zeros(n, 1, 28, 28)
    return images.to(case["dtype"])


@settings(max_examples=12, **HYPOTHESIS)
@given(case=DEGENERATE)
def test_every_analysis_is_finite_on_degenerate_members(case):
    plan = make_plan(case["k"], case["n"], null=case["null"])
    report = one_step(degenerate_members(case), degenerate_images(case), plan, full=case["full"])
    assert_all_finite(report, plan, case["full"])


@pytest.mark.parametrize(
    "case",
    [
        dict(dead=1.0, dead_members="all", zero_layer=None, images="noise"),  # every unit dead in every net
        dict(dead=0.0, dead_members="first", zero_layer="fc6", images="noise"),  # one net's whole fc6 is 0
        dict(dead=0.5, dead_members="all", zero_layer="conv1", images="constant"),
        dict(dead=0.0, dead_members="all", zero_layer=None, images="zeros", dtype=torch.bfloat16),
        dict(dead=0.0, dead_members="all", zero_layer=None, images="noise", dtype=torch.bfloat16, scale=1e3),
    ],
    ids=["all-dead", "one-net-fc6-zero", "dead-zero-conv1-constant-images", "bf16-zero-images", "bf16-huge-weights"],
)
def test_named_degenerate_cases(case):
    case = {**dict(k=2, n=12, scale=1.0, dtype=torch.float32, identical=False, full=True, null=True), **case}
    plan = make_plan(case["k"], case["n"])
    assert_all_finite(one_step(degenerate_members(case), degenerate_images(case), plan), plan, True)


def test_figures_of_a_degenerate_step_render():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from convergent.models import receptive_field
    from convergent.monitor.plotting import step_figures

    case = dict(k=2, n=12, images="constant", dead=0.5, dead_members="first", zero_layer="fc7", scale=1.0,
                dtype=torch.bfloat16, identical=False)  # fmt: skip
    plan = make_plan(2, 12)
    members = degenerate_members(case)
    images = degenerate_images(case)
    report = one_step(members, images, plan)
    assert_all_finite(report, plan, True)
    probe_set = [(images[i].float(), 0) for i in range(images.shape[0])]
    fields = {layer: receptive_field(members[0], layer) for layer in plan.conv_layers}
    drawn = []
    try:
        for key, fig in step_figures(report, plan, fields, probe_set):
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=40)
            assert buf.tell() > 1000, key
            drawn.append(key)
            plt.close(fig)
    finally:
        plt.close("all")
    assert {"corr/m0-m1", "matching/m0-m1", "spectral/m0-m1", "hier/m0-m1", "patches/m0-m1", "cross_layer/m0-m1",
            "act/mean", "sparse/error_vs_nnz"} <= set(drawn), drawn  # fmt: skip


def test_overflowing_activations_are_reported_and_never_written(tmp_path):
    """fp16 activations that overflow to inf (a diverging member): through the monitor's write
    path, the step's failures name the layers, and the npz, the logged scalars and the figures hold
    nothing non-finite (the figures that cannot be drawn are a failure too, not a crash)."""
    from types import SimpleNamespace

    import matplotlib.pyplot as plt

    from convergent.models import receptive_field
    from convergent.monitor.service import StepService

    case = dict(k=2, n=12, images="noise", dead=0.0, dead_members="all", zero_layer=None, scale=1.0,
                dtype=torch.float16, identical=False)  # fmt: skip
    members = degenerate_members(case)
    with torch.no_grad():
        for p in members[1].parameters():  # member 1 only: its deep layers overflow fp16
            p.mul_(1e3)
    images = degenerate_images(case)
    plan = make_plan(2, 12)
    widths = {layer: members[0].layer_width(layer) for layer in plan.layers}
    probe_set = [(images[i].float(), 0) for i in range(12)]
    logged = {}
    logger = SimpleNamespace(log_metrics=lambda values, step: logged.update(values), save=lambda: None)
    fields = {layer: receptive_field(members[0], layer) for layer in plan.conv_layers}
    monitor = StepService(plan, widths, tmp_path, [logger], background=True, probe_set=probe_set, fields=fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleSizeWarning)
        probe = monitor.probe(members, probe_loader(images, 12), torch.device("cpu"), True)
        monitor.analyse_and_write(probe, 0, True)
    monitor.finish(0, figures=False)
    monitor.close()

    assert monitor.failures and all(f.startswith("step 0: ") for f in monitor.failures)
    assert any(" on fc7 failed" in f or "fc7/" in f for f in monitor.failures), monitor.failures[:10]
    assert logged and all(np.isfinite(v) for v in logged.values())
    assert "align/conv1/max_match" in logged  # the layers that did not overflow are analysed
    with np.load(tmp_path / "analysis" / "step=0.npz") as npz:
        assert "conv1/corr/m0-m1" in npz.files
        for key in npz.files:
            if npz[key].dtype.kind in "fc":
                assert np.isfinite(npz[key]).all(), key
    assert list((tmp_path / "figures").rglob("*.png")), "no figure was drawn"
    assert plt.get_fignums() == []


# --- generated activations: any shape, any degeneracy ------------------------------------------
class Replay(nn.Module):
    """A "member" whose taps are given arrays: `images` are probe indices [N, 1, 1, 1]."""

    def __init__(self, acts: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.acts = acts

    def layer_width(self, layer: str) -> int:
        return self.acts[layer].shape[1]

    def forward(self, images: torch.Tensor, taps=None):
        index = images.flatten().long()
        out = {layer: self.acts[layer][index] for layer in taps}
        return torch.zeros(len(index), 10), out


@st.composite
def activations(draw):
    """k members' post-ReLU activations for 2 conv layers and 1 fc layer, with dead units,
    constant units, all-zero members and half-precision rounding drawn at random."""
    k = draw(st.sampled_from([2, 3]))
    n = draw(st.integers(4, 24))
    shapes = {
        "conv1": (draw(st.integers(2, 6)), draw(st.integers(1, 3))),
        "conv2": (draw(st.integers(2, 6)), draw(st.integers(1, 3))),
        "fc6": (draw(st.integers(2, 12)), None),
    }
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    scale = draw(st.sampled_from([1.0, 1e-6, 1e4]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    members = []
    for _ in range(k):
        acts = {}
        for layer, (c, side) in shapes.items():
            shape = (n, c) if side is None else (n, c, side, side)
            x = np.maximum(rng.standard_normal(shape), 0) * scale
            kind = draw(st.sampled_from(["plain", "dead", "constant", "zero", "duplicate"]))
            if kind == "dead":
                x[:, : draw(st.integers(1, c))] = 0
            elif kind == "constant":  # the same value for every image and position
                x[:, : draw(st.integers(1, c))] = scale * 0.5
            elif kind == "zero":
                x[:] = 0
            elif kind == "duplicate" and members:
                x = members[0][layer].double().numpy().copy()
            acts[layer] = torch.from_numpy(x).to(dtype).float()  # half-precision activations, used as float
        members.append(acts)
    return k, n, members


@settings(max_examples=15, **HYPOTHESIS)
@given(data=activations(), full=st.booleans(), null=st.booleans())
def test_every_analysis_is_finite_on_generated_activations(data, full, null):
    k, n, acts = data
    members = [Replay(a) for a in acts]
    # every analysis but the functional ones, which need real AlexNet members
    import convergent.analysis.builtin  # noqa: F401
    from convergent.analysis.registry import REGISTRY

    names = sorted(n for n in REGISTRY.analyses if n != "functional")
    plan = make_plan(k, n, layers=["conv1", "conv2", "fc6"], null=null, n_clusters=2, analyses=names)
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    report = one_step(members, images, plan, full=full)
    assert_all_finite(report, plan, full)


def test_the_smallest_probe_sets_work_and_a_too_small_one_for_the_null_is_a_clear_error():
    from convergent.errors import ConfigError

    members = [member(0), member(1)]
    images = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    plan = make_plan(2, 4, layers=["conv1", "fc6"])
    assert_all_finite(one_step(members, images, plan), plan, True)
    plan = make_plan(2, 2, layers=["conv1"], null=False)
    assert one_step(members, images[:2], plan).failures == []
    with pytest.raises(ConfigError, match="too small for the null"):
        make_plan(2, 2, layers=["conv1"])
