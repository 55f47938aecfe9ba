"""The user's own data from the config: the files form of ``data:`` (`kdistill.data.sources`) read into a
`DataBundle`.

Each split (train, validation, test, transfer) is read from its source (`kdistill.data.tables`), checked (rows of
inputs and labels agree, not empty, no NaN / Inf inputs, integer labels in ``0..num_classes-1``, the same input
shape in every split), and the ``fraction`` splits are carved from the training rows with ``data.seed``.
``num_classes`` is the config's, else the largest label of the labelled splits plus one. The transfer set's
labels, if its source has any, are dropped: the teacher labels it.

`load_without_train` is the data-free hook: the bundle of a ``train: none`` config (test, validation and
transfer sets; ``train`` is None), for a scheme that synthesizes its training inputs. `load_user_data` refuses
``train: none`` unless asked to allow it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from kdistill.data.arrays import ArrayDataset, DataBundle, as_inputs, as_labels
from kdistill.data.sources import TABLE_FORMATS, SourceConfig
from kdistill.data.tables import (columns_to_arrays, detect_format, read_dataset, read_hf_columns, read_npy,
                                  read_npz, read_table, resolve_path)
from kdistill.errors import DataError

LABELLED = {"train": True, "validation": True, "test": True, "transfer": False}


def _config_folders() -> list[Path]:
    from kdistill.models import CONFIG_FOLDERS

    return list(reversed(CONFIG_FOLDERS))  # the config read last first


def _check_fields(source: SourceConfig, fmt: str, where: str) -> None:
    """Refuse the fields that do not apply to the source's format (they would be silently ignored)."""
    wrong = {"npz": ("label", "features", "split"), "npy": ("x", "label", "features", "split"),
             "csv": ("y", "split"), "parquet": ("y", "split"), "hf": ("y",)}[fmt]
    given = [f for f in wrong if getattr(source, f) is not None]
    if given:
        how = "name the arrays with x: and y:" if fmt == "npz" else "give the labels' file with y:" \
            if fmt == "npy" else "name the label column with label: and the inputs with features: (or x:)"
        raise DataError(f"{', '.join(given)} does not apply to a {fmt} source", where=f"{where}.{given[0]}",
                        fix=f"for {fmt}, {how}")


def read_source(source: SourceConfig, split: str, *, folders: Sequence[Path] = ()) -> tuple[np.ndarray, Optional[
        np.ndarray]]:
    """(x, y) of one configured source (not a fraction); y is None for an unlabeled transfer source."""
    where, labelled = f"data.{split}", LABELLED[split]
    if source.dataset is not None:
        return read_dataset(source, where, labelled, folders)
    path = resolve_path(source.path, f"{where}.path", folders)
    fmt = detect_format(path, source.format, f"{where}.path")
    _check_fields(source, fmt, where)
    if fmt == "npz":
        return read_npz(path, source, where, labelled)
    if fmt == "npy":
        return read_npy(path, source, where, labelled, folders)
    columns = read_table(path, fmt, f"{where}.path") if fmt in ("csv", "parquet") else \
        read_hf_columns(path, source, f"{where}.path")
    assert fmt in TABLE_FORMATS
    return columns_to_arrays(columns, source, where, labelled, path.name)


