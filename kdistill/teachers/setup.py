"""From a run's config to its teacher-output cache: what to store, where, and build-or-reuse.

The stored outputs are the ones the loss terms read from the teacher (``logits`` and any teacher taps). A
``topk`` cache keeps the logits as top-k log-probabilities at the temperature of the terms that read them, so
those terms must share one temperature and have a top-k version (`kdistill.losses.SPARSE_LOSSES`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from kdistill.errors import ConfigError
from kdistill.losses.sparse import SPARSE_LOSSES, loss_temperature
from kdistill.teachers.cache import LOGITS, CacheSpec, CachedTeacher, build_cache

DEFAULT_DIR = "teacher-cache"
ANSWERS_FILE = "teacher-answers.sqlite"  # a black-box teacher's answer cache in the run directory


def cached_outputs(terms: Sequence[Any]) -> list[str]:
    """The teacher outputs the terms read (a term is anything with .loss and .teacher, e.g. distiller.Term)."""
    return sorted({t.teacher for t in terms if t.loss != "ce"})


def cache_spec(cache_cfg: Any, terms: Sequence[Any], batch_size: int = 256) -> CacheSpec:
    """The `CacheSpec` of a `teacher.cache` config for these loss terms (ConfigError if top-k cannot serve them)."""
    temperature = 1.0
    if cache_cfg.kind == "topk":
        readers = [t for t in terms if t.loss != "ce" and t.teacher == LOGITS]
        for t in readers:
            if t.loss not in SPARSE_LOSSES:
                raise ConfigError(f"term '{t.name}' ({t.loss}) needs the teacher's full distribution, but "
                                  f"teacher.cache.kind: topk stores only the top-{cache_cfg.k} classes",
                                  where="teacher.cache.kind",
                                  fix=f"use kind: dense, or terms among {', '.join(SPARSE_LOSSES)}")
        temps = {loss_temperature(t.loss, t.params) for t in readers}
        if len(temps) > 1:
            raise ConfigError(f"the terms reading the teacher's logits use temperatures {sorted(temps)}, but a top-k "
                              f"cache stores the distribution at one temperature", where="teacher.cache.kind",
                              fix="give those terms one temperature, or use kind: dense")
        temperature = temps.pop() if temps else 1.0
    return CacheSpec(kind=cache_cfg.kind, k=cache_cfg.k, dtype=cache_cfg.dtype, temperature=temperature,
                     shard_rows=cache_cfg.shard_rows, batch_size=batch_size)


def cache_dir(cache_cfg: Any, run_dir: Optional[os.PathLike]) -> Path:
    if cache_cfg.dir:
        return Path(cache_cfg.dir)
    if run_dir is None:
        raise ConfigError("teacher.cache has no dir and the run has no run directory", where="teacher.cache.dir",
                          fix="set teacher.cache.dir or give the run an --out directory")
    return Path(run_dir) / DEFAULT_DIR


def prepare_cache(teacher: Callable, dataset: Any, cache_cfg: Any, terms: Sequence[Any], run_dir: Optional[os.PathLike],
                  *, batch_size: int = 256, accelerator: Any = None, rebuild: bool = False, progress: bool = True,
                  log: Callable[[str], None] = print) -> Optional[CachedTeacher]:
    """Build the cache of `teacher` on `dataset` if missing, continue it if partial, reuse it if valid, refuse it
    if stale. Returns None when no term reads the teacher (nothing to cache)."""
    outputs = cached_outputs(terms)
    if not outputs:
        log("teacher.cache: no loss term reads the teacher; nothing to cache")
        return None
    spec = cache_spec(cache_cfg, terms, batch_size)
    directory = cache_dir(cache_cfg, run_dir)
    rank, world, barrier, device = 0, 1, None, "cpu"
    if accelerator is not None:
        rank, world = accelerator.process_index, accelerator.num_processes
        barrier, device = accelerator.wait_for_everyone, accelerator.device
    if hasattr(teacher, "to"):
        teacher.to(device)
    cached = build_cache(teacher, dataset, directory, spec, outputs=outputs, rank=rank, world_size=world,
                         barrier=barrier, rebuild=rebuild, device=device, progress=progress and rank == 0, log=log)
    if rank == 0:
        m = cached.reader.manifest
        log(f"teacher cache {directory}: {m['num_samples']} samples x {m['views']} view(s), "
            f"{', '.join(f.name + ' ' + f.kind for f in cached.fields)}, {m['row_bytes']} bytes per sample")
    return cached


# -- black-box teachers (kind: api; kdistill.teachers.api) -------------------------------------------------------

def api_teacher(teacher_cfg: Any, num_classes: int, run_dir: Optional[os.PathLike], *,
                log: Callable[[str], None] = print, sleep: Optional[Callable[[float], None]] = None) -> Any:
    """The `ApiTeacherModel` of a ``teacher: {kind: api, ...}`` section: its backend (callable or URL), its answer
    cache (``teacher.answers``, default RUN_DIR/teacher-answers.sqlite) and budget. Sends nothing."""
    import time

    from kdistill.teachers.api import ApiTeacher, ApiTeacherModel, CallableBackend, HttpBackend
    from kdistill.teachers.api_cache import AnswerCache

    api = teacher_cfg.api
    if api.url is not None:
        backend = HttpBackend(api.url, api.fields.model_dump(), timeout=api.timeout, where="teacher.url")
    else:
        backend = CallableBackend(api.call, teacher_cfg.kwargs, as_torch=api.as_torch, where="teacher.call")
    if api.answers:
        path = Path(api.answers)
    elif run_dir is not None:
        path = Path(run_dir) / ANSWERS_FILE
    else:
        raise ConfigError("a kind: api teacher keeps its answers in a file, but the run has no run directory",
                          where="teacher.answers", fix="set teacher.answers or give the run an --out directory")
    cache = AnswerCache(path, f"{backend.identity}|{api.identity}")
    teacher = ApiTeacher(backend, cache, budget=api.budget, batch_size=api.batch_size, retries=api.retries,
                         backoff=api.backoff, max_backoff=api.max_backoff, fields=api.fields.model_dump(),
                         where="teacher", sleep=sleep or time.sleep, log=log)
    return ApiTeacherModel(teacher, num_classes, api.label_smoothing)


def api_rows(bundle: Any, data: Any = None) -> list:
    """The datasets a run asks a black-box teacher about: the student's data (default: train + transfer), the
    validation split if any, and the test set (the teacher's own evaluation)."""
    data = data if data is not None else bundle.distill_set()
    return [d for d in (data, getattr(bundle, "validation", None), bundle.test) if d is not None]


def check_api_budget(model: Any, datasets: Sequence[Any], log: Callable[[str], None] = print) -> int:
    """Refuse (before anything is sent) a run whose rows not yet answered exceed the teacher's budget; returns
    the number of rows the run will send."""
    from kdistill.teachers.api import stacked_rows

    teacher = model.teacher
    rows = stacked_rows(datasets)
    missing = len(teacher.cache.missing(teacher.cache.keys(rows)))
    teacher.check_budget(missing)
    budget = f", budget {teacher.budget}" if teacher.budget is not None else ""
    log(f"teacher API: {len(rows) - missing} of {len(rows)} rows answered by the cache {teacher.cache.path}; "
        f"{missing} to send ({teacher.cache.sent()} sent before{budget})")
    return missing
