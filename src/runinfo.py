"""What a run directory holds about itself: W&B run id, last checkpoint, end-of-run summary.

`run.json` is written when a run starts, so a resumed run (`resume=<dir>`, or a requeued job
whose run dir already holds a checkpoint) continues the same W&B run and the same step count.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from convergent.errors import ConfigError

RUN_FILE = "run.json"
LAST_CHECKPOINT = "checkpoints/last.ckpt"


@dataclass
class RunInfo:
    run_dir: str
    wandb_id: str

    @classmethod
    def load_or_create(cls, run_dir: Path) -> RunInfo:
        path = Path(run_dir) / RUN_FILE
        if path.exists():
            return cls(**json.loads(path.read_text()))
        # under a W&B sweep agent the run id is the agent's (W&B ignores any other id there)
        run_id = os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID") else None
        info = cls(run_dir=str(run_dir), wandb_id=run_id or uuid.uuid4().hex[:8])
        if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(info), indent=1))
            tmp.replace(path)
        return info

    def last_checkpoint(self) -> str | None:
        return self.existing_checkpoint(self.run_dir)

    @staticmethod
    def existing_checkpoint(run_dir: str | Path) -> str | None:
        """The run directory's last.ckpt, if it holds one (read without creating run.json)."""
        path = Path(run_dir) / LAST_CHECKPOINT
        return str(path) if path.exists() else None


def finished_summary(run_dir: Path) -> dict:
    """The summary a finished run wrote (summary.json), for a resume that has nothing to train."""
    path = Path(run_dir) / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {"run_dir": str(run_dir)}
    summary["finished"] = True
    return summary


def resume_target(argv: list[str]) -> Path | None:
    """The run directory of `resume=<dir>` in these arguments (the last one given), or None."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if not given or given[-1] in ("", "null", "None"):
        return None
    return Path(given[-1]).expanduser().resolve()


def resume_argv(argv: list[str]) -> list[str]:
    """Rewrite `resume=<run dir>` into Hydra arguments that recompose the run's saved config in
    that directory; other arguments are kept as overrides. Trust in a checkpoint is never inherited
    from the saved config: `trust_checkpoint=true` applies to the command that gives it (and is
    accepted for run directories saved before the key existed)."""
    run_dir = resume_target(argv)
    if run_dir is None:
        return argv
    rest = resume_overrides(argv)
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.exists():
        given = [a for a in argv if a.startswith("resume=")][-1]
        raise ConfigError(f"{given}: no saved config at {saved}; pass the run directory that convergent-train created")
    if "-m" in rest or "--multirun" in rest:
        raise ConfigError("resume= continues one run; drop -m/--multirun")
    return ["--config-dir", str(saved.parent), "--config-name", "config", f"hydra.run.dir={run_dir}", *rest]


def resume_overrides(argv: list[str]) -> list[str]:
    """The overrides a `resume=` applies to the saved config: trust off unless given again."""
    rest = [f"++{a}" if a.startswith("trust_checkpoint=") else a for a in argv if not a.startswith("resume=")]
    return ["++trust_checkpoint=false", *rest]


# The headline alignment of the end-of-run summary: per layer, these measures with their calibration.
SUMMARY_MEASURES = ("align/{layer}/semi_match", "align/{layer}/max_match", "cka/{layer}/linear")
SUMMARY_SUFFIXES = ("", "/ci_lo", "/ci_hi", "/null", "/null_p95", "/above_null")


def alignment_summary(scalars: dict[str, float], layers) -> dict[str, float]:
    """The final semi-match, max-match and linear CKA of every layer, their interval, null and score
    above chance, keyed by their metric keys (the values of the last analysis step)."""
    out = {}
    for layer in layers:
        for pattern in SUMMARY_MEASURES:
            for suffix in SUMMARY_SUFFIXES:
                key = pattern.format(layer=layer) + suffix
                if key in scalars:
                    out[key] = float(scalars[key])
    return out


def summarize(trainer, ensemble, run_dir: Path, elapsed: float, monitor=None) -> dict:
    """End-of-run summary: printed, written to run_dir/summary.json and to the W&B run's summary."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    summary = {
        "run_dir": str(run_dir),
        "wall_time_s": round(elapsed, 1),
        "global_step": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "val/acc": metrics.get("val/acc"),
        "val/loss": metrics.get("val/loss"),
        "member_val_acc": [metrics.get(f"member{i}/val/acc") for i in range(ensemble.k)],
        "alignment": {},
    }
    if monitor is not None:
        summary["alignment"] = alignment_summary(monitor.final_scalars, monitor.plan.layers)
        summary["alignment_layers"] = list(monitor.plan.layers)
        if monitor.failures:
            summary["failed_analyses"] = list(monitor.failures)
    if trainer.is_global_zero:
        (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
        _wandb_summary(trainer, summary["alignment"])
        print_summary(summary)
    return summary


def _wandb_summary(trainer, alignment: dict[str, float]) -> None:
    for logger in trainer.loggers:
        run = getattr(logger, "experiment", None) if type(logger).__name__ == "WandbLogger" else None
        if run is not None and hasattr(run, "summary"):
            run.summary.update(alignment)


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    table = Table(title=f"convergent: {summary['run_dir']}", show_header=False)
    table.add_row("wall time", f"{summary['wall_time_s']} s")
    table.add_row("steps / epochs", f"{summary['global_step']} / {summary['epochs']}")
    table.add_row("val/acc (mean)", fmt(summary["val/acc"]))
    table.add_row("val/acc per member", ", ".join(fmt(a) for a in summary["member_val_acc"]))
    for failure in summary.get("failed_analyses", []):
        table.add_row("[red]failed analysis", failure)
    console = Console()
    console.print(table)
    alignment = summary.get("alignment") or {}
    if alignment:
        grid = Table(title="alignment at the last step: value [95 % interval] / null / above null")
        grid.add_column("layer")
        for pattern in SUMMARY_MEASURES:
            grid.add_column(pattern.split("/")[0] + " " + pattern.split("/")[-1])
        for layer in summary.get("alignment_layers", []):
            cells = []
            for pattern in SUMMARY_MEASURES:
                key = pattern.format(layer=layer)
                if key not in alignment:
                    cells.append("-")
                    continue
                lo, hi = alignment.get(f"{key}/ci_lo"), alignment.get(f"{key}/ci_hi")
                cell = f"{alignment[key]:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")
                if f"{key}/null" in alignment:
                    cell += f" / {alignment[f'{key}/null']:.3f} / {fmt(alignment.get(f'{key}/above_null'))}"
                cells.append(cell)
            grid.add_row(layer, *cells)
        console.print(grid)
