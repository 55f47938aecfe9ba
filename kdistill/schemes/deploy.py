"""Compress and deploy after offline distillation (classification): the ``compress:`` stages and the ``export:``
of the distilled student (`kdistill.compress.stages`), the ``deployed`` rows of the summary, and
``kdistill export RUN_DIR`` on a finished run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from torch import nn

from kdistill.distiller import Distiller, Term, split_taps
from kdistill.errors import KDError
from kdistill.evaluate import predict_logits
from kdistill.schemes.common import SchemeJob

__all__ = ["compress_and_export", "compress_context", "deployed", "export_run_dir"]


def compress_and_export(job: SchemeJob, student: nn.Module, teacher, data) -> list:
    """The config's ``compress:`` stages on the distilled student, then its ``export:`` (`kdistill.compress`):
    the deployable artifacts, [] when the config has neither."""
    cfg = job.cfg
    if not cfg.compress and cfg.export is None:
        return []
    from kdistill.compress.stages import compress_and_export as run_all

    ctx = compress_context(job, student, teacher, data)
    return run_all(cfg.compress, cfg.export, ctx)


def compress_context(job: SchemeJob, student: nn.Module, teacher, data):
    """The classification task's `kdistill.compress.stages.CompressContext`: recovery with the run's terms from
    `teacher` on `data` (kd) or on the labelled training set alone (ce); calibration from the training inputs,
    parity on the test inputs."""
    import torch

    from kdistill.compress.stages import CompressContext

    cfg, bundle = job.cfg, job.bundle
    terms, taps = job.terms()
    student_taps, teacher_taps = split_taps(terms, taps)
    train_x, test_x = bundle.train.tensors["x"], bundle.test.tensors["x"]

    def objective(model: nn.Module, kind: str):
        if kind == "ce":
            return Distiller(model, None, [Term("ce", "ce")]), bundle.train
        return Distiller(model, teacher, terms, student_taps=student_taps, teacher_taps=teacher_taps), data

    def batches(x: torch.Tensor, n: int) -> list:
        size = min(cfg.train.batch_size, 64)
        return [x[i * size:(i + 1) * size] for i in range(min(n, max(1, len(x) // size)))]

    return CompressContext(job.run_dir, student, test_x[:4], objective, cfg.train, cfg.seed + 5,
                           lambda n: batches(train_x, n), lambda n: batches(test_x, n),
                           progress=job.progress, log=job.log)


def deployed(job: SchemeJob, teacher: nn.Module, student: nn.Module, artifacts: list, teacher_logits) -> list:
    """One row per deployable artifact (teacher and student fp32 in torch, each compressed / exported model):
    test accuracy, top-1 agreement with the teacher, bytes on disk, latency at batch 1 and 32 and throughput,
    all models timed interleaved at the recorded thread counts (`kdistill.evaluate.deploy`)."""
    from kdistill.evaluate import accuracy, agreement
    from kdistill.evaluate.cost import weight_bytes
    from kdistill.evaluate.deploy import deployed_row, deployed_timing

    test = job.bundle.test
    models = {"teacher": teacher, "student": student, **{a.name: a.model for a in artifacts}}
    files = {"teacher": job.run_dir.file("teacher.safetensors"), "student": job.run_dir.file("student.safetensors"),
             **{a.name: a.file for a in artifacts}}
    runtimes = {"teacher": "torch", "student": "torch", **{a.name: a.runtime for a in artifacts}}
    x = test.tensors["x"]
    timing = deployed_timing(models, x[:1], x[:32], threads=job.cfg.eval.threads,
                             repeats=job.cfg.eval.latency_repeats)
    rows = []
    for name, model in models.items():
        logits = teacher_logits if name == "teacher" else predict_logits(model, test)
        runtime, file = runtimes[name], files.get(name)
        row = deployed_row(name, runtime=runtime, file=file if file is not None and file.is_file() else None,
                           metric={"accuracy": accuracy(logits, test.tensors["y"])},
                           agreement=None if name == "teacher" else agreement(logits, teacher_logits), timing=timing)
        if row.get("bytes") is None and runtime == "torch":
            row["bytes"] = weight_bytes(model)
        rows.append(row)
    return rows


def load_artifacts(job: SchemeJob, student: nn.Module) -> list:
    """The artifacts a finished run directory holds (compress stages, exported ONNX files), read from its files:
    pruned / factorized models rebuilt from ``NAME.arch.json`` (no torch-pruning needed), ONNX files in
    onnxruntime sessions."""
    from kdistill.compress.config import stage_names
    from kdistill.compress.stages import Artifact, final_name, load_stage_model

    folder, cfg, out = job.run_dir.path, job.cfg, []
    for name, step in zip(stage_names(cfg.compress), cfg.compress):
        if step.kind == "quantize":
            out.append(_onnx_artifact(folder / f"{name}.int8.onnx", name, folder / f"{name}.json"))
        else:
            out.append(Artifact(name, "torch", load_stage_model(folder, name, job.student()),
                                folder / f"{name}.safetensors", _read_json(folder / f"{name}.json")))
    final = final_name(cfg.compress)
    for path in sorted(folder.glob(f"{final}.onnx")) + sorted(folder.glob(f"{final}.int8-*.onnx")):
        out.append(_onnx_artifact(path, path.name, path.with_name(path.name + ".json")))
    return [a for a in out if a is not None]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _onnx_artifact(path: Path, name: str, info: Path):
    from kdistill.compress.export import OrtModel
    from kdistill.compress.stages import Artifact

    return Artifact(name, "onnxruntime", OrtModel(path), path, _read_json(info)) if path.is_file() else None


def export_run_dir(run_dir: Path, export_cfg, *, log=print) -> dict:
    """``kdistill export RUN_DIR``: export a finished offline run's final model (its last prune / low_rank stage,
    else its student) with `export_cfg`, then measure every artifact again and write the ``deployed`` rows into
    its ``summary.json`` (the rest of the summary is kept). Returns the summary."""
    from kdistill.compress.stages import final_name, load_stage_model, run_export
    from kdistill.models.loading import load_state_dict_file
    from kdistill.schemes.offline import _teacher_model, teacher_path
    from kdistill.tasks import load_resolved

    run_dir = Path(run_dir)
    cfg = load_resolved(run_dir / "config.yaml")
    if not (run_dir / "student.safetensors").is_file():
        raise KDError(f"{run_dir} has no distilled student yet (no student.safetensors): nothing to export",
                      fix=f"finish the run first: kdistill run {run_dir}")
    job = SchemeJob.start(cfg, run_dir, log=log)
    student = job.student()
    student.load_state_dict(load_state_dict_file(run_dir / "student.safetensors", where="student.safetensors"))
    name = final_name(cfg.compress)
    if name != "student" and not (run_dir / f"{name}.safetensors").is_file():
        raise KDError(f"{run_dir}: compress stage '{name}' is not finished", fix=f"finish it: kdistill run {run_dir}")
    model = student if name == "student" else load_stage_model(run_dir, name, job.student())
    teacher = _teacher_model(job)
    teacher.load_state_dict(load_state_dict_file(teacher_path(cfg, run_dir), where="teacher.weights"))
    teacher.eval()
    ctx = compress_context(job, student, teacher, job.bundle.distill_set())
    run_export(export_cfg, model, name, ctx)
    summary = _read_json(run_dir / "summary.json")
    summary["deployed"] = deployed(job, teacher, student, load_artifacts(job, student),
                                   predict_logits(teacher, job.bundle.test))
    job.run_dir.write_summary(summary)
    return summary


def optional_artifacts(job: SchemeJob, student: nn.Module) -> Optional[list]:
    """`load_artifacts` when the run's config has compress / export sections, else None."""
    return load_artifacts(job, student) if job.cfg.compress or job.cfg.export is not None else None
