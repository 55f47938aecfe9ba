"""The ``compress:`` and ``export:`` stages of a run, for every task.

A task hands `run_compress` a `CompressContext`: the distilled student, an example batch, how to build the
recovery objective (``kd``: the run's own distillation terms from the teacher; ``ce``: the labels alone) and its
data, and calibration batches. Each step then runs as a stage of the shared job skeleton
(`kdistill.tasks.job.run_stage`): its own ``checkpoints/<stage>/`` and ``<stage>.safetensors``, resumed when
killed, loaded when done.

Files of a step ``NAME`` in the run directory:

* prune / low_rank: ``NAME.arch.json`` (the changed layer shapes, `kdistill.compress.arch`: the model reloads from
  its builder plus this file, without torch-pruning), ``NAME.init.safetensors`` (the weights right after the
  transform, before recovery), ``NAME.json`` (what the transform did), ``NAME.safetensors`` (after recovery);
* quantize: ``NAME.safetensors`` (QAT: the fake-quantized student after recovery; read back through
  `prepare_qat`), ``NAME.int8.onnx`` (the int8 model for onnxruntime: static QDQ for ``qat`` and ``static``,
  dynamic for ``dynamic``), ``NAME.json`` (parity of the int8 model with its float model).

`run_export` writes ``FINAL.onnx`` (FINAL: the last prune / low_rank step, else ``student``) and its int8
variants ``FINAL.int8-dynamic.onnx`` / ``FINAL.int8-static.onnx`` with their parity against PyTorch.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from kdistill.compress.config import CompressStep, ExportConfig, RecoveryConfig, check_steps, stage_names
from kdistill.errors import ConfigError, KDError
from kdistill.files import atomic_write_bytes, load_weights, save_weights
from kdistill.tasks.job import RunDir, run_stage
from kdistill.train_config import TrainConfig

__all__ = ["Artifact", "CompressContext", "compress_and_export", "final_name", "recovery_train", "run_compress",
           "run_export"]


@dataclass
class Artifact:
    """One deployable result: a torch model or an ONNX file, with what made it."""

    name: str
    runtime: str  # "torch" or "onnxruntime"
    model: Any  # nn.Module, or `kdistill.compress.export.OrtModel`
    file: Optional[Path] = None
    info: dict = field(default_factory=dict)


@dataclass
class CompressContext:
    """What a task gives the compress and export stages.

    `objective(model, kind)` returns ``(objective, data)`` of a recovery: ``kind`` "kd" (the run's terms from
    the teacher) or "ce" (labels alone). `calibration(n)` returns n training batches of model inputs.
    `heldout(n)` returns n held-out batches of model inputs (parity checks). `example` is one batch of inputs."""

    run_dir: RunDir
    student: nn.Module
    example: Any
    objective: Callable[[nn.Module, str], tuple[Any, Any]]
    train: TrainConfig
    seed: int
    calibration: Callable[[int], list]
    heldout: Callable[[int], list]
    collate_fn: Optional[Callable] = None
    progress: bool = False
    log: Callable[[str], None] = print


def recovery_train(recovery: RecoveryConfig, train: TrainConfig) -> TrainConfig:
    """The run's `train` with the recovery's steps, lr (default train.lr / 10), batch size and schedule."""
    update = {"steps": recovery.steps, "lr": recovery.lr or train.lr / 10, "warmup_steps": 0,
              "checkpoint_every": min(train.checkpoint_every, recovery.steps) if train.checkpoint_every else 0,
              "eval_every": 0}
    if recovery.batch_size:
        update["batch_size"] = recovery.batch_size
    if recovery.schedule:
        update["schedule"] = recovery.schedule
    return TrainConfig.model_validate({**train.model_dump(), **update})


def final_name(steps: list[CompressStep]) -> str:
    """The stage whose torch model is exported: the last prune / low_rank step, else the student."""
    names = stage_names(steps)
    kept = [n for n, s in zip(names, steps) if s.kind != "quantize"]
    return kept[-1] if kept else "student"


def run_compress(steps: list[CompressStep], ctx: CompressContext) -> list[Artifact]:
    """Run the compress steps in order, each on the previous step's model; returns one `Artifact` per step (a
    torch model for prune / low_rank, an int8 ONNX model for quantize)."""
    steps = check_steps(steps)
    artifacts: list[Artifact] = []
    model = ctx.student
    for name, step in zip(stage_names(steps), steps):
        if step.kind in ("prune", "low_rank"):
            model, info = _structural(name, step, copy.deepcopy(model), ctx)
            artifacts.append(Artifact(name, "torch", model, ctx.run_dir.file(f"{name}.safetensors"), info))
        else:
            artifacts.append(_quantize(name, step.quantize, copy.deepcopy(model), ctx))
    return artifacts


# -- prune / low_rank ------------------------------------------------------------------------------------------------
def _transform(step: CompressStep, model: nn.Module, example) -> tuple[nn.Module, dict]:
    s = step.settings
    if step.kind == "prune":
        from kdistill.compress.prune import prune

        return prune(model, example, target=s.target, of=s.of, scope=s.scope, importance=s.importance,
                     ignore=s.ignore)
    from kdistill.compress.low_rank import low_rank

    return low_rank(model, example, rank=s.rank, energy=s.energy, skip=s.skip)


def _structural(name: str, step: CompressStep, model: nn.Module, ctx: CompressContext) -> tuple[nn.Module, dict]:
    """Transform (or rebuild from ``NAME.arch.json`` when done earlier / resuming), then recover."""
    from kdistill.compress.arch import architecture, load_spec, rebuild, save_spec

    spec_file, init_file = ctx.run_dir.file(f"{name}.arch.json"), ctx.run_dir.file(f"{name}.init.safetensors")
    info_file = ctx.run_dir.file(f"{name}.json")
    if spec_file is not None and spec_file.is_file() and init_file.is_file():
        rebuild(model, load_spec(spec_file))
        model.load_state_dict(load_weights(init_file))
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        ctx.log(f"[{name}] transform done earlier: rebuilt from {spec_file.name}")
    else:
        was = model.training
        model.eval()
        model, info = _transform(step, model, ctx.example)
        model.train(was)
        ctx.log(f"[{name}] {_describe(step.kind, info)}")
        if spec_file is not None:
            save_weights(init_file, {k: v.detach().contiguous() for k, v in model.state_dict().items()},
                         {"stage": name, "steps": "0"})
            atomic_write_bytes(info_file, json.dumps(info, indent=2).encode())
            save_spec(spec_file, architecture(model))  # written last: it marks the transform as done
    return _recover(name, step.settings.recovery, model, ctx), info


def _describe(kind: str, info: dict) -> str:
    if kind == "prune":
        return (f"pruned {100 * info.get('reached', 0):.1f} % of the {info.get('of', 'macs')} "
                f"(target {100 * info.get('target', 0):.0f} %): params {info.get('params_before')} -> "
                f"{info.get('params_after')}")
    return (f"factorized {len(info.get('layers', {}))} layer(s): params {info.get('params_before')} -> "
            f"{info.get('params_after')}")


def _recover(name: str, recovery: RecoveryConfig, model: nn.Module, ctx: CompressContext) -> nn.Module:
    """The recovery phase as a resumable stage; with 0 steps the transformed model is saved as it is."""
    if recovery.steps == 0:
        weights = ctx.run_dir.file(f"{name}.safetensors")
        if weights is not None and not weights.is_file():
            save_weights(weights, {k: v.detach().contiguous() for k, v in model.state_dict().items()},
                         {"stage": name, "steps": "0"})
        return model
    objective, data = ctx.objective(model, recovery.objective)
    student, _ = run_stage(name, objective, data, recovery_train(recovery, ctx.train), seed=ctx.seed,
                           run_dir=ctx.run_dir, collate_fn=ctx.collate_fn, progress=ctx.progress, log=ctx.log)
    return student


# -- quantize --------------------------------------------------------------------------------------------------------
def _quantize(name: str, settings, model: nn.Module, ctx: CompressContext) -> Artifact:
    from kdistill.compress.export import OrtModel

    mode = settings.mode
    if mode == "qat":
        from kdistill.compress.quantize import prepare_qat, strip_qat

        model = strip_qat(_recover(name, settings.recovery, prepare_qat(model), ctx))
    onnx_file = ctx.run_dir.file(f"{name}.int8.onnx")
    info_file = ctx.run_dir.file(f"{name}.json")
    if onnx_file is None:
        raise KDError(f"compress.{name}: an int8 model is an ONNX file and needs a run directory",
                      where=f"compress.{name}", fix="give the run an output directory (--out DIR)")
    if onnx_file.is_file() and info_file.is_file():
        ctx.log(f"[{name}] done earlier: {onnx_file.name}")
        info = json.loads(info_file.read_text())
    else:
        int8_mode = "dynamic" if mode == "dynamic" else "static"
        info = _onnx_int8(model, ctx, onnx_file, int8_mode, settings.calibration_batches, name)
        info["mode"] = mode
        atomic_write_bytes(info_file, json.dumps(info, indent=2).encode())
        ctx.log(f"[{name}] int8 ({mode}) -> {onnx_file.name}: top-1 agreement with its float model "
                f"{100 * info['top1_agreement']:.2f} %")
    return Artifact(name, "onnxruntime", OrtModel(onnx_file), onnx_file, info)


def _onnx_int8(model: nn.Module, ctx: CompressContext, dst: Path, mode: str, calibration_batches: int,
               where: str) -> dict:
    """Export `model` to a temporary fp32 ONNX next to `dst`, quantize it to `dst`, check agreement."""
    from kdistill.compress.export import OrtModel, export_onnx, parity, quantize_onnx

    fp32 = dst.with_name(dst.name + ".fp32.tmp.onnx")
    try:
        export_onnx(model.eval(), ctx.example, fp32, where=where)
        calibration = ctx.calibration(calibration_batches) if mode == "static" else None
        quantize_onnx(fp32, dst, mode, calibration=calibration)
    finally:
        for leftover in (fp32, fp32.with_name(fp32.name + ".data")):
            leftover.unlink(missing_ok=True)
    return {**parity(model, OrtModel(dst), ctx.heldout(8)), "int8": mode}


# -- export ----------------------------------------------------------------------------------------------------------
def run_export(export: ExportConfig, model: nn.Module, name: str, ctx: CompressContext) -> list[Artifact]:
    """``NAME.onnx`` (fp32) and its int8 variants, each checked against PyTorch on held-out batches (done files
    are reused: their ``.json`` holds the parity measured when they were written)."""
    from kdistill.compress.export import OrtModel, export_onnx, parity

    if not ctx.run_dir:
        raise ConfigError("export: needs a run directory to write the ONNX files into",
                          fix="give the run an output directory (--out DIR)")
    out: list[Artifact] = []
    fp32 = ctx.run_dir.file(f"{name}.onnx")
    info_file = ctx.run_dir.file(f"{name}.onnx.json")
    if fp32.is_file() and info_file.is_file():
        info = json.loads(info_file.read_text())
    else:
        export_onnx(model.eval(), ctx.example, fp32, where=name)
        info = parity(model, OrtModel(fp32), ctx.heldout(export.parity_batches))
        atomic_write_bytes(info_file, json.dumps(info, indent=2).encode())
    ctx.log(f"[export] {fp32.name}: max |logit difference| vs PyTorch {info['max_abs_diff']:.2e} "
            f"on {info.get('samples', '?')} held-out samples")
    out.append(Artifact(f"{name}.onnx", "onnxruntime", OrtModel(fp32), fp32, info))
    for mode in export.int8:
        dst = ctx.run_dir.file(f"{name}.int8-{mode}.onnx")
        mode_info = ctx.run_dir.file(f"{name}.int8-{mode}.onnx.json")
        if dst.is_file() and mode_info.is_file():
            info = json.loads(mode_info.read_text())
        else:
            info = _onnx_int8(model, ctx, dst, mode, export.calibration_batches, f"export.int8.{mode}")
            atomic_write_bytes(mode_info, json.dumps(info, indent=2).encode())
        ctx.log(f"[export] {dst.name}: top-1 agreement with fp32 {100 * info['top1_agreement']:.2f} %")
        out.append(Artifact(dst.name, "onnxruntime", OrtModel(dst), dst, info))
    return out


def compress_and_export(steps: list[CompressStep], export: Optional[ExportConfig], ctx: CompressContext
                        ) -> list[Artifact]:
    """`run_compress`, then (with `export`) `run_export` of the final torch model (the last prune / low_rank
    stage's, else the student): every task's compress-and-deploy step."""
    artifacts = run_compress(steps, ctx)
    if export is not None:
        name = final_name(steps)
        model = ctx.student if name == "student" else next(a.model for a in artifacts if a.name == name)
        artifacts += run_export(export, model, name, ctx)
    return artifacts


def load_stage_model(run_dir: Path, name: str, base: nn.Module) -> nn.Module:
    """A finished prune / low_rank stage's model from `base` (a freshly built student) and its files; no
    torch-pruning needed."""
    from kdistill.compress.arch import load_spec, rebuild

    run_dir = Path(run_dir)
    spec = run_dir / f"{name}.arch.json"
    if spec.is_file():
        rebuild(base, load_spec(spec))
    base.load_state_dict(load_weights(run_dir / f"{name}.safetensors"))
    return base
