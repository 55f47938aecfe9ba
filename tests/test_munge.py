"""MUNGE (Bucila et al. 2006) against an independent small computation of the paper's procedure."""

import numpy as np
import pytest

from kdistill.data.munge import MungeConfig, munge, nearest_neighbours
from kdistill.errors import DataError


def table(n=120, seed=0):
    """3 continuous columns on different scales, 2 nominal columns (codes {0, 1, 2} and {5, 7})."""
    rng = np.random.default_rng(seed)
    cont = rng.normal(size=(n, 3)) * np.array([1.0, 100.0, 0.01]) + np.array([0.0, 50.0, 3.0])
    nom = np.stack([rng.integers(0, 3, n), rng.choice([5, 7], n)], axis=1)
    return np.concatenate([cont[:, :2], nom[:, :1], cont[:, 2:], nom[:, 1:]], axis=1), [2, 4]


def reference_neighbours(x, nominal):
    """Brute force, float64: squared distance = sum over continuous columns of the standardised difference
    squared + the number of nominal mismatches; the nearest other row."""
    cont = [c for c in range(x.shape[1]) if c not in nominal]
    z = (x[:, cont] - x[:, cont].mean(0)) / x[:, cont].std(0)
    out = []
    for i in range(len(x)):
        dist = ((z - z[i]) ** 2).sum(1) + sum((x[:, c] != x[i, c]).astype(float) for c in nominal)
        dist[i] = np.inf
        out.append(int(np.argmin(dist)))
    return np.array(out)


def test_neighbours_match_a_brute_force_reference():
    x, nominal = table()
    assert (nearest_neighbours(x, nominal) == reference_neighbours(x, nominal)).all()


def test_distribution_follows_the_paper():
    x, nominal = table()
    n, d = x.shape
    p, s, k = 0.3, 2.0, 40
    out = munge(x, multiplier=k, p=p, s=s, seed=1, nominal=nominal)
    assert out.shape == (k * n, d)
    nb = x[reference_neighbours(x, nominal)]
    orig, neigh = np.tile(x, (k, 1)), np.tile(nb, (k, 1))
    changed = out != orig
    differs = orig != neigh  # where swapping can be seen at all
    # the fraction of attributes swapped / redrawn is p (binomial, ~4 standard errors)
    for c in range(d):
        m = differs[:, c]
        frac = changed[m, c].mean()
        assert abs(frac - p) < 4 * np.sqrt(p * (1 - p) / m.sum()), (c, frac)
    for c in nominal:  # nominal: the neighbour's value exactly, values stay in the column's set
        assert set(np.unique(out[:, c])) <= set(np.unique(x[:, c]))
        assert (out[changed[:, c], c] == neigh[changed[:, c], c]).all()
    for c in [c for c in range(d) if c not in nominal]:  # continuous: N(neighbour, |a - b| / s)
        m = changed[:, c]
        z = (out[m, c] - neigh[m, c]) / (np.abs(orig[m, c] - neigh[m, c]) / s)
        assert abs(z.mean()) < 4 / np.sqrt(m.sum()) and abs(z.std() - 1) < 0.08, (c, z.mean(), z.std())
        # unchanged attributes keep the original value exactly
        assert (out[~m, c] == orig[~m, c]).all()


def test_extremes_size_and_seed():
    x, nominal = table(n=40)
    assert np.array_equal(munge(x, multiplier=2, p=0.0, nominal=nominal), np.tile(x, (2, 1)))
    every = munge(x, multiplier=1, p=1.0, nominal=nominal, seed=3)
    nb = x[reference_neighbours(x, nominal)]
    assert np.array_equal(every[:, nominal], nb[:, nominal])
    assert munge(x, size=55, seed=2).shape == (55, x.shape[1])
    assert np.array_equal(munge(x, size=55, seed=2), munge(x, size=55, seed=2))
    assert not np.array_equal(munge(x, size=55, seed=2), munge(x, size=55, seed=4))


def test_bad_inputs_are_one_line_errors():
    x, _ = table(n=10)
    with pytest.raises(DataError, match="nominal column 9"):
        munge(x, multiplier=1, nominal=[9])
    with pytest.raises(DataError, match="table of rows"):
        munge(np.zeros((4, 2, 2)), multiplier=1)
    with pytest.raises(DataError, match="at least 2"):
        munge(x[:1], multiplier=1)
    with pytest.raises(ValueError, match="exactly one of size"):
        MungeConfig(size=3, multiplier=2)


def test_config_transfer_munge_for_a_table_and_refused_for_images(tmp_path):
    """``data.transfer: {munge: ...}``: the files form makes MUNGE rows of the training split it read; the built-in
    form refuses image inputs with one line."""
    import pandas as pd

    from kdistill.config import parse_config
    from kdistill.data import load_data

    x, nominal = table(n=60)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    frame["label"] = (x[:, 0] > 0).astype(int)
    frame.to_csv(tmp_path / "t.csv", index=False)
    munge_cfg = {"multiplier": 3, "p": 0.4, "seed": 5, "nominal": nominal}
    cfg = parse_config({"data": {"train": str(tmp_path / "t.csv"), "test": {"fraction": 0.25},
                                 "transfer": {"munge": munge_cfg}},
                        "teacher": {"kind": "api", "call": "tests.test_api_teacher:linear_teacher"},
                        "student": {"name": "mlp"}})
    bundle = load_data(cfg.data)
    train = bundle.train.tensors["x"].double().numpy()
    want = munge(train, multiplier=3, p=0.4, seed=5, nominal=nominal)
    assert np.allclose(bundle.transfer.tensors["x"].numpy(), want.astype(np.float32))
    assert len(bundle.transfer) == 3 * len(bundle.train) and "y" not in bundle.transfer.tensors
    digits = parse_config({"data": {"name": "digits", "transfer": {"munge": {"size": 10}}},
                           "teacher": {"kind": "api", "call": "tests.test_api_teacher:linear_teacher"},
                           "student": {"name": "mlp"}})
    with pytest.raises(DataError, match=r"rows of a table.*\(data.transfer.munge\)"):
        load_data(digits.data)


def test_blackbox_doc_numbers_come_from_the_committed_result():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = json.loads((root / "benchmarks" / "results" / "data_free_tabular.json").read_text())
    text = " ".join((root / "docs" / "blackbox.md").read_text().split())
    names = ("ensemble_top1", "real_labels_top1", "munge_top1")
    for f in result["tabular_folds"]:
        assert "| " + " | ".join([str(f["fold"])] + [f"{100 * f[n]:.2f}" for n in names]) + " |" in text
    assert "| mean ± std | " + " | ".join(f"{100 * result[n]['mean']:.2f} ± {100 * result[n]['std']:.2f}"
                                         for n in names) + " |" in text
    assert f"keeps **{100 * result['munge_retention']:.1f} %** of the ensemble" in text
    acceptance = result["tabular_acceptance"]
    assert acceptance["munge_keeps_98pct_of_ensemble"] and "(target >= 98 %: met)" in text
    assert not acceptance["munge_beats_real_labels"] and "does **not** beat the MLP" in text
    assert f"took {result['seconds']:.0f} s at 1 thread" in text and not result["quick"]
