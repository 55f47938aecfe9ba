"""A scikit-learn ensemble as a black-box teacher (the setting of Bucila et al. 2006).

`fit_sklearn_teacher` trains a gradient-boosting or random-forest ensemble on a table and saves it with joblib;
`sklearn_teacher` (the factory a config names) loads it and returns its ``predict_proba`` as the teacher function:

    teacher:
      kind: api
      call: kdistill.teachers.sklearn_teacher:sklearn_teacher
      kwargs: {path: runs/bc/teacher.joblib}

`fit_for_config` (``python -m kdistill.teachers.sklearn_teacher CONFIG --out teacher.joblib``) fits it on the
training split of a run's config exactly as the run reads it, so the teacher sees the inputs the run will send.
The returned function carries an ``identity`` (the SHA-256 of the file), so the answer cache of another model
saved at the same path is not reused. joblib files are pickles: load only files you made or trust.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from kdistill.errors import ConfigError

MODELS = ("gradient_boosting", "random_forest")


def make_ensemble(model: str = "gradient_boosting", seed: int = 0, **params: Any) -> Any:
    """An unfitted scikit-learn ensemble classifier: ``gradient_boosting`` or ``random_forest``."""
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier

    if model == "gradient_boosting":
        return GradientBoostingClassifier(random_state=seed, **params)
    if model == "random_forest":
        return RandomForestClassifier(random_state=seed, **params)
    raise ConfigError(f"unknown ensemble '{model}'", where="model", fix=f"use one of {', '.join(MODELS)}")


def fit_sklearn_teacher(x: np.ndarray, y: np.ndarray, path: os.PathLike, *, model: str = "gradient_boosting",
                        seed: int = 0, **params: Any) -> Path:
    """Fit an ensemble on ``(x, y)`` (labels 0..C-1, every class present) and save it to `path` (atomically)."""
    import joblib

    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    y = np.asarray(y).astype(np.int64)
    classes = np.unique(y)
    if not np.array_equal(classes, np.arange(len(classes))):
        raise ConfigError(f"the teacher's labels must be 0..C-1 with every class present, got {classes[:10]}",
                          where="y", fix="encode them, e.g. sklearn.preprocessing.LabelEncoder")
    estimator = make_ensemble(model, seed, **params).fit(x, y)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    joblib.dump(estimator, tmp)
    os.replace(tmp, path)
    return path


def proba_function(estimator: Any, identity: str = "") -> Callable[[np.ndarray], np.ndarray]:
    """``rows -> estimator.predict_proba(rows)`` (rows flattened to 2-D), with an ``identity`` attribute."""

    def predict(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.float64)
        return estimator.predict_proba(rows.reshape(len(rows), -1))

    predict.identity = identity
    return predict


def sklearn_teacher(path: str) -> Callable[[np.ndarray], np.ndarray]:
    """The teacher function of an ensemble saved by `fit_sklearn_teacher` (a trusted joblib file)."""
    import joblib

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"no scikit-learn teacher at {file}", where="teacher.kwargs.path",
                          fix="train one with kdistill.teachers.sklearn_teacher.fit_sklearn_teacher")
    estimator = joblib.load(file)
    if not hasattr(estimator, "predict_proba"):
        raise ConfigError(f"{file} holds a {type(estimator).__name__}, which has no predict_proba",
                          where="teacher.kwargs.path", fix="save a fitted classifier")
    classes = np.asarray(getattr(estimator, "classes_", []))
    if not np.array_equal(classes, np.arange(len(classes))):
        raise ConfigError(f"the classifier in {file} has classes {classes[:10]}, not 0..C-1",
                          where="teacher.kwargs.path", fix="fit it on labels 0..C-1")
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:24]
    return proba_function(estimator, identity=f"sklearn:{digest}")


def fit_for_config(config: os.PathLike, out: os.PathLike, *, model: str = "gradient_boosting", seed: int = 0,
                   **params: Any) -> Path:
    """Fit an ensemble on the training split of a run's config, exactly as the run reads it (files, fractions,
    ``standardize``, ``train_size``), and save it to `out`: the teacher then sees the inputs the run sends."""
    from kdistill.config import load_config
    from kdistill.data import load_data

    cfg = load_config(config)
    data = cfg.data
    if getattr(data, "transfer", None) is not None and getattr(data.transfer, "munge", None) is not None:
        data = data.model_copy(update={"transfer": None})  # the teacher learns from the labelled rows only
    train = load_data(data).train
    return fit_sklearn_teacher(train.tensors["x"].numpy(), train.tensors["y"].numpy(), out, model=model, seed=seed,
                               **params)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m kdistill.teachers.sklearn_teacher CONFIG --out teacher.joblib [--model random_forest]``."""
    import argparse
    import sys

    from kdistill.errors import KDError

    parser = argparse.ArgumentParser(description="fit a scikit-learn ensemble teacher on a config's training split")
    parser.add_argument("config")
    parser.add_argument("--out", required=True, help="the joblib file to write (teacher.kwargs.path)")
    parser.add_argument("--model", choices=MODELS, default="gradient_boosting")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        path = fit_for_config(args.config, args.out, model=args.model, seed=args.seed)
    except KDError as err:
        print(f"kdistill: error: {err}", file=sys.stderr)
        return 2
    print(f"teacher written to {path}")
    return 0


__all__ = ["MODELS", "fit_for_config", "fit_sklearn_teacher", "make_ensemble", "main", "proba_function",
           "sklearn_teacher"]


if __name__ == "__main__":
    raise SystemExit(main())
