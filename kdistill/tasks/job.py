"""The job skeleton every task shares: the run directory contract and one resumable stage on the engine.

Run directory contract (every task, every scheme):

* ``config.yaml``: the fully resolved config (overrides included), written atomically when the run starts; a
  directory that holds a different run's config is refused (`RunDir.claim`), so a run is never mixed with another;
* ``checkpoints/<stage>/step-N/`` and ``metrics.jsonl``: written by the engine, one stage at a time;
* ``<stage>.safetensors``: the exported student of a finished stage; a stage whose file exists is done and is
  loaded instead of trained (`run_stage`), an interrupted one resumes from its newest good checkpoint;
* ``summary.json``: written atomically at the end (`RunDir.write_summary`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Union

from torch import nn

from kdistill.errors import CheckpointError, ConfigError, KDError
from kdistill.files import atomic_write_bytes, load_weights, save_weights

__all__ = ["RunDir", "run_stage"]


class RunDir:
    """One run's folder (or None: keep nothing). `dump` turns a config into its canonical YAML text and `load`
    reads a config file back (both the task's), so configs are compared resolved, not as typed."""

    def __init__(self, path: Optional[Union[str, Path]], cfg: Any = None, *, dump: Optional[Callable] = None,
                 load: Optional[Callable] = None):
        self.path = Path(path) if path is not None else None
        self.cfg, self.dump, self.load = cfg, dump, load

    def __bool__(self) -> bool:
        return self.path is not None

    def file(self, name: str) -> Optional[Path]:
        return self.path / name if self.path is not None else None

    def claim(self) -> None:
        """Create the folder and write the resolved config; refuse a folder that holds another run."""
        if self.path is None:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise KDError(f"cannot create the run directory {self.path}: {err.strerror or err}",
                          fix="choose a writable --out directory") from None
        if self.cfg is None or self.dump is None:
            return
        resolved = self.dump(self.cfg)
        existing = self.path / "config.yaml"
        if existing.is_file():
            try:
                old = self.dump(self.load(existing)) if self.load is not None else existing.read_text()
            except ConfigError:
                old = None
            if old != resolved:
                raise ConfigError(f"{self.path} holds a run with a different config.yaml",
                                  fix="use another --out directory, or delete this one to start over")
            return
        atomic_write_bytes(existing, resolved.encode())

    def write_summary(self, summary: dict, name: str = "summary.json") -> None:
        if self.path is not None:
            atomic_write_bytes(self.path / name, json.dumps(summary, indent=2).encode())


def _as_run_dir(run_dir: Union[RunDir, Path, str, None]) -> Optional[Path]:
    if isinstance(run_dir, RunDir):
        return run_dir.path
    return Path(run_dir) if run_dir is not None else None


def run_stage(name: str, objective, data, train_cfg, *, seed: int, run_dir: Union[RunDir, Path, str, None] = None,
              eval_fn: Optional[Callable[[nn.Module], dict]] = None, collate_fn: Optional[Callable] = None,
              progress: bool = False, log: Callable[[str], None] = print, side_weights: bool = False
              ) -> tuple[nn.Module, Optional[dict]]:
    """One resumable stage = one `Engine.fit` of `objective` on `data`: ``(exported student, fit result)``.

    With a run directory the stage checkpoints under ``checkpoints/<name>/`` and saves ``<name>.safetensors``
    (the exported student) plus, with `side_weights`, ``<name>.side.safetensors`` when the trainable side holds
    more than the student (exit heads, snapshots). A stage whose weights file exists is done: it is loaded and
    the result is None. A damaged weights file is re-created from the stage's final checkpoint.
    """
    from kdistill.engine import Engine

    folder = _as_run_dir(run_dir)
    weights = folder / f"{name}.safetensors" if folder is not None else None
    side_file = folder / f"{name}.side.safetensors" if folder is not None else None
    if weights is not None and weights.is_file():
        try:
            if side_weights and side_file.is_file():
                objective.build(_first_batch(data, train_cfg.batch_size))
                objective.side.load_state_dict(load_weights(side_file))
            else:
                objective.export_student().load_state_dict(load_weights(weights))
        except CheckpointError as err:  # damaged: the stage's final checkpoint holds the same weights
            log(f"warning: {err}; re-creating it from the stage's checkpoints")
        else:
            log(f"[{name}] done earlier: loaded {weights}")
            return objective.export_student(), None
    engine = Engine(train_cfg, folder, stage=name, seed=seed, progress=progress, log=log)
    result = engine.fit(objective, data, eval_fn=eval_fn, collate_fn=collate_fn)
    student = objective.export_student()
    if weights is not None and engine.accelerator.is_main_process:
        student_state = student.state_dict()
        if side_weights:
            side_state = objective.side.state_dict()
            if len(side_state) > len(student_state):
                save_weights(side_file, side_state, {"stage": name, "steps": result["steps"]})
        save_weights(weights, student_state, {"stage": name, "steps": result["steps"]})
    return student, result


def _first_batch(data, batch_size: int) -> dict:
    import torch

    return data.batch(torch.arange(min(len(data), batch_size)))
