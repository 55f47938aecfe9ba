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
