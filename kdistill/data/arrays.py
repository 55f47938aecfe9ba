"""In-memory datasets as a dict of equal-length tensors, batched by fancy indexing (no per-item collate)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from kdistill.errors import DataError


class ArrayDataset(torch.utils.data.Dataset):
    """Equal-length tensors: ``x`` (inputs), optional ``y`` (labels, -100 = unlabeled), ``index`` (sample ids).

    `batch(idx)` returns a dict of the rows in `idx`; `len()` the number of samples. Works as a map-style
    torch Dataset too (`ds[i]` -> dict of single rows), so it can go through a DataLoader with workers.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], name: str = "data"):
        if "x" not in tensors:
            raise DataError(f"dataset '{name}' has no inputs 'x'")
        n = len(tensors["x"])
        if n == 0:
            raise DataError(f"dataset '{name}' is empty", fix="check the data source and train_size")
        for key, value in tensors.items():
            if len(value) != n:
                raise DataError(f"dataset '{name}': '{key}' has {len(value)} rows but 'x' has {n}")
        tensors = dict(tensors)
        tensors.setdefault("index", torch.arange(n))
        self.tensors = tensors
        self.name = name

    def __len__(self) -> int:
        return len(self.tensors["x"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.index_select(0, idx) for k, v in self.tensors.items()}

    def fingerprint(self) -> str:
        """A content hash of the tensors (for cache keys)."""
        h = hashlib.sha256()
        for key in sorted(self.tensors):
            t = self.tensors[key].contiguous()
            h.update(key.encode())
            h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        return h.hexdigest()[:16]


def concat(a: ArrayDataset, b: ArrayDataset, name: str) -> ArrayDataset:
    """Rows of `a` then rows of `b`; `index` renumbered 0..N-1; missing labels filled with -100."""
    keys = set(a.tensors) | set(b.tensors)
    out = {}
    for k in keys:
        if k == "index":
            continue
        if k == "y":
            ya = a.tensors.get("y", torch.full((len(a),), -100, dtype=torch.long))
            yb = b.tensors.get("y", torch.full((len(b),), -100, dtype=torch.long))
            out[k] = torch.cat([ya, yb])
        else:
            if k not in a.tensors or k not in b.tensors:
                raise DataError(f"cannot join datasets '{a.name}' and '{b.name}': only one has '{k}'")
            out[k] = torch.cat([a.tensors[k], b.tensors[k]])
    return ArrayDataset(out, name)


@dataclass
class DataBundle:
    """What a run needs: labelled train and test sets, optional transfer set, and the data facts."""

    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, ...]
    transfer: Optional[ArrayDataset] = None
    info: dict = field(default_factory=dict)

    def distill_set(self) -> ArrayDataset:
        """The inputs the student sees when a teacher labels them: train plus transfer set."""
        if self.transfer is None:
            return self.train
        return concat(self.train, self.transfer, f"{self.name}+transfer")


def check_labels(ds: ArrayDataset, num_classes: int) -> None:
    y = ds.tensors.get("y")
    if y is None:
        return
    valid = y[y != -100]
    if len(valid) and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
        raise DataError(f"dataset '{ds.name}': labels outside 0..{num_classes - 1} "
                        f"(min {int(valid.min())}, max {int(valid.max())})",
                        fix="relabel to 0..num_classes-1 or use -100 for unlabeled rows")
    if not torch.isfinite(ds.tensors["x"].float()).all():
        raise DataError(f"dataset '{ds.name}': inputs contain NaN or Inf", fix="clean or impute the inputs")


def as_float(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
