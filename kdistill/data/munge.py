"""MUNGE pseudo-data for tabular inputs (Bucila, Caruana, Niculescu-Mizil, "Model Compression", KDD 2006).

A large teacher (an ensemble) is compressed into a small model by labelling many unlabeled inputs drawn near the
training data. MUNGE makes them from the labelled table itself. One pass over the ``n`` rows:

1. for each row ``e`` find its nearest neighbour ``e'`` among the other rows, by Euclidean distance over the
   continuous attributes standardised to zero mean and unit variance plus, for the nominal attributes, the number
   of attributes on which the two rows differ (a mismatch costs 1, like one unit of standardised distance);
2. for each attribute ``a``, with probability ``p``: a nominal attribute takes the neighbour's value; a continuous
   one is drawn from ``N(e'_a, sd)`` with the local spread ``sd = |e_a - e'_a| / s``; with probability ``1 - p`` the
   attribute keeps its value.

``k`` passes give ``k * n`` new rows (``size`` truncates the last pass), all unlabeled: the teacher labels them.

Deviation from the paper's pseudo-code, which walks the rows in order and changes *both* ``e`` and ``e'`` in place
(so a row may be changed several times in one pass and later rows see changed neighbours): here each new row is
a function of one original row and its neighbour in the original table, drawn independently for every row and
pass. Every attribute's marginal law is the paper's (swap with probability ``p``, Gaussian of spread
``|a - b| / s`` around the neighbour's value), passes are independent and vectorised, and the result is
reproducible from ``seed``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence

import numpy as np
from pydantic import Field, model_validator

from kdistill.configbase import Strict
from kdistill.errors import DataError


class MungeConfig(Strict):
    """``data.transfer.munge``: pseudo-rows near the training rows, labelled by the teacher (Bucila et al. 2006)."""

    size: Optional[int] = Field(None, ge=1, description="number of MUNGE rows (or give multiplier)")
    multiplier: Optional[int] = Field(None, ge=1, description="passes over the training rows: multiplier x n rows")
    p: float = Field(0.5, ge=0, le=1, description="probability that an attribute is swapped / redrawn")
    s: float = Field(1.0, gt=0, description="local spread divisor: sd = |a - b| / s")
    seed: int = Field(0, description="seed of the MUNGE draws")
    nominal: list[int] = Field(default_factory=list, description="column indices of nominal (categorical) "
                                                                 "attributes; the others are continuous")

    @model_validator(mode="after")
    def _one_size(self) -> "MungeConfig":
        if (self.size is None) == (self.multiplier is None):
            raise ValueError("give exactly one of size (rows) or multiplier (passes), e.g. munge: {multiplier: 10}")
        return self


class MungeTransfer(Strict):
    """``data.transfer: {munge: {...}}`` in the files form of ``data:``: the transfer set is MUNGE rows of the
    training split (made after it is read, standardised and cut to train_size)."""

    munge: MungeConfig
    fraction: ClassVar[None] = None  # read like a `SourceConfig` by the data section's checks

    def origin(self) -> str:
        return "MUNGE rows of the training split"


def transfer_form(value: Any) -> str:
    """The union tag of a files-form ``data.transfer`` value: ``munge`` or a source."""
    munge_keyed = isinstance(value, dict) and "munge" in value
    return "munge" if munge_keyed or isinstance(value, MungeTransfer) else "source"


def neighbour_features(x: np.ndarray, nominal: Sequence[int] = ()) -> np.ndarray:
    """The embedding whose Euclidean distance is MUNGE's: standardised continuous columns, and each nominal column
    one-hot encoded and scaled by 1/sqrt(2) (two different one-hot vectors are then at distance 1)."""
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    x = np.asarray(x, dtype=np.float64)
    nominal = sorted(set(int(c) for c in nominal))
    continuous = [c for c in range(x.shape[1]) if c not in nominal]
    parts = []
    if continuous:
        parts.append(StandardScaler().fit_transform(x[:, continuous]))  # a constant column scales to 0
    if nominal:
        onehot = OneHotEncoder(sparse_output=False, handle_unknown="ignore").fit_transform(x[:, nominal])
        parts.append(onehot / np.sqrt(2.0))
    return np.concatenate(parts, axis=1)


def nearest_neighbours(x: np.ndarray, nominal: Sequence[int] = ()) -> np.ndarray:
    """For each row, the index of its nearest other row under MUNGE's distance."""
    from sklearn.neighbors import NearestNeighbors

    features = neighbour_features(x, nominal)
    # kneighbors() without query points leaves each point out of its own neighbours
    return NearestNeighbors(n_neighbors=1).fit(features).kneighbors(return_distance=False)[:, 0]


