"""The classification job of a config with ``data_free:`` (or ``data.train: none``, or boundary samples).

Stages:
1. ``teacher``: ``teacher.weights`` (required with ``data.train: none``: there is nothing to train it on), or
   trained on the real training data;
2. ``baseline`` (real training data and ``baseline: true`` only);
3. the transfer set: with ``data_free.method: deepinversion`` synthesised from the teacher (cached on disk,
   `kdistill.datafree.synthesis`), joined to the real training data when there is some;
4. ``student``: KD on the transfer set through the engine (with ``data.transfer.boundary``, every batch gets
   boundary copies: `BoundaryDistiller`); with ``method: dfad`` the student is trained against a generator
   instead (`kdistill.datafree.dfad`, its own loop) and saved as ``student.safetensors``.
With ``data.train: none`` the training split is never read: only the test split is loaded (Fashion-MNIST reads
its t10k files alone; the generated datasets make both splits together and the training one is dropped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from kdistill.data import ArrayDataset, DataBundle, check_labels, concat, load_data
from kdistill.data.augment import maybe_augment
from kdistill.datafree.config import boundary_of, train_is_none
from kdistill.datafree.inversion import has_batchnorm
from kdistill.distiller import Distiller, split_taps
from kdistill.errors import WiringError
from kdistill.files import save_weights
from kdistill.models.loading import load_state_dict_file
from kdistill.schemes.common import TEACHER_SEED, SchemeJob
from kdistill.tasks import dump_config, load_resolved
from kdistill.tasks.job import RunDir, run_stage

__all__ = ["evaluate_run_dir", "load_test_only", "run", "uses_datafree"]


def uses_datafree(cfg) -> bool:
    """Whether a classification config runs this job instead of its scheme's."""
    return cfg.data_free is not None or train_is_none(cfg.data) or boundary_of(cfg.data) is not None


def load_test_only(data_cfg) -> DataBundle:
    """The dataset's test split and facts, without reading the training inputs (``train`` is None)."""
    if getattr(data_cfg, "name", None) is None:  # the files form: kdistill.data.user's data-free hook
        from kdistill.data import load_without_train

        return load_without_train(data_cfg)
    if data_cfg.name == "fashion_mnist":
        from kdistill.data.builtin import FASHION_MNIST_DIR, read_idx
        from kdistill.errors import DataError

        import torch

        folder = Path(data_cfg.root or FASHION_MNIST_DIR)
        found = {}
        for kind, stem in (("images", "t10k-images-idx3-ubyte"), ("labels", "t10k-labels-idx1-ubyte")):
            cands = [folder / f"{stem}.gz", folder / stem]
            found[kind] = next((c for c in cands if c.is_file()), None)
            if found[kind] is None:
                raise DataError(f"Fashion-MNIST file {cands[0].name} not found in {folder}", where="data.root",
                                fix="install it with 'apt-get install dataset-fashion-mnist' or set data.root")
        x = torch.from_numpy(read_idx(found["images"]).astype("float32")[:, None] / 255.0)
        y = torch.from_numpy(read_idx(found["labels"]).astype("int64"))
        bundle = DataBundle("fashion_mnist", None, ArrayDataset({"x": x, "y": y}, "fashion_mnist-test"), 10,
                            (1, 28, 28), None, {"root": str(folder), "train": "none"})
    else:  # generated together with their training split (mnist1d, digits): that split is dropped unused
        bundle = load_data(data_cfg)
        bundle.train, bundle.transfer = None, None
        bundle.info = {**bundle.info, "train": "none"}
    if data_cfg.test_size:
        t = bundle.test.tensors
        bundle.test = ArrayDataset({k: v[:data_cfg.test_size] for k, v in t.items()}, bundle.test.name)
    return bundle


