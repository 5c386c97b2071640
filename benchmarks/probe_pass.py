"""probe_pass_cost and stats_memory: what the monitor's probe pass costs in time and memory."""

from __future__ import annotations

import json
import platform
import resource
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import (
    LAYERS,
    MAIN_K,
    PROBE_BATCH,
    PROBE_SIZE,
    GeneratedProbe,
    Measured,
    Options,
    alternate,
    build_members,
    median,
    paired_ratio,
    plan,
    probe_batches,
    python_module,
    spread,
    stopwatch,
    widths_of,
)


def moments_runner(members: Sequence[nn.Module], null: bool = False):
    """The monitor's light-step statistics of every default layer: the grouped moments (and, with
    `null`, the null's re-paired cross moments, as a light analysis step collects them), product dtype
    `auto`; no mutual information, top-k or pooled features."""
    from convergent.analysis.config import NullConfig
    from convergent.monitor.probe import ProbeRunner

    p = plan(len(members), layers=list(LAYERS), analyses=["cka"], null=NullConfig(enabled=null))
    return ProbeRunner(p, widths_of(members[0]))


def forward_taps(runner, members: Sequence[nn.Module], batches, device: str) -> None:
    """The probe forward alone: every member's taps of every batch, eval mode, no_grad."""
    from convergent.monitor.probe import evaluating

    with evaluating(members), torch.no_grad():
        for batch in batches:
            runner.taps(members, batch[0].to(device))


# --- 1. probe_pass_cost --------------------------------------------------------------------------
def probe_pass_cost(options: Options, device: str = "cpu") -> Measured:
    n = PROBE_BATCH if options.quick else PROBE_SIZE
    members = [m.to(device) for m in build_members()]
    batches = list(GeneratedProbe(n)) if options.quick else probe_batches(n)  # --quick: no data set to load
    runner, with_null = moments_runner(members), moments_runner(members, null=True)
    moments = stopwatch(lambda: runner.run(members, batches, device, full=False), device)
    light = stopwatch(lambda: with_null.run(members, batches, device, full=False), device)
    forward = stopwatch(lambda: forward_taps(runner, members, batches, device), device)
    t_light, t_fwd, t_moments = alternate([light, forward, moments], options.pick(full=11, quick=1), warmup=1)
    ratio, ratio_text = paired_ratio(t_light, t_fwd)
    draws = with_null.plan.config.null.draws
    return Measured(
        ratio,
        f"light step / forward: {ratio_text}; "
        f"{device}; {MAIN_K} x alexnet_small 0.25, {n} {'generated' if options.quick else 'mnist5k'} probe images "
        f"in batches of {PROBE_BATCH}, taps of {', '.join(LAYERS)} (eval, no_grad); with a light analysis step's "
        f"statistics (moments in {with_null.groups} image groups + the null's {draws} re-pairings of the first pair, "
        f"float32 products) {spread(t_light)}; forward alone {spread(t_fwd)}; the moments without the null "
        f"{spread(t_moments)} = {median(t_moments) / median(t_fwd):.3g} x; no MI, top-k or pooled features (full "
        "steps only); batches preloaded; accumulators built in the warm-up round (the monitor reuses them)",
    )


