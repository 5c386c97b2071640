"""`convergent-bench`: the project's performance figures, each measured inside one run.

    convergent-bench                                   # every figure (tens of minutes on 2 CPU cores)
    convergent-bench --only max_match_4096,stats_memory --json bench.json
    convergent-bench --quick                           # smaller, faster versions (used by the tests)
    convergent-bench --list                            # the figures and what each measures

Every figure is a ratio of two things measured in the same process (or in back-to-back
subprocesses), their repetitions alternated A B B A ... and their medians compared, so a busy
machine slows both alike; `max_match_4096` is an absolute time. The table shows each figure, its
goal and whether it is met; `--json FILE` writes the same as a list of
``{"name", "value", "goal", "op", "met", "unit", "detail"}`` (``value`` is null where a figure
failed to run, with the error in ``detail``).

Figures (README "Benchmarks"):
  probe_pass_cost         ensemble probe forward with the monitor's moments / the same forward alone
  stats_memory            peak memory a probe pass holds at probe size 8,000 / at 1,000 (subprocesses)
  monitor_overhead        wall time of `convergent-train` / `convergent-train callbacks=none`
  sparse_speedup          scikit-learn Lasso path per target / `sparse_prediction` from the moments
  sparse_384              seconds of `sparse_prediction` at conv3 width (384 units) on collinear activations
  max_match_4096          seconds of `max_match` on a 4096 x 4096 correlation matrix
  ensemble_training       images/s per member, K=4 in one module / K=1 (Lightning, CPU)
  one_pass_every_measure  one probe pass + every analysis / torch-cka's linear CKA of every pair

With CUDA, `*_cuda` variants of the in-process figures run the same measurement on the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.resources
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")  # the default analysis.layers
# The main job's model and probe pass (conf/model/alexnet_small.yaml, analysis batch size).
MAIN_MODEL = {"name": "alexnet_small", "width": 0.25}
MAIN_K = 4
PROBE_SIZE = 1000  # the whole mnist5k validation split
PROBE_BATCH = 250
TRAIN_BATCH = 64  # conf/data/mnist5k.yaml


# --- results and the registry --------------------------------------------------------------------
@dataclass
class Measured:
    """What a figure function returns: the value, a note on how it was measured, and `ok` for
    any condition besides the goal (e.g. the two methods agree)."""

    value: float
    detail: str = ""
    ok: bool = True


@dataclass(frozen=True)
class Options:
    quick: bool = False
    rounds: int | None = None  # --repeat: A/B rounds of every alternated figure (None: per figure)

    def pick(self, full: int, quick: int) -> int:
        return self.rounds if self.rounds else (quick if self.quick else full)


@dataclass(frozen=True)
class Spec:
    name: str
    goal: float
    op: str  # "<=", "<" or ">="
    unit: str
    run: Callable[[Options], Measured]
    about: str


@dataclass
class Figure:
    name: str
    value: float | None
    goal: float
    op: str
    met: bool
    unit: str
    detail: str = ""
    seconds: float = 0.0

    @property
    def shown(self) -> str:
        """The value as the table and the progress lines print it."""
        return "error" if self.value is None else f"{self.value:.3g} {self.unit}"

    def as_json(self) -> dict:
        return {
            "name": self.name,
            "value": self.value if self.value is not None and math.isfinite(self.value) else None,
            "goal": self.goal,
            "op": self.op,
            "met": self.met,
            "unit": self.unit,
            "detail": self.detail,
        }


COMPARE = {"<=": lambda v, g: v <= g, "<": lambda v, g: v < g, ">=": lambda v, g: v >= g}


def evaluate(spec: Spec, options: Options) -> Figure:
    """Run one figure; an exception becomes a failed figure (value None) and the suite goes on."""
    t0 = time.perf_counter()
    try:
        m = spec.run(options)
    except Exception as e:  # a benchmark that cannot run must not hide the others
        failed = f"failed: {type(e).__name__}: {e}"
        return Figure(spec.name, None, spec.goal, spec.op, False, spec.unit, failed, time.perf_counter() - t0)
    value = float(m.value)
    met = math.isfinite(value) and COMPARE[spec.op](value, spec.goal) and m.ok
    return Figure(spec.name, value, spec.goal, spec.op, bool(met), spec.unit, m.detail, time.perf_counter() - t0)


# --- shared helpers ------------------------------------------------------------------------------
def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def stopwatch(fn: Callable[[], object], device: str = "cpu") -> Callable[[], float]:
    """A measurement: the seconds one call of `fn` takes (GPU work included)."""

    def measure() -> float:
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t

    return measure


def alternate(measures: Sequence[Callable[[], float]], rounds: int, warmup: int = 0) -> list[list[float]]:
    """Measurements of A, B, ... in the order A B, B A, A B, ... (after `warmup` untimed rounds),
    so that drifting load hits all alike. Each measure returns one measurement (seconds)."""
    for _ in range(warmup):
        for measure in measures:
            measure()
    out: list[list[float]] = [[] for _ in measures]
    for r in range(rounds):
        order = range(len(measures)) if r % 2 == 0 else reversed(range(len(measures)))
        for i in order:
            out[i].append(measures[i]())
    return out


def spread(ts: Sequence[float]) -> str:
    """`median s (min-max, n)` of a list of timings."""
    return f"{median(ts):.3g} s ({min(ts):.3g}-{max(ts):.3g}, n={len(ts)})"


@contextlib.contextmanager
def quiet_lightning():
    """No Lightning banners or data-loader hints in the middle of the table."""
    names = ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning")
    saved = {n: logging.getLogger(n).level for n in names}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def config(group: str, name: str, **overrides) -> dict:
    """A packaged config file (conf/<group>/<name>.yaml) as a dict, with overrides."""
    from omegaconf import OmegaConf

    path = importlib.resources.files("convergent.conf") / group / f"{name}.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(str(path)), resolve=True)
    cfg.update(overrides)
    return cfg


def analysis_settings(k: int = MAIN_K, **overrides):
    """AnalysisSettings of conf/analysis/default.yaml with overrides (config keys)."""
    from convergent.settings import AnalysisSettings

    return AnalysisSettings.from_config(config("analysis", "default", **overrides), k=k)


def mnist5k():
    from convergent.data import MNIST5k

    dm = MNIST5k(batch_size=TRAIN_BATCH)
    dm.setup()
    return dm


def probe_batches(n: int, batch: int = PROBE_BATCH) -> list:
    """The first n mnist5k validation images as the monitor's probe batches (image, label,
    index), loaded once so that data loading is in neither side of a ratio."""
    return list(mnist5k().probe_dataloader(n, batch))


def build_members(k: int = MAIN_K, model: dict | None = None, seed: int = 0) -> list[nn.Module]:
    """K members as the main job builds them (seeds seed*1000 + i), random init."""
    from convergent.ensemble import build_member, member_seeds

    model = dict(model or MAIN_MODEL)
    return [build_member(model, s, 10, 1, 28) for s in member_seeds(seed, k)]


def ensemble_module(k: int, vectorize: bool = False):
    from convergent.ensemble import Ensemble

    return Ensemble(
        model=dict(MAIN_MODEL), num_classes=10, in_channels=1, input_size=28, k=k, optim=config("optim", "adam"), vectorize=vectorize
    )


def lightning_fit(module, max_steps: int, device: str = "cpu", callbacks: Sequence = ()) -> None:
    """`max_steps` training steps of the main job's set-up (mnist5k, batch 64, Adam) through a
    real `pl.Trainer`; no validation, checkpoints or loggers."""
    import pytorch_lightning as pl

    with quiet_lightning():
        trainer = pl.Trainer(
            accelerator="gpu" if torch.device(device).type == "cuda" else "cpu",
            devices=1,
            max_steps=max_steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=list(callbacks),
        )
        trainer.fit(module, datamodule=mnist5k())


def widths_of(member: nn.Module, layers: Sequence[str] = LAYERS) -> dict[str, int]:
    return {layer: member.layer_width(layer) for layer in layers}


def moments_runner(members: Sequence[nn.Module]):
    """The monitor's moments of every default layer and nothing else (no null, no mutual
    information, no top-k, no pooled features), product dtype `auto`: `run(full=False)` folds
    each batch into one accumulator per layer (a light step), `run(full=True)` into the fit and
    held-out halves (even / odd images)."""
    from convergent.probe import ProbeOptions, ProbeRunner

    options = ProbeOptions(layers=LAYERS, null=False, mutual_info=False, top_k=0, pooled=False)
    return ProbeRunner(options, widths_of(members[0]), len(members))


def forward_taps(runner, members: Sequence[nn.Module], batches, device: str) -> None:
    """The probe forward alone: every member's taps of every batch, eval mode, no_grad."""
    from convergent.probe import evaluating

    with evaluating(members), torch.no_grad():
        for batch in batches:
            runner.taps(members, batch[0].to(device))


