"""Offline distillation from a frozen teacher (Hinton, Vinyals, Dean 2015), as a plan of stages.

Stages, each one `kdistill.tasks.job.run_stage` with its own checkpoints under ``RUN_DIR/checkpoints/<stage>/``:
1. ``teacher``  (only when no teacher weights are given): the teacher is trained on the labelled data;
2. ``baseline`` (when ``baseline: true``): the student trained on labels alone, same steps and batch size;
3. ``student``: the student trained with the configured objective on the labelled data plus the transfer set
   (whose rows have no labels: CE counts only labelled rows, the teacher's terms count every row), from the
   live teacher or from its stored outputs (``teacher.cache``).
A stage whose weights file exists is done and is skipped on a re-run; an interrupted stage resumes from its
newest good checkpoint. Then every model is evaluated and ``summary.json`` is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from torch import nn

from kdistill.configbase import Strict
from kdistill.data.augment import maybe_augment
from kdistill.distiller import Distiller, Term, split_taps
from kdistill.errors import ConfigError, KDError
from kdistill.evaluate import predict_logits
from kdistill.evaluate.predictions import PREDICTIONS_FILE
from kdistill.models.loading import load_into, load_state_dict_file
from kdistill.progress import run_plan
from kdistill.schemes.common import (TEACHER_SEED, SchemeJob, config_terms, load_configured_weights, scheme_run,
                                     teacher_train_config)
from kdistill.taps import Taps
from kdistill.teachers.live import freeze

if TYPE_CHECKING:
    from kdistill.config import RunConfig


class OfflineScheme(Strict):
    """A frozen teacher (trained first when it has no weights) teaches the student (Hinton et al. 2015)."""

    name: Literal["offline"] = "offline"


@scheme_run
def run(job: SchemeJob) -> dict:
    """The offline KD job of a config: teacher (trained or loaded), baseline, KD student, evaluation.

    Every stage's wiring is checked on one batch before the first stage trains (`kdistill.wiring.preflight`); a
    teacher at chance level on the test set is reported before the student stages (`SchemeJob.check_teacher`).
    """
    with run_plan(_stages_to_train(job)):
        return _run(job)


def _stages_to_train(job: SchemeJob) -> dict[str, int]:
    """The stages this run still trains, in order, with their steps (for the run's progress ETA)."""
    cfg = job.cfg
    stages = {}
    if not cfg.teacher.weights and cfg.teacher.kind == "model":
        stages["teacher"] = teacher_train_config(cfg.teacher, cfg.train).steps
    if cfg.baseline:
        stages["baseline"] = cfg.train.steps
    stages["student"] = cfg.train.steps
    from kdistill.compress.config import stage_names

    for name, step in zip(stage_names(cfg.compress), cfg.compress):
        if step.kind != "quantize" or step.quantize.mode == "qat":
            if step.settings.recovery.steps:
                stages[name] = step.settings.recovery.steps
    return {name: steps for name, steps in stages.items()
            if not (job.run_dir and job.run_dir.file(f"{name}.safetensors").is_file())}


def _run(job: SchemeJob) -> dict:
    cfg = job.cfg
    terms, taps = job.terms()
    student_taps, teacher_taps = split_taps(terms, taps)
    if cfg.teacher.cache is not None:  # a top-k cache that cannot serve the terms is refused before any training
        from kdistill.teachers.setup import cache_spec

        cache_spec(cfg.teacher.cache, terms)
    teacher = _teacher_model(job)
    # resolve every tap path now (a TapError naming the closest modules) rather than after training the teacher
    Taps(teacher, teacher_taps)
    Taps(job.student(), student_taps)
    if cfg.teacher.weights:
        load_configured_weights(teacher, cfg.teacher, "teacher", trust=job.trust_checkpoint)
    given = bool(cfg.teacher.weights) or cfg.teacher.kind == "api"
    _preflight(job, teacher if given else None, terms, student_taps, teacher_taps)
    teacher = _teacher(job, teacher)
    job.check_teacher(teacher)
    from kdistill.audit.stage import audit_record_for_summary, audit_stage

    audit = audit_stage(job, teacher, weights=str(teacher_path(cfg, job.run_dir.path)) if job.run_dir else None)

    baseline = None
    if cfg.baseline:
        baseline = job.baseline(maybe_augment(job.bundle.train, cfg.data.augment, cfg.seed),
                                eval_fn=job.accuracy_eval(cfg.train))
    student_data = maybe_augment(job.bundle.distill_set(), cfg.data.augment, cfg.seed)
    student_teacher = teacher
    if cfg.teacher.cache is not None and not (job.run_dir and job.run_dir.file("student.safetensors").is_file()):
        # build the cache if missing, continue a partial one, reuse a valid one, refuse a stale one
        student_teacher = teacher_cache(cfg, job.run_dir.path, teacher, teacher_taps, terms, student_data,
                                        progress=job.progress, log=job.log) or teacher
    student = job.distill("student", job.student(), student_teacher, student_data, seed=cfg.seed + 3,
                          eval_fn=job.accuracy_eval(cfg.train))
    from kdistill.schemes.deploy import compress_and_export

    artifacts = compress_and_export(job, student, student_teacher, student_data)
    summary = summarize(teacher, student, baseline, job, artifacts, predictions=job.run_dir.file(PREDICTIONS_FILE))
    summary["audit"] = audit_record_for_summary(audit, job, {"teacher": teacher, "student": student,
                                                             "baseline": baseline})
    job.run_dir.write_summary(summary)
    return summary


def _teacher_model(job: SchemeJob) -> nn.Module:
    if job.cfg.teacher.kind == "api":  # a black box: its budget is checked for every row the run will ask about
        from kdistill.teachers.setup import api_rows, api_teacher, check_api_budget

        model = api_teacher(job.cfg.teacher, job.bundle.num_classes, job.run_dir.path, log=job.log)
        check_api_budget(model, api_rows(job.bundle), log=job.log)
        return model
    return job.model(job.cfg.teacher, job.cfg.seed + TEACHER_SEED, "teacher")


def _teacher(job: SchemeJob, model: Optional[nn.Module] = None) -> nn.Module:
    """The frozen teacher: its configured weights (a `model` given here has them loaded already), or the stage
    ``teacher`` on the (augmented) labelled data."""
    cfg = job.cfg
    if cfg.teacher.kind == "api":  # every row asked for up front (batched, cached), then read from the cache
        from kdistill.teachers.setup import api_rows

        model = model if model is not None else _teacher_model(job)
        model.label(*api_rows(job.bundle))
        return freeze(model)
    if model is not None and cfg.teacher.weights:
        return freeze(model)
    return job.teacher(model=model, data=maybe_augment(job.bundle.train, cfg.data.augment, cfg.seed),
                       eval_fn=job.accuracy_eval(cfg.teacher.train or cfg.train))


def ready_teacher(job: SchemeJob) -> nn.Module:
    """The run's frozen teacher exactly as `run` obtains it: ``teacher.weights``, the run directory's finished
    ``teacher`` stage, or that stage trained now (`kdistill audit`)."""
    return _teacher(job)


def teacher_cache(cfg: "RunConfig", run_dir: Optional[Path], teacher: nn.Module, teacher_taps: dict, terms, data, *,
                  rebuild: bool = False, progress: bool = True, log=print):
    """The `CachedTeacher` of `teacher.cache` for the student stage's data (None when no term reads the teacher)."""
    from kdistill.engine import get_accelerator
    from kdistill.teachers.live import LiveTeacher
    from kdistill.teachers.setup import prepare_cache

    return prepare_cache(LiveTeacher(teacher, teacher_taps), data, cfg.teacher.cache, terms, run_dir,
                         batch_size=max(cfg.train.batch_size, 256),
                         accelerator=get_accelerator(cfg.train.mixed_precision), rebuild=rebuild,
                         progress=progress, log=log)


def build_teacher_cache(cfg: "RunConfig", run_dir: Path, *, rebuild: bool = False, progress: bool = True, log=print,
                        trust_checkpoint: bool = False):
    """`kdistill cache build`: the teacher (loaded, or trained as the run's ``teacher`` stage), then its cache."""
    if cfg.teacher is None or cfg.teacher.cache is None:
        raise ConfigError("the config has no teacher.cache", where="teacher.cache",
                          fix="add e.g. 'cache: {kind: dense}' under teacher")
    from kdistill.teachers.setup import cache_spec

    terms = config_terms(cfg)[0]
    cache_spec(cfg.teacher.cache, terms)  # refuse a top-k cache that cannot serve the terms before any training
    job = SchemeJob.start(cfg, Path(run_dir), progress=progress, log=log, trust_checkpoint=trust_checkpoint)
    teacher = _teacher(job)
    _, teacher_taps = split_taps(terms, cfg.distill.taps)
    data = maybe_augment(job.bundle.distill_set(), cfg.data.augment, cfg.seed)
    return teacher_cache(cfg, job.run_dir.path, teacher, teacher_taps, terms, data, rebuild=rebuild,
                         progress=progress, log=log)


def _preflight(job: SchemeJob, teacher: Optional[nn.Module], terms, student_taps, teacher_taps):
    """Dry-run every stage on throw-away models (a loaded teacher is used as is: it stays frozen) before any
    training, so a student-stage mistake is reported before the teacher trains."""
    from kdistill.engine import get_accelerator
    from kdistill.wiring import preflight

    cfg, bundle = job.cfg, job.bundle
    fresh_teacher = teacher is None
    teacher = teacher if teacher is not None else _teacher_model(job)
    # the student stage first: it holds both models, so a fault is reported with the right role
    stages = [("student", Distiller(job.student(), teacher, terms, student_taps=student_taps,
                                    teacher_taps=teacher_taps), bundle.distill_set(), cfg.train)]
    if cfg.baseline:
        stages.append(("baseline", Distiller(job.student(), None, [Term("ce", "ce")]), bundle.train, cfg.train))
    if fresh_teacher:
        stages.append(("teacher", Distiller(_teacher_model(job), None, [Term("ce", "ce")]), bundle.train,
                       cfg.teacher.train or cfg.train))
    acc = get_accelerator(cfg.train.mixed_precision)
    preflight(stages, device=acc.device, world_size=acc.num_processes, num_classes=bundle.num_classes)
    if not fresh_teacher:
        teacher.cpu()


def summarize(teacher: nn.Module, student: nn.Module, baseline: Optional[nn.Module], job: SchemeJob,
              artifacts: Optional[list] = None, *, predictions: Optional[Path] = None) -> dict:
    """Quality of each model, then their cost measured together (interleaved rounds at fixed thread counts), the
    ratios (``speedup``: the teacher's latency over the student's, round by round, at the primary thread count)
    and the training stages' thread counts (``train_threads``, from metrics.jsonl). With compressed or exported
    `artifacts` (or a config asking for them) the ``deployed`` rows are added (`deployed`). With `predictions`
    (a file path) the test-set logits every quality number was computed from are saved there with the labels
    (`kdistill.evaluate.predictions.save_predictions`: the report's per-example sections read them)."""
    from kdistill.engine.threads import stage_threads
    from kdistill.evaluate import round_ratio

    test = job.bundle.test
    models = {"teacher": teacher, "student": student, **({"baseline": baseline} if baseline is not None else {})}
    logits = {name: predict_logits(model, test) for name, model in models.items()}
    teacher_logits = logits["teacher"]
    summary = {"dataset": job.bundle.name, "teacher": job.evaluate(teacher, cost=False, logits=teacher_logits)}
    for name in ("student", "baseline"):
        if name in models:
            summary[name] = job.evaluate(models[name], reference_logits=teacher_logits, cost=False,
                                         logits=logits[name])
    if predictions is not None:
        from kdistill.evaluate.predictions import save_predictions

        save_predictions(predictions, test.tensors["y"], logits, ece_bins=job.cfg.eval.ece_bins)
    cost = job.measure_cost(models, summary)
    t, s = summary["teacher"], summary["student"]
    summary["retention"] = s["accuracy"] / t["accuracy"] if t["accuracy"] else float("nan")
    # a black-box teacher (teacher.kind: api) has no parameters here: no compression ratio against it
    summary["compression"] = t["params"] / s["params"] if t["params"] else float("nan")
    speedups = {str(c): round_ratio(cost, "teacher", "student", c) for c in cost["threads"]}
    primary = speedups[str(cost["primary_threads"])]
    summary["speedup"], summary["speedup_spread"] = primary["ratio"], primary["spread"]
    summary["cost"] = {"threads": cost["threads"], "primary_threads": cost["primary_threads"],
                       "speedup_by_threads": speedups, "warnings": cost["warnings"]}
    summary["train_threads"] = stage_threads(job.run_dir.file("metrics.jsonl"))
    if artifacts:
        from kdistill.schemes.deploy import deployed

        summary["deployed"] = deployed(job, teacher, student, artifacts, teacher_logits)
    return summary


def evaluate_run_dir(run_dir: Path, *, log=print, trust_checkpoint: bool = False) -> dict:
    """Re-evaluate a finished run directory from its config and weights files (``kdistill eval DIR``).

    The run's ``summary.json`` is left as it is: the new measurement goes to ``RUN_DIR/eval-<time>.json``, whose
    path the returned summary holds under ``"file"``."""
    import time

    from kdistill.tasks import load_resolved

    run_dir = Path(run_dir)
    cfg = load_resolved(run_dir / "config.yaml")
    trained_teacher = not cfg.teacher.weights and cfg.teacher.kind == "model"
    stages = (["teacher"] if trained_teacher else []) + (["baseline"] if cfg.baseline else []) + ["student"]
    missing = [name for name in stages if not (run_dir / f"{name}.safetensors").is_file()]
    if missing:
        raise KDError(f"{run_dir} is not finished: stage(s) {', '.join(missing)} have no weights yet",
                      fix=f"resume with: kdistill run {run_dir}")
    job = SchemeJob.start(cfg, run_dir, log=log, trust_checkpoint=trust_checkpoint)
    teacher = _teacher_model(job)
    if cfg.teacher.kind == "model":
        path = teacher_path(cfg, run_dir)
        load_into(teacher, load_state_dict_file(path, where="teacher.weights", trust=trust_checkpoint),
                  where="teacher.weights", source=str(path))
    student = _trained_student(job, "student")
    baseline = _trained_student(job, "baseline") if (run_dir / "baseline.safetensors").is_file() else None
    from kdistill.schemes.deploy import optional_artifacts

    summary = summarize(teacher, student, baseline, job, optional_artifacts(job, student))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, n = f"eval-{stamp}.json", 1
    while (run_dir / name).exists():
        n += 1
        name = f"eval-{stamp}-{n}.json"
    job.run_dir.write_summary(summary, name=name)
    return {**summary, "file": str(run_dir / name)}


def teacher_path(cfg: "RunConfig", run_dir: Path) -> Path:
    """The teacher's weights of a run: its configured file, else the run's trained ``teacher.safetensors``."""
    return Path(cfg.teacher.weights) if cfg.teacher.weights else Path(run_dir) / "teacher.safetensors"


def _trained_student(job: SchemeJob, stage: str) -> nn.Module:
    model = job.student()
    model.load_state_dict(load_state_dict_file(job.run_dir.file(f"{stage}.safetensors"), where=f"{stage}.safetensors"))
    return model


__all__ = ["OfflineScheme", "build_teacher_cache", "evaluate_run_dir", "ready_teacher", "run", "summarize",
           "teacher_cache", "teacher_path"]