def _checked(x: np.ndarray, y: Optional[np.ndarray], split: str) -> ArrayDataset:
    """The split as an `ArrayDataset` after the row, emptiness, finiteness and label-type checks."""
    where = f"data.{split}"
    if x.ndim == 0:
        raise DataError(f"the inputs of {where} are a single value, not rows", where=where,
                        fix="give an array with one row per sample")
    if x.ndim == 1:
        x = x[:, None]  # N scalar inputs: one feature each
    x = np.array(x)  # a writable copy (files and pandas may hand out read-only views)
    if len(x) == 0:
        raise DataError(f"split {split} is empty (0 rows)", where=where, fix="give a source with at least one row")
    if y is not None and len(y) != len(x):
        raise DataError(f"{len(x)} input rows but {len(y)} labels", where=where,
                        fix="give one label per input row")
    inputs = as_inputs(x, where)
    bad = ~torch.isfinite(inputs)
    if bad.any():
        row = int(bad.reshape(len(inputs), -1).any(1).nonzero()[0])
        col = int(bad[row].reshape(-1).nonzero()[0])
        raise DataError(f"inputs contain NaN or Inf (first at row {row}, feature {col}; "
                        f"{int(bad.reshape(len(inputs), -1).any(1).sum())} rows affected)", where=where,
                        fix="drop or impute those rows before training")
    tensors = {"x": inputs}
    if y is not None:
        y = np.array(y)
        labels = as_labels(y.reshape(len(y)) if y.ndim > 1 and y.shape[1:] == (1,) else y, f"{where} labels")
        if labels.dim() != 1:
            raise DataError(f"labels have shape {tuple(labels.shape)}, expected one class index per row",
                            where=where, fix="give integer class indices 0..K-1, not one-hot or multi-label rows")
        if len(labels) and int(labels.min()) < 0:
            raise DataError(f"negative label {int(labels.min())}", where=where,
                            fix="relabel the classes to 0..K-1")
        tensors["y"] = labels
    return ArrayDataset(tensors, split)


def _rows(ds: ArrayDataset, rows: torch.Tensor, name: str, *, labels: bool = True) -> ArrayDataset:
    return ArrayDataset({k: v[rows] for k, v in ds.tensors.items() if k != "index" and (labels or k != "y")}, name)


def _carve(train: ArrayDataset, carved: dict[str, float], seed: int) -> tuple[ArrayDataset, dict[str, ArrayDataset]]:
    """The `fraction` splits drawn at random (seed) from the training rows, in the order validation, test,
    transfer; the remaining rows stay the training split, in their original order."""
    n = len(train)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    start, out = 0, {}
    for split, fraction in carved.items():
        count = int(round(fraction * n))
        if count == 0 or start + count >= n:
            empty = split if count == 0 else "train"
            raise DataError(f"fraction {fraction} of the {n} training rows leaves split {empty} empty",
                            where=f"data.{split}.fraction", fix="use a larger training split or fraction")
        out[split] = _rows(train, perm[start:start + count], split, labels=split != "transfer")
        start += count
    rest = perm[start:].sort().values
    return _rows(train, rest, "train"), out


def _num_classes(cfg, splits: dict[str, ArrayDataset]) -> tuple[int, str]:
    labelled = {s: d.tensors["y"] for s, d in splits.items() if s != "transfer" and "y" in d.tensors}
    largest = {s: int(y.max()) for s, y in labelled.items() if len(y)}
    if cfg.num_classes is not None:
        for split, top in largest.items():
            if top >= cfg.num_classes:
                raise DataError(f"label {top} of split {split} is outside the class range 0..{cfg.num_classes - 1}",
                                where="data.num_classes", fix=f"set num_classes: {top + 1} or relabel the classes")
        return cfg.num_classes, "config"
    classes = max(largest.values()) + 1 if largest else 0
    if classes < 2:
        raise DataError(f"the labels hold {classes} class{'es' if classes != 1 else ''}: nothing to classify",
                        where="data.num_classes", fix="check the label column / array, or set num_classes")
    return classes, "labels"


def _same_shapes(splits: dict[str, ArrayDataset]) -> tuple[int, ...]:
    first, shape = None, None
    for split, ds in splits.items():
        here = tuple(ds.tensors["x"].shape[1:])
        if shape is None:
            first, shape = split, here
        elif here != shape:
            raise DataError(f"inputs of shape {here} per row, but data.{first} has {shape}",
                            where=f"data.{split}", fix="give every split the same features (columns / arrays)")
    return shape


