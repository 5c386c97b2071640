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
failed to run, with the error in ``detail``). One module per figure or family in this folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from benchmarks.common import (
    Figure,
    Options,
    Spec,
    evaluate,
)
from benchmarks.gpu import probe_pass_cost_224, stats_memory_224
from benchmarks.matching import max_match_4096
from benchmarks.measures import one_pass_every_measure
from benchmarks.monitor import alexnet224_monitor_overhead, monitor_overhead
from benchmarks.probe_pass import child_memory, probe_pass_cost, stats_memory
from benchmarks.sparse import sparse_384, sparse_speedup
from benchmarks.training import ensemble_training, vectorized_speedup

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
    Spec("vectorized_speedup_cuda", 1.5, ">=", "x", vectorized_speedup, "4 x alexnet_small steps/s, vectorize=true / loop (CUDA)"),
    Spec("probe_pass_cost_cuda_224", 1.3, "<=", "x", probe_pass_cost_224, "4 x alexnet 224 px: probe forward + light-step statistics / forward (CUDA)"),
    Spec("stats_memory_cuda_224", 1.1, "<=", "x", stats_memory_224, "4 x alexnet 224 px: the statistics' GPU memory / the estimate (CUDA)"),
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
    parser = argparse.ArgumentParser(prog="convergent-bench", description=(__doc__ or "").split("\n\n")[0])
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
