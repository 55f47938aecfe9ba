"""Teacher-output cache: run the frozen teacher over the training set once, then train from disk.

In offline distillation the teacher's forward pass is the same every epoch when the inputs are not randomly
augmented, so it can be computed once and read back: every later epoch then costs about what training the
student alone costs.

    teacher = build_cache(LiveTeacher(model, taps), dataset, "runs/x/teacher-cache", CacheSpec(kind="topk", k=32))
    distiller = Distiller(student, teacher, terms)        # CachedTeacher: batch -> {"logits": ..., tap: ...}

**Validity.** A cache is keyed by a hash of the teacher (weights, architecture, taps), the dataset fingerprint,
the input-transform settings and the storage settings; `build_cache` / `open_cache` refuse a directory built
for other ones (naming what changed). A dataset whose inputs are randomly augmented declares it with an
``augmentation`` attribute (a dict of its settings): with ``views: N`` the sample's inputs are a deterministic
function of ``(index, aug_seed)``, ``aug_seed`` in ``0..N-1``, and the cache stores each of the N views (keyed by
``(index, aug_seed)``, looked up by the batch's ``aug_seed``); with no fixed views every step draws new inputs, and
the cache refuses to be built (its targets would belong to inputs the student never sees).

**Scale.** Shards are written whole or not at all, so a killed build continues where it stopped; with several
processes each builds the shards ``i % world_size == rank``. Reading goes through memory maps (see `store.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from accelerate.utils import send_to_device

from kdistill.errors import CacheError
from kdistill.losses.sparse import SparseDistribution
from kdistill.teachers.fingerprint import (augmentation_of, augmentation_views,  # noqa: F401  (re-exported)
                                           dataset_fingerprint, teacher_fingerprint, weights_fingerprint)
from kdistill.teachers.store import (FORMAT, CacheReader, CacheStore, FieldSpec, fields_to_json, from_torch,
                                     to_torch)

LOGITS = "logits"
PREFIX = "teacher:"  # batch keys of prefetched teacher outputs
SHARD_BYTES = 64 << 20


@dataclass(frozen=True)
class CacheSpec:
    """How to store the teacher outputs.

    Args:
        kind: ``dense`` (every logit) or ``topk`` (the top-k classes of each position plus the tail mass).
        k: classes kept per position for ``topk``.
        dtype: storage dtype of the values (``float16`` default, ``bfloat16``, ``float32``).
        temperature: for ``topk``: the temperature of the stored probabilities (that of the loss terms).
        shard_rows: rows per shard (default: about 64 MiB per shard).
        batch_size: teacher batch size while building.
    """

    kind: str = "dense"
    k: int = 32
    dtype: str = "float16"
    temperature: float = 1.0
    shard_rows: Optional[int] = None
    batch_size: int = 256

    def settings(self) -> dict:
        """The parts of the spec that change what is stored (and so the cache key)."""
        out = {"kind": self.kind, "dtype": self.dtype}
        if self.kind == "topk":
            out.update(k=self.k, temperature=float(self.temperature))
        return out


# ------------------------------------------------------------------------------------------------------------
# the key (fingerprints in kdistill.teachers.fingerprint)
# ------------------------------------------------------------------------------------------------------------

def cache_key_parts(teacher: Any, dataset: Any, spec: CacheSpec, outputs: Sequence[str]) -> dict:
    return {"format": FORMAT, "teacher": teacher_fingerprint(teacher), "data": dataset_fingerprint(dataset),
            "transform": augmentation_of(dataset), "store": {**spec.settings(), "outputs": sorted(outputs)}}


def cache_key(parts: Mapping) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


_PART_WORDS = {
    "format": "it was written by another version of the cache format",
    "teacher": "the teacher differs (weights, architecture or taps)",
    "data": "the dataset differs (its content fingerprint)",
    "transform": "the input transform / augmentation settings differ",
    "store": "the storage settings differ (kind, k, dtype, temperature or stored outputs)",
}


def _stale(directory: Path, cached: Mapping, wanted: Mapping) -> CacheError:
    changed = [p for p in _PART_WORDS if cached.get(p) != wanted.get(p)] or ["format"]
    first = changed[0]
    detail = ""
    if first in ("teacher", "data", "transform", "store"):
        detail = f" (cache: {json.dumps(cached.get(first), sort_keys=True, default=str)[:120]}; this run: " \
                 f"{json.dumps(wanted.get(first), sort_keys=True, default=str)[:120]})"
    more = f"; also: {', '.join(changed[1:])}" if len(changed) > 1 else ""
    return CacheError(f"the teacher-output cache in {directory} is stale: {_PART_WORDS[first]}{detail}{more}; "
                      f"training on it would use targets of another teacher or inputs",
                      fix="rebuild it (kdistill cache build CONFIG --rebuild) or point teacher.cache.dir to another "
                          "folder")


# ------------------------------------------------------------------------------------------------------------
# the cached teacher
# ------------------------------------------------------------------------------------------------------------

class CachedTeacher:
    """A teacher read from a cache: ``batch -> {"logits": tensor or SparseDistribution, tap: tensor, ...}``.

    Rows are looked up by ``batch["index"]`` (and ``batch["aug_seed"]`` for a cache of augmentation views).
    `prefetch(host_batch)` reads them on the host before the batch goes to the device (the engine calls it in
    the data pipeline, so the hot loop never syncs to find out which rows it needs); `__call__` then only
    assembles and upcasts. Called on a batch that was not prefetched, it reads the rows itself.
    """

    def __init__(self, reader: CacheReader):
        self.reader = reader
        self.key = reader.manifest["key"]
        self.fields = reader.fields
        self.directory = reader.root
        # (batch key, file name, dtype name) of every stored array, and how to assemble the outputs: once, here
        self._files = [(PREFIX + fname[:-4], fname, spec.dtype) for spec in self.fields for fname in spec.arrays()]
        self._first_key = self._files[0][0]
        self._unaugmented = reader.manifest["parts"].get("transform") is None

    def fingerprint(self) -> dict:
        return {"cache": self.key}

    def to(self, device: Any) -> "CachedTeacher":
        return self  # outputs follow the batch's device

    def _rows(self, batch: Mapping[str, Any]) -> np.ndarray:
        index = batch["index"]
        index = index.numpy() if torch.is_tensor(index) else np.asarray(index)
        index = index.astype(np.int64, copy=False).reshape(-1)
        n = self.reader.num_samples
        # one reduction checks both ends: a negative int64 read as uint64 is larger than any valid index
        if index.size and int(index.view(np.uint64).max()) >= n:
            bad = index[(index < 0) | (index >= n)][0]
            raise CacheError(f"sample index {int(bad)} is outside the teacher-output cache of {n} samples in "
                             f"{self.directory}", fix="the cache belongs to another dataset: rebuild it")
        aug = batch.get("aug_seed")
        if self.reader.views == 1:
            if aug is not None and self._unaugmented:
                raise CacheError(f"the batch has augmented inputs ('aug_seed') but the cache in {self.directory} "
                                 f"holds teacher outputs for un-augmented inputs",
                                 fix="rebuild the cache for the augmented dataset (data.augment.views)")
            return index
        if aug is None:
            raise CacheError(f"the cache in {self.directory} holds {self.reader.views} augmentation views per sample "
                             f"but the batch has no 'aug_seed' telling which view it holds",
                             fix="train on the augmented dataset the cache was built for")
        aug = (aug.numpy() if torch.is_tensor(aug) else np.asarray(aug)).astype(np.int64).reshape(-1)
        if aug.size and (aug.min() < 0 or aug.max() >= self.reader.views):
            raise CacheError(f"aug_seed {int(aug.max())} is outside the {self.reader.views} cached views",
                             where=str(self.directory), fix="rebuild the cache with data.augment.views as trained")
        return aug * n + index

    def prefetch(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Host side: the cached rows of a batch still on the CPU, as ``teacher:*`` batch entries."""
        got = self.reader.gather(self._rows(batch))
        return {key: to_torch(got[fname], dtype) for key, fname, dtype in self._files}

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if self._first_key in batch:
            pre = batch
        else:
            index = batch["index"]
            host = {"index": index.cpu() if torch.is_tensor(index) else index}
            if "aug_seed" in batch:
                aug = batch["aug_seed"]
                host["aug_seed"] = aug.cpu() if torch.is_tensor(aug) else aug
            device = index.device if torch.is_tensor(index) else torch.device("cpu")
            pre = {k: v.to(device) for k, v in self.prefetch(host).items()}
        values: dict[str, Any] = {}
        for spec in self.fields:
            if spec.kind == "dense":
                values[spec.name] = pre[f"{PREFIX}{spec.name}"].float()
            else:
                values[spec.name] = SparseDistribution(
                    pre[f"{PREFIX}{spec.name}.indices"].long(), pre[f"{PREFIX}{spec.name}.log_probs"].float(),
                    pre[f"{PREFIX}{spec.name}.log_tail"].float(), int(spec.shape[-1]), spec.temperature)
        return values