def _start(cfg, run_dir, **options) -> SchemeJob:
    if not train_is_none(cfg.data):
        return SchemeJob.start(cfg, run_dir, **options)
    folder = RunDir(run_dir, cfg, dump=dump_config, load=load_resolved, log=options.get("log", print))
    folder.claim()
    bundle = load_test_only(cfg.data)
    check_labels(bundle.test, bundle.num_classes)
    return SchemeJob(cfg, bundle, folder, options.get("progress", True), options.get("log", print),
                     options.get("trust_checkpoint", False), options.get("weak_teacher", "warn"))


def _terms(job: SchemeJob):
    terms, taps = job.terms()
    if train_is_none(job.cfg.data):  # the alpha shorthand's CE part has no labels to read: only the teacher's terms
        from kdistill.losses import get_loss

        terms = [t for t in terms if not get_loss(t.loss).needs_labels]
    return terms, taps


def run(cfg, run_dir=None, *, progress: bool = True, log=print, trust_checkpoint: bool = False,
        weak_teacher: str = "warn") -> dict:
    """Run the job (module docstring); returns the summary (also RUN_DIR/summary.json)."""
    from kdistill.schemes.offline import summarize

    job = _start(cfg, run_dir, progress=progress, log=log, trust_checkpoint=trust_checkpoint,
                 weak_teacher=weak_teacher)
    real = not train_is_none(cfg.data)
    method = cfg.data_free.method if cfg.data_free is not None else None
    model = job.model(cfg.teacher, cfg.seed + TEACHER_SEED, "teacher")
    if method == "deepinversion" and not has_batchnorm(model):
        raise WiringError(f"teacher '{cfg.teacher.name}' has no BatchNorm layer, so DeepInversion has no statistics "
                          f"to match", where="teacher.name",
                          fix="use data_free.method: dfad, or a teacher with BatchNorm layers")
    teacher = job.teacher(model=model, eval_fn=job.accuracy_eval(cfg.teacher.train or cfg.train) if real else None)
    teacher.eval()
    job.check_teacher(teacher)
    baseline = job.baseline(eval_fn=job.accuracy_eval(cfg.train)) if real and cfg.baseline else None
    info: dict = {"method": method, "train": "real" if real else "none"}
    if method == "dfad":
        student = _dfad_student(job, teacher, info)
    else:
        data = job.bundle.distill_set() if real else None
        if method == "deepinversion":
            transfer = _synthesised(job, teacher, info)
            data = concat(data, transfer, f"{job.bundle.name}+synthesis") if data is not None else transfer
        student = _kd_student(job, teacher, data)
    summary = summarize(teacher, student, baseline, job, predictions=job.run_dir.file("predictions.safetensors"))
    summary["data_free"] = info
    job.run_dir.write_summary(summary)
    return summary


def _synthesised(job: SchemeJob, teacher: nn.Module, info: dict) -> ArrayDataset:
    from kdistill.datafree.synthesis import deepinversion_set

    cfg = job.cfg
    df = cfg.data_free
    folder = Path(df.cache_dir) if df.cache_dir else (job.run_dir.path / "synthesis" if job.run_dir else None)
    if folder is None:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="kdistill-synthesis-"))
    x, targets, made = deepinversion_set(teacher, job.bundle.input_shape, job.bundle.num_classes, df.deepinversion,
                                         seed=df.seed, folder=folder, student_factory=lambda: job.student(),
                                         log=job.log)
    info.update({"synthesis": {k: v for k, v in made.items() if k != "key"}, "transfer_size": len(x),
                 "settings": df.deepinversion.model_dump(mode="json")})
    # the targets are kept for inspection only ("target"): the student learns from the teacher's outputs
    return ArrayDataset({"x": x, "target": targets}, "synthesis")