# --- 2. stats_memory -----------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak resident memory from a starting point on. On Linux the high-water mark is reset
    (`/proc/self/clear_refs` 5) and read back (VmHWM), so earlier peaks (imports, model set-up)
    cannot mask the pass; elsewhere ru_maxrss, which can only under-count growth."""

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM after a reset, minus VmRSS at the start"
            self.base = _proc_status_kib("VmRSS")
        except OSError:
            self.base = None
        if self.base is None:
            self.method = "ru_maxrss after minus ru_maxrss before"
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    def reset_peak(self) -> None:
        """Forget the peak so far, keep the base (Linux; elsewhere the peak cannot be reset)."""
        if self.method.startswith("VmHWM"):
            Path("/proc/self/clear_refs").write_text("5")

    def peak_bytes(self) -> int:
        peak = _proc_status_kib("VmHWM") if self.method.startswith("VmHWM") else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return 1024 * (peak - self.base)


# (probe sizes compared, probe batch, members): the main job's, and a small one for --quick
MEMORY_SETUP = {False: ((1000, 8000), PROBE_BATCH, MAIN_K), True: ((100, 400), 25, 2)}


def child_memory(n: int, quick: bool = False) -> dict:
    """In a fresh process: every statistic the monitor keeps (default analysis config) of the main
    job's members over n generated probe images; the peak memory the pass adds."""
    from convergent.monitor.probe import ProbeRunner

    _, batch, k = MEMORY_SETUP[quick]
    torch.manual_seed(0)
    members = build_members(k)
    meter = PeakRSS()
    meter.start()  # the base: the process with its members, before any statistic exists
    runner = ProbeRunner(plan(k=k, probe_size=n, batch_size=batch), widths_of(members[0]))
    # The monitor runs a probe pass at every analysis step: measure a pass of n images after a
    # first pass of the smaller size (the same for both sizes), so one-time costs (lazy kernels,
    # the allocator's first heap) count on both sides alike. Everything the first pass left
    # (the accumulators, the heap) still counts: the base is before it.
    runner.run(members, GeneratedProbe(MEMORY_SETUP[quick][0][0], batch), "cpu", full=True)
    meter.reset_peak()
    stats = runner.run(members, GeneratedProbe(n, batch), "cpu", full=True)
    peak = meter.peak_bytes()
    estimate = runner.estimate_bytes()["total"]
    return {"n": n, "peak_bytes": peak, "images": stats.n_images, "estimate_bytes": estimate, "method": meter.method}


# glibc's initial mmap threshold (128 KiB), fixed: every allocation of 128 KiB or more gets its own
# mapping and goes back to the OS when freed, so the resident peak is the memory the pass holds.
# By default glibc raises the threshold as big blocks are freed and later ones land in the heap,
# whose fragments (around the members' forward: measured) differ by tens of MiB between identical
# processes (1,000 images: 239 to 280 MiB), more than the 5 % the figure must resolve; that
# figure is reported beside it.
HELD_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def stats_memory(options: Options) -> Measured:
    (small, large), batch, k = MEMORY_SETUP[options.quick]
    quick = ["--quick"] if options.quick else []

    def child(n: int, env: dict[str, str] | None) -> dict:
        out = python_module("benchmarks.cli", "--child-memory", str(n), *quick, env=env).stdout
        return json.loads(out.strip().splitlines()[-1])

    glibc = platform.libc_ver()[0] == "glibc"  # elsewhere the variable means nothing: one setting
    held: dict[int, list[dict]] = {large: [], small: []}
    default: dict[int, list[dict]] = {large: [], small: []}
    for _ in range(options.pick(full=3, quick=1)):  # fresh processes, one at a time, sizes alternating
        for n in (large, small):
            held[n].append(child(n, HELD_MEMORY_ENV if glibc else None))
            if glibc:
                default[n].append(child(n, None))
    mib = 1 << 20

    def peaks(runs: dict[int, list[dict]]) -> tuple[float, str]:
        peak = {n: median([r["peak_bytes"] for r in rs]) for n, rs in runs.items()}
        each = {n: ", ".join(f"{r['peak_bytes'] / mib:.0f}" for r in rs) for n, rs in runs.items()}
        return peak[large] / peak[small], (
            f"{large} images {peak[large] / mib:.1f} MiB (runs: {each[large]}), {small} images "
            f"{peak[small] / mib:.1f} MiB (runs: {each[small]}), medians"
        )

    ratio, held_text = peaks(held)
    if glibc:
        default_ratio, default_text = peaks(default)
        held_text = f"glibc's mmap threshold fixed at 128 KiB (memory held, no heap fragments): {held_text}; "
        held_text += f"with glibc's default dynamic threshold (heap fragments too): {default_ratio:.3g} = {default_text}"
    a = held[large][0]
    return Measured(
        ratio,
        f"every statistic of the default analysis config (moments, null, MI bins/joint, top-k, pooled) of "
        f"{k} x alexnet_small 0.25, batches of {batch} generated images, after a first pass of {small} images "
        f"(as the monitor's later analysis steps); peak memory over the process with its members (statistics' "
        f"states, work memory, the forward's taps and what the first pass left), {held_text}; "
        f"the statistics' states alone: {a['estimate_bytes'] / mib:.1f} MiB; each run a fresh process, {a['method']}",
    )
