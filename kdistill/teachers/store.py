"""The on-disk store of a teacher-output cache: a manifest and shards of memory-mapped ``.npy`` files.

Layout of a cache directory::

    manifest.json             format, key (and the parts it hashes), rows, views, shard size, fields
    shards/00000/<file>.npy   rows [0, S) of every stored array, one .npy file per array
    shards/00001/...          rows [S, 2S) ...
    complete.json             written last, once every shard exists

Row ``r`` holds sample ``index = r % num_samples`` under augmentation view ``r // num_samples`` (one view when
the inputs are not augmented). A field is one teacher output (``logits`` or a tap):

- ``dense``: ``<name>.npy`` with the output as is, ``(rows, *shape)``, in the cache dtype;
- ``topk`` (logits only): ``<name>.indices.npy`` (uint16 when V <= 65536, else int32), ``<name>.log_probs.npy``
  (cache dtype) of shape ``(rows, *positions, k)`` and ``<name>.log_tail.npy`` (float32, ``(rows, *positions)``).

A shard is written into ``shards/.00003.tmp/`` and renamed when complete, so a killed build leaves only whole
shards under final names; a new build skips them. Reading opens every file with ``np.load(mmap_mode="r")``:
only the rows a batch asks for are read from disk (the operating system's page cache does the rest).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from kdistill.errors import CacheError
from kdistill.files import atomic_write_bytes, fsync_dir

FORMAT = 1
MANIFEST = "manifest.json"
COMPLETE = "complete.json"
SHARDS = "shards"
DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}  # bfloat16 is stored as raw bits


@dataclass(frozen=True)
class FieldSpec:
    """One stored teacher output: its name, per-sample shape and how it is stored."""

    name: str
    kind: str  # "dense" | "topk"
    shape: tuple  # per-sample shape of the teacher output, e.g. (10,) or (T, V) or (C, H, W)
    dtype: str  # "float16" | "bfloat16" | "float32": the values' storage dtype
    k: int = 0
    temperature: float = 1.0  # topk only: the temperature of the stored log-probabilities

    def arrays(self) -> dict[str, tuple[tuple, np.dtype]]:
        """file name -> (per-row shape, numpy dtype) of the arrays this field is stored as."""
        if self.kind == "dense":
            return {f"{self.name}.npy": (tuple(self.shape), np.dtype(DTYPES[self.dtype]))}
        positions, num_classes = tuple(self.shape[:-1]), int(self.shape[-1])
        index_dtype = np.uint16 if num_classes <= 65536 else np.int32
        return {f"{self.name}.indices.npy": (positions + (self.k,), np.dtype(index_dtype)),
                f"{self.name}.log_probs.npy": (positions + (self.k,), np.dtype(DTYPES[self.dtype])),
                f"{self.name}.log_tail.npy": (positions, np.dtype(np.float32))}

    def row_bytes(self) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) * dt.itemsize for shape, dt in self.arrays().values())

    @classmethod
    def from_json(cls, data: dict) -> "FieldSpec":
        return cls(data["name"], data["kind"], tuple(data["shape"]), data["dtype"], int(data.get("k", 0)),
                   float(data.get("temperature", 1.0)))


def write_json_atomic(path: Path, data: dict) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode())


class CacheStore:
    """Paths and shard bookkeeping of one cache directory (no teacher logic here)."""

    def __init__(self, root: os.PathLike):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def read_manifest(self) -> Optional[dict]:
        if not self.manifest_path.is_file():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise CacheError(f"teacher-output cache {self.root}: unreadable {MANIFEST} ({err})",
                             fix="delete the cache directory and build it again") from None

    def write_manifest(self, manifest: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / SHARDS).mkdir(exist_ok=True)
        write_json_atomic(self.manifest_path, manifest)

    def is_complete(self) -> bool:
        return (self.root / COMPLETE).is_file()

    def mark_complete(self, manifest: dict) -> None:
        write_json_atomic(self.root / COMPLETE, {"key": manifest["key"], "num_shards": manifest["num_shards"]})

    def shard_dir(self, shard: int) -> Path:
        return self.root / SHARDS / f"{shard:05d}"

    def shard_tmp(self, shard: int) -> Path:
        return self.root / SHARDS / f".{shard:05d}.tmp"

    def done_shards(self) -> set[int]:
        folder = self.root / SHARDS
        if not folder.is_dir():
            return set()
        return {int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()}

    def wipe(self) -> None:
        """Remove everything this store wrote (for an explicit rebuild)."""
        for name in (COMPLETE, MANIFEST):
            (self.root / name).unlink(missing_ok=True)
        shutil.rmtree(self.root / SHARDS, ignore_errors=True)

    def open_shard_for_writing(self, shard: int, rows: int, fields: list[FieldSpec]) -> dict[str, np.memmap]:
        tmp = self.shard_tmp(shard)
        shutil.rmtree(tmp, ignore_errors=True)  # a torn shard from a killed build
        tmp.mkdir(parents=True)
        out = {}
        for spec in fields:
            for fname, (shape, dtype) in spec.arrays().items():
                out[fname] = np.lib.format.open_memmap(tmp / fname, mode="w+", dtype=dtype, shape=(rows, *shape))
        return out

    def finish_shard(self, shard: int, arrays: dict[str, np.memmap]) -> None:
        tmp = self.shard_tmp(shard)
        for fname, arr in arrays.items():
            arr.flush()
            with open(tmp / fname, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, self.shard_dir(shard))
        fsync_dir(self.root / SHARDS)


def manifest_fields(manifest: dict) -> list[FieldSpec]:
    return [FieldSpec.from_json(f) for f in manifest["fields"]]


def fields_to_json(fields: list[FieldSpec]) -> list[dict]:
    return [{**asdict(f), "shape": list(f.shape)} for f in fields]


class CacheReader:
    """Row lookups in a complete cache through memory maps (nothing is loaded whole).

    Picklable (the maps are reopened lazily in each process), so it can ride into DataLoader workers.
    """

    def __init__(self, root: os.PathLike, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self.fields = manifest_fields(manifest)
        self.num_samples = int(manifest["num_samples"])
        self.views = int(manifest["views"])
        self.shard_rows = int(manifest["shard_rows"])
        self.num_shards = int(manifest["num_shards"])
        self._maps: Optional[list[dict[str, np.ndarray]]] = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def _open(self) -> list[dict[str, np.ndarray]]:
        if self._maps is None:
            store = CacheStore(self.root)
            maps = []
            for shard in range(self.num_shards):
                rows = min(self.shard_rows, self.num_samples * self.views - shard * self.shard_rows)
                files = {}
                for spec in self.fields:
                    for fname, (shape, dtype) in spec.arrays().items():
                        path = store.shard_dir(shard) / fname
                        try:
                            arr = np.load(path, mmap_mode="r")
                        except (OSError, ValueError) as err:
                            raise CacheError(f"teacher-output cache {self.root}: cannot read {path} ({err})",
                                             fix="delete the cache directory and build it again") from None
                        if arr.shape != (rows, *shape) or arr.dtype != dtype:
                            raise CacheError(f"teacher-output cache {self.root}: {path} holds {arr.shape} "
                                             f"{arr.dtype}, the manifest says {(rows, *shape)} {dtype}",
                                             fix="delete the cache directory and build it again")
                        files[fname] = arr.view(np.ndarray)  # still the file's map; cheaper fancy indexing
                maps.append(files)
            self._maps = maps
        return self._maps

    def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """file name -> the stored arrays at these rows (a fresh in-memory copy of just these rows)."""
        maps = self._open()
        if self.num_shards == 1:
            return {fname: arr[rows] for fname, arr in maps[0].items()}
        shard_of = rows // self.shard_rows
        local = rows - shard_of * self.shard_rows
        out = {fname: np.empty((len(rows), *arr.shape[1:]), dtype=arr.dtype) for fname, arr in maps[0].items()}
        for shard in np.unique(shard_of):
            sel = shard_of == shard
            for fname, arr in maps[int(shard)].items():
                out[fname][sel] = arr[local[sel]]
        return out


def to_torch(arr: np.ndarray, dtype_name: str) -> torch.Tensor:
    """A numpy array from the store as a tensor (bfloat16 comes back from its stored bits)."""
    t = torch.from_numpy(arr if arr.flags.c_contiguous else np.ascontiguousarray(arr))
    if dtype_name == "bfloat16" and t.dtype == torch.uint16:
        return t.view(torch.bfloat16)
    return t


def from_torch(t: torch.Tensor, np_dtype: np.dtype) -> np.ndarray:
    """A tensor as the numpy dtype it is stored in (bfloat16 as its raw bits)."""
    t = t.detach().cpu()
    if np_dtype == np.uint16 and t.is_floating_point():  # bfloat16 values
        return t.to(torch.bfloat16).view(torch.uint16).numpy()
    if np_dtype == np.float16:
        return t.to(torch.float16).numpy()
    if np_dtype == np.float32:
        return t.to(torch.float32).numpy()
    return t.numpy().astype(np_dtype)
