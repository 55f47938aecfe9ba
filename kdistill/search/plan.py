"""What a search runs: the base config of its trials (the config without ``search:``, exported for the deployment
metrics, the teacher trained once), the search settings with the command line's constraints, and the storage."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from kdistill.configbase import apply_overrides, read_yaml, validate
from kdistill.errors import ConfigError
from kdistill.search.config import DEPLOY_METRICS, Constraint, SearchConfig, parse_constraint
from kdistill.search.space import check_space

__all__ = ["Plan", "make_plan", "storage_file"]

SHARED_TEACHER_BLOCKERS = ("teacher", "data", "seed", "scheme", "task")


@dataclass
class Plan:
    out: Path
    storage: str
    search: SearchConfig
    constraints: list[Constraint]
    base: dict  # the raw config of every trial before the searched values
    source: str
    teacher_dir: Optional[Path] = None  # the shared teacher's run directory (trained before the trials)
    notes: list = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """What must not change between a search and its resumption on the same storage."""
        text = json.dumps({"base": self.base, "space": self.search.model_dump(mode="json")["space"],
                           "objectives": self.search.objectives}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def storage_file(url: str) -> Path:
    """The SQLite file of a ``sqlite:///PATH`` storage URL; anything else is a one-line `ConfigError`."""
    prefix = "sqlite:///"
    if not isinstance(url, str) or not url.startswith(prefix) or len(url) == len(prefix) or ":memory:" in url:
        raise ConfigError(f"--storage {url!r}: only SQLite storage files are supported (one file every worker "
                          "process opens)", fix="give --storage sqlite:///DIR/search.db, or leave it out "
                                                "(default: sqlite:///OUT/search.db)")
    return Path(url[len(prefix):])


def make_plan(config: Path, out: Path, *, storage: Optional[str] = None, constraints: Sequence[str] = (),
              overrides: Sequence[str] = ()) -> tuple[Plan, Any]:
    """(the plan, the task) of ``kdistill search CONFIG``: every mistake (no search section, a bad space,
    constraint or storage URL) is a one-line `ConfigError` before anything is trained."""
    from kdistill.models import add_config_folder
    from kdistill.tasks import get_task, task_name

    data = read_yaml(config)
    if not isinstance(data, dict):
        raise ConfigError(f"{config}: the top level must be a mapping of fields", fix="see docs/search.md")
    add_config_folder(Path(config).parent)
    task = get_task(task_name(data))
    if overrides:
        data = apply_overrides(data, list(overrides), task.config)
    task.parse(data, str(config))  # the whole config, search section included, is valid
    if task.name != "classification":
        raise ConfigError(f"{config}: kdistill search runs classification configs (task: {task.name})",
                          where="task", fix="search a classification config; other tasks: run them with --set")
    raw_search = data.pop("search", None)
    if raw_search is None:
        raise ConfigError(f"{config}: no search: section", where="search",
                          fix="add search: {space: {distill.temperature: {low: 1, high: 8}}} (see docs/search.md)")
    search = validate(SearchConfig, raw_search, f"{config}: search")
    parsed = []
    for text in list(search.constraints) + list(constraints):
        try:
            parsed.append(parse_constraint(text, "--constraint" if text in constraints else "search.constraints"))
        except ValueError as err:
            raise ConfigError(str(err), fix="write e.g. --constraint latency_ms<=2 --constraint bytes<=200000") \
                from None
    url = storage or f"sqlite:///{Path(out) / 'search.db'}"
    storage_file(url)

    base = copy.deepcopy(data)
    base["baseline"] = False  # the trials compare configs; the no-teacher baseline is not theirs to train
    needed = set(search.objectives) | {c.metric for c in parsed}
    if needed & set(DEPLOY_METRICS) and not base.get("export"):
        base["export"] = {"format": "onnx"}  # latency and bytes are measured on onnxruntime
    base.setdefault("eval", {})
    base["eval"] = {**(base["eval"] or {}), "threads": search.threads}
    cfg = task.parse(base, f"{config} (the trials' base)")
    check_space(base, search.space, task)
    plan = Plan(Path(out), url, search, parsed, base, str(config))
    touched = {path.split(".")[0] for path in search.space}
    if search.share_teacher and cfg.scheme.name == "offline" and cfg.teacher is not None and \
            not cfg.teacher.weights and not touched & set(SHARED_TEACHER_BLOCKERS):
        plan.teacher_dir = Path(out) / "teacher"
    elif search.share_teacher and cfg.teacher is not None and not cfg.teacher.weights:
        plan.notes.append("every trial trains its own teacher (the space changes the teacher, the data, the seed "
                          "or the scheme)")
    return plan, task


def train_shared_teacher(plan: Plan, task, *, progress: bool, log) -> None:
    """Train the teacher once in ``OUT/teacher`` (resumable; loaded when done) and point the base config at its
    weights: every trial then distils from the same frozen teacher."""
    if plan.teacher_dir is None:
        return
    from kdistill.schemes.common import SchemeJob
    from kdistill.schemes.offline import ready_teacher, teacher_path

    teacher_cfg = task.parse({k: v for k, v in plan.base.items() if k not in ("compress", "export")},
                             f"{plan.source} (teacher)")
    job = SchemeJob.start(teacher_cfg, plan.teacher_dir, progress=progress, log=log)
    ready_teacher(job)
    plan.base["teacher"] = {**plan.base["teacher"],
                            "weights": str(teacher_path(teacher_cfg, plan.teacher_dir).resolve())}
