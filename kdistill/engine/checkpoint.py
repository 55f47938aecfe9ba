"""Checkpoints: atomic, checksummed, safe to load.

Layout of one checkpoint ``<dir>/step-00001234/``:
- ``model.safetensors``  trainable weights (student, adapters, stateful losses); or, for a sharded (FSDP2) run,
                         ``sharded/``: every process's shards of the weights and optimizer state
                         (`torch.distributed.checkpoint`, see `kdistill.engine.fsdp`);
- ``state.pt``           optimizer, scheduler, grad-scaler, data position: tensors and plain containers only,
                         so it loads with ``torch.load(weights_only=True)``;
- ``rng-rank{r}.pt``     each process's RNG states (torch, CUDA, numpy, python) as tensors and lists;
- ``meta.json``          step and SHA-256 of every file, written last.
Writes go to ``step-XXXXXXXX.tmp`` (files fsynced), then one rename: a crash never leaves a half checkpoint
under a final name; a ``*.tmp`` left by a kill is ignored and removed by the next write. Loading verifies
checksums and falls back to the previous good checkpoint with a warning; the next write sets the skipped newer
ones aside as ``step-XXXXXXXX.stale`` so that keeping the last N by step never keeps a damaged one. A failed
write (full disk, read-only folder) raises a one-line `CheckpointError` and leaves earlier checkpoints intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file

from kdistill.errors import CheckpointError
from kdistill.files import atomic_write_bytes, fsync_dir, load_weights, os_reason, save_weights, sha256

__all__ = ["CheckpointWriter", "atomic_write_bytes", "list_checkpoints", "load_latest", "load_weights",
           "rng_state", "save_weights", "set_rng_state", "step_of", "verify"]  # the `files` writers re-exported

PREFIX = "step-"
SHARDED = "sharded"  # the folder of a sharded checkpoint's weights and optimizer state


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python_version": int(py_state[0]),
        "python_state": torch.tensor(py_state[1], dtype=torch.int64),
        "python_gauss": [] if py_state[2] is None else [float(py_state[2])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    meta = state["numpy_meta"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), meta[0], meta[1], meta[2]))
    gauss = state["python_gauss"][0] if state["python_gauss"] else None
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"].tolist()), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_save_bytes(obj: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    with open(path, "wb") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())


def step_of(path: Path) -> Optional[int]:
    """The step of a checkpoint folder name ``step-00001234`` (None for anything else)."""
    name = Path(path).name
    if not name.startswith(PREFIX):
        return None
    digits = name[len(PREFIX):]
    return int(digits) if digits.isdigit() else None


def list_checkpoints(folder: Path) -> list[Path]:
    """Finished checkpoints of one stage, oldest first (``*.tmp`` writes in progress and set-aside ones excluded)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def _remove_stale(folder: Path, newer_than: int) -> None:
    """Rank 0, before writing step `newer_than`: drop half-written ``*.tmp`` folders (a kill during a write) and
    set aside finished checkpoints of later steps (damaged ones that resume skipped, or a lost timeline) as
    ``*.stale``, so that pruning by step never keeps them in place of good ones."""
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name.endswith(".tmp"):
            shutil.rmtree(p, ignore_errors=True)
    for p in list_checkpoints(folder):
        if step_of(p) > newer_than:
            target = p.with_name(p.name + ".stale")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(p, target)


