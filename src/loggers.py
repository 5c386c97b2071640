"""W&B and CSV loggers from the `logger` config group.

With no W&B API key configured, W&B logs offline (and says so once) instead of prompting.
The mode is passed to `wandb.init` directly, never through the environment, so nothing leaks
between the jobs of a multirun. W&B's data directory (`WANDB_DATA_DIR`, where it stages a copy of
every artifact file it is given, e.g. each logged table, until upload) is pointed at the job's own
`<run dir>/wandb` for the job (`WANDB_ENV`, put back by `convergent.train.finish_run`), so nothing
of a run accumulates in the user's home directory.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from convergent.wandb_mode import WANDB_MODES, has_wandb_key, resolve_wandb_mode  # noqa: F401 - public here too

WANDB_ENV = ("WANDB_DATA_DIR",)  # set per job by build_loggers; restored after the job


def _wandb_settings(wb: dict):
    import wandb

    return wandb.Settings(init_timeout=float(wb.get("init_timeout", 60)), silent=True)


def _complete_rows(path: str) -> tuple[list[str], list[dict]]:
    """Header and rows of a metrics.csv, without what a killed write left half done: a last line
    without its newline (an interrupted append) and rows whose field count is not the header's."""
    with open(path, newline="") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.reader(text.splitlines(keepends=True))
    header = next(reader, [])
    rows = [dict(zip(header, r)) for r in reader if len(r) == len(header)]
    return header, rows


def _atomic_rows(path: str, header: list[str], rows: list[dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run continues it instead.
    Rows up to `keep_through` (the step of the checkpoint the run resumes from) are kept; the tail
    a killed run logged after its checkpoint is dropped, since the resumed run logs it again.
    `keep_through=-1` (no checkpoint: a fresh start) drops every row.

    Every row has its step: a row logged without one is refused (Lightning's writer would number it
    by its position in the buffer), the file is rewritten atomically when new columns appear
    (Lightning rewrites it in place: a kill then would lose every row), and a row half written by a
    killed process is dropped on resume."""

    def __init__(self, log_dir: str, keep_through: int = -1) -> None:
        self.keep_through = int(keep_through)
        super().__init__(log_dir=log_dir)

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if step is None:
            raise ValueError(f"CSV rows need their step; got metrics {sorted(metrics_dict)[:5]} without one")
        super().log_metrics(metrics_dict, step=step)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        _header, rows = _complete_rows(self.metrics_file_path)
        _atomic_rows(self.metrics_file_path, list(fieldnames), rows)

    def _check_log_dir_exists(self) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        header, rows = _complete_rows(self.metrics_file_path)
        rows = [r for r in rows if r.get("step") not in (None, "") and int(float(r["step"])) <= self.keep_through]
        if not rows:
            os.remove(self.metrics_file_path)
            return
        _atomic_rows(self.metrics_file_path, header, rows)
        self.metrics_keys = header


class ContinuingCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives a resume (see `_ContinuingWriter`)."""

    def __init__(self, *args, keep_through: int = -1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._keep_through = int(keep_through)

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if step is None:  # Lightning's CSVLogger would number the row by its buffer position instead
            raise ValueError(f"CSV rows need their step; got metrics {sorted(metrics)[:5]} without one")
        super().log_metrics(metrics, step)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir, keep_through=self._keep_through)
        return self._experiment


def build_loggers(
    cfg: dict,
    run_dir: Path,
    config: dict,
    group: str | None,
    run_name: str | None,
    run_id: str | None = None,
    resume_step: int = -1,
    job_type: str | None = None,
) -> list[Logger]:
    """CSV mirror (run_dir/csv/metrics.csv) and W&B (run_dir/wandb/). `resume_step`: the global
    step of the checkpoint the run resumes from (-1: none); the CSV keeps its rows up to it.
    `config` goes to W&B as given (convergent-train passes it flat: `convergent.sweep.flat_config`)."""
    loggers: list[Logger] = []
    if cfg.get("csv"):
        loggers.append(ContinuingCSVLogger(save_dir=str(run_dir), name="", version="csv", keep_through=resume_step))
    wb = cfg.get("wandb")
    if wb:
        mode = resolve_wandb_mode(wb.get("mode"))
        if mode != "disabled":  # W&B's staging copies (tables) live and die with the run directory
            os.environ["WANDB_DATA_DIR"] = str(Path(run_dir).resolve() / "wandb")
        logger = FlatWandbLogger(
            project=wb.get("project") or "convergent",
            entity=wb.get("entity"),
            group=wb.get("group") or group,
            tags=list(wb.get("tags") or []),
            name=run_name,
            id=run_id,
            resume="allow" if run_id else None,
            save_dir=str(run_dir),
            mode=mode,
            config=config,
            job_type=job_type,
            settings=_wandb_settings(wb),
        )
        if mode == "offline" and not wb.get("mode") and not os.environ.get("WANDB_MODE"):
            rank_zero_info(
                f"W&B: no API key found, logging offline under {run_dir / 'wandb'}; "
                f"upload later with `wandb sync {run_dir / 'wandb'}/offline-run-*`"
            )
        if start_or_warn(logger, mode):
            loggers.append(logger)
    return loggers


class FlatWandbLogger(WandbLogger):
    """Lightning logs the module's hyperparameters (`model`, `k`, `seeds`, ...) into the W&B
    config as nested dictionaries, which W&B would show as `model.width` beside the run config's
    own flat `model.width`; they go in flat, under `module.` (`module.model.width`, `module.seeds`)."""

    def log_hyperparams(self, params) -> None:
        from argparse import Namespace

        from convergent.sweep import flat_config

        params = vars(params) if isinstance(params, Namespace) else dict(params)
        super().log_hyperparams(flat_config(params, prefix="module."))


def start_or_warn(logger: WandbLogger, mode: str) -> bool:
    """Start the W&B run now (rank 0), so an unreachable server or a broken install shows up
    before training: warn in one line and carry on with the CSV mirror instead of failing."""
    if mode == "disabled":
        return True
    try:
        logger.experiment  # noqa: B018 - starts wandb.init on rank 0
    except Exception as e:  # wandb raises its own error types (CommError, UsageError, ...)
        rank_zero_warn(
            f"W&B could not start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "continuing with the CSV mirror only (csv/metrics.csv)"
        )
        return False
    return True


def wandb_logger(loggers) -> WandbLogger | None:
    for logger in loggers or []:
        if isinstance(logger, WandbLogger):
            return logger
    return None
