"""A tiny finished classification run for the report tests (seconds on one thread): mnist1d, a 1-D CNN teacher,
an MLP student and a baseline, a few steps each, evaluation during training, cost measured at one thread, and a
teacher audit with a few trigger-search steps (the Audit section's plots)."""

from pathlib import Path

import yaml

from kdistill.cli import main
from tests.conftest import report_on, tiny_config

SECTIONS = ("comparison", "curves", "pareto", "calibration", "per-class", "disagreements", "audit")


def tiny_report_run(folder: Path) -> Path:
    """Run the tiny config into `folder`/run through the CLI; returns the run directory (it holds report.html)."""
    cfg = tiny_config(baseline=True,
                      teacher={"name": "cnn1d", "kwargs": {"channels": 8, "depth": 3},
                               "train": {"steps": 12, "batch_size": 64, "log_every": 3}},
                      train={"steps": 12, "batch_size": 64, "log_every": 3, "checkpoint_every": 0, "eval_every": 6},
                      eval={"latency_repeats": 2, "throughput_batch": 8, "threads": 1},
                      audit={"cleanse": {"steps": 5, "batch": 8}, "strip": {"rows": 16, "overlays": 4}})
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = folder / "run"
    with report_on():
        code = main(["run", str(path), "--out", str(run_dir), "--no-progress"])
    assert code == 0
    return run_dir
