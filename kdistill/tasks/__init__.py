"""Tasks: what a run distils. A config's ``task:`` names one; the job is dispatched here, once.

* ``classification`` (default): any classifier, every scheme (`kdistill.tasks.classification`);
* ``causal_lm``: Hugging Face causal LMs, token-level / on-policy KD (`kdistill.tasks.causal_lm`);
* ``sentence_embedding``: encoders and sentence-embedding models (`kdistill.tasks.sentence_embedding`).

A task supplies its config model, data, models, objective terms and evaluation; the run-directory contract,
stages, resume and the summary are the shared skeleton of `kdistill.tasks.job`. Task modules are imported on
use, so ``transformers`` is loaded only by the tasks that need it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import yaml

from kdistill.configbase import apply_overrides, read_yaml
from kdistill.errors import ConfigError

TASKS: dict[str, str] = {
    "classification": "kdistill.tasks.classification",
    "causal_lm": "kdistill.tasks.causal_lm",
    "sentence_embedding": "kdistill.tasks.sentence_embedding",
}
DEFAULT_TASK = "classification"


@dataclass(frozen=True)
class Task:
    """What the CLI and the API need of a task.

    ``run(cfg, run_dir, *, progress, log, **options) -> summary`` runs the whole job (stages resume, the summary
    is written atomically); ``table(summary) -> str`` is the text printed at the end; ``build_cache`` (optional)
    is `kdistill cache build`; ``evaluate`` (optional) re-measures a finished run directory; ``export``
    (optional) is `kdistill export RUN_DIR`: ``export(run_dir, export_cfg, log=...) -> summary``."""

    name: str
    config: type
    run: Callable[..., dict]
    table: Callable[[dict], str]
    build_cache: Optional[Callable[..., Any]] = None
    evaluate: Optional[Callable[..., dict]] = None
    export: Optional[Callable[..., dict]] = None

    def parse(self, data: Any, source: str = "config") -> Any:
        from kdistill.configbase import validate

        cfg = validate(self.config, data, source)
        try:
            dump_config(cfg)  # free-form values (kwargs, params) must be writable to the run's config.yaml
        except (ValueError, RecursionError):
            raise ConfigError(f"{source}: a value refers to itself (a YAML alias cycle) or is nested too deeply",
                              fix="write the value out instead of using an alias") from None
        return cfg


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"config: task: unknown task {name!r}", where="task",
                          fix=f"use one of {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name]).TASK


def task_name(data: Any) -> str:
    name = data.get("task", DEFAULT_TASK) if isinstance(data, dict) else DEFAULT_TASK
    if not isinstance(name, str) or name not in TASKS:
        raise ConfigError(f"config: task: unknown task {name!r}", fix=f"use one of {', '.join(TASKS)}")
    return name


def parse_any(data: Any, source: str = "config", overrides: Sequence[str] = ()) -> tuple[Task, Any]:
    """(task, validated config) of a raw config mapping with ``--set`` overrides applied."""
    if isinstance(data, dict) and overrides:
        task = get_task(task_name(apply_overrides(data, [o for o in overrides if o.startswith("task=")],
                                                  get_task(task_name(data)).config)))
        data = apply_overrides(data, list(overrides), task.config)
    task = get_task(task_name(data))
    return task, task.parse(data, source)


def load_any(path: Union[str, Path], overrides: Sequence[str] = ()) -> tuple[Task, Any]:
    """(task, validated config) of a config file, overrides applied; every mistake is a one-line `ConfigError`.
    The file's folder is where model import paths are looked for after the working directory."""
    from kdistill.models import add_config_folder

    data = read_yaml(path)
    if isinstance(data, dict) and data.get("api") == "kdistill.distill":
        raise ConfigError(f"{path} was written by the Python API (kdistill.distill): its models and data are Python "
                          "objects, not config fields", fix="re-run it from Python with the same arguments "
                                                             "(the run resumes), or read its summary.json")
    add_config_folder(Path(path).parent)
    return parse_any(data, str(path), overrides)


def dump_config(cfg: Any) -> str:
    """The canonical YAML of a resolved config (every default filled in)."""
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)


def load_resolved(path: Union[str, Path]) -> Any:
    """A run directory's config.yaml read back (for the run directory's identity check)."""
    return load_any(path)[1]


__all__ = ["DEFAULT_TASK", "TASKS", "Task", "dump_config", "get_task", "load_any", "load_resolved", "parse_any",
           "task_name"]
