"""The job skeleton every task shares: the run directory contract and one resumable stage on the engine.

Run directory contract (every task, every scheme):

* ``config.yaml``: the fully resolved config (overrides included), written atomically when the run starts; a
  directory that holds a different run's config is refused once its training has started (`RunDir.claim` names
  the changed fields), so a run is never mixed with another; one whose run never started training is reused.
  `RunDir.reset` starts it over (``--fresh``) or restarts a stage and the stages after it (``--restart-stage``);
* ``checkpoints/<stage>/step-N/`` and ``metrics.jsonl``: written by the engine, one stage at a time;
* ``<stage>.safetensors``: the exported student of a finished stage, with its SHA-256 next to it
  (``<stage>.safetensors.sha256``, the `sha256sum` format, verified on every load); a stage whose file exists is
  done and is loaded instead of trained (`run_stage`), an interrupted one resumes from its newest good checkpoint;
* ``audit.json`` (classification with an ``audit:`` section, or ``kdistill audit``): the teacher audit
  (`kdistill.audit`); changes to the ``audit:`` section alone never count as another run's config (`FREE_SECTIONS`);
* ``summary.json``: written atomically at the end (`RunDir.write_summary`), then ``report.html`` (the
  self-contained HTML report, `kdistill.report.html`), built from the run's files: the summary, ``metrics.jsonl``
  and the per-example outputs the task kept (``predictions.safetensors``, ``similarities.safetensors``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml
from torch import nn

from kdistill.errors import CheckpointError, ConfigError, KDError
from kdistill.files import atomic_write_bytes, load_weights, save_weights
from kdistill.models.loading import verify_checksum, write_checksum

__all__ = ["RunDir", "run_stage"]


class RunDir:
    """One run's folder (or None: keep nothing). `dump` turns a config into its canonical YAML text and `load`
    reads a config file back (both the task's), so configs are compared resolved, not as typed."""

    def __init__(self, path: Optional[Union[str, Path]], cfg: Any = None, *, dump: Optional[Callable] = None,
                 load: Optional[Callable] = None, log: Callable[[str], None] = print):
        self.path = Path(path) if path is not None else None
        self.cfg, self.dump, self.load, self.log = cfg, dump, load, log

    def __bool__(self) -> bool:
        return self.path is not None

    def file(self, name: str) -> Optional[Path]:
        return self.path / name if self.path is not None else None

    def claim(self) -> None:
        """Create the folder and write the resolved config. A folder that holds another run's config is refused
        (naming the changed fields) once that run has started training, and reused when it never did."""
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
            if old == resolved:
                return
            if self.started() and not _only_free_changes(old, resolved):
                changes = config_changes(old, resolved)
                raise ConfigError(f"{self.path} holds a run with a different config.yaml whose training has started "
                                  f"({changes}); resuming it would mix two configs", fix=RESTART_FIX)
            if self.started():
                self.log(f"note: {self.path}: only settings that change no trained weights differ "
                         f"({config_changes(old, resolved)}): continuing the run with them")
            else:
                self.log(f"note: {self.path} held a run that never started training: reusing it with this config")
        atomic_write_bytes(existing, resolved.encode())

    def started(self) -> bool:
        """Whether a run in this folder has trained anything: a stage's weights file or a finished checkpoint."""
        from kdistill.engine.checkpoint import list_checkpoints

        if self.path is None or not self.path.is_dir():
            return False
        if any(self.path.glob("*.safetensors")):
            return True
        folder = self.path / "checkpoints"
        return folder.is_dir() and any(list_checkpoints(stage) for stage in folder.iterdir() if stage.is_dir())

    def stages(self) -> list[str]:
        """The stages this folder holds, in the order they first trained (metrics.jsonl), then any others."""
        order: list[str] = []
        metrics = self.path / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                try:
                    stage = json.loads(line).get("stage")
                except (ValueError, AttributeError):
                    continue
                if isinstance(stage, str) and stage not in order:
                    order.append(stage)
        found = {p.name[:-len(".safetensors")] for p in self.path.glob("*.safetensors")}
        found = {name[:-len(".side")] if name.endswith(".side") else name for name in found} - REPORT_INPUTS
        if (self.path / "checkpoints").is_dir():
            found |= {p.name for p in (self.path / "checkpoints").iterdir() if p.is_dir()}
        return order + sorted(found - set(order))

    def reset(self, *, fresh: bool = False, restart_stage: Optional[str] = None, log=print) -> list[str]:
        """Forget results so the next `claim` starts over: everything this package writes (``fresh``), or the
        stage `restart_stage` and every stage that trained after it (their weights and checkpoints; the config
        and the summary are rewritten by the next run). Returns the stages forgotten."""
        if self.path is None or not self.path.is_dir():
            return []
        stages = self.stages()
        if fresh:
            for name in ("config.yaml", "metrics.jsonl", "checkpoints", "teacher-cache", "student", "report.html",
                         "audit.json"):
                _remove(self.path / name)
            for pattern in ("*.safetensors", "*.safetensors.sha256", "summary*.json"):
                for item in self.path.glob(pattern):
                    _remove(item)
            log(f"note: {self.path}: started over (--fresh)")
            return stages
        if restart_stage not in stages:
            raise ConfigError(f"--restart-stage {restart_stage}: {self.path} holds no stage of that name",
                              fix=f"use one of: {', '.join(stages) or 'none (nothing trained yet)'}")
        dropped = stages[stages.index(restart_stage):]
        for stage in dropped:
            _remove(self.path / "checkpoints" / stage)
            for suffix in (".safetensors", ".safetensors.sha256", ".side.safetensors", ".side.safetensors.sha256"):
                _remove(self.path / f"{stage}{suffix}")
        for name in ("config.yaml", "summary.json", "report.html", "predictions.safetensors",
                     "similarities.safetensors", "audit.json"):
            _remove(self.path / name)
        kept = [s for s in stages if s not in dropped]
        log(f"note: {self.path}: restarting stage(s) {', '.join(dropped)} under the new config"
            + (f"; kept, trained under the old config: {', '.join(kept)}" if kept else ""))
        return dropped

    def write_summary(self, summary: dict, name: str = "summary.json") -> None:
        """Write `summary` atomically; the run's ``summary.json`` is followed by its ``report.html``."""
        if self.path is not None:
            atomic_write_bytes(self.path / name, json.dumps(summary, indent=2).encode())
            if name == "summary.json" and report_enabled():
                self.write_report()

    def write_report(self) -> None:
        """``report.html`` of the finished run (`kdistill.report.html.write_report`). A report that cannot be
        written leaves the run's results as they are: one warning line says why and how to retry."""
        from kdistill.report.html import write_report

        try:
            out, notes = write_report(self.path)
        except Exception as err:  # the run's results are written: a report fault must not lose them
            self.log(f"warning: {self.path / 'report.html'} not written ({type(err).__name__}: {err}); "
                     f"retry with: kdistill report {self.path}")
            return
        for note in notes:
            self.log(f"note: {note}")


def report_enabled() -> bool:
    """Whether a finished run writes its ``report.html`` (``KDISTILL_REPORT=off`` skips it, e.g. in sweeps or
    tests: ``kdistill report RUN_DIR`` writes it later from the same files)."""
    return os.environ.get("KDISTILL_REPORT", "on").strip().lower() not in {"off", "0", "false", "no"}


# per-example outputs kept for the report (`kdistill.evaluate.predictions`): files of the run, not stages
REPORT_INPUTS = {"predictions", "similarities"}

RESTART_FIX = ("run again with --restart-stage STAGE to retrain STAGE and the stages after it under the new config, "
               "or --fresh to start this run over (Python: fresh=True), or use another --out directory")


def config_changes(old: Optional[str], new: str, limit: int = 4) -> str:
    """The fields that differ between two resolved configs (YAML texts), as ``path: old -> new`` items."""
    if old is None:
        return "its config.yaml cannot be read"
    flat_old, flat_new = _flatten(yaml.safe_load(old)), _flatten(yaml.safe_load(new))
    changed = [f"{k}: {flat_old.get(k, '(unset)')} -> {flat_new.get(k, '(unset)')}"
               for k in sorted(set(flat_old) | set(flat_new)) if flat_old.get(k, "(unset)") != flat_new.get(k, "(unset)")]
    more = f"; +{len(changed) - limit} more" if len(changed) > limit else ""
    return "; ".join(changed[:limit]) + more


# top-level config sections whose changes alter no trained weights: a started run continues under them
FREE_SECTIONS = ("audit",)


def _only_free_changes(old: Optional[str], new: str) -> bool:
    """Whether two resolved configs (YAML texts) differ only inside `FREE_SECTIONS`."""
    if old is None:
        return False
    flat_old, flat_new = _flatten(yaml.safe_load(old)), _flatten(yaml.safe_load(new))
    changed = {k for k in set(flat_old) | set(flat_new) if flat_old.get(k, "(unset)") != flat_new.get(k, "(unset)")}
    return bool(changed) and all(k.split(".")[0] in FREE_SECTIONS for k in changed)


def _flatten(value: Any, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


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
                state = load_weights(side_file)
                verify_checksum(side_file)
                objective.side.load_state_dict(state)
            else:
                state = load_weights(weights)
                verify_checksum(weights)
                objective.export_student().load_state_dict(state)
        except CheckpointError as err:  # damaged: the stage's final checkpoint holds the same weights
            log(f"warning: {err}; re-creating it from the stage's checkpoints")
            if _from_final_checkpoint(name, objective, data, train_cfg, folder, weights, side_file, side_weights, log):
                log(f"[{name}] done earlier: re-created {weights}")
                return objective.export_student(), None
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
                write_checksum(side_file)
        save_weights(weights, student_state, {"stage": name, "steps": result["steps"]})
        write_checksum(weights)
    return student, result


def _from_final_checkpoint(name, objective, data, train_cfg, folder: Path, weights: Path, side_file: Path,
                           side_weights: bool, log) -> bool:
    """Write a finished stage's weights file again from its final checkpoint, without the engine (its metrics
    lines stay as they are); False when there is no good checkpoint at the final step (the stage then resumes)."""
    from kdistill.engine.checkpoint import load_latest

    ck = load_latest(folder / "checkpoints" / name, log=log)
    if ck is None or ck["step"] != train_cfg.steps:
        return False
    objective.build(_first_batch(data, train_cfg.batch_size))
    objective.side.load_state_dict(ck["weights"])
    meta = {"stage": name, "steps": ck["step"]}
    if side_weights and len(objective.side.state_dict()) > len(objective.export_student().state_dict()):
        save_weights(side_file, objective.side.state_dict(), meta)
        write_checksum(side_file)
    save_weights(weights, objective.export_student().state_dict(), meta)
    write_checksum(weights)
    return True


def _first_batch(data, batch_size: int) -> dict:
    import torch

    return data.batch(torch.arange(min(len(data), batch_size)))
