"""One call from Python: ``kdistill.distill(teacher, student, train, test=..., transfer=...)``.

It runs the offline job of the CLI on the caller's models and data, on the same skeleton (`SchemeJob`,
`run_stage`, `RunDir`): stages ``teacher`` (only with ``train_teacher=True``), ``baseline`` and ``student``, a
teacher at chance level reported before distillation, the run directory (checkpoints, ``metrics.jsonl``, weights
with their SHA-256, ``summary.json``) and the comparison table. Calling it again with the same arguments and
``out`` resumes (finished stages are loaded, an interrupted one continues from its checkpoint).

Data: ``(x, y)`` pairs of numpy arrays (any real dtype: float64 from scikit-learn is converted to float32) or
tensors, a ``{"x": ..., "y": ...}`` mapping, an `ArrayDataset`, or any torch ``Dataset`` of ``(x, y)`` items;
``transfer`` (unlabeled inputs the teacher labels) takes ``x`` alone. The caller's models are not modified: the
stages train copies, returned in the result.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
import yaml
from torch import nn

from kdistill.config import parse_config
from kdistill.data import ArrayDataset, DataBundle, check_labels
from kdistill.data.arrays import as_inputs, as_labels
from kdistill.errors import ConfigError, DataError
from kdistill.evaluate.predictions import PREDICTIONS_FILE
from kdistill.progress import run_plan
from kdistill.report import summary_table
from kdistill.schemes.common import SchemeJob, teacher_train_config, train_ce
from kdistill.schemes.offline import summarize
from kdistill.tasks.job import RunDir
from kdistill.teachers.live import freeze

__all__ = ["DistillResult", "distill", "search", "to_dataset"]

GIVEN = "kdistill.api:given"  # the model name in the job's config: the models are the caller's objects


def given(*args, **kwargs):
    raise ConfigError("this run's models were passed to kdistill.distill as Python objects",
                      fix="call kdistill.distill again with the same models")


@dataclass
class DistillResult:
    """What `distill` returns: the trained models (copies), the summary (as in summary.json) and its table."""

    student: nn.Module
    teacher: nn.Module
    baseline: Optional[nn.Module]
    summary: dict
    table: str
    run_dir: Optional[Path]

    def __str__(self) -> str:
        return self.table


def to_dataset(data: Any, name: str, *, labelled: bool = True) -> ArrayDataset:
    """An `ArrayDataset` of `data` (see the module docstring); inputs float32, labels int64."""
    if isinstance(data, ArrayDataset):
        tensors = dict(data.tensors)
    elif isinstance(data, Mapping):
        tensors = dict(data)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and labelled:
        tensors = {"x": data[0], "y": data[1]}
    elif isinstance(data, torch.utils.data.TensorDataset):
        tensors = {"x": data.tensors[0], **({"y": data.tensors[1]} if len(data.tensors) > 1 else {})}
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        items = [data[i] for i in range(len(data))]
        first = items[0] if items else None
        if isinstance(first, (tuple, list)) and len(first) >= 2:
            tensors = {"x": torch.stack([torch.as_tensor(it[0]) for it in items]),
                       "y": torch.as_tensor([int(it[1]) for it in items])}
        else:
            tensors = {"x": torch.stack([torch.as_tensor(it[0] if isinstance(it, (tuple, list)) else it)
                                         for it in items])} if items else {}
    else:
        tensors = {"x": data}
    if "x" not in tensors:
        raise DataError(f"{name}: no inputs", fix="pass (x, y) arrays, {'x': ..., 'y': ...} or a Dataset")
    tensors["x"] = as_inputs(tensors["x"], f"{name}.x")
    if "y" in tensors:
        tensors["y"] = as_labels(tensors["y"], f"{name}.y")
    elif labelled:
        raise DataError(f"{name}: no labels", fix="pass (x, y): the student's labelled data")
    tensors.pop("index", None)
    return ArrayDataset(tensors, name)


def _bundle(train, test, transfer, num_classes: Optional[int], seed: int, log) -> DataBundle:
    train_set = to_dataset(train, "train")
    if test is None:  # hold out a fifth of the training rows, seeded
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
        cut = max(1, len(order) // 5)
        test_set = ArrayDataset({k: v[order[:cut]] for k, v in train_set.tensors.items() if k != "index"}, "test")
        train_set = ArrayDataset({k: v[order[cut:]] for k, v in train_set.tensors.items() if k != "index"}, "train")
        log(f"note: no test set given: {cut} of the training rows are held out for evaluation")
    else:
        test_set = to_dataset(test, "test")
    transfer_set = to_dataset(transfer, "transfer", labelled=False) if transfer is not None else None
    if transfer_set is not None:
        transfer_set.tensors.pop("y", None)
    if test_set.tensors["x"].shape[1:] != train_set.tensors["x"].shape[1:]:
        raise DataError(f"test inputs have shape {tuple(test_set.tensors['x'].shape[1:])} per row, train "
                        f"{tuple(train_set.tensors['x'].shape[1:])}", fix="give both the same features")
    if num_classes is None:
        labels = torch.cat([train_set.tensors["y"], test_set.tensors["y"]])
        num_classes = int(labels[labels != -100].max()) + 1
    bundle = DataBundle("arrays", train_set, test_set, num_classes, tuple(train_set.tensors["x"].shape[1:]),
                        transfer_set)
    check_labels(bundle.train, num_classes)
    check_labels(bundle.test, num_classes)
    return bundle


def _describe(model: nn.Module, name: str) -> dict:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{name} is a {type(model).__name__}, not a torch.nn.Module", where=name,
                          fix="pass the model object itself")
    import hashlib

    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode() + value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "params": sum(p.numel() for p in model.parameters()), "sha256": digest.hexdigest()}


def distill(teacher: nn.Module, student: nn.Module, train, *, test=None, transfer=None,
            out: Optional[Union[str, Path]] = None, steps: int = 1000, batch_size: int = 128, lr: float = 3e-3,
            alpha: float = 0.9, temperature: float = 4.0, terms: Optional[list] = None, baseline: bool = True,
            train_teacher: bool = False, teacher_train: Optional[dict] = None, num_classes: Optional[int] = None,
            seed: int = 0, eval_options: Optional[dict] = None, progress: bool = True, log: Callable[[str], None] = print,
            fresh: bool = False, weak_teacher: str = "warn", **train_options) -> DistillResult:
    """Distil `teacher` into `student` on `train` and measure both on `test`, as ``kdistill run`` does.

    Args:
        teacher, student: ``torch.nn.Module`` objects (not modified: the stages train copies).
        train: labelled data (see the module docstring); test: held-out labelled data (default: a fifth of
            `train`, seeded); transfer: extra unlabeled inputs labelled by the teacher.
        out: the run directory (None: keep nothing); the same call on the same `out` resumes.
        steps, batch_size, lr, **train_options: the ``train:`` section (e.g. ``checkpoint_every=100``).
        alpha, temperature, terms: the ``distill:`` section (Hinton KD by default; `terms` as in a config).
        baseline: also train the student on the labels alone, same budget.
        eval_options: the ``eval:`` section (e.g. ``{"latency_repeats": 10}``).
        train_teacher: train the teacher on `train` first (stage ``teacher``, `teacher_train` over `train`);
            otherwise it is used as given.
        weak_teacher: "warn" (default) or "refuse" when the teacher scores at chance level on `test`.
        fresh: forget what `out` holds and start over.
    """
    distill_section = {"alpha": alpha, "temperature": temperature, **({"terms": terms} if terms else {})}
    raw = {"seed": seed, "teacher": {"name": GIVEN, **({"train": dict(teacher_train or {})} if train_teacher else {})},
           "student": {"name": GIVEN}, "distill": distill_section, "baseline": baseline,
           "train": {"steps": steps, "batch_size": batch_size, "lr": lr, **train_options}, "eval": dict(eval_options or {})}
    cfg = parse_config(raw, "kdistill.distill")
    bundle = _bundle(train, test, transfer, num_classes, seed, log)
    settings = _settings(cfg)
    identity = {"api": "kdistill.distill", "teacher": {**_describe(teacher, "teacher"), **settings.pop("teacher")},
                "student": _describe(student, "student"),
                "data": {part: {"rows": len(ds), "fingerprint": ds.fingerprint()}
                         for part, ds in (("train", bundle.train), ("test", bundle.test),
                                          ("transfer", bundle.transfer)) if ds is not None},
                "num_classes": bundle.num_classes, "train_teacher": train_teacher, **settings}
    folder = RunDir(out, identity, dump=lambda c: yaml.safe_dump(c, sort_keys=False),
                    load=lambda path: yaml.safe_load(Path(path).read_text()), log=log)
    if fresh:
        folder.reset(fresh=True, log=log)
    folder.claim()
    job = SchemeJob(cfg, bundle, folder, progress, log, False, weak_teacher)
    teacher_cfg = teacher_train_config(cfg.teacher, cfg.train) if train_teacher else None
    stages = {**({"teacher": teacher_cfg.steps} if teacher_cfg else {}),
              **({"baseline": cfg.train.steps} if baseline else {}), "student": cfg.train.steps}
    with run_plan({k: v for k, v in stages.items() if not (folder and folder.file(f"{k}.safetensors").is_file())}):
        trained_teacher = copy.deepcopy(teacher)
        if teacher_cfg is not None:
            trained_teacher = train_ce("teacher", trained_teacher, bundle.train, teacher_cfg, seed=seed + 1,
                                       eval_fn=job.accuracy_eval(teacher_cfg), **job.stage_options)
        trained_teacher = freeze(trained_teacher)
        job.check_teacher(trained_teacher)
        base = None
        if baseline:
            base = train_ce("baseline", copy.deepcopy(student), bundle.train, cfg.train, seed=seed + 2,
                            eval_fn=job.accuracy_eval(cfg.train), **job.stage_options)
        trained = job.distill("student", copy.deepcopy(student), trained_teacher, bundle.distill_set(),
                              seed=seed + 3, eval_fn=job.accuracy_eval(cfg.train))
    summary = summarize(trained_teacher, trained, base, job, predictions=folder.file(PREDICTIONS_FILE))
    summary["audit"] = {"ran": False}  # as in a CLI run without an audit: section (`kdistill audit` audits a config)
    folder.write_summary(summary)
    return DistillResult(trained, trained_teacher, base, summary, summary_table(summary), folder.path)


def _settings(cfg) -> dict:
    """The job's settings as the CLI's config.yaml writes them, resolved (data and models are objects: left out)."""
    from kdistill.tasks import dump_config

    settings = yaml.safe_load(dump_config(cfg))
    for key in ("task", "data", "scheme", "student"):
        settings.pop(key, None)
    settings["teacher"] = {"train": settings["teacher"]["train"]}
    return settings


def search(config: Union[str, Path], *, trials: int, out: Optional[Union[str, Path]] = None,
           storage: Optional[str] = None, jobs: int = 1, constraints: tuple = (), overrides: tuple = (),
           progress: bool = False, log: Callable[[str], None] = print) -> dict:
    """``kdistill search CONFIG`` from Python: an Optuna study over the config's ``search:`` section (resumed when
    its storage already holds it); returns the search record (trials, Pareto front, best trial) also written to
    ``OUT/search.json``, with ``OUT/best.yaml`` and ``OUT/report.html`` (docs/search.md)."""
    from kdistill.search import search as run_search

    return run_search(config, trials=trials, out=out, storage=storage, jobs=jobs, constraints=constraints,
                      overrides=overrides, progress=progress, log=log)
