"""one_pass_every_measure: one probe pass and every analysis against torch-cka's linear CKA."""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from benchmarks.common import (
    LAYERS,
    MAIN_K,
    PROBE_BATCH,
    PROBE_SIZE,
    Measured,
    Options,
    alternate,
    ensemble_module,
    lightning_fit,
    median,
    plan,
    probe_batches,
    spread,
    stopwatch,
    widths_of,
)

# --- 7. one_pass_every_measure -------------------------------------------------------------------
# The modules whose outputs are the post-ReLU taps of LAYERS (models/alexnet.py: Stage.pre).
TORCH_CKA_MODULES = [f"{'conv' if layer.startswith('conv') else 'fc'}_stages.{layer}.pre" for layer in LAYERS]


def torch_cka_all_pairs(members: Sequence[nn.Module], batches, device: str) -> dict[tuple[int, int], torch.Tensor]:
    """torch-cka's minibatch linear CKA (layers x layers) of every member pair. Each pair hooks
    fresh copies of its two members (torch-cka never removes its hooks). torch-cka forms the
    kernels of raw activations in float32; on small activations (random-init fc layers) its HSIC
    cancels to ~0 or below and a cell becomes NaN/inf: kept, and reported by the check."""
    from unittest import mock

    from torch_cka import CKA

    out = {}
    with warnings.catch_warnings(), mock.patch("torch_cka.cka.tqdm", lambda it, **kw: it):
        warnings.simplefilter("ignore")  # "Dataloader for Model 2 is not given": the same probe set
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                cka = CKA(
                    copy.deepcopy(members[a]),
                    copy.deepcopy(members[b]),
                    model1_name=f"m{a}",
                    model2_name=f"m{b}",
                    model1_layers=TORCH_CKA_MODULES,
                    model2_layers=TORCH_CKA_MODULES,
                    device=device,
                )
                try:
                    cka.compare(batches)
                except AssertionError:  # "HSIC computation resulted in NANs": keep the matrix, the check reports it
                    pass
                out[(a, b)] = cka.hsic_matrix
    return out


class ProbeBatches(list):
    """Preloaded probe batches with the `.dataset` torch-cka reads for its report."""

    dataset = "mnist5k probe set"


def trained_members(steps: int, device: str) -> list[nn.Module]:
    ensemble = ensemble_module(MAIN_K)
    if steps:
        lightning_fit(ensemble, steps, device)
    return [m.to(device).eval() for m in ensemble.members]


def one_pass_every_measure(options: Options, device: str = "cpu") -> Measured:
    from convergent.monitor.probe import ProbeRunner
    from convergent.monitor.step import analyse

    steps = 100 if options.quick else 300  # random-init fc activations are too small for torch-cka's float32
    n = 500 if options.quick else PROBE_SIZE
    import convergent.analysis.builtin  # noqa: F401 - registers the built-in analyses
    from convergent.analysis.registry import REGISTRY

    # every analysis of the statistics; functional convergence evaluates the networks themselves
    # (interpolations, stitching: no counterpart in torch-cka) and is timed in the main job instead
    statistics_only = [name for name in REGISTRY.analyses if name != "functional"]
    p = plan(heavy_pairs="all", probe_size=n, batch_size=PROBE_BATCH, figures="none", analyses=statistics_only)
    members = trained_members(steps, device)
    batches = ProbeBatches(probe_batches(n))
    runner = ProbeRunner(p, widths_of(members[0]))
    results: dict = {}

    def ours() -> None:
        t = time.perf_counter()
        probe = runner.run(members, batches, device, full=True)
        results["pass"] = time.perf_counter() - t
        results["ours"] = analyse(probe, p, step=0, full=True)
        results["timings"] = results["ours"].seconds

    def theirs() -> None:
        results["torch_cka"] = torch_cka_all_pairs(members, batches, device)

    rounds, warmup = options.pick(full=3, quick=1), 0 if options.quick else 1
    ta, tb = alternate([stopwatch(ours, device), stopwatch(theirs, device)], rounds, warmup)
    scalars, cka = results["ours"].scalars, results["torch_cka"]
    diffs = {
        (layer, pair): abs(float(cka[pair][i, i]) - scalars[f"cka/{layer}/linear_debiased/m{pair[0]}-m{pair[1]}"])
        for i, layer in enumerate(LAYERS)
        if layer.startswith("fc")
        for pair in cka
    }
    bad = [key for key, d in diffs.items() if not math.isfinite(d)]
    worst = max(diffs, key=lambda key: diffs[key] if math.isfinite(diffs[key]) else math.inf)
    max_diff = diffs[worst]
    failures = len(results["ours"].failures)
    slowest = sorted(results["timings"].items(), key=lambda kv: -kv[1])[:5]
    return Measured(
        median(ta) / median(tb),
        f"{device}; {MAIN_K} x alexnet_small 0.25 ({f'{steps} training steps' if steps else 'random init'}), "
        f"{n} mnist5k probe images, batches of {PROBE_BATCH}; ours (probe pass with every statistic + "
        f"analyze(full=True), default analysis config, every analysis but functional, heavy_pairs=all, every layer and pair: {len(scalars)} scalars, "
        f"{failures} failures) "
        f"{spread(ta)} (last round: probe pass {results['pass']:.3g} s; slowest analyses "
        f"{', '.join(f'{name} {sec:.3g} s' for name, sec in slowest)}); torch-cka 0.21 (linear CKA only, "
        f"{len(LAYERS)} x {len(LAYERS)} layers, all {len(cka)} pairs) {spread(tb)}. CKA check on fc6/fc7: torch-cka "
        "averages the unbiased HSIC (Song et al.) over minibatches, "
        f"so it estimates the same quantity as our cka/<layer>/linear_debiased (unbiased HSIC over the whole probe "
        f"set); max |difference| {max_diff:.2g} ({worst[0]}, m{worst[1][0]}-m{worst[1][1]}), non-finite torch-cka "
        f"values: {len(bad)}; met needs <= 0.01, all finite and no analysis failure (conv layers are not compared: "
        "torch-cka flattens each image's map, ours takes every position as a sample)",
        ok=max_diff <= 0.01 and not bad and failures == 0,
    )