# ------------------------------------------------------------------------------------------------------------
# building and opening
# ------------------------------------------------------------------------------------------------------------

def dataset_batch(dataset: Any, idx: torch.Tensor, view: Optional[int]) -> dict:
    """Rows `idx` of a dataset (under augmentation view `view`), as a batch dict."""
    if view is not None:
        return dataset.batch(idx, aug_seed=torch.full_like(idx, view))
    if hasattr(dataset, "batch"):
        return dataset.batch(idx)
    items = [dataset[int(i)] for i in idx]
    batch = torch.utils.data.default_collate(items)
    batch.setdefault("index", idx.clone())
    return batch


def _field_specs(values: Mapping[str, Any], outputs: Sequence[str], spec: CacheSpec) -> list[FieldSpec]:
    fields = []
    for name in outputs:
        value = values.get(name)
        if not torch.is_tensor(value):
            got = "nothing" if value is None else type(value).__name__
            raise CacheError(f"the teacher gave {got} for output '{name}', which the loss terms read",
                             where="teacher.cache", fix="tap a module whose output is a tensor")
        shape = tuple(value.shape[1:])
        if name == LOGITS and spec.kind == "topk":
            if not shape:
                raise CacheError("top-k needs logits with a class axis", where="teacher.cache.kind")
            if not 1 <= spec.k <= shape[-1]:
                raise CacheError(f"teacher.cache.k={spec.k} but the teacher has {shape[-1]} classes",
                                 where="teacher.cache.k", fix=f"choose k between 1 and {shape[-1]}")
            fields.append(FieldSpec(name, "topk", shape, spec.dtype, spec.k, float(spec.temperature)))
        else:
            fields.append(FieldSpec(name, "dense", shape, spec.dtype))
    return fields


