"""Experiment tracking through Accelerate's trackers (``train.log_with: tensorboard``, wandb, mlflow).

The trackers get the same scalars as ``metrics.jsonl``: at each log line the stage's ``loss``, ``lr`` and every
loss term (``terms/<name>``), at each evaluation its numbers (``eval/<name>``), all at the stage's step. Each
stage is one tracker run named after it, under ``RUN_DIR/tracking`` (TensorBoard: ``RUN_DIR/tracking/<stage>/``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

__all__ = ["Tracking", "scalars", "tracking_dir"]

TRACKING_DIR = "tracking"


def tracking_dir(run_dir: Path) -> Path:
    return Path(run_dir) / TRACKING_DIR


def scalars(record: dict) -> dict[str, float]:
    """The tracker scalars of one metrics.jsonl record ({} for records that are not a log line or evaluation)."""
    out: dict[str, float] = {}
    if "terms" in record and "loss" in record:
        out["loss"] = record["loss"]
        out["lr"] = record.get("lr")
        out.update({f"terms/{k}": v for k, v in record["terms"].items()})
    elif isinstance(record.get("eval"), dict):
        out.update({f"eval/{k}": v for k, v in record["eval"].items()})
    return {k: float(v) for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class Tracking:
    """The stage's tracker run on `accelerator` (made with ``log_with``): `log(record)` forwards a metrics record,
    `close()` finishes the stage's trackers. Accelerate's ``end_training`` would also destroy the process group,
    which the next stage of a DDP run still needs; so each tracker is finished here as ``end_training`` finishes
    it, and dropped from the accelerator so that the next stage's run does not write into this one."""

    def __init__(self, accelerator, stage: str, config: Optional[dict] = None):
        self.accelerator = accelerator
        accelerator.trackers = []
        accelerator.init_trackers(stage, config=config)
        self.open = True

    def log(self, record: dict) -> None:
        values = scalars(record)
        if values and self.open:
            self.accelerator.log(values, step=int(record.get("step", 0)))

    def close(self) -> None:
        if self.open:
            self.open = False
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []
