"""The teacher's sentence embeddings, computed once, through the shared teacher-output cache (`kdistill.teachers`).

Each set of sentences (``train``, ``heldout``, ``probe``) is one cache in ``DIR/<set>/``: a dense float32
``embedding`` output of the frozen teacher, keyed by the teacher (weights, pooling, normalization; see
`EncoderTeacher.fingerprint`) and the tokenized sentences (their content fingerprint, so ``max_length`` too).
Rows are stored in order of sentence length, in batches of the encoding batch size, exactly as `encode` batches
them: the teacher runs on batches with little padding and the stored embeddings are bit for bit those of
`encode`. `ReorderedTeacher` looks a dataset's ``index`` up in that order.

A complete cache with the same key is reused (the next run in the same folder reads it); a partial one is
continued; a stale or damaged one is built again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from kdistill.encoders.data import sentence_dataset
from kdistill.encoders.distiller import EncoderTeacher
from kdistill.errors import CacheError
from kdistill.teachers import CacheSpec, CacheStore, CachedTeacher, build_cache, cache_key_parts, open_cache
from kdistill.teachers.cache import launched_processes

__all__ = ["EMBEDDING", "ReorderedTeacher", "teacher_embeddings"]

EMBEDDING = "embedding"
SHARD_BATCHES = 256  # batches per shard (a shard holds whole batches, so batches are those of `encode`)


class ReorderedTeacher:
    """A `CachedTeacher` whose rows are stored in another order: sample ``index`` is row ``rows[index]``.

    Has the cached teacher's ``prefetch`` (the engine reads the rows on the host) and ``__call__``."""

    def __init__(self, cached: CachedTeacher, rows: np.ndarray):
        self.cached = cached
        self.rows = np.asarray(rows, dtype=np.int64)

    def fingerprint(self) -> dict:
        return self.cached.fingerprint()

    def to(self, device: Any) -> "ReorderedTeacher":
        return self  # outputs follow the batch's device

    def __len__(self) -> int:
        return len(self.rows)

    def _remap(self, batch: Mapping[str, Any]) -> dict:
        index = batch["index"]
        host = (index.cpu().numpy() if torch.is_tensor(index) else np.asarray(index)).astype(np.int64).reshape(-1)
        if host.size and (host.min() < 0 or host.max() >= len(self.rows)):
            raise CacheError(f"sample index {int(host.max())} is outside the {len(self.rows)} cached teacher "
                             f"embeddings in {self.cached.directory}", fix="the cache belongs to other sentences")
        rows = torch.from_numpy(self.rows[host])
        return {**batch, "index": rows.to(index.device) if torch.is_tensor(index) else rows}

    def prefetch(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.cached.prefetch(self._remap(batch))

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return self.cached(self._remap(batch))

    def table(self) -> torch.Tensor:
        """Every embedding ``(N, D)`` float32, in sample order."""
        return self({"index": torch.arange(len(self.rows))})[EMBEDDING]


def _open_or_build(teacher: EncoderTeacher, data: Any, directory: Path, spec: CacheSpec, *, progress: bool,
                   log: Callable[[str], None]) -> tuple[CachedTeacher, bool]:
    """(cache, reused): the complete cache of these outputs if it is valid and readable, else built (again)."""
    try:
        cached = open_cache(directory, cache_key_parts(teacher, data, spec, [EMBEDDING]))
        cached.reader.gather(np.arange(1))  # opens every shard's files: a damaged one is found now
        return cached, True
    except CacheError as err:
        if (directory / "manifest.json").exists():
            log(f"[encoders] {str(err).splitlines()[0]}: computing the embeddings again")
    store = CacheStore(directory)
    try:
        complete = store.read_manifest() is not None and store.is_complete()
    except CacheError:  # unreadable manifest
        complete = True
    rank, _, barrier = launched_processes()
    barrier()  # every process has read the old cache's state before process 0 wipes it
    if complete and rank == 0:  # complete but stale or damaged: start over (a partial one of the key is continued)
        store.wipe()
    barrier()
    cached = build_cache(teacher, data, directory, spec, outputs=[EMBEDDING], rebuild=True, progress=progress,
                         log=log)
    return cached, False


def teacher_embeddings(teacher: nn.Module, sets: Mapping[str, Sequence[str]], tokenizer: Any, directory: Path, *,
                       max_length: int, batch_size: int, progress: bool = False,
                       log: Callable[[str], None] = print) -> tuple[dict[str, ReorderedTeacher], bool]:
    """The teacher's embeddings of each set of sentences, from ``directory/<set>/`` (built there when missing).

    Returns ``({set: ReorderedTeacher}, reused)``; ``reused`` is True when every set was read from a cache."""
    live = EncoderTeacher(teacher, {EMBEDDING})
    spec = CacheSpec(kind="dense", dtype="float32", batch_size=batch_size, shard_rows=batch_size * SHARD_BATCHES)
    out, reused = {}, True
    for name, texts in sets.items():
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # as `encode` batches them
        data = sentence_dataset([texts[i] for i in order], tokenizer, max_length, name=f"{name}-by-length")
        cached, hit = _open_or_build(live, data, Path(directory) / name, spec, progress=progress, log=log)
        rows = np.empty(len(order), dtype=np.int64)
        rows[order] = np.arange(len(order))
        out[name] = ReorderedTeacher(cached, rows)
        reused = reused and hit
    return out, reused
