"""What a report is built from: the files of one run directory, read once (`read_run`).

Every number the report shows comes from these files: ``summary.json`` (the comparison, deployed rows, ECE,
perplexities...), ``metrics.jsonl`` (training curves), ``config.yaml`` (task and scheme) and the per-example
outputs the task kept (`kdistill.evaluate.predictions`). Nothing is re-measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from kdistill.errors import KDError
from kdistill.evaluate.predictions import PREDICTIONS_FILE, SIMILARITIES_FILE, load_arrays

__all__ = ["RunFiles", "read_run"]


@dataclass
class RunFiles:
    """One run directory's report inputs. `predictions`: ``(labels, {model: logits}, ece_bins)`` or None;
    `similarities`: ``(teacher, student, pairs_total)`` or None."""

    path: Path
    summary: dict
    config: dict
    metrics: list = field(default_factory=list)
    predictions: Optional[tuple] = None
    similarities: Optional[tuple] = None

    @property
    def task(self) -> str:
        return str(self.config.get("task") or "classification")

    @property
    def scheme(self) -> str:
        scheme = self.summary.get("scheme") or (self.config.get("scheme") or {}).get("name")
        return str(scheme or "offline")


def read_run(run_dir: Path) -> RunFiles:
    """The report inputs of `run_dir`. A missing folder, or one without ``summary.json`` (an unfinished run),
    is a `KDError` saying what and how to fix."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise KDError(f"run directory {run_dir} does not exist",
                      fix="give the --out directory of a run (kdistill run CONFIG --out RUN_DIR)")
    if not run_dir.is_dir():
        raise KDError(f"{run_dir} is a file, not a run directory", fix="give the --out directory of a run")
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        finish = (f"finish it with: kdistill run {run_dir}" if (run_dir / "config.yaml").is_file()
                  else "give the --out directory of a finished run")
        raise KDError(f"{run_dir} has no summary.json: the run has not finished (or this is not a run directory)",
                      fix=finish)
    summary = _json(summary_file)
    if not isinstance(summary, dict):
        raise KDError(f"{summary_file} does not hold a summary (a JSON object)",
                      fix=f"run the job again to re-create it: kdistill run {run_dir}")
    run = RunFiles(run_dir, summary, _config(run_dir / "config.yaml"), _metrics(run_dir / "metrics.jsonl"))
    found = load_arrays(run_dir / PREDICTIONS_FILE)
    if found is not None:
        tensors, meta = found
        logits = {name[:-len("_logits")]: value for name, value in tensors.items() if name.endswith("_logits")}
        run.predictions = (tensors["labels"], logits, int(meta.get("ece_bins", 15)))
    found = load_arrays(run_dir / SIMILARITIES_FILE)
    if found is not None:
        tensors, meta = found
        run.similarities = (tensors["teacher"], tensors["student"], int(meta.get("pairs_total", 0)))
    return run


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise KDError(f"{path} is not valid JSON ({err})",
                      fix=f"run the job again to re-create it: kdistill run {path.parent}") from None


def _config(path: Path) -> dict:
    """The run's resolved config as plain data ({} when absent or unreadable: the report then says less)."""
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _metrics(path: Path) -> list:
    """The JSON records of ``metrics.jsonl`` (a torn line from a kill is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
