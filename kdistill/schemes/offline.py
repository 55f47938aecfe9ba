"""Offline distillation from a frozen teacher (Hinton, Vinyals, Dean 2015), as a plan of stages.

Stages, each one `Engine.fit` with its own checkpoints under ``RUN_DIR/checkpoints/<stage>/``:
1. ``teacher``  (only when no teacher weights are given): the teacher is trained on the labelled data;
2. ``baseline`` (when ``baseline: true``): the student trained on labels alone, same steps and batch size;
3. ``student``: the student trained with the configured objective on the labelled data plus the transfer set
   (whose rows have no labels: CE counts only labelled rows, the teacher's terms count every row).
A stage whose weights file exists is done and is skipped on a re-run; an interrupted stage resumes from its
newest good checkpoint. Then every model is evaluated and ``summary.json`` is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from kdistill.config import RunConfig, TrainConfig, dump_config, load_config, parse_config
from kdistill.data import DataBundle, check_labels, load_data
from kdistill.data.augment import maybe_augment
from kdistill.distiller import Distiller, Term, split_taps, terms_from_config
from kdistill.engine import Engine
from kdistill.engine.checkpoint import atomic_write_bytes, load_weights, save_weights
from kdistill.errors import CheckpointError, ConfigError, KDError
from kdistill.evaluate import accuracy, agreement, cost_report, expected_calibration_error, predict_logits
from kdistill.models import build_model
from kdistill.models.loading import load_into, load_state_dict_file
from kdistill.seeding import seeded_build
from kdistill.taps import Taps


def _model(cfg_model, bundle: DataBundle, seed: int, where: str) -> nn.Module:
    return seeded_build(seed, lambda: build_model(cfg_model.name, cfg_model.kwargs, input_shape=bundle.input_shape,
                                                  num_classes=bundle.num_classes, where=where))


def prepare_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    """Create the run directory and write the resolved config; refuse a directory of a different run."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KDError(f"cannot create the run directory {run_dir}: {err.strerror or err}",
                      fix="choose a writable --out directory") from None
    resolved = dump_config(cfg)
    existing = run_dir / "config.yaml"
    if existing.is_file():
        try:
            old = dump_config(load_config(existing))
        except ConfigError:
            old = None
        if old != resolved:
            raise ConfigError(f"{run_dir} holds a run with a different config.yaml",
                              fix="use another --out directory, or delete this one to start over")
        return
    atomic_write_bytes(existing, resolved.encode())


def evaluate_model(model: nn.Module, bundle: DataBundle, eval_cfg, teacher_logits=None) -> dict:
    logits = predict_logits(model, bundle.test)
    labels = bundle.test.tensors["y"]
    example = bundle.test.tensors["x"][:1]
    report = {"accuracy": accuracy(logits, labels),
              "ece": expected_calibration_error(logits, labels, eval_cfg.ece_bins)}
    if teacher_logits is not None:
        report["agreement"] = agreement(logits, teacher_logits)
    report.update(cost_report(model, example, latency_repeats=eval_cfg.latency_repeats,
                              throughput_batch=eval_cfg.throughput_batch))
    return report


def _accuracy_eval(bundle: DataBundle) -> Callable[[nn.Module], dict]:
    def fn(model: nn.Module) -> dict:
        return {"accuracy": accuracy(predict_logits(model, bundle.test), bundle.test.tensors["y"])}
    return fn


def train_stage(name: str, run_dir: Optional[Path], train_cfg: TrainConfig, distiller: Distiller, data, seed: int,
                bundle: DataBundle, progress: bool = True, log=print) -> nn.Module:
    """Run one stage (or resume it) and save ``<name>.safetensors``; skip it if that file exists."""
    weights_path = run_dir / f"{name}.safetensors" if run_dir else None
    student = distiller.export_student()
    if weights_path is not None and weights_path.is_file():
        try:
            student.load_state_dict(load_weights(weights_path))
        except CheckpointError as err:  # damaged: the stage's final checkpoint holds the same weights
            log(f"warning: {err}; re-creating it from the stage's checkpoints")
        else:
            log(f"[{name}] done earlier: loaded {weights_path}")
            return student
    engine = Engine(train_cfg, run_dir, stage=name, seed=seed, progress=progress, log=log)
    result = engine.fit(distiller, data, eval_fn=_accuracy_eval(bundle) if train_cfg.eval_every else None)
    student = distiller.export_student()
    if weights_path is not None and engine.accelerator.is_main_process:
        save_weights(weights_path, student.state_dict(), {"stage": name, "steps": result["steps"]})
    return student