class CheckpointWriter:
    """Writes checkpoints of one training stage. In multi-process runs every rank calls `write`; rank 0 owns
    the folder, each rank writes its own RNG file."""

    def __init__(self, folder: Path, keep: int = 2, rank: int = 0, barrier=lambda: None):
        self.folder = Path(folder)
        self.keep = keep
        self.rank = rank
        self.barrier = barrier

    def write(self, step: int, weights: Optional[dict[str, torch.Tensor]], state: dict[str, Any],
              sharded: Optional[Callable[[Path], None]] = None) -> Path:
        """`sharded` (every rank calls it with the checkpoint's ``sharded/`` folder) replaces `weights`."""
        final = self.folder / f"{PREFIX}{step:08d}"
        tmp = self.folder / f"{PREFIX}{step:08d}.tmp"
        try:
            if self.rank == 0:
                self.folder.mkdir(parents=True, exist_ok=True)
                _remove_stale(self.folder, step)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            self.barrier()
            _torch_save_bytes(rng_state(), tmp / f"rng-rank{self.rank}.pt")
            if sharded is not None:
                sharded(tmp / SHARDED)
            self.barrier()
            if self.rank == 0:
                if weights is not None:
                    save_weights(tmp / "model.safetensors", weights)
                _torch_save_bytes(state, tmp / "state.pt")
                files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
                meta = {"format": 1, "step": step, "world_size": state.get("world_size", 1),
                        "files": {name: sha256(tmp / name) for name in files}}
                with open(tmp / "meta.json", "w") as fh:
                    fh.write(json.dumps(meta, indent=1))
                    fh.flush()
                    os.fsync(fh.fileno())
                fsync_dir(tmp)
                if (tmp / SHARDED).is_dir():
                    fsync_dir(tmp / SHARDED)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                fsync_dir(self.folder)
                self._prune()
        except (OSError, CheckpointError) as err:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            reason = os_reason(err) if isinstance(err, OSError) else err.what.rpartition(": ")[2]
            raise CheckpointError(f"cannot write checkpoint {final}: {reason}",
                                  fix="free disk space or make the run directory writable, then run the same "
                                      "command again; earlier checkpoints are intact") from None
        self.barrier()
        return final

    def _prune(self) -> None:
        for old in list_checkpoints(self.folder)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def verify(ckpt: Path) -> Optional[str]:
    """None if the checkpoint is complete and its checksums match, else the reason it is not."""
    meta_path = Path(ckpt) / "meta.json"
    if not meta_path.is_file():
        return "meta.json missing"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):  # ValueError covers bad JSON and bytes that are not UTF-8
        return "meta.json unreadable"
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not isinstance(meta.get("step"), int):
        return "meta.json malformed"
    if meta["step"] != step_of(ckpt):
        return f"meta.json says step {meta['step']}, the folder name says {step_of(ckpt)}"
    if "state.pt" not in files:
        return "meta.json lists no state.pt"
    if "model.safetensors" not in files and f"{SHARDED}/.metadata" not in files:
        return "meta.json lists no model.safetensors"
    for name, digest in files.items():
        path = Path(ckpt) / str(name)
        if not path.is_file():
            return f"{name} missing"
        try:
            if sha256(path) != digest:
                return f"{name} checksum mismatch (damaged or truncated)"
        except OSError as err:
            return f"{name} unreadable ({os_reason(err)})"
    return None


def load_latest(folder: Path, rank: int = 0, log=None, sharded: bool = False) -> Optional[dict[str, Any]]:
    """The newest checkpoint whose checksums verify: {"step", "weights", "state", "rng", "path", "sharded"} or None.

    A sharded checkpoint (FSDP2: ``weights`` None, ``sharded`` its folder of shards) is returned only with
    `sharded`; otherwise it is passed over without a warning (its weights need the processes that share them).

    An unusable checkpoint (truncated, corrupted, half-deleted) is skipped with a warning (through `log` when
    given, else `warnings.warn`) and the previous one is tried; nothing in it is unpickled before its checksums
    match, and then only with ``weights_only=True``."""

    def warn(msg: str) -> None:
        if log is not None:
            log(f"warning: {msg}")
        else:
            warnings.warn(msg, stacklevel=3)

    candidates = [c for c in reversed(list_checkpoints(folder)) if (c / SHARDED).is_dir() == sharded]
    for ckpt in candidates:
        problem = verify(ckpt)
        if problem is None:
            try:
                weights = None if sharded else load_file(str(ckpt / "model.safetensors"))
                state = torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu")
                rng_path = ckpt / f"rng-rank{rank}.pt"
                rng = torch.load(rng_path, weights_only=True) if rng_path.is_file() else None
                if not isinstance(state, dict):
                    raise TypeError("state.pt is not a mapping")
            except Exception as err:  # a failure here is damage the checksum did not catch
                problem = f"unreadable ({type(err).__name__})"
            else:
                return {"step": step_of(ckpt), "weights": weights, "state": state, "rng": rng, "path": ckpt,
                        "sharded": ckpt / SHARDED if sharded else None}
        warn(f"checkpoint {ckpt} is not usable ({problem}); falling back to the previous one")
    if candidates:
        warn(f"no usable checkpoint in {folder}; this stage starts again from step 0")
    return None
