"""Loading user weights safely: safetensors, or `torch.load(weights_only=True)` for .pt/.pth files.

Full unpickling executes arbitrary code from the file; it happens only with ``trust=True`` (the CLI's
``--trust-checkpoint``), never by default. A weights file with a ``<file>.sha256`` next to it (the `sha256sum`
format; kdistill writes one beside every stage's weights) is verified before it is read: a damaged or changed file
is refused instead of loaded silently.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Union

import torch

from kdistill.errors import CheckpointError


def checksum_file(path: Union[str, Path]) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def file_sha256(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksum(path: Union[str, Path]) -> Path:
    """Write ``<path>.sha256`` (``HEX  NAME``, checkable with ``sha256sum -c``) atomically; returns its path."""
    from kdistill.files import atomic_write_bytes

    path = Path(path)
    target = checksum_file(path)
    atomic_write_bytes(target, f"{file_sha256(path)}  {path.name}\n".encode())
    return target


def verify_checksum(path: Union[str, Path], *, where: str = "weights") -> bool:
    """Check `path` against its ``.sha256`` file when there is one (False: none to check); a mismatch is a
    `CheckpointError`."""
    path = Path(path)
    recorded = checksum_file(path)
    if not recorded.is_file():
        return False
    expected = recorded.read_text().split()[:1]
    actual = file_sha256(path)
    if expected != [actual]:
        raise CheckpointError(f"{path} does not match the SHA-256 recorded in {recorded.name} (the file was damaged "
                              f"or replaced after it was written)", where=where,
                              fix="restore the file, or delete it (a run directory re-creates a stage's weights "
                                  "from its checkpoints), or delete the .sha256 file if the change is intended")
    return True


def load_state_dict_file(path: Union[str, Path], *, where: str = "weights", trust: bool = False) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}", where=where, fix="check the path")
    verify_checksum(path, where=where)
    if path.suffix == ".safetensors":
        from kdistill.files import load_weights

        return load_weights(path)
    if path.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise CheckpointError(f"unknown weights format '{path.suffix}' for {path}", where=where,
                              fix="use .safetensors (preferred) or a .pt/.pth state dict")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0][:160]
        raise CheckpointError(f"{path} holds Python objects beyond tensors ({first})", where=where,
                              fix="re-save it as a state dict or .safetensors; or, only if you trust its source, "
                                  "pass --trust-checkpoint (full unpickling can run arbitrary code)") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read {path}: {str(err).splitlines()[0][:160]}", where=where,
                              fix="the file is damaged or not a PyTorch file") from None
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors", where=where,
                              fix="save model.state_dict() (or use .safetensors)")
    return obj


def load_into(model: torch.nn.Module, state_dict: dict, *, where: str = "weights", source: str = "") -> None:
    """`model.load_state_dict(state_dict)` with a one-line `CheckpointError` naming the first missing, unexpected
    and mis-shaped keys when the weights were saved from another architecture."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and torch.is_tensor(state_dict[k]) and tuple(state_dict[k].shape) != tuple(v.shape)]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape file vs model", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    if problems:
        raise CheckpointError(f"the weights{' in ' + source if source else ''} do not fit the model "
                              f"({'; '.join(problems)})", where=where,
                              fix="use weights saved from the same model name and kwargs")
    model.load_state_dict(state_dict)
