"""csv/metrics.csv: every row has its step, whatever a killed or failing write left behind."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from convergent.loggers import ContinuingCSVLogger


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def logger_in(run_dir: Path, keep_through: int = -1) -> ContinuingCSVLogger:
    return ContinuingCSVLogger(save_dir=str(run_dir), name="", version="csv", keep_through=keep_through)


def test_a_row_without_its_step_is_refused(tmp_path):
    logger = logger_in(tmp_path)
    with pytest.raises(ValueError, match="CSV rows need their step"):
        logger.log_metrics({"align/conv1/max_match": 0.5})
    logger.log_metrics({"align/conv1/max_match": 0.5}, step=3)
    logger.save()
    assert [r["step"] for r in rows_of(tmp_path / "csv" / "metrics.csv")] == ["3"]


def test_a_half_written_row_is_dropped_on_resume_and_the_rest_kept(tmp_path):
    logger = logger_in(tmp_path)
    for step in range(4):
        logger.log_metrics({"train/loss": 1.0 / (step + 1), "val/acc": 0.1 * step}, step=step)
    logger.save()
    path = tmp_path / "csv" / "metrics.csv"
    text = path.read_text()
    path.write_text(text + "0.123")  # a killed append: a row cut after its first field, no newline
    resumed = logger_in(tmp_path, keep_through=10)
    resumed.log_metrics({"train/loss": 0.01}, step=4)
    resumed.save()
    rows = rows_of(path)
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert all(r["step"] not in ("", None) for r in rows)
    assert float(rows[3]["val/acc"]) == pytest.approx(0.3)


class Unwritable:
    def __str__(self) -> str:
        raise OSError("disk full")


def test_a_rewrite_for_new_columns_that_fails_midway_keeps_every_earlier_row(tmp_path, monkeypatch):
    """Lightning rewrites metrics.csv in place when new columns appear: interrupted (a kill, a full
    disk), every earlier row was gone. Here the rewrite goes to a temporary file first; a write
    that fails at its third row leaves the file as it was."""
    from convergent import loggers

    logger = logger_in(tmp_path)
    for step in range(5):
        logger.log_metrics({"train/loss": float(step)}, step=step)
    logger.save()
    path = tmp_path / "csv" / "metrics.csv"
    before = path.read_text()
    real = loggers._complete_rows

    def third_row_unwritable(p):
        header, rows = real(p)
        rows[2]["train/loss"] = Unwritable()
        return header, rows

    monkeypatch.setattr(loggers, "_complete_rows", third_row_unwritable)
    logger.log_metrics({"train/loss": 5.0, "val/acc": 0.5}, step=5)  # a new column: save() rewrites the file
    with pytest.raises(OSError, match="disk full"):
        logger.save()
    assert path.read_text() == before
