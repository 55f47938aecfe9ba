"""Readers of one data source: arrays (``.npz``, ``.npy``), tables (CSV, Parquet), ``datasets`` folders and torch
Datasets by import path. Each returns ``(x, y)`` as numpy arrays (``y`` None when the source has no labels and
none are needed); every unreadable or malformed source is a one-line `DataError` naming the config field.

Tables go through pandas (Parquet through pyarrow), folders through ``datasets.load_from_disk``; both are the
``data`` extra (``pip install kdistill[data]``) and imported only when such a source is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from kdistill.errors import ConfigError, DataError

SUFFIXES = {".npz": "npz", ".npy": "npy", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
Arrays = tuple[np.ndarray, Optional[np.ndarray]]


def _names(names) -> str:
    names = [str(n) for n in names]
    return ", ".join(names[:20]) + (f" (+{len(names) - 20} more)" if len(names) > 20 else "") if names else "none"


def _candidates(path: str, folders) -> list[Path]:
    given = Path(path).expanduser()
    return [given] if given.is_absolute() else [Path.cwd() / given, *(Path(f) / given for f in folders)]


def find_path(path: str, folders=()) -> Optional[Path]:
    """The absolute path of `path`: as given, else from the working directory, else from the first of `folders`
    that holds it (None when none does)."""
    return next((c.resolve() for c in _candidates(path, folders) if c.exists()), None)


def resolve_path(path: str, where: str, folders=()) -> Path:
    """`path` as given when absolute or found from the working directory, else next to a config file read in this
    process (`kdistill.models.CONFIG_FOLDERS`); a missing file is a `DataError`."""
    found = find_path(path, folders)
    if found is not None:
        return found
    candidates = _candidates(path, folders)
    looked = ", ".join(str(c.parent) for c in candidates)
    raise DataError(f"file not found: {path} (looked in {looked})", where=where,
                    fix="give an existing file (relative paths: from the working directory or the config's folder)")


def detect_format(path: Path, given: Optional[str], where: str) -> str:
    if given:
        return given
    if path.is_dir():
        if any((path / m).is_file() for m in HF_MARKERS):
            return "hf"
        raise DataError(f"{path} is a folder but not one written by datasets' save_to_disk (no "
                        f"{' / '.join(HF_MARKERS)})", where=where, fix="give a file, or a save_to_disk folder")
    suffixes = [s.lower() for s in path.suffixes]
    for suffix in reversed(suffixes):
        if suffix in SUFFIXES:
            return SUFFIXES[suffix]
    raise DataError(f"unknown data format '{''.join(path.suffixes) or path.name}' of {path.name}", where=where,
                    fix="use .npz, .npy, .csv, .parquet or a datasets save_to_disk folder, or set format: "
                        "npz | npy | csv | parquet | hf")


def read_npz(path: Path, source, where: str, labelled: bool) -> Arrays:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path.name} as .npz ({str(err).splitlines()[0][:120]})", where=where,
                        fix="write it with numpy.savez(path, x=..., y=...)") from None
    x_name, y_name = source.x or "x", source.y or "y"
    if x_name not in arrays:
        raise DataError(f"array '{x_name}' not in {path.name}; available: {_names(arrays)}", where=f"{where}.x",
                        fix="set x: to the inputs' array name")
    if y_name not in arrays:
        if labelled or source.y is not None:
            raise DataError(f"array '{y_name}' not in {path.name}; available: {_names(arrays)}", where=f"{where}.y",
                            fix="set y: to the labels' array name")
        return arrays[x_name], None
    return arrays[x_name], arrays[y_name]


def _load_npy(path: Path, where: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path.name} as .npy ({str(err).splitlines()[0][:120]})", where=where,
                        fix="write it with numpy.save (numeric arrays, no pickled objects)") from None


def read_npy(path: Path, source, where: str, labelled: bool, folders=()) -> Arrays:
    x = _load_npy(path, f"{where}.path")
    if source.y is None:
        if labelled:
            raise DataError(f"{path.name} holds the inputs only", where=f"{where}.y",
                            fix="set y: to the labels' .npy file (or use one .npz with x and y)")
        return x, None
    return x, _load_npy(resolve_path(source.y, f"{where}.y", folders), f"{where}.y")


def _frame_columns(frame) -> dict[str, np.ndarray]:
    return {str(c): frame[c].to_numpy() for c in frame.columns}


def read_table(path: Path, fmt: str, where: str) -> dict[str, np.ndarray]:
    """The columns of a CSV / Parquet file."""
    try:
        import pandas as pd
    except ImportError:
        raise DataError(f"reading {fmt} files needs pandas", where=where,
                        fix="pip install 'kdistill[data]'") from None
    try:
        frame = pd.read_csv(path) if fmt == "csv" else pd.read_parquet(path)
    except ImportError as err:
        raise DataError(f"reading {fmt} files needs pyarrow ({err})", where=where,
                        fix="pip install 'kdistill[data]'") from None
    except Exception as err:  # pandas' parser errors, pyarrow's ArrowInvalid, empty files...
        raise DataError(f"cannot read {path.name} as {fmt} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:120] if str(err) else 'unreadable'})", where=where,
                        fix=f"check that it is a {fmt} file with a header row" if fmt == "csv" else
                        f"check that it is a {fmt} file") from None
    return _frame_columns(frame)


def read_hf_columns(path: Path, source, where: str) -> dict[str, Any]:
    """The columns of a ``datasets`` folder (a Dataset, or one split of a DatasetDict), numpy-formatted."""
    try:
        import datasets
    except ImportError:
        raise DataError("reading a datasets folder needs the datasets package", where=where,
                        fix="pip install 'kdistill[data]'") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # FileNotFoundError, a broken arrow file, a folder of something else
        raise DataError(f"cannot load {path} with datasets.load_from_disk ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:120] if str(err) else 'unreadable'})", where=where,
                        fix="give a folder written by Dataset.save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        if source.split is None or source.split not in loaded:
            what = "holds several splits" if source.split is None else f"has no split '{source.split}'"
            raise DataError(f"{path.name} {what}; available: {_names(loaded)}", where=f"{where.rsplit('.', 1)[0]}"
                            ".split", fix="set split: to one of them")
        loaded = loaded[source.split]
    loaded = loaded.with_format("numpy")
    return {name: _column(loaded, name, where) for name in loaded.column_names}


def _column(dataset, name: str, where: str):
    try:
        return np.asarray(dataset[name])
    except ValueError as err:  # ragged lists
        raise DataError(f"column '{name}' holds values of different shapes ({str(err)[:80]})", where=where,
                        fix="pad or crop every row to one shape") from None


def columns_to_arrays(columns: dict[str, np.ndarray], source, where: str, labelled: bool, origin: str) -> Arrays:
    """(x, y) from named columns: `source.x` (one column of whole inputs) or `source.features` (scalar columns,
    default: every column but the label) and `source.label` (default 'label')."""
    available = list(columns)
    if available and len(next(iter(columns.values()))) == 0:
        raise DataError(f"{origin} has no rows", where=where, fix="give a table with at least one data row")

    def column(name: str, field: str) -> np.ndarray:
        if name not in columns:
            raise DataError(f"column '{name}' not in {origin}; available: {_names(available)}",
                            where=f"{where}.{field}", fix=f"set {field}: to one of the available columns")
        return columns[name]

    label = source.label or "label"
    y = None
    if labelled or source.label is not None:
        y = column(label, "label")
    elif label in columns:
        y = columns[label]
    if source.x is not None:
        x = column(source.x, "x")
        if x.dtype == object:
            try:
                x = np.stack([np.asarray(v) for v in x])
            except ValueError:
                raise DataError(f"column '{source.x}' of {origin} holds inputs of different shapes",
                                where=f"{where}.x", fix="pad or crop every input to one shape") from None
        return x, y
    names = [c for c in available if c != label] if source.features in (None, "all-but-label") else source.features
    if not names:
        raise DataError(f"{origin} has no feature columns besides '{label}'", where=f"{where}.features",
                        fix="list the feature columns under features:")
    for name in names:
        values = column(name, "features")
        if values.dtype.kind not in "fiub" or values.ndim != 1:
            kind = f"dtype {values.dtype}" if values.ndim == 1 else f"{values.ndim - 1}-d values"
            raise DataError(f"feature column '{name}' of {origin} is not numeric ({kind})", where=f"{where}.features",
                            fix="encode it as numbers, leave it out of features:, or name an array column with x:")
        bad = ~np.isfinite(values.astype(np.float64, copy=False))
        if bad.any():
            count = int(bad.sum())
            raise DataError(f"feature column '{name}' of {origin} has NaN or Inf in {count} row{'s' * (count > 1)} "
                            f"(first: row {int(bad.argmax())})", where=f"{where}.features",
                            fix="drop or impute those rows before training")
    return np.stack([columns[n].astype(np.float64, copy=False) for n in names], axis=1), y


def read_dataset(source, where: str, labelled: bool, folders=()) -> Arrays:
    """(x, y) of every item of a map-style torch Dataset given by import path (items: (x, y) pairs, or x alone for
    an unlabeled split)."""
    import torch

    from kdistill.models import import_module

    target = source.dataset
    module_name, sep, attr = target.partition(":")
    if not sep:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise DataError(f"'{target}' is not an import path", where=f"{where}.dataset",
                        fix="write 'package.module:name' or 'package.module.Class'")
    try:
        obj = import_module(module_name, roots=folders, where=f"{where}.dataset")
    except ConfigError as err:
        raise DataError(str(err)) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DataError(f"module '{module_name}' has no attribute '{attr}'", where=f"{where}.dataset",
                            fix="check the name after the module path")
        obj = getattr(obj, part)
    if not isinstance(obj, torch.utils.data.Dataset) and callable(obj):
        try:
            obj = obj(**source.kwargs)
        except TypeError as err:
            raise DataError(f"calling '{target}' failed: {err}", where=f"{where}.kwargs",
                            fix="give the keyword arguments it takes") from None
    elif source.kwargs:
        raise DataError(f"'{target}' is a Dataset object, not callable: kwargs cannot be passed",
                        where=f"{where}.kwargs", fix="remove kwargs, or point at the Dataset class")
    if not isinstance(obj, torch.utils.data.Dataset) or not hasattr(obj, "__len__"):
        raise DataError(f"'{target}' gives a {type(obj).__name__}, not a map-style torch Dataset",
                        where=f"{where}.dataset", fix="return a torch.utils.data.Dataset with __len__ and __getitem__ "
                                                      "whose items are (x, y) pairs")
    items = [obj[i] for i in range(len(obj))]
    pairs = [isinstance(it, (tuple, list)) and len(it) == 2 for it in items]
    if items and not all(pairs) and (labelled or any(pairs)):
        bad = pairs.index(False)
        raise DataError(f"item {bad} of '{target}' is a {type(items[bad]).__name__}, not an (x, y) pair",
                        where=f"{where}.dataset", fix="make __getitem__ return (inputs, label)")
    xs = [np.asarray(it[0].detach().cpu() if torch.is_tensor(it[0]) else it[0]) if p else
          np.asarray(it.detach().cpu() if torch.is_tensor(it) else it) for it, p in zip(items, pairs)]
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        first = xs[0].shape
        bad = next(i for i, x in enumerate(xs) if x.shape != first)
        raise DataError(f"item {bad} of '{target}' has inputs of shape {xs[bad].shape}, item 0 {first}",
                        where=f"{where}.dataset", fix="give every item inputs of one shape")
    x = np.stack(xs) if xs else np.zeros((0,))
    y = np.asarray([np.asarray(it[1]).item() if np.asarray(it[1]).size == 1 else np.nan
                    for it in items]) if items and all(pairs) else None
    return x, y


def read_texts(source, where: str = "data.corpus", folders=()) -> list[tuple[str, str]]:
    """The documents of a `TextSourceConfig` as ``[(title, text), ...]`` (titles: the file name and the document's
    number): a .txt file cut at blank lines (or lines), or a table's / datasets folder's text column."""
    path = resolve_path(source.path, f"{where}.path", folders)
    fmt = source.format or ("txt" if path.is_file() and path.suffix.lower() == ".txt" else None)
    if fmt is None:
        fmt = detect_format(path, None, f"{where}.path")
        if fmt not in ("csv", "parquet", "hf"):
            raise DataError(f"{path.name} is a {fmt} file, not text", where=f"{where}.path",
                            fix="give a .txt file, a table with a text column or a datasets folder")
    if fmt == "txt":
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path.name} is not UTF-8 text (byte {err.start})", where=f"{where}.path",
                            fix="convert it to UTF-8") from None
        import re

        parts = raw.splitlines() if source.separator == "line" else re.split(r"\n\s*\n", raw)
        texts = [" ".join(p.split()) for p in parts]
    else:
        columns = read_table(path, fmt, f"{where}.path") if fmt != "hf" else \
            read_hf_columns(path, source, f"{where}.path")
        if source.column not in columns:
            raise DataError(f"column '{source.column}' not in {path.name}; available: {_names(columns)}",
                            where=f"{where}.column", fix="set column: to the column holding the documents")
        values = list(columns[source.column])
        bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
        if bad is not None:
            raise DataError(f"column '{source.column}' of {path.name} holds a {type(values[bad]).__name__} at row "
                            f"{bad}, not text", where=f"{where}.column", fix="give a column of strings (no gaps)")
        texts = [" ".join(v.split()) for v in values]
    docs = [(f"{path.name}:{i}", t) for i, t in enumerate(texts) if t]
    if len(docs) < 2:
        raise DataError(f"{path.name} holds {len(docs)} non-empty document{'s' * (len(docs) != 1)}; the held-out "
                        "split takes whole documents", where=f"{where}.path",
                        fix="give at least 2 documents (separated by blank lines in a .txt, or set separator: line)")
    return docs


__all__ = ["SUFFIXES", "columns_to_arrays", "detect_format", "find_path", "read_dataset", "read_hf_columns", "read_npy",
           "read_npz", "read_table", "read_texts", "resolve_path"]
