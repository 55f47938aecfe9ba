"""``task: classification``: any classifier (built-in zoo or an import path), every training scheme.

The scheme (``scheme:``, default ``offline``) is the plan of rounds; this module only wires it to the shared
job skeleton and the CLI (`kdistill.tasks.Task`).
"""

from __future__ import annotations

from kdistill.config import RunConfig
from kdistill.report import summary_table
from kdistill.tasks import Task


def _run(cfg: RunConfig, run_dir, *, progress: bool = True, log=print, **options) -> dict:
    from kdistill.datafree.job import uses_datafree
    from kdistill.schemes import run

    if uses_datafree(cfg):  # data_free / data.train: none / boundary samples (docs/data_free.md)
        from kdistill.datafree.job import run as run_datafree

        return run_datafree(cfg, run_dir, progress=progress, log=log, **options)

    return run(cfg, run_dir, progress=progress, log=log, **options)


def _build_cache(cfg: RunConfig, run_dir, **options):
    from kdistill.schemes.offline import build_teacher_cache

    return build_teacher_cache(cfg, run_dir, **options)


def _evaluate(run_dir, **options) -> dict:
    from pathlib import Path

    from kdistill.datafree.job import uses_datafree
    from kdistill.schemes.offline import evaluate_run_dir
    from kdistill.tasks import load_resolved

    if (Path(run_dir) / "config.yaml").is_file() and uses_datafree(load_resolved(Path(run_dir) / "config.yaml")):
        from kdistill.datafree.job import evaluate_run_dir as evaluate_datafree

        return evaluate_datafree(run_dir, **options)

    return evaluate_run_dir(run_dir, **options)


def _export(run_dir, export_cfg, **options) -> dict:
    from kdistill.schemes.deploy import export_run_dir

    return export_run_dir(run_dir, export_cfg, **options)


TASK = Task("classification", RunConfig, _run, summary_table, _build_cache, _evaluate, _export)
