"""The Bucila setting (Bucila, Caruana, Niculescu-Mizil 2006): a gradient-boosting ensemble, reached only as a
black box, labels MUNGE pseudo-rows; a small MLP learns from them.

scikit-learn's breast-cancer table (569 rows, 30 continuous features, 2 classes), stratified 5-fold
cross-validation. In each fold the outer training part is split 80/20 (stratified) into the rows every model
learns from and an inner validation split (early stopping and the choice of learning rate / weight decay for both
MLPs); features are standardised with the learning rows' statistics. Per fold:

- ``ensemble_top1``: `GradientBoostingClassifier` (scikit-learn defaults) fit on the learning rows, saved with
  `kdistill.teachers.sklearn_teacher.fit_sklearn_teacher`;
- ``real_labels_top1``: the MLP (30-64-64-2, ReLU, Adam) on the real labels of the learning rows;
- ``munge_top1``: the same MLP on MUNGE rows of the learning rows (``multiplier`` x n, p, s below) plus the
  learning rows themselves, all labelled with the ensemble's probabilities through the black-box teacher path
  (`kdistill.teachers.api.ApiTeacher` over the callable ``kdistill.teachers.sklearn_teacher:sklearn_teacher``,
  with its answer cache), trained on those soft targets (cross-entropy to the probabilities).

Both MLPs get the same grid (learning rate x weight decay), the same early stopping (best inner-validation
log-loss, patience in epochs) and the same architecture; test accuracy is measured on the held-out fold.

    python benchmarks/data_free_tabular.py --json benchmarks/results/data_free_tabular.json     # ~3 min, 1 thread
    python benchmarks/data_free_tabular.py --quick --json /tmp/tabular_quick.json               # a check

`run(quick)` returns the result's keys (benchmarks/data_free.py merges them into its own result).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from kdistill.provenance import git_revision  # noqa: E402

HIDDEN = (64, 64)


def settings(quick: bool) -> dict:
    return {"folds": 2 if quick else 5, "seed": 0, "inner_validation": 0.2, "hidden": list(HIDDEN),
            "grid": {"lr": [3e-3] if quick else [1e-3, 3e-3], "weight_decay": [0.0] if quick else [0.0, 1e-3]},
            "real": {"batch_size": 32, "max_epochs": 60 if quick else 300, "patience": 30},
            "munge": {"multiplier": 5 if quick else 20, "p": 0.5, "s": 1.0, "batch_size": 128,
                      "max_epochs": 10 if quick else 60, "patience": 10},
            "teacher": "gradient_boosting (scikit-learn defaults)"}


def mlp(inputs: int, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers, width = [], inputs
    for h in HIDDEN:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, classes))


def soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to target distributions (one-hot rows for real labels)."""
    return -(targets * torch.log_softmax(logits, -1)).sum(-1).mean()


