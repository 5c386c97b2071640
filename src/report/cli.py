"""`convergent-report`: a sweep's runs as one result.

    convergent-report multirun/2026-12-01/10-00-00                # a Hydra multirun
    convergent-report outputs/2026-12-01 --out width-report      # W&B agent runs (one dir each)
    convergent-report multirun/A multirun/B --wandb              # several paths; also to W&B

Each PATH is a multirun directory, a run directory, or any folder holding some (searched
recursively for directories with `.hydra/config.yaml`). Writes summary.csv, final.csv, runs.csv,
figures/*.png and index.html to --out (default: <first PATH>/report). Exit status 0, also when
some runs failed (they are listed); 2 with one `error: ...` line when a PATH does not exist or
holds no runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="convergent-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="multirun dir, run dir, or a folder holding several")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <first PATH>/report)")
    parser.add_argument(
        "--wandb", action="store_true", help="also log the report to W&B as one run, job_type=report (offline without an API key)"
    )
    parser.add_argument(
        "--group", default=None, help="W&B group of the report run (default: the runs' group: their multirun dir's name)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from convergent.report.build import build_report, write_tables
    from convergent.report.runs import ReportError

    try:
        report = build_report(args.paths)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from convergent.report.figures import write_figures
    from convergent.report.html import write_index

    out = args.out or args.paths[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = write_tables(report, out)
    figures = write_figures(report.charts, report.rows, report.group_sizes, out / "figures")
    files["index.html"] = write_index(
        report, figures, {**files, "figures/": out / "figures", "index.html": out / "index.html"}, out
    )
    if args.wandb:
        from convergent.report.wandb_report import log_report

        log_report(report, figures, files, out, group=args.group)
    groups = ", ".join(f"{name} ({n})" for name, n in report.group_sizes.items())
    print(
        f"convergent-report: {len(report.runs)} runs in {len(report.group_sizes)} groups: {groups}; {len(figures)} figures; {out / 'index.html'}"
    )
    if report.problems:
        listed = ", ".join(f"{s.run.path} ({s.status})" for s in report.problems)
        print(
            f"convergent-report: {len(report.problems)} runs failed or are incomplete, listed in {out / 'runs.csv'}: {listed}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
