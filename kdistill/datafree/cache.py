"""Synthesised transfer sets on disk: one safetensors file per (teacher fingerprint, synthesis settings).

The key is a SHA-256 of the teacher's weights fingerprint, the input shape, the class count, the method, its
settings and the seed; the file is ``<folder>/<method>-<key>.safetensors`` with tensors ``x`` (inputs) and
``y`` (the targets they were synthesised for) and metadata (the key's parts, ``batches_done``). It is rewritten
atomically after every batch, so an interrupted synthesis continues where it stopped; a complete file is reused
as is.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from kdistill.errors import CacheError, CheckpointError
from kdistill.files import load_weights, save_weights
from kdistill.teachers.fingerprint import weights_fingerprint

__all__ = ["SynthesisCache", "synthesis_key"]


def synthesis_key(teacher: nn.Module, input_shape, num_classes: int, method: str, settings: dict, seed: int) -> dict:
    """What identifies a synthesised set (every part that changes its contents)."""
    return {"teacher": weights_fingerprint(teacher), "input_shape": list(input_shape), "num_classes": int(num_classes),
            "method": method, "settings": settings, "seed": int(seed)}


class SynthesisCache:
    """The file of one synthesised set: `load` what exists, `extend` it batch by batch (atomic writes)."""

    def __init__(self, folder: Path, key: dict):
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(folder) / f"{key['method']}-{digest}.safetensors"

    def load(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The stored batches ``([x_0, ...], [y_0, ...])`` (empty lists when there is no file yet)."""
        if not self.path.is_file():
            return [], []
        try:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as fh:
                meta = fh.metadata() or {}
            state = load_weights(self.path)
        except CheckpointError as err:
            raise CacheError(f"synthesised set {self.path} is damaged: {err.what}",
                             fix="delete the file; it is re-created on the next run") from None
        if json.loads(meta.get("key", "null")) != json.loads(json.dumps(self.key, sort_keys=True)):
            raise CacheError(f"synthesised set {self.path} was made for other settings (key mismatch)",
                             fix="delete the file; it is re-created on the next run")
        done = int(meta.get("batches_done", 0))
        return list(state["x"].chunk(done)) if done else [], list(state["y"].chunk(done)) if done else []

    def save(self, xs: list[torch.Tensor], ys: list[torch.Tensor], complete: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(self.path, {"x": torch.cat(xs), "y": torch.cat(ys)},
                     metadata={"key": json.dumps(self.key, sort_keys=True), "batches_done": len(xs),
                               "complete": int(complete)})

    def build(self, batches: int, make_batch: Callable[[int, list, list], tuple[torch.Tensor, torch.Tensor]], *,
              log: Optional[Callable[[str], None]] = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """All `batches` batches: the stored ones, then ``make_batch(i, xs, ys)`` for each missing one (saved after
        each). Returns ``(x, y, batches_made_now)``."""
        xs, ys = self.load()
        if len(xs) > batches:
            xs, ys = xs[:batches], ys[:batches]
        made = 0
        if xs and log is not None:
            log(f"synthesis: reusing {len(xs)}/{batches} batches from {self.path}")
        for i in range(len(xs), batches):
            x, y = make_batch(i, xs, ys)
            xs.append(x)
            ys.append(y)
            made += 1
            self.save(xs, ys, complete=len(xs) == batches)
        return torch.cat(xs), torch.cat(ys), made