def munge(x: np.ndarray, *, size: Optional[int] = None, multiplier: Optional[int] = None, p: float = 0.5,
          s: float = 1.0, seed: int = 0, nominal: Sequence[int] = ()) -> np.ndarray:
    """MUNGE rows from the table `x` (``n x d``, numeric; nominal columns hold category codes): ``multiplier * n``
    rows, or `size` rows. Returns float64 rows whose nominal columns only hold values seen in that column."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise DataError(f"MUNGE needs a table of rows x attributes, got inputs of shape {x.shape}",
                        where="data.transfer.munge", fix="use it on tabular data (one feature vector per row)")
    n, d = x.shape
    if n < 2:
        raise DataError(f"MUNGE needs at least 2 training rows to find neighbours, got {n}",
                        where="data.transfer.munge")
    if not np.isfinite(x).all():
        raise DataError("MUNGE inputs contain NaN or Inf", where="data.transfer.munge", fix="impute them first")
    bad = [c for c in nominal if not 0 <= int(c) < d]
    if bad:
        raise DataError(f"nominal column {bad[0]} is outside the table's {d} columns",
                        where="data.transfer.munge.nominal", fix=f"use column indices 0..{d - 1}")
    if (size is None) == (multiplier is None):
        raise DataError("give exactly one of size or multiplier", where="data.transfer.munge")
    if not 0 <= p <= 1 or s <= 0:
        raise DataError(f"MUNGE needs 0 <= p <= 1 and s > 0, got p={p}, s={s}", where="data.transfer.munge")
    total = size if size is not None else multiplier * n
    passes = -(-total // n)
    neighbour = x[nearest_neighbours(x, nominal)]
    is_nominal = np.zeros(d, dtype=bool)
    is_nominal[list(int(c) for c in nominal)] = True
    spread = np.abs(x - neighbour) / s
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(passes):
        swap = rng.random((n, d)) < p
        noise = rng.standard_normal((n, d))
        drawn = np.where(is_nominal, neighbour, neighbour + spread * noise)
        rows.append(np.where(swap, drawn, x))
    return np.concatenate(rows)[:total]


def munge_config_rows(x: np.ndarray, cfg: MungeConfig) -> np.ndarray:
    """`munge` with the settings of a ``data.transfer.munge`` section."""
    return munge(x, size=cfg.size, multiplier=cfg.multiplier, p=cfg.p, s=cfg.s, seed=cfg.seed, nominal=cfg.nominal)


def with_munge(bundle, cfg: MungeConfig, where: str = "data.transfer.munge"):
    """`bundle` with MUNGE rows of its training inputs added to its transfer set (unlabeled: the teacher labels
    them). The inputs must be rows of features, ``(n, d)``."""
    import torch

    from kdistill.data.arrays import ArrayDataset, concat

    x = bundle.train.tensors["x"]
    if x.dim() != 2:
        raise DataError(f"MUNGE makes rows of a table, but the training inputs have shape {tuple(x.shape)}",
                        where=where, fix="use tabular data (one feature vector per row) or remove munge")
    rows = munge_config_rows(x.double().numpy(), cfg)
    made = ArrayDataset({"x": torch.from_numpy(rows.astype(np.float32))}, f"{bundle.name}-munge")
    bundle.transfer = made if bundle.transfer is None else concat(bundle.transfer, made, bundle.transfer.name)
    return bundle


__all__ = ["MungeConfig", "MungeTransfer", "munge", "munge_config_rows", "nearest_neighbours", "neighbour_features",
           "transfer_form", "with_munge"]