def open_cache(directory: os.PathLike, key_parts: Optional[Mapping] = None) -> CachedTeacher:
    """Open a complete cache; with `key_parts`, refuse it (CacheError) unless it was built for exactly those."""
    directory = Path(directory)
    store = CacheStore(directory)
    manifest = store.read_manifest()
    if manifest is None:
        raise CacheError(f"no teacher-output cache in {directory}", fix="build it with: kdistill cache build CONFIG")
    if key_parts is not None and manifest.get("key") != cache_key(key_parts):
        raise _stale(directory, manifest.get("parts", {}), key_parts)
    if not store.is_complete():
        done = len(store.done_shards())
        raise CacheError(f"the teacher-output cache in {directory} is incomplete ({done} of {manifest['num_shards']} "
                         f"shards)", fix="run the same build again (kdistill cache build CONFIG): it continues")
    return CachedTeacher(CacheReader(directory, manifest))


def launched_processes() -> tuple[int, int, Callable[[], None]]:
    """``(rank, world size, barrier)`` of this process: from Accelerate's process state when the process was
    launched as one of several (``WORLD_SIZE`` > 1, as torchrun and ``accelerate launch`` set it), else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, lambda: None
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state.wait_for_everyone


def build_cache(teacher: Callable[[Mapping], Mapping[str, Any]], dataset: Any, directory: os.PathLike,
                spec: CacheSpec = CacheSpec(), *, outputs: Sequence[str] = (LOGITS,), rank: Optional[int] = None,
                world_size: Optional[int] = None, barrier: Optional[Callable[[], None]] = None, rebuild: bool = False,
                device: Any = "cpu", progress: bool = False, log: Callable[[str], None] = print) -> CachedTeacher:
    """Run `teacher` over every sample (and augmentation view) of `dataset` and store `outputs`; resumable.

    An existing complete cache with the same key is reused as is; a partial one is continued; one with another
    key is refused (or wiped first with ``rebuild=True``). With several processes, call it on every rank; each
    writes its own shards. ``rank``, ``world_size`` and ``barrier`` default to the launched processes
    (`launched_processes`), so that processes started by torchrun never write the same files.
    """
    from kdistill.progress import Progress

    directory = Path(directory)
    store = CacheStore(directory)
    if rank is None or world_size is None:
        rank, world_size, launched_barrier = launched_processes()
        barrier = barrier or launched_barrier
    barrier = barrier or (lambda: None)
    if spec.kind not in ("dense", "topk"):
        raise CacheError(f"unknown cache kind '{spec.kind}'", where="teacher.cache.kind", fix="use dense or topk")
    views = augmentation_views(dataset)
    parts = cache_key_parts(teacher, dataset, spec, outputs)
    key = cache_key(parts)
    existing = store.read_manifest()
    if existing is not None and existing.get("key") != key:
        if not rebuild:
            raise _stale(directory, existing.get("parts", {}), parts)
        barrier()
        if rank == 0:
            store.wipe()
        existing = None
    elif existing is not None and store.is_complete():
        return open_cache(directory, parts)
    device = torch.device(device)
    num_samples = len(dataset)
    if rank == 0 and existing is None:
        probe = teacher(send_to_device(dataset_batch(dataset, torch.arange(min(2, num_samples)), 0 if views > 1 else None),
                              device))
        fields = _field_specs(probe, outputs, spec)
        row_bytes = sum(f.row_bytes() for f in fields)
        shard_rows = spec.shard_rows or max(1, SHARD_BYTES // max(1, row_bytes))
        total = num_samples * views
        store.write_manifest({"format": FORMAT, "key": key, "parts": parts, "num_samples": num_samples,
                              "views": views, "shard_rows": shard_rows, "num_shards": -(-total // shard_rows),
                              "row_bytes": row_bytes, "fields": fields_to_json(fields)})
    barrier()
    manifest = store.read_manifest()
    if manifest is None or manifest.get("key") != key:  # pragma: no cover - another writer raced us
        raise CacheError(f"the cache manifest in {directory} changed during the build", fix="build it again")
    reader = CacheReader(directory, manifest)
    fields, shard_rows, total = reader.fields, reader.shard_rows, num_samples * views
    done = store.done_shards()
    mine = [s for s in range(reader.num_shards) if s % world_size == rank and s not in done]
    if done and mine and rank == 0:
        log(f"teacher cache {directory}: continuing, {len(done)} of {reader.num_shards} shards already built")
    with Progress(sum(min(shard_rows, total - s * shard_rows) for s in mine), "teacher cache",
                  progress and bool(mine)) as bar:
        for shard in mine:
            lo, hi = shard * shard_rows, min(total, (shard + 1) * shard_rows)
            arrays = store.open_shard_for_writing(shard, hi - lo, fields)
            row = lo
            while row < hi:
                view, index = divmod(row, num_samples)
                n = min(hi - row, spec.batch_size, num_samples - index)
                idx = torch.arange(index, index + n)
                batch = send_to_device(dataset_batch(dataset, idx, view if views > 1 else None), device)
                _store_rows(teacher(batch), fields, arrays, slice(row - lo, row - lo + n), idx)
                row += n
                bar.update(n)
            store.finish_shard(shard, arrays)
            del arrays
    barrier()
    if rank == 0:
        missing = sorted(set(range(reader.num_shards)) - store.done_shards())
        if missing:
            raise CacheError(f"teacher cache {directory}: shards {missing[:5]} were not built (a process failed?)",
                             fix="run the build again: it continues")
        store.mark_complete(manifest)
    barrier()
    return open_cache(directory, parts)


def _store_rows(values: Mapping[str, Any], fields: list[FieldSpec], arrays: dict, rows: slice,
                idx: torch.Tensor) -> None:
    for spec in fields:
        value = values.get(spec.name)
        if not torch.is_tensor(value) or tuple(value.shape[1:]) != tuple(spec.shape):
            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise CacheError(f"teacher output '{spec.name}' has shape {got}, expected (batch, {spec.shape})",
                             fix="teacher outputs must have the same shape for every sample")
        value = value.detach()
        if not bool(torch.isfinite(value).all()):
            raise CacheError(f"the teacher produced non-finite '{spec.name}' values for samples "
                             f"{int(idx[0])}..{int(idx[-1])}; they would become NaN targets",
                             fix="check the teacher weights and the inputs")
        if spec.kind == "dense":
            arrays[f"{spec.name}.npy"][rows] = from_torch(value, arrays[f"{spec.name}.npy"].dtype)
        else:
            sparse = SparseDistribution.from_logits(value, spec.k, spec.temperature)
            for part, tensor in (("indices", sparse.indices), ("log_probs", sparse.log_probs),
                                 ("log_tail", sparse.log_tail)):
                arr = arrays[f"{spec.name}.{part}.npy"]
                arr[rows] = from_torch(tensor, arr.dtype)