def train_mlp(x, targets, x_val, y_val, *, lr, weight_decay, batch_size, max_epochs, patience, seed):
    """Adam on soft targets; the weights of the epoch with the best validation log-loss (early stopping)."""
    model = mlp(x.shape[1], targets.shape[1], seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch, since = float("inf"), None, 0, 0
    for epoch in range(max_epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad()
            soft_ce(model(x[idx]), targets[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = float(nn.functional.cross_entropy(model(x_val), y_val))
        if val < best - 1e-6:
            best, best_state, best_epoch, since = val, {k: v.clone() for k, v in model.state_dict().items()}, epoch, 0
        else:
            since += 1
            if since >= patience:
                break
    model.load_state_dict(best_state)
    return model, best, best_epoch


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def tuned(x, targets, x_val, y_val, grid, opts, seed):
    """The grid point with the best validation log-loss, and its record."""
    best = None
    for lr in grid["lr"]:
        for wd in grid["weight_decay"]:
            model, loss, epoch = train_mlp(x, targets, x_val, y_val, lr=lr, weight_decay=wd, seed=seed, **opts)
            if best is None or loss < best[1]:
                best = (model, loss, {"lr": lr, "weight_decay": wd, "val_log_loss": loss, "best_epoch": epoch})
    return best[0], best[2]


def black_box_labels(teacher_path: Path, rows: np.ndarray, answers: Path, classes: int) -> tuple[np.ndarray, int]:
    """The ensemble's probabilities for `rows` through the black-box teacher path (callable + answer cache)."""
    from kdistill.teachers.api import ApiTeacher, CallableBackend
    from kdistill.teachers.api_cache import AnswerCache

    backend = CallableBackend("kdistill.teachers.sklearn_teacher:sklearn_teacher", {"path": str(teacher_path)})
    teacher = ApiTeacher(backend, AnswerCache(answers, backend.identity), batch_size=1024, log=lambda line: None)
    return teacher.probabilities(rows, classes, 0.0), teacher.requests


def fold(k: int, x_learn, y_learn, x_val, y_val, x_test, y_test, cfg: dict, workdir: Path) -> dict:
    from sklearn.preprocessing import StandardScaler

    from kdistill.data.munge import munge
    from kdistill.teachers.sklearn_teacher import fit_sklearn_teacher

    seed = cfg["seed"] + 1000 * k
    scaler = StandardScaler().fit(x_learn)
    x_learn, x_val, x_test = (scaler.transform(a).astype(np.float32) for a in (x_learn, x_val, x_test))
    classes = int(y_learn.max()) + 1
    t0 = time.perf_counter()
    path = fit_sklearn_teacher(x_learn, y_learn, workdir / f"teacher-{k}.joblib", model="gradient_boosting",
                               seed=seed)
    from kdistill.teachers.sklearn_teacher import sklearn_teacher

    ensemble = sklearn_teacher(str(path))
    ensemble_acc = float((ensemble(x_test).argmax(1) == y_test).mean())
    tv = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    xv, yv = tv(x_val), torch.from_numpy(y_val).long()
    xt, yt = tv(x_test), torch.from_numpy(y_test).long()
    onehot = torch.eye(classes)[torch.from_numpy(y_learn).long()]
    real, real_rec = tuned(tv(x_learn), onehot, xv, yv, cfg["grid"], {k2: cfg["real"][k2] for k2 in
                           ("batch_size", "max_epochs", "patience")}, seed)
    m = cfg["munge"]
    pseudo = munge(x_learn, multiplier=m["multiplier"], p=m["p"], s=m["s"], seed=seed).astype(np.float32)
    rows = np.concatenate([pseudo, x_learn])
    probs, requests = black_box_labels(path, rows, workdir / "answers.sqlite", classes)
    student, munge_rec = tuned(tv(rows), tv(probs), xv, yv, cfg["grid"],
                               {k2: m[k2] for k2 in ("batch_size", "max_epochs", "patience")}, seed)
    return {"fold": k, "ensemble_top1": ensemble_acc, "real_labels_top1": accuracy(real, xt, yt),
            "munge_top1": accuracy(student, xt, yt), "real_labels_choice": real_rec, "munge_choice": munge_rec,
            "munge_rows": int(len(pseudo)), "teacher_rows_labelled": int(len(rows)), "teacher_requests": requests,
            "seconds": round(time.perf_counter() - t0, 2)}


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_fold": values}


def run(quick: bool) -> dict:
    """The tabular result's keys: ``ensemble_top1``, ``real_labels_top1``, ``munge_top1`` (mean, std over folds,
    per-fold values), ``munge_retention`` and the issue's acceptance checks."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import StratifiedKFold, train_test_split

    cfg = settings(quick)
    data = load_breast_cancer()
    x, y = data.data.astype(np.float64), data.target.astype(np.int64)
    folds = []
    splitter = StratifiedKFold(n_splits=cfg["folds"], shuffle=True, random_state=cfg["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        for k, (train, test) in enumerate(splitter.split(x, y)):
            learn, val = train_test_split(train, test_size=cfg["inner_validation"], stratify=y[train],
                                          random_state=cfg["seed"] + k)
            folds.append(fold(k, x[learn], y[learn], x[val], y[val], x[test], y[test], cfg, Path(tmp)))
            print(json.dumps({key: folds[-1][key] for key in ("fold", "ensemble_top1", "real_labels_top1",
                                                              "munge_top1", "seconds")}), flush=True)
    out = {name: summary([f[name] for f in folds]) for name in ("ensemble_top1", "real_labels_top1", "munge_top1")}
    retention = out["munge_top1"]["mean"] / out["ensemble_top1"]["mean"]
    return {"tabular_dataset": "breast_cancer (scikit-learn, 569 x 30, 2 classes)", "tabular_settings": cfg,
            **out, "munge_retention": retention,
            "tabular_acceptance": {"munge_beats_real_labels": out["munge_top1"]["mean"] > out["real_labels_top1"]["mean"],
                                   "munge_keeps_98pct_of_ensemble": retention >= 0.98},
            "tabular_folds": folds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 folds, one grid point, short training")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = {"git_revision": git_revision(),
              "command": " ".join(["python", "benchmarks/data_free_tabular.py", *sys.argv[1:]]),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cores": len(os.sched_getaffinity(0)),
              "quick": args.quick, **run(args.quick)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    for name in ("ensemble_top1", "real_labels_top1", "munge_top1"):
        r = result[name]
        print(f"{name:18s} {100 * r['mean']:.2f} +- {100 * r['std']:.2f} %")
    print(f"munge_retention    {result['munge_retention']:.4f}   acceptance {result['tabular_acceptance']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
