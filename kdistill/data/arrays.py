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
        # numpy arrays (scikit-learn's float64 included) are converted: inputs to float32, labels to int64
        tensors = {k: (as_inputs(v, f"{name}.{k}") if k == "x" else as_labels(v, f"{name}.{k}") if k == "y"
                       else torch.as_tensor(v)) if isinstance(v, np.ndarray) else v for k, v in tensors.items()}
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
    """What a run needs: labelled train and test sets, optional transfer set, and the data facts.

    ``train`` is None only for a data-free run (``data.train: none``: its inputs come from a synthesizer);
    ``validation`` is an optional held-out labelled split (evaluation during training)."""

    name: str
    train: Optional[ArrayDataset]
    test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, ...]
    transfer: Optional[ArrayDataset] = None
    info: dict = field(default_factory=dict)
    validation: Optional[ArrayDataset] = None

    def distill_set(self) -> ArrayDataset:
        """The inputs the student sees when a teacher labels them: train plus transfer set."""
        if self.train is None:
            if self.transfer is None:
                raise DataError("this run reads no training split (data.train: none) and has no transfer set",
                                where="data.train", fix="give a training split or a transfer set")
            return self.transfer
        if self.transfer is None:
            return self.train
        return concat(self.train, self.transfer, f"{self.name}+transfer")


def check_labels(ds: Optional[ArrayDataset], num_classes: int) -> None:
    if ds is None:  # no such split (a data-free run's training set)
        return
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


def as_inputs(values, name: str = "x") -> torch.Tensor:
    """Model inputs as a float32 tensor: numpy arrays or tensors of any real dtype (float64, float16, integers,
    booleans) are converted; anything else is a one-line `DataError`."""
    if torch.is_tensor(values):
        if values.is_complex():
            raise DataError(f"{name}: complex inputs ({values.dtype}) cannot be converted to float32",
                            fix="pass real-valued features, e.g. x.real or x.abs()")
        return values if values.dtype == torch.float32 else values.float()
    array = np.asarray(values)
    if array.dtype.kind in "fiub":
        return as_float(array)
    try:
        return as_float(array.astype(np.float32))
    except (TypeError, ValueError) as err:
        raise DataError(f"{name}: cannot convert inputs of dtype {array.dtype} to float32 ({err})",
                        fix="encode non-numeric columns as numbers first (e.g. sklearn.preprocessing.OrdinalEncoder)"
                        ) from None


def as_labels(values, name: str = "y") -> torch.Tensor:
    """Class labels as an int64 tensor (-100 = unlabeled): integer arrays, or floats holding whole numbers (as
    pandas or scikit-learn may give them); fractional or non-numeric labels are a one-line `DataError`."""
    array = values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
    if array.dtype.kind in "iub":
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not (array == np.round(array)).all():
            bad = array[~np.isfinite(array) | (array != np.round(array))].ravel()[:3]
            raise DataError(f"{name}: labels must be class indices 0..K-1, got values such as "
                            f"{', '.join(str(v) for v in bad)}",
                            fix="pass integer class labels (regression targets are not supported)")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
    raise DataError(f"{name}: labels of dtype {array.dtype} are not class indices",
                    fix="map them to 0..K-1, e.g. sklearn.preprocessing.LabelEncoder().fit_transform(y)")