def python_module(
    module: str, *args: str, cwd: str | Path | None = None, timeout: float = 3600, env: dict[str, str] | None = None
):
    """`python -m <module> args` in a subprocess (W&B offline, plus `env`), failing loudly."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"python -m {module} {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


class GeneratedProbe:
    """Probe batches (image, label, index) generated one at a time from a seed: nothing of the
    data is held, so memory can only grow with the statistics. Iterable again and again (the
    mutual-information pass reads the probe set twice)."""

    def __init__(self, n: int, batch: int = PROBE_BATCH) -> None:
        self.n, self.batch = n, batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for lo in range(0, self.n, self.batch):
            hi = min(self.n, lo + self.batch)
            g = torch.Generator().manual_seed(lo)
            yield torch.randn(hi - lo, 1, 28, 28, generator=g), torch.zeros(hi - lo, dtype=torch.long), torch.arange(lo, hi)


# --- 1. probe_pass_cost --------------------------------------------------------------------------
def probe_pass_cost(options: Options, device: str = "cpu") -> Measured:
    n = PROBE_BATCH if options.quick else PROBE_SIZE
    members = [m.to(device) for m in build_members()]
    batches = list(GeneratedProbe(n)) if options.quick else probe_batches(n)  # --quick: no data set to load
    runner = moments_runner(members)
    light = stopwatch(lambda: runner.run(members, batches, device, full=False), device)
    split = stopwatch(lambda: runner.run(members, batches, device, full=True), device)
    forward = stopwatch(lambda: forward_taps(runner, members, batches, device), device)
    # light and forward back to back in every round: the median of the per-round ratios follows the
    # machine's drifting load better than a ratio of medians (both are reported)
    t_light, t_fwd, t_split = alternate([light, forward, split], options.pick(full=11, quick=1), warmup=1)
    paired = [a / b for a, b in zip(t_light, t_fwd)]
    return Measured(
        median(paired),
        f"median of {len(paired)} per-round ratios light / forward ({min(paired):.3g}-{max(paired):.3g}; ratio of "
        f"medians {median(t_light) / median(t_fwd):.3g}); "
        f"{device}; {MAIN_K} x alexnet_small 0.25, {n} {'generated' if options.quick else 'mnist5k'} probe images "
        f"in batches of {PROBE_BATCH}, taps of "
        f"{', '.join(LAYERS)} (eval, no_grad); with the monitor's light-step moments (run(full=False): one "
        f"accumulator per layer, float32 products) {spread(t_light)}; forward alone {spread(t_fwd)}; with the "
        f"fit/held-out split moments (run(full=True), same options) {spread(t_split)} = "
        f"{median(t_split) / median(t_fwd):.3g} x; no null, MI, top-k or pooled features; batches preloaded; "
        "accumulators built in the warm-up round (the monitor reuses them)",
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
    from convergent.callbacks.monitor import probe_runner

    _, batch, k = MEMORY_SETUP[quick]
    torch.manual_seed(0)
    members = build_members(k)
    meter = PeakRSS()
    meter.start()  # the base: the process with its members, before any statistic exists
    runner = probe_runner(analysis_settings(k=k, probe_size=n, batch_size=batch), widths_of(members[0]))
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
        out = python_module("convergent.bench", "--child-memory", str(n), *quick, env=env).stdout
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


# --- 3. monitor_overhead -------------------------------------------------------------------------
def train_job(args: Sequence[str], summaries: list[dict] | None = None, timeout: float = 3600) -> Callable[[], float]:
    """A measurement: the seconds of one whole `convergent-train args...` process in a fresh run
    directory; its summary.json is appended to `summaries`."""

    def measure() -> float:
        with tempfile.TemporaryDirectory(prefix="convergent-bench-") as tmp:
            t = time.perf_counter()
            python_module("convergent.train", f"hydra.run.dir={tmp}/run", *args, cwd=tmp, timeout=timeout)
            elapsed = time.perf_counter() - t
            if summaries is not None:
                summaries.append(json.loads((Path(tmp) / "run" / "summary.json").read_text()))
            return elapsed

    return measure


def monitor_overhead(options: Options) -> Measured:
    extra = ["trainer.max_epochs=1"] if options.quick else []
    summaries: dict[str, list[dict]] = {"on": [], "off": []}
    ta, tb = alternate(
        [train_job(extra, summaries["on"]), train_job([*extra, "callbacks=none"], summaries["off"])], options.pick(full=1, quick=1)
    )
    acc = {side: ", ".join(f"{s['val/acc']:.4f}" for s in runs) for side, runs in summaries.items()}
    return Measured(
        median(ta) / median(tb),
        f"`{' '.join(['convergent-train', *extra])}` (the main job, every analysis) {spread(ta)}, mean member "
        f"val/acc {acc['on']} / the same with callbacks=none {spread(tb)}, val/acc {acc['off']}; "
        "whole subprocesses back to back (A B, B A, ...), W&B offline",
    )


# --- 4. sparse_speedup ---------------------------------------------------------------------------
def standardised(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return (x - mean) / np.where(std > 0, std, 1.0)


def sklearn_path(xf, yf, xh, yh, l1: Sequence[float]) -> np.ndarray:
    """Held-out mean squared error of one target along the L1 path: LinearRegression for 0, else
    Lasso(alpha=l1) (scikit-learn defaults), fitted on fit-standardised data."""
    from sklearn.linear_model import Lasso, LinearRegression

    errors = []
    for w in l1:
        model = LinearRegression() if w == 0 else Lasso(alpha=w)
        model.fit(xf, yf)
        errors.append(float(np.mean((yh - model.predict(xh)) ** 2)))
    return np.array(errors)


def sparse_speedup(options: Options) -> Measured:
    import sklearn.linear_model  # noqa: F401 - imported before any timing
    from sklearn.exceptions import ConvergenceWarning

    from convergent.analysis.sparse import sparse_prediction
    from convergent.stats import Moments

    s = analysis_settings(k=2)
    n_images, subset = (200, 2) if options.quick else (600, 8)
    members = build_members(2, {"name": "alexnet_small", "width": 0.5})
    batches = probe_batches(n_images)
    with torch.no_grad():
        taps = [[m.eval()(b[0], taps=["conv2"])[1]["conv2"] for m in members] for b in batches]
    evens = [(b[2] % 2) == 0 for b in batches]
    units = members[0].layer_width("conv2")

    def ours():
        fit, held = (Moments([units, units], product_dtype=s.product_dtype()) for _ in range(2))
        for acts, even in zip(taps, evens):
            fit.update(*[a[even] for a in acts])
            held.update(*[a[~even] for a in acts])
        return sparse_prediction(fit.compute(), held.compute(), 0, 1, l1=s.l1, tol=s.sparse_tol, max_iter=s.sparse_max_iter)

    def samples(i: int, even: bool) -> np.ndarray:
        rows = [a[i][e if even else ~e] for a, e in zip(taps, evens)]
        return torch.cat(rows).movedim(1, -1).reshape(-1, units).double().numpy()

    result = ours()
    targets = result.scored_dst.nonzero().squeeze(1)
    chosen = targets[torch.linspace(0, len(targets) - 1, subset).round().long()].tolist()
    sk_errors: dict[int, np.ndarray] = {}
    caught: list = []

    def sklearn_subset() -> None:
        xf, yf, xh, yh = samples(0, True), samples(1, True), samples(0, False), samples(1, False)
        mx, sx, my, sy = xf.mean(0), xf.std(0), yf.mean(0), yf.std(0)
        xf, xh = standardised(xf, mx, sx), standardised(xh, mx, sx)
        yf, yh = standardised(yf, my, sy), standardised(yh, my, sy)
        var_all = np.concatenate([yf, yh]).var(0)  # sparse_prediction's normaliser: whole-probe variance
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always", ConvergenceWarning)
            for j in chosen:
                sk_errors[j] = sklearn_path(xf, yf[:, j], xh, yh[:, j], s.l1) / var_all[j]
        caught[:] = [x for x in w if issubclass(x.category, ConvergenceWarning)]

    t_ours, t_sk = alternate([stopwatch(ours), stopwatch(sklearn_subset)], options.pick(full=3, quick=1))
    scale = len(targets) / len(chosen)
    speedup = median(t_sk) * scale / median(t_ours)
    ref = np.stack([sk_errors[j] for j in chosen], 1)  # [L, subset]
    mine = result.error_per_unit[:, chosen].cpu().numpy()
    diff_mean = float(np.abs(ref.mean(1) - mine.mean(1)).max())
    diff_unit = float(np.abs(ref - mine).max())
    n_fit, n_held = result.n_fit, result.n_held_out
    return Measured(
        speedup,
        f"conv2 of 2 x alexnet_small 0.5 (random init, {units} units), {n_images} mnist5k images x 13 x 13 positions "
        f"(fit/held: even/odd images, {n_fit}/{n_held} samples), l1 path {list(s.l1)}; scikit-learn "
        f"(LinearRegression / Lasso(alpha), defaults, one target at a time) timed on {len(chosen)} of the "
        f"{len(targets)} scored targets and scaled x{scale:.1f}: {spread(t_sk)} per subset; ours (moments of both "
        f"splits + sparse_prediction of all targets) {spread(t_ours)}; held-out error (MSE over the whole-probe "
        f"variance, fit-standardised, as sparse_prediction defines it), max |difference| over the path: "
        f"{diff_mean:.2g} (mean over the subset), {diff_unit:.2g} (per unit), met needs <= 1e-3 (mean); "
        f"sklearn convergence warnings: {len(caught)}",
        ok=diff_mean <= 1e-3,
    )


# --- 4b. sparse_384 (issue 20) ------------------------------------------------------------------
def sparse_384(options: Options) -> Measured:
    """Seconds of `sparse_prediction` at conv3 width (384 units) on collinear activations: conv3 of
    two random-init paper AlexNets (227 px) on nearly uniform images (one colour per image plus
    1e-3 noise, so every position of an image sees almost the same input), fit / held-out split
    on even / odd images as the monitor does, one direction, the default L1 path, tol and max_iter.
    Full runs also time the solver before issue 20 (`_sparse_fista`) on the same Gram matrices."""
    import warnings as _warnings

    from convergent.analysis._sparse_fista import lasso_gram_path_fista
    from convergent.analysis.sparse import sparse_prediction
    from convergent.ensemble import build_member
    from convergent.stats import Moments

    s = analysis_settings(k=2)
    n_images = 40  # 20 fit + 20 held-out images: samples > units, nearly collinear (fewer: singular)
    paper = {"name": "alexnet", "width": 1.0, "groups": 1, "lrn": "after_pool", "dropout": 0.5, "batch_norm": False}
    members = [build_member(paper, seed, 1000, 3, 227).eval() for seed in (0, 1)]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n_images, 3, 1, 1, generator=g) * 2 - 1 + 1e-3 * torch.randn(n_images, 3, 227, 227, generator=g)
    units = members[0].layer_width("conv3")
    fit, held = (Moments([units, units], product_dtype=s.product_dtype()) for _ in range(2))
    with torch.no_grad():
        for start in range(0, n_images, 8):
            x = images[start : start + 8]
            even = (torch.arange(start, start + len(x)) % 2) == 0
            acts = [m(x, taps=["conv3"])[1]["conv3"] for m in members]
            fit.update(*[a[even] for a in acts])
            held.update(*[a[~even] for a in acts])
    fit_s, held_s = fit.compute(), held.compute()
    results = []

    def ours() -> None:
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore", RuntimeWarning)  # convergence is reported below
            results.append(sparse_prediction(fit_s, held_s, 0, 1, l1=s.l1, tol=s.sparse_tol, max_iter=s.sparse_max_iter))

    times = [stopwatch(ours)() for _ in range(options.pick(full=3, quick=1))]
    res = results[-1]
    detail = (
        f"conv3 ({units} units, {int(res.live_src.sum())} live) of 2 x paper AlexNet (random init, 227 px), {n_images} "
        f"nearly uniform images x 13 x 13 positions ({res.n_fit}/{res.n_held_out} fit/held-out samples), condition "
        f"number of the sources' correlations {res.condition:.3g}; l1 path {list(s.l1)}, tol {s.sparse_tol}, max_iter "
        f"{s.sparse_max_iter}: {spread(times)}, converged {int(res.converged.sum())} of {len(s.l1)}, iterations "
        f"{res.iterations.tolist()}"
    )
    if not options.quick:
        live_x, live_y = ~fit_s.dead(0), ~fit_s.dead(1)
        R = fit_s.corr(0, 0)[live_x][:, live_x].contiguous()
        B = fit_s.corr(0, 1)[live_x][:, live_y].contiguous()
        before = stopwatch(lambda: results.append(lasso_gram_path_fista(R, B, s.l1, max_iter=s.sparse_max_iter, tol=s.sparse_tol)))()
        conv_before = results[-1][3]
        detail += (
            f"; the solver before issue 20 (FISTA + padded Newton steps) on the same matrices: {before:.3g} s, converged "
            f"{int(conv_before.sum())} of {len(s.l1)}: speed-up x{before / median(times):.3g}"
        )
    return Measured(median(times), detail, ok=bool(res.converged.all()))


# --- 5. max_match_4096 ---------------------------------------------------------------------------
def correlation_of_random_data(units: int, samples: int, seed: int = 0) -> torch.Tensor:
    """Correlations between the units of two independent random data sets [units, units]."""
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.randn(samples, units, generator=g) for _ in range(2))
    x, y = ((z - z.mean(0)) / z.std(0, correction=0) for z in (x, y))
    return (x.T @ y / samples).double()


def max_match_4096(options: Options) -> Measured:
    from convergent.analysis.matching import max_match

    corr = correlation_of_random_data(4096, 1024)
    times = [stopwatch(lambda: max_match(corr))() for _ in range(options.pick(full=3, quick=1))]
    detail = (
        "max_match (Hungarian, scipy) on the 4096 x 4096 correlations of two independent random data sets "
        f"(1024 samples): {spread(times)}"
    )
    if not options.quick:
        uniform = torch.rand(4096, 4096, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
        detail += f"; uniform in [-1, 1] (harder): {stopwatch(lambda: max_match(uniform))():.3g} s"
    return Measured(median(times), detail)


# --- 6. ensemble_training ------------------------------------------------------------------------
def step_times(k: int, warmup: int, steps: int, device: str = "cpu", vectorize: bool = False) -> float:
    """Median seconds per training step (batch end to batch end, after `warmup` steps) of a
    K-member Ensemble through a real pl.Trainer."""
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync(device)
            self.ends.append(time.perf_counter())

    timer = StepTimer()
    lightning_fit(ensemble_module(k, vectorize), warmup + steps, device, [timer])
    return median(np.diff(timer.ends[warmup - 1 :]).tolist())


def ensemble_training(options: Options, device: str = "cpu") -> Measured:
    warmup, steps = (3, 8) if options.quick else (10, 40)
    t4, t1 = alternate([partial(step_times, k, warmup, steps, device) for k in (MAIN_K, 1)], options.pick(full=3, quick=1))
    per_member_4, alone = MAIN_K * TRAIN_BATCH / median(t4), TRAIN_BATCH / median(t1)  # images/s, all members
    return Measured(
        per_member_4 / alone,
        f"{device}; alexnet_small 0.25, mnist5k, batch {TRAIN_BATCH}, Adam, pl.Trainer; median step time after "
        f"{warmup} warm-up steps ({steps} steps per run): K={MAIN_K} {spread(t4)} ({per_member_4:.0f} member-images/s), "
        f"K=1 {spread(t1)} ({alone:.0f} images/s); value = {MAIN_K} x t(K=1) / t(K={MAIN_K})",
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
    from convergent.callbacks.monitor import probe_runner
    from convergent.pipeline import analyze

    steps = 100 if options.quick else 300  # random-init fc activations are too small for torch-cka's float32
    n = 500 if options.quick else PROBE_SIZE
    settings = analysis_settings(heavy_pairs="all", probe_size=n, batch_size=PROBE_BATCH, figures="none")
    members = trained_members(steps, device)
    batches = ProbeBatches(probe_batches(n))
    runner = probe_runner(settings, widths_of(members[0]))
    results: dict = {}

    def ours() -> None:
        t = time.perf_counter()
        probe = runner.run(members, batches, device, full=True)
        results["pass"] = time.perf_counter() - t
        results["timings"] = defaultdict(float)
        results["ours"] = analyze(probe, settings, step=0, full=True, timings=results["timings"])

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
        f"analyze(full=True), default analysis config, heavy_pairs=all, every layer and pair: {len(scalars)} scalars, "
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


# --- GPU only: the vectorized ensemble and ImageNet-size members ---------------------------------
def vectorized_speedup(options: Options, device: str = "cuda") -> Measured:
    warmup, steps = (3, 8) if options.quick else (10, 60)
    tv, tl = alternate(
        [partial(step_times, MAIN_K, warmup, steps, device, vectorize) for vectorize in (True, False)], options.pick(full=3, quick=1)
    )
    return Measured(
        median(tl) / median(tv),
        f"{device}; {MAIN_K} x alexnet_small 0.25, mnist5k, batch {TRAIN_BATCH}, Adam, pl.Trainer; median step time "
        f"ensemble.vectorize=true {spread(tv)} ({MAIN_K * TRAIN_BATCH / median(tv):.0f} member-images/s), the loop "
        f"{spread(tl)} ({MAIN_K * TRAIN_BATCH / median(tl):.0f} member-images/s); value = t(loop) / t(vectorized)",
    )


# The GPU main job of ImageNet-size members: 4 x alexnet at 224 px on generated images.
IMAGENET_BATCH = 128
IMAGENET_JOB = (
    "model=alexnet", "data=synthetic", "data.input_size=224", "data.in_channels=3", "data.train_size=2048",
    "data.val_size=512", f"data.batch_size={IMAGENET_BATCH}", "data.val_batch_size=256", "trainer=gpu", "trainer.max_epochs=1000",
    "logger=csv", "analysis.max_units=1024", "analysis.probe_size=500", "analysis.batch_size=100",
)  # fmt: skip


def alexnet224_monitor_overhead(options: Options, device: str = "cuda") -> Measured:
    steps = 60 if options.quick else 400
    args = (*IMAGENET_JOB, f"trainer.max_steps={steps}")
    ta, tb = alternate([train_job(args, timeout=900), train_job([*args, "callbacks=none"], timeout=900)], 1)
    images = steps * IMAGENET_BATCH * MAIN_K
    return Measured(
        median(ta) / median(tb),
        f"{device}; `convergent-train {' '.join(args)}` (4 x alexnet, bf16 training, every analysis, fc layers "
        f"subsampled to 1024 units) {spread(ta)} / the same with callbacks=none {spread(tb)}; whole processes "
        f"(start-up, data generation and validation included): {images / median(tb):.0f} member-images/s without "
        f"the monitor, {images / median(ta):.0f} with it",
    )


# --- the suite -----------------------------------------------------------------------------------
REGISTRY: list[Spec] = [
    Spec("probe_pass_cost", 1.5, "<=", "x", probe_pass_cost, "probe forward + the monitor's moments / forward alone"),
    Spec("stats_memory", 1.05, "<=", "x", stats_memory, "peak memory of the statistics, probe 8,000 / 1,000 images"),
    Spec("monitor_overhead", 1.25, "<=", "x", monitor_overhead, "convergent-train / the same with callbacks=none"),
    Spec("sparse_speedup", 50.0, ">=", "x", sparse_speedup, "sklearn Lasso path per target / sparse_prediction"),
    Spec("sparse_384", 10.0, "<", "s", sparse_384, "sparse_prediction at conv3 width on collinear activations (seconds)"),
    Spec("max_match_4096", 3.0, "<", "s", max_match_4096, "max_match on a 4096 x 4096 correlation matrix (seconds)"),
    Spec("ensemble_training", 0.95, ">=", "x", ensemble_training, "images/s per member, K=4 / K=1 (Lightning)"),
    Spec("one_pass_every_measure", 1.0, "<=", "x", one_pass_every_measure, "one pass + every analysis / torch-cka CKA"),
]
CUDA_VARIANTS = ("probe_pass_cost", "ensemble_training", "one_pass_every_measure")
CUDA_ONLY: list[Spec] = [
    Spec("vectorized_speedup_cuda", 1.0, ">=", "x", vectorized_speedup, "4 x alexnet_small steps/s, vectorize=true / loop (CUDA)"),
    Spec(
        "alexnet224_monitor_overhead_cuda", 1.25, "<=", "x", alexnet224_monitor_overhead,
        "4 x alexnet at 224 px: convergent-train / callbacks=none (CUDA)",
    ),
]  # fmt: skip


def registry() -> list[Spec]:
    """The figures; with CUDA also `<name>_cuda` of the in-process figures that take a device."""
    specs = list(REGISTRY)
    if torch.cuda.is_available():
        specs += [
            replace(s, name=f"{s.name}_cuda", run=partial(s.run, device="cuda"), about=s.about + " (CUDA)")
            for s in REGISTRY
            if s.name in CUDA_VARIANTS
        ]
        specs += CUDA_ONLY
    return specs


def select(specs: list[Spec], only: str | None) -> list[Spec]:
    if not only:
        return specs
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {s.name for s in specs}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"convergent-bench: unknown figure(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    return [s for s in specs if s.name in names]


def run_suite(specs: Sequence[Spec], options: Options, progress: Callable[[Figure], None] | None = None) -> list[Figure]:
    figures = []
    for spec in specs:
        fig = evaluate(spec, options)
        figures.append(fig)
        if progress:
            progress(fig)
    return figures


def print_table(figures: Sequence[Figure], console) -> None:
    from rich.table import Table

    table = Table(title="convergent-bench")
    for column in ("figure", "measured", "goal", "met", "seconds"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for f in figures:
        met = "[green]yes[/green]" if f.met else "[red]no[/red]"
        table.add_row(f.name, f.shown, f"{f.op} {f.goal:g} {f.unit}", met, f"{f.seconds:.0f}")
    console.print(table)
    for f in figures:
        console.print(f"[bold]{f.name}[/bold]: {f.detail}", highlight=False)


def write_json(figures: Sequence[Figure], path: Path) -> None:
    path.write_text(json.dumps([f.as_json() for f in figures], indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="convergent-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated figure names (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller, faster versions of the figures")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the figures as JSON")
    parser.add_argument(
        "--repeat", type=int, default=None, metavar="N", help="A/B rounds of every alternated figure (A B, B A, ...)"
    )
    parser.add_argument("--list", action="store_true", help="list the figures and exit")
    parser.add_argument("--child-memory", type=int, default=None, metavar="N", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child_memory is not None:  # internal: one stats_memory measurement in this fresh process
        print(json.dumps(child_memory(args.child_memory, args.quick)))
        return 0
    specs = registry()
    if args.list:
        for s in specs:
            print(f"{s.name:24s} {f'{s.op} {s.goal:g} {s.unit}':>10s}  {s.about}")
        return 0
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")

    from rich.console import Console

    console = Console(stderr=False)
    chosen = select(specs, args.only)
    options = Options(quick=args.quick, rounds=args.repeat)

    def progress(f: Figure) -> None:
        console.print(f"{f.name}: {f.shown} (goal {f.op} {f.goal:g}) in {f.seconds:.0f} s", highlight=False)

    figures = run_suite(chosen, options, progress)
    print_table(figures, console)
    if args.json:
        write_json(figures, args.json)
    return 1 if any(f.value is None for f in figures) else 0


if __name__ == "__main__":
    sys.exit(main())
