"""The config of the user's own data: each split from a file, a folder, a torch Dataset or a fraction of train.

``data:`` of a classification run is a choice of two forms, told apart by their keys (`data_form`):

* the built-in form, ``{name: mnist1d | digits | fashion_mnist, ...}`` (`kdistill.config.DataConfig`);
* the files form, ``{train: SOURCE | none, test: SOURCE, validation: SOURCE, transfer: SOURCE, num_classes}``
  (`UserDataBase`; `kdistill.config.UserDataConfig` adds ``augment``), read by `kdistill.data.user`.

A SOURCE is one of ``{path: FILE_OR_FOLDER, ...}`` (``.npz`` / ``.npy`` arrays, CSV / Parquet tables, a folder
written by ``datasets``' ``save_to_disk``), ``{dataset: "module:attr" | "module.Class", kwargs: {...}}`` (any
map-style torch Dataset of ``(x, y)`` items) or ``{fraction: F}`` (carved at random from the training split); a
bare string is a path. ``train: none`` means no training split is read at all (data-free distillation: the
inputs come from a synthesizer). The union tags start with ``form:``, which the config's error messages skip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from kdistill.configbase import Strict

FORMATS = ("npz", "npy", "csv", "parquet", "hf")
TABLE_FORMATS = ("csv", "parquet", "hf")
SPLITS = ("train", "validation", "test", "transfer")
BUILTIN_TAG, FILES_TAG = "form:builtin", "form:files"


class SourceConfig(Strict):
    """Where one split comes from: a file or folder (`path`), a torch Dataset (`dataset`) or part of train
    (`fraction`); the other fields say which arrays or columns hold the inputs and the labels."""

    path: Optional[str] = Field(None, description="a .npz / .npy / .csv / .parquet file or a datasets folder "
                                                  "(relative: to the working directory, then the config's folder)")
    format: Optional[Literal["npz", "npy", "csv", "parquet", "hf"]] = Field(
        None, description="the file's format when its suffix does not say it (hf: a datasets save_to_disk folder)")
    x: Optional[str] = Field(None, description=".npz: the inputs' array name (default 'x'); hf / parquet: a "
                                               "column holding whole input arrays")
    y: Optional[str] = Field(None, description=".npz: the labels' array name (default 'y'); .npy: the labels' "
                                               ".npy file")
    label: Optional[str] = Field(None, description="tables and datasets folders: the label column (default "
                                                   "'label')")
    features: Optional[Union[list[str], Literal["all-but-label"]]] = Field(
        None, description="tables and datasets folders: the feature columns, or 'all-but-label' (default)")
    split: Optional[str] = Field(None, description="datasets folders holding a DatasetDict: which split to read")
    dataset: Optional[str] = Field(None, description="a torch Dataset by import path: 'module:attr' or "
                                                     "'module.Class' (called with kwargs when callable)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of `dataset`")
    fraction: Optional[float] = Field(None, gt=0, lt=1, description="this share of the training split, drawn at "
                                                                     "random with data.seed (not for train)")

    @model_validator(mode="before")
    @classmethod
    def _path_shorthand(cls, value):
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_origin(self) -> "SourceConfig":
        given = [k for k in ("path", "dataset", "fraction") if getattr(self, k) is not None]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise ValueError(f"give exactly one of path, dataset or fraction (got {what})")
        if self.kwargs and self.dataset is None:
            raise ValueError("kwargs go with dataset: (the Dataset's keyword arguments); remove kwargs")
        if self.path is None:
            extra = [k for k in ("format", "x", "y", "label", "features", "split") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"{', '.join(extra)} only go with path: (which arrays / columns of the file); "
                                 f"remove {', '.join(extra)}")
        return self

    @model_validator(mode="after")
    def _anchored(self) -> "SourceConfig":
        """A relative `path` (and a .npy `y`) found from the working directory or the config's folder is stored
        absolute, so the run directory's config.yaml reads the same files from anywhere (a path not found is
        left as given: reading it reports the error)."""
        from kdistill.data.tables import find_path
        from kdistill.models import CONFIG_FOLDERS

        folders = list(reversed(CONFIG_FOLDERS))  # the config read last first
        for name in ("path", "y") if self.path is not None else ():
            value = getattr(self, name)
            if value is None or Path(value).is_absolute() or (name == "y" and not value.endswith(".npy")):
                continue
            found = find_path(value, folders)
            if found is not None:
                object.__setattr__(self, name, str(found))
        return self

    def origin(self) -> str:
        """A short description for logs and the summary."""
        if self.path is not None:
            return self.path
        if self.dataset is not None:
            return self.dataset
        return f"fraction {self.fraction} of train"


def _train_form(value) -> str:
    return "form:none" if isinstance(value, str) and value.strip().lower() == "none" else "form:source"


TrainSource = Annotated[Union[Annotated[SourceConfig, Tag("form:source")],
                              Annotated[Literal["none"], Tag("form:none")]], Discriminator(_train_form)]


class UserDataBase(Strict):
    """The files form of ``data:`` (see the module docstring)."""

    train: TrainSource = Field(..., description="the labelled training split, or 'none' (data-free: no training "
                                                 "split is read; needs a teacher and a test split)")
    validation: Optional[SourceConfig] = Field(None, description="held-out split for evaluation during training "
                                                                 "(train.eval_every); e.g. {fraction: 0.1}")
    test: Optional[SourceConfig] = Field(None, description="the labelled test split (required); e.g. {fraction: 0.2}")
    transfer: Optional[SourceConfig] = Field(None, description="unlabeled inputs the teacher labels (labels in the "
                                                               "source are ignored)")
    num_classes: Optional[int] = Field(None, ge=2, description="number of classes (default: largest label + 1)")
    seed: int = Field(0, description="seed of the fraction splits")
    train_size: Optional[int] = Field(None, ge=1, description="keep only the first N training samples")
    test_size: Optional[int] = Field(None, ge=1, description="evaluate on the first N test samples only")
    standardize: bool = Field(False, description="standardize every input feature with the training split's mean "
                                                 "and std (tables of features on different scales)")

    @field_validator("train", mode="before")
    @classmethod
    def _none_word(cls, value):
        return "none" if isinstance(value, str) and value.strip().lower() == "none" else value

    @model_validator(mode="after")
    def _splits_fit(self) -> "UserDataBase":
        if isinstance(self.train, SourceConfig) and self.train.fraction is not None:
            raise ValueError("train: fraction carves other splits out of train; give train a path or a dataset")
        if self.test is None:
            raise ValueError("test: give a test split (a file, or {fraction: 0.2} to carve it from train)")
        carved = {s: getattr(self, s).fraction for s in ("validation", "test", "transfer")
                  if getattr(self, s) is not None and getattr(self, s).fraction is not None}
        if self.train == "none" and carved:
            raise ValueError(f"train: none reads no training split, so {', '.join(carved)} cannot be a fraction of "
                             "it; give a path or a dataset")
        if self.train == "none" and self.standardize:
            raise ValueError("standardize: the statistics come from the training split and train is none; remove "
                             "standardize (or give a training split)")
        if sum(carved.values()) >= 1:
            raise ValueError(f"the fractions of {', '.join(carved)} add up to {sum(carved.values()):g}: nothing "
                             "would be left to train on; keep their sum below 1")
        return self

    @property
    def data_free(self) -> bool:
        """True when no training split is read (``train: none``)."""
        return self.train == "none"


class TextSourceConfig(Strict):
    """A text corpus of the user's (the LM task's ``data.corpus``): documents from a text file, or one text column
    of a table / datasets folder. A bare string is a path."""

    path: str = Field(..., description="a .txt file, a CSV / Parquet table or a datasets save_to_disk folder")
    format: Optional[Literal["txt", "csv", "parquet", "hf"]] = Field(None, description="when the suffix does not "
                                                                                        "say it")
    column: str = Field("text", description="tables and datasets folders: the column holding the documents")
    separator: Literal["blank_line", "line"] = Field("blank_line", description=".txt: documents end at a blank "
                                                                                "line, or every line is one")
    split: Optional[str] = Field(None, description="datasets folders holding a DatasetDict: which split to read")

    @model_validator(mode="before")
    @classmethod
    def _path_shorthand(cls, value):
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _anchored(self) -> "TextSourceConfig":
        from kdistill.data.tables import find_path
        from kdistill.models import CONFIG_FOLDERS

        found = None if Path(self.path).is_absolute() else find_path(self.path, list(reversed(CONFIG_FOLDERS)))
        if found is not None:
            object.__setattr__(self, "path", str(found))
        return self


def _corpus_form(value) -> str:
    return "form:builtin" if value == "wiki" else "form:files"


TextCorpus = Annotated[Union[Annotated[Literal["wiki"], Tag("form:builtin")],
                             Annotated[TextSourceConfig, Tag("form:files")]], Discriminator(_corpus_form)]


def data_form(value: Any) -> str:
    """The union tag of a ``data:`` value: the files form when it has a split key (or a transfer source), else
    the built-in form (also when ``name`` is given, so old configs read as before; ``{train: none}`` alone is
    the built-in dataset's test split without its training split)."""
    if isinstance(value, dict):
        if "name" in value:
            return BUILTIN_TAG
        if any(k in value for k in ("validation", "test", "num_classes", "standardize")):
            return FILES_TAG
        if "train" in value and _train_form(value["train"]) != "form:none":
            return FILES_TAG
        transfer = value.get("transfer")
        if isinstance(transfer, str) or (isinstance(transfer, dict)
                                         and {"path", "dataset", "fraction"} & set(transfer)):
            return FILES_TAG
        return BUILTIN_TAG
    return FILES_TAG if isinstance(value, UserDataBase) else BUILTIN_TAG


__all__ = ["BUILTIN_TAG", "FILES_TAG", "FORMATS", "SPLITS", "SourceConfig", "TABLE_FORMATS", "TextCorpus",
           "TextSourceConfig", "TrainSource", "UserDataBase", "data_form"]