def run(cfg: RunConfig, run_dir: Optional[Path], *, progress: bool = True, log=print,
        trust_checkpoint: bool = False) -> dict:
    """The offline KD job of a config: teacher (trained or loaded), baseline, KD student, evaluation.

    Every stage's wiring is checked on one batch before the first stage trains (`kdistill.wiring.preflight`).
    `trust_checkpoint` allows full unpickling of a .pt/.pth `teacher.weights` (arbitrary code: trusted files only).
    """
    if run_dir is not None:
        run_dir = Path(run_dir)
        prepare_run_dir(cfg, run_dir)
    bundle = load_data(cfg.data)
    check_labels(bundle.train, bundle.num_classes)
    check_labels(bundle.test, bundle.num_classes)

    teacher = _model(cfg.teacher, bundle, cfg.seed + 101, "teacher")
    terms = terms_from_config(cfg.distill.resolved_terms())
    student_taps, teacher_taps = split_taps(terms, cfg.distill.taps)
    if cfg.teacher.cache is not None:  # a top-k cache that cannot serve the terms is refused before any training
        from kdistill.teachers.setup import cache_spec

        cache_spec(cfg.teacher.cache, terms)
    # resolve every tap path now (a TapError naming the closest modules) rather than after training the teacher
    Taps(teacher, teacher_taps)
    Taps(_model(cfg.student, bundle, cfg.seed + 202, "student"), student_taps)
    if cfg.teacher.weights:
        state = load_state_dict_file(cfg.teacher.weights, where="teacher.weights", trust=trust_checkpoint)
        load_into(teacher, state, where="teacher.weights", source=cfg.teacher.weights)
    _preflight(cfg, bundle, teacher if cfg.teacher.weights else None, terms, student_taps, teacher_taps)
    if not cfg.teacher.weights:
        teacher_train = cfg.teacher.train or cfg.train
        if cfg.train.deterministic and not teacher_train.deterministic:  # deterministic covers the whole run
            teacher_train = teacher_train.model_copy(update={"deterministic": True})
        teacher = train_stage("teacher", run_dir, teacher_train, Distiller(teacher, None, [Term("ce", "ce")]),
                              maybe_augment(bundle.train, cfg.data.augment, cfg.seed), cfg.seed + 1, bundle,
                              progress, log)
    teacher.eval()

    baseline = None
    if cfg.baseline:
        base_model = _model(cfg.student, bundle, cfg.seed + 202, "student")
        baseline = train_stage("baseline", run_dir, cfg.train, Distiller(base_model, None, [Term("ce", "ce")]),
                               maybe_augment(bundle.train, cfg.data.augment, cfg.seed), cfg.seed + 2, bundle,
                               progress, log)

    student = _model(cfg.student, bundle, cfg.seed + 202, "student")
    student_data = maybe_augment(bundle.distill_set(), cfg.data.augment, cfg.seed)
    student_teacher = teacher
    if cfg.teacher.cache is not None and not (run_dir is not None and (run_dir / "student.safetensors").is_file()):
        # build the cache if missing, continue a partial one, reuse a valid one, refuse a stale one
        student_teacher = teacher_cache(cfg, run_dir, teacher, teacher_taps, terms, student_data, progress=progress,
                                        log=log) or teacher
    distiller = Distiller(student, student_teacher, terms, student_taps=student_taps, teacher_taps=teacher_taps)
    student = train_stage("student", run_dir, cfg.train, distiller, student_data, cfg.seed + 3, bundle,
                          progress, log)
    summary = summarize(teacher, student, baseline, bundle, cfg)
    if run_dir is not None:
        atomic_write_bytes(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def teacher_cache(cfg: RunConfig, run_dir: Optional[Path], teacher: nn.Module, teacher_taps: dict, terms, data, *,
                  rebuild: bool = False, progress: bool = True, log=print):
    """The `CachedTeacher` of `teacher.cache` for the student stage's data (None when no term reads the teacher)."""
    from kdistill.teachers.live import LiveTeacher
    from kdistill.engine import get_accelerator
    from kdistill.teachers.setup import prepare_cache

    return prepare_cache(LiveTeacher(teacher, teacher_taps), data, cfg.teacher.cache, terms, run_dir,
                         batch_size=max(cfg.train.batch_size, 256),
                         accelerator=get_accelerator(cfg.train.mixed_precision), rebuild=rebuild,
                         progress=progress, log=log)


def build_teacher_cache(cfg: RunConfig, run_dir: Path, *, rebuild: bool = False, progress: bool = True, log=print,
                        trust_checkpoint: bool = False):
    """`kdistill cache build`: the teacher (loaded, or trained as the run's ``teacher`` stage), then its cache."""
    if cfg.teacher is None or cfg.teacher.cache is None:
        raise ConfigError("the config has no teacher.cache", where="teacher.cache",
                          fix="add e.g. 'cache: {kind: dense}' under teacher")
    from kdistill.teachers.setup import cache_spec

    terms = terms_from_config(cfg.distill.resolved_terms())
    cache_spec(cfg.teacher.cache, terms)  # refuse a top-k cache that cannot serve the terms before any training
    run_dir = Path(run_dir)
    prepare_run_dir(cfg, run_dir)
    bundle = load_data(cfg.data)
    teacher = _model(cfg.teacher, bundle, cfg.seed + 101, "teacher")
    if cfg.teacher.weights:
        state = load_state_dict_file(cfg.teacher.weights, where="teacher.weights", trust=trust_checkpoint)
        load_into(teacher, state, where="teacher.weights", source=cfg.teacher.weights)
    else:
        teacher_train = cfg.teacher.train or cfg.train
        if cfg.train.deterministic and not teacher_train.deterministic:
            teacher_train = teacher_train.model_copy(update={"deterministic": True})
        teacher = train_stage("teacher", run_dir, teacher_train, Distiller(teacher, None, [Term("ce", "ce")]),
                              maybe_augment(bundle.train, cfg.data.augment, cfg.seed), cfg.seed + 1, bundle,
                              progress, log)
    _, teacher_taps = split_taps(terms, cfg.distill.taps)
    data = maybe_augment(bundle.distill_set(), cfg.data.augment, cfg.seed)
    return teacher_cache(cfg, run_dir, teacher.eval(), teacher_taps, terms, data, rebuild=rebuild,
                         progress=progress, log=log)


def _preflight(cfg: RunConfig, bundle: DataBundle, teacher: Optional[nn.Module], terms, student_taps, teacher_taps):
    """Dry-run every stage on throw-away models (a loaded teacher is used as is: it stays frozen) before any
    training, so a student-stage mistake is reported before the teacher trains."""
    from kdistill.engine import get_accelerator
    from kdistill.wiring import preflight

    fresh_teacher = teacher is None
    teacher = teacher if teacher is not None else _model(cfg.teacher, bundle, cfg.seed + 101, "teacher")
    # the student stage first: it holds both models, so a fault is reported with the right role
    stages = [("student", Distiller(_model(cfg.student, bundle, cfg.seed + 202, "student"), teacher, terms,
                                    student_taps=student_taps, teacher_taps=teacher_taps),
               bundle.distill_set(), cfg.train)]
    if cfg.baseline:
        stages.append(("baseline", Distiller(_model(cfg.student, bundle, cfg.seed + 202, "student"), None,
                                             [Term("ce", "ce")]), bundle.train, cfg.train))
    if fresh_teacher:
        stages.append(("teacher", Distiller(_model(cfg.teacher, bundle, cfg.seed + 101, "teacher"), None,
                                            [Term("ce", "ce")]), bundle.train, cfg.teacher.train or cfg.train))
    acc = get_accelerator(cfg.train.mixed_precision)
    preflight(stages, device=acc.device, world_size=acc.num_processes, num_classes=bundle.num_classes)
    if not fresh_teacher:
        teacher.cpu()


def summarize(teacher: nn.Module, student: nn.Module, baseline: Optional[nn.Module], bundle: DataBundle,
              cfg: RunConfig) -> dict:
    teacher_logits = predict_logits(teacher, bundle.test)
    summary = {"dataset": bundle.name, "teacher": evaluate_model(teacher, bundle, cfg.eval)}
    summary["student"] = evaluate_model(student, bundle, cfg.eval, teacher_logits)
    if baseline is not None:
        summary["baseline"] = evaluate_model(baseline, bundle, cfg.eval, teacher_logits)
    t, s = summary["teacher"], summary["student"]
    summary["retention"] = s["accuracy"] / t["accuracy"] if t["accuracy"] else float("nan")
    summary["compression"] = t["params"] / s["params"]
    summary["speedup"] = t["latency_ms"] / s["latency_ms"]
    return summary


def evaluate_run_dir(run_dir: Path, *, log=print, trust_checkpoint: bool = False) -> dict:
    """Re-evaluate a finished run directory from its config and weights files (``kdistill eval DIR``)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    bundle = load_data(cfg.data)
    teacher = _model(cfg.teacher, bundle, cfg.seed + 101, "teacher")
    teacher_path = cfg.teacher.weights or run_dir / "teacher.safetensors"
    load_into(teacher, load_state_dict_file(teacher_path, where="teacher.weights", trust=trust_checkpoint),
              where="teacher.weights", source=str(teacher_path))
    student = _model(cfg.student, bundle, cfg.seed + 202, "student")
    student.load_state_dict(load_state_dict_file(run_dir / "student.safetensors", where="student.safetensors"))
    baseline = None
    if (run_dir / "baseline.safetensors").is_file():
        baseline = _model(cfg.student, bundle, cfg.seed + 202, "student")
        baseline.load_state_dict(load_state_dict_file(run_dir / "baseline.safetensors", where="baseline"))
    summary = summarize(teacher, student, baseline, bundle, cfg)
    atomic_write_bytes(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def config_from_dict(data: dict) -> RunConfig:
    return parse_config(data, "config")