def _standardized(splits: dict[str, ArrayDataset]) -> dict:
    """Every split's inputs standardized per feature with the training split's mean and std (std 0 -> 1)."""
    x = splits["train"].tensors["x"].double()
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    for split, ds in splits.items():
        ds.tensors["x"] = ((ds.tensors["x"].double() - mean) / std).float()
    return {"standardized": "per feature, with the training split's mean and std"}


def load_user_data(cfg, *, allow_no_train: bool = False, folders: Optional[Sequence[Path]] = None) -> DataBundle:
    """The `DataBundle` of the files form of ``data:`` (`kdistill.data.sources.UserDataBase`)."""
    folders = _config_folders() if folders is None else list(folders)
    if cfg.train == "none" and not allow_no_train:
        raise DataError("data.train is none: no training split is read, so only a scheme that synthesizes its "
                        "inputs (data-free distillation) can run", where="data.train",
                        fix="give a training split, or use such a scheme")
    read: dict[str, ArrayDataset] = {}
    carved: dict[str, float] = {}
    for split in ("train", "validation", "test", "transfer"):
        source = getattr(cfg, split)
        if source is None or source == "none":
            continue
        if source.fraction is not None:
            carved[split] = source.fraction
            continue
        x, y = read_source(source, split, folders=folders)
        read[split] = _checked(x, y if split != "transfer" else None, split)
    if carved:
        read["train"], parts = _carve(read["train"], carved, cfg.seed)
        read.update(parts)
    if cfg.train_size and "train" in read:
        read["train"] = _rows(read["train"], torch.arange(min(cfg.train_size, len(read["train"]))), "train")
    if cfg.test_size:
        read["test"] = _rows(read["test"], torch.arange(min(cfg.test_size, len(read["test"]))), "test")
    order = [s for s in ("train", "validation", "test", "transfer") if s in read]
    splits = {s: read[s] for s in order}
    input_shape = _same_shapes(splits)
    num_classes, classes_from = _num_classes(cfg, splits)
    info = {"sources": {s: (getattr(cfg, s).origin() if getattr(cfg, s) != "none" else "none")
                        for s in ("train", "validation", "test", "transfer") if getattr(cfg, s) is not None},
            "rows": {s: len(d) for s, d in splits.items()}, "num_classes_from": classes_from}
    if getattr(cfg, "standardize", False):
        info.update(_standardized(splits))
    name = _bundle_name(cfg)
    for split, ds in splits.items():
        ds.name = name if split == "train" else f"{name}-{split}"
    return DataBundle(name, splits.get("train"), splits["test"], num_classes, input_shape, splits.get("transfer"),
                      info, validation=splits.get("validation"))


def load_without_train(cfg, *, folders: Optional[Sequence[Path]] = None) -> DataBundle:
    """The data-free hook: the bundle of a ``data.train: none`` config (``train`` is None; test, validation and
    transfer sets as configured), for a scheme that synthesizes its training inputs."""
    if cfg.train != "none":
        raise DataError("load_without_train reads configs whose data.train is none", where="data.train",
                        fix="use load_user_data for a config with a training split")
    return load_user_data(cfg, allow_no_train=True, folders=folders)


def corpus_documents(corpus, *, folders: Optional[Sequence[Path]] = None) -> list[tuple[str, str]]:
    """The documents of the LM task's ``data.corpus``: ``"wiki"`` (gensim's Wikipedia test articles) or the
    user's text (`kdistill.data.sources.TextSourceConfig`), as ``[(title, text), ...]``."""
    if corpus == "wiki":
        from kdistill.data.text import wiki_articles

        return wiki_articles()
    from kdistill.data.tables import read_texts

    return read_texts(corpus, "data.corpus", _config_folders() if folders is None else list(folders))


def _bundle_name(cfg) -> str:
    source = cfg.train if cfg.train != "none" else cfg.test
    if source.path is not None:
        stem = Path(source.path.rstrip("/")).name
        return stem.split(".")[0] or "data"
    return source.dataset.replace(":", ".").rsplit(".", 1)[-1]


__all__ = ["corpus_documents", "load_user_data", "load_without_train", "read_source"]
