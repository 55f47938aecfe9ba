"""Writes breast_cancer_train.csv and breast_cancer_test.csv (examples/breast_cancer.yaml) from the Wisconsin
breast cancer table that ships inside scikit-learn (569 rows, column `target`: 0 malignant, 1 benign). Of its 30
features the 10 means and the 10 "worst" values are kept (the 10 standard errors are left out to keep the files
small).

    python examples/data/make_breast_cancer.py

The rows are shuffled with seed 0 and split 455 / 114; values are written with 4 significant digits, the
table's own precision (every value reads back exactly), so the files are byte-identical on every run.
"""

from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer

HERE = Path(__file__).resolve().parent


def main() -> None:
    frame = load_breast_cancer(as_frame=True).frame
    frame = frame.iloc[np.random.default_rng(0).permutation(len(frame))].reset_index(drop=True)
    frame.columns = [c.replace(" ", "_") for c in frame.columns]
    frame = frame[[c for c in frame.columns if not c.endswith("_error")]]
    for name, part in (("train", frame.iloc[:455]), ("test", frame.iloc[455:])):
        part.to_csv(HERE / f"breast_cancer_{name}.csv", index=False, float_format="%.4g")


if __name__ == "__main__":
    main()
