"""The audit inside a run and on the command line.

* `audit_stage(job, teacher)`: the run's ``audit`` stage (a config with an ``audit:`` section), right after the
  teacher is ready and before any student stage: writes ``RUN_DIR/audit.json`` and refuses (a `KDError`: one
  line, exit 2) a teacher that violates a threshold. The teacher stage's files stay: nothing is lost. The audit is
  measured again on every run of the config (seconds), so it always describes the teacher and thresholds in use;
* `audit_record_for_summary`: after distillation, the audit's numbers plus what the student inherited (the
  summary's ``audit`` entry);
* `audit_command(cfg, run_dir)`: ``kdistill audit CONFIG``: the teacher obtained exactly as the run obtains it
  (its trained ``teacher`` stage in the run directory, ``teacher.weights``, or trained now as that stage), then
  the same audit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

from torch import nn

from kdistill.audit.config import AuditConfig
from kdistill.audit.teacher import audit_teacher, inheritance, summary_entry, violations
from kdistill.errors import ConfigError, KDError
from kdistill.files import atomic_write_bytes

__all__ = ["AUDIT_FILE", "AuditFailed", "audit_command", "audit_record_for_summary", "audit_stage", "refusal"]

AUDIT_FILE = "audit.json"
AUDIT_SCHEMES = ("offline", "multi_teacher")


class AuditFailed(KDError):
    """The teacher violates a threshold of the ``audit:`` section."""


def _measure(job, teacher: nn.Module, settings: AuditConfig, members: Optional[Mapping[str, nn.Module]],
             name: str) -> dict:
    record = audit_teacher(teacher, job.bundle, settings, ece_bins=job.cfg.eval.ece_bins, members=members,
                           name=name)
    record["thresholds"] = settings.thresholds.model_dump()
    record["violations"] = violations(record, settings.thresholds)
    record["passed"] = not record["violations"]
    if job.run_dir:
        atomic_write_bytes(job.run_dir.file(AUDIT_FILE), json.dumps(record, indent=2).encode())
    return record


def refusal(record: dict, run_dir: Optional[Path], weights: Optional[str]) -> AuditFailed:
    """The one-line error of a failed audit: what failed (value vs threshold) and how to go on."""
    failed = "; ".join(v["message"] for v in record["violations"])
    first = record["violations"][0]
    where = f" (full audit: {run_dir / AUDIT_FILE})" if run_dir is not None else ""
    kept = f"the teacher's weights are kept ({weights}); " if weights else ""
    rerun = f"kdistill run {run_dir}" if run_dir is not None else "the run"
    return AuditFailed(f"teacher audit failed: {failed}{where}",
                       fix=f"{kept}fix the teacher (e.g. more teacher.train.steps, then {rerun} --restart-stage "
                           f"teacher) or relax the threshold (--set audit.thresholds.{first['threshold']}=...) and "
                           f"run again (finished stages are loaded, not retrained)")


def audit_stage(job, teacher: nn.Module, members: Optional[Mapping[str, nn.Module]] = None,
                name: str = "teacher", weights: Optional[str] = None) -> Optional[dict]:
    """The run's audit of its ready `teacher` (None when the config has no enabled ``audit:`` section)."""
    settings = getattr(job.cfg, "audit", None)
    if settings is None or not settings.enabled:
        return None
    job.log(f"[audit] auditing the {name} (accuracy, calibration, label noise, STRIP, trigger reconstruction)")
    record = _measure(job, teacher, settings, members, name)
    if not record["passed"]:
        raise refusal(record, job.run_dir.path, weights)
    job.log(f"[audit] passed in {record['seconds']:.1f} s: {job.run_dir.file(AUDIT_FILE) or 'not kept'}")
    return record


def audit_record_for_summary(record: Optional[dict], job, models: Mapping[str, Optional[nn.Module]]) -> dict:
    """The summary's ``audit`` entry: the audit's numbers and what `models` inherited; ``{"ran": false}`` when
    the run had no audit."""
    if record is None:
        return {"ran": False}
    present = {k: m for k, m in models.items() if m is not None}
    return {"ran": True, **summary_entry(record), "inheritance": inheritance(record, job.bundle, present)}


def audit_command(cfg, run_dir: Path, *, progress: bool = True, log=print, trust_checkpoint: bool = False) -> dict:
    """``kdistill audit``: the configured teacher(s), obtained as the run obtains them, audited with the config's
    ``audit:`` settings (defaults without one); ``audit.json`` is written to `run_dir`. Returns the record (its
    ``violations`` list the thresholds it breaks; the caller decides what a failure means)."""
    from kdistill.schemes.common import SchemeJob

    scheme = cfg.scheme.name
    if scheme not in AUDIT_SCHEMES:
        raise ConfigError(f"scheme '{scheme}' trains its own teachers during the run; 'kdistill audit' audits the "
                          "teacher of scheme offline or the teachers of scheme multi_teacher", where="scheme.name",
                          fix="audit a config with a teacher: section (scheme offline) or scheme.teachers")
    settings = cfg.audit if cfg.audit is not None else AuditConfig()
    job = SchemeJob.start(cfg, run_dir, progress=progress, log=log, trust_checkpoint=trust_checkpoint)
    if scheme == "offline":
        from kdistill.schemes.offline import ready_teacher

        return _measure(job, ready_teacher(job), settings, None, "teacher")
    from kdistill.schemes.multi_teacher import audit_model, ready_teachers

    teachers = ready_teachers(job)
    members = {f"teacher{k}": t for k, t in enumerate(teachers)}
    return _measure(job, audit_model(job, teachers), settings, members, f"teachers combined ({cfg.scheme.combine})")
