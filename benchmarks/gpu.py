"""GPU-only figures at the paper's scale: 4 x AlexNet at 224 px, fc6/fc7 of 4,096 units.

probe_pass_cost_cuda_224   the probe forward with a light analysis step's statistics / the forward
stats_memory_cuda_224      peak GPU memory of a full step's statistics / the printed estimate
(`alexnet224_monitor_overhead_cuda`, the whole job, is in benchmarks/monitor.py.)
"""

from __future__ import annotations

import torch

from benchmarks.common import MAIN_K, Measured, Options, alternate, paired_ratio, plan, spread, stopwatch

IMAGE_SIZE, BATCH, PROBE = 224, 100, 500


def imagenet_members(options: Options, device: str) -> list:
    from convergent.ensemble import build_member, member_seeds

    width = 0.0625 if options.quick else 1.0  # --quick: the code path on small nets (any device)
    model = {"name": "alexnet", "width": width}
    return [build_member(model, s, 1000, 3, IMAGE_SIZE).to(device) for s in member_seeds(0, MAIN_K)]


def generated_batches(options: Options, device: str) -> list:
    n = 2 * 8 if options.quick else PROBE
    batch = 8 if options.quick else BATCH
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(min(batch, n - lo), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(device),
            torch.zeros(min(batch, n - lo)),
            torch.arange(lo, min(lo + batch, n)),
        )
        for lo in range(0, n, batch)
    ]


def runner_for(members, options: Options, **overrides):
    from convergent.monitor.probe import ProbeRunner

    n = sum(len(b[2]) for b in generated_batches(options, "cpu"))
    p = plan(probe_size=n, batch_size=BATCH, memory_limit_gb=120.0, **overrides)
    return ProbeRunner(p, {layer: members[0].layer_width(layer) for layer in p.layers})


def probe_pass_cost_224(options: Options, device: str = "cuda") -> Measured:
    from benchmarks.probe_pass import forward_taps

    members = imagenet_members(options, device)
    batches = generated_batches(options, device)
    runner = runner_for(members, options, analyses=["cka"])
    light = stopwatch(lambda: runner.run(members, batches, device, full=False), device)
    forward = stopwatch(lambda: forward_taps(runner, members, batches, device), device)
    t_light, t_fwd = alternate([light, forward], options.pick(full=5, quick=1), warmup=1)
    ratio, ratio_text = paired_ratio(t_light, t_fwd)
    return Measured(
        ratio,
        f"{device}; {MAIN_K} x alexnet at {IMAGE_SIZE} px ({'width 0.0625' if options.quick else 'fc6/fc7 of 4,096 units'}), "
        f"{sum(len(b[2]) for b in batches)} generated images in batches of {len(batches[0][2])}, layers conv1..fc7; "
        f"light step (moments in {runner.groups} groups + the null's {runner.draws} re-pairings, float32 products, "
        f"TF32 off) {spread(t_light)} / forward alone {spread(t_fwd)}; {ratio_text}",
    )


def stats_memory_224(options: Options, device: str = "cuda") -> Measured:
    members = imagenet_members(options, device)
    batches = generated_batches(options, device)
    runner = runner_for(members, options)
    estimate = runner.estimate_bytes()["total"]
    if torch.device(device).type != "cuda":
        runner.run(members, batches, device, full=True)
        return Measured(1.0, f"{device}: no CUDA memory counters; the pass ran (estimate {estimate / 2**30:.2f} GiB)")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    runner.run(members, batches, device, full=True)
    torch.cuda.synchronize()
    states = sum(m.state_bytes() for m in runner.accumulators(torch.device(device))["metrics"] if hasattr(m, "state_bytes"))
    peak = torch.cuda.max_memory_allocated() - before
    return Measured(
        states / estimate,
        f"{device}; {MAIN_K} x alexnet at {IMAGE_SIZE} px, a full step's statistics: states {states / 2**30:.2f} GiB, "
        f"estimate printed before training {estimate / 2**30:.2f} GiB, peak over the pass (states, work buffers, "
        f"the forward's taps) {peak / 2**30:.2f} GiB; met needs the states within 10 % of the estimate",
        ok=abs(states / estimate - 1) <= 0.1,
    )