def _kd_student(job: SchemeJob, teacher: nn.Module, data: ArrayDataset) -> nn.Module:
    cfg = job.cfg
    terms, taps = _terms(job)
    student_taps, teacher_taps = split_taps(terms, taps)
    boundary = boundary_of(cfg.data)
    if boundary is not None:
        from kdistill.datafree.boundary import BoundaryDistiller

        objective = BoundaryDistiller(job.student(), teacher, terms, student_taps=student_taps,
                                      teacher_taps=teacher_taps, teacher_model=teacher, boundary=boundary)
    else:
        objective = Distiller(job.student(), teacher, terms, student_taps=student_taps, teacher_taps=teacher_taps)
    eval_fn = job.accuracy_eval(cfg.train)
    data = maybe_augment(data, getattr(cfg.data, "augment", None), cfg.seed)  # shifts / flips of the transfer set
    return run_stage("student", objective, data, cfg.train, seed=cfg.seed + 3, eval_fn=eval_fn,
                     **job.stage_options)[0]


def _dfad_student(job: SchemeJob, teacher: nn.Module, info: dict) -> nn.Module:
    """The DFAD student: loaded when ``student.safetensors`` exists, else trained and saved there."""
    import time

    from kdistill.datafree.dfad import train_dfad

    cfg = job.cfg
    settings = cfg.data_free.dfad
    student = job.student()
    weights: Optional[Path] = job.run_dir.file("student.safetensors")
    info["settings"] = settings.model_dump(mode="json")
    if weights is not None and weights.is_file():
        student.load_state_dict(load_state_dict_file(weights, where="student.safetensors"))
        job.log(f"[student] done earlier: loaded {weights}")
        return student.eval()
    start = time.perf_counter()
    every = max(1, settings.iterations // 10)

    def report(it: int, terms: dict) -> None:
        if job.progress and (it + 1) % every == 0:
            job.log(f"[student] dfad {it + 1}/{settings.iterations}: discrepancy "
                    f"{float(terms['student_discrepancy']):.4f} {time.perf_counter() - start:.0f} s")

    student, _ = train_dfad(teacher, student, job.bundle.input_shape, settings, seed=cfg.data_free.seed,
                            on_iteration=report)
    info["seconds"] = round(time.perf_counter() - start, 1)
    if weights is not None:
        save_weights(weights, student.state_dict())
    return student


def evaluate_run_dir(run_dir: Path, *, log=print, trust_checkpoint: bool = False) -> dict:
    """``kdistill eval RUN_DIR`` of a finished data-free run: teacher and student re-evaluated (the training split
    is not read with ``data.train: none``); written to ``RUN_DIR/eval-<time>.json`` like the offline scheme's."""
    import time

    from kdistill.errors import KDError
    from kdistill.schemes.common import load_configured_weights
    from kdistill.schemes.offline import summarize, teacher_path
    from kdistill.tasks import load_resolved

    run_dir = Path(run_dir)
    cfg = load_resolved(run_dir / "config.yaml")
    if not (run_dir / "student.safetensors").is_file():
        raise KDError(f"{run_dir} is not finished: stage student has no weights yet",
                      fix=f"resume with: kdistill run {run_dir}")
    job = _start(cfg, run_dir, log=log, trust_checkpoint=trust_checkpoint)
    teacher = job.model(cfg.teacher, cfg.seed + TEACHER_SEED, "teacher")
    if cfg.teacher.weights:
        load_configured_weights(teacher, cfg.teacher, "teacher", trust=trust_checkpoint)
    else:
        teacher.load_state_dict(load_state_dict_file(teacher_path(cfg, run_dir), where="teacher.safetensors"))
    student = job.student()
    student.load_state_dict(load_state_dict_file(run_dir / "student.safetensors", where="student.safetensors"))
    baseline = None
    if (run_dir / "baseline.safetensors").is_file():
        baseline = job.student()
        baseline.load_state_dict(load_state_dict_file(run_dir / "baseline.safetensors", where="baseline.safetensors"))
    summary = summarize(teacher.eval(), student.eval(), baseline, job)
    name = f"eval-{time.strftime('%Y%m%d-%H%M%S')}.json"
    job.run_dir.write_summary(summary, name=name)
    return {**summary, "file": str(run_dir / name)}
