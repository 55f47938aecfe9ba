"""Files on the ground floor: atomic writes, canonical safetensors I/O, checksums.

Every file a run keeps (weights, summaries, configs, manifests) is written through here: to a temp file in the
same folder, fsynced, then renamed, so a crash never leaves a half-written file under its final name. Imports
nothing from kdistill but `errors`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save as safetensors_save

from kdistill.errors import CheckpointError


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, *chunks: bytes) -> None:
    """Write the chunks to one file atomically: temp file in the same folder, fsync, rename. A failed write (full
    disk, no permission) is a one-line `CheckpointError` and leaves no temp file behind. The temp file is named
    after the process, so processes of one launch writing the same file (the run's config.yaml) do not collide."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise CheckpointError(f"cannot write {path}: {os_reason(err)}", fix="check free space and permissions") \
            from None
    fsync_dir(path.parent)


def os_reason(err: BaseException) -> str:
    """The one-line cause of a failed write: the OS's words ("No space left on device"), not a traceback."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def safetensors_bytes(state_dict: dict[str, torch.Tensor], metadata: Optional[dict] = None) -> tuple[bytes, memoryview]:
    """(header, data) of a safetensors file with a canonical header: keys sorted, so that equal tensors and
    metadata always give equal bytes (safetensors itself writes metadata in a per-process hash order)."""
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in state_dict.items()}
    raw = safetensors_save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()})
    size = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(header).to_bytes(8, "little") + header, memoryview(raw)[8 + size:]


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    """Save tensors as safetensors, atomically and byte-reproducibly (shared storage is cloned: safetensors
    refuses aliases). A failed write (full disk, no permission) is a one-line `CheckpointError`."""
    header, data = safetensors_bytes(state_dict, metadata)
    atomic_write_bytes(Path(path), header, data)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"cannot read weights {path}: {err}", fix="the file is damaged; re-create it") \
            from None


def write_json_atomic(path: Path, data: Any, *, indent: Optional[int] = 2, sort_keys: bool = False) -> None:
    """Write `data` as JSON atomically (see `atomic_write_bytes`)."""
    atomic_write_bytes(Path(path), json.dumps(data, indent=indent, sort_keys=sort_keys).encode())
