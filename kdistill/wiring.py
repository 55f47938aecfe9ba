"""The wiring check: every mistake in the pairing of data, teacher, student and objective, found before training.

`preflight` checks all the stages of a plan (e.g. teacher -> baseline -> student) before the first one trains,
so that a student-stage mistake does not wait for hours of teacher training; `dry_run` is the check of one
distiller on one batch, which the engine also runs at the start of every stage. Each fault is one `KDError`
line (what, where, fix):

- data: an empty dataset or one smaller than a batch, NaN/Inf inputs, labels outside the class range;
- models: parameters in another dtype than the inputs, or on another device than the batch (or never
  materialized, on 'meta'); vocabularies that differ (models with ``config.vocab_size`` reading the same ids; a
  ``distiller.tokenizer`` lets padded heads pass); a forward that fails on the first batch (naming the side, the
  batch's shapes and the model's own error);
- the objective (`Distiller.build`): tap paths that do not exist (with the closest names), output shapes or
  class counts that differ, adapters that cannot exist, labels the student cannot predict.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from kdistill.errors import DataError, KDError, WiringError

_INPUT_KEYS = ("x", "teacher_x", "student_x")
_FORWARD_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError, AssertionError, NotImplementedError)


def _tensors(value: Any) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _describe(inputs: Any) -> str:
    if torch.is_tensor(inputs):
        return f"{tuple(inputs.shape)} {str(inputs.dtype).replace('torch.', '')} on {inputs.device}"
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in inputs.items()) + "}"
    return type(inputs).__name__


def _first_line(err: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(err).__name__}: {text[:limit]}" if text else type(err).__name__


def check_finite(tensors: Mapping[str, Any], name: str) -> None:
    """DataError naming the key and the number of rows when floating inputs hold NaN or Inf."""
    for key in _INPUT_KEYS:
        for t in _tensors(tensors.get(key)):
            if not t.dtype.is_floating_point:
                continue
            finite = torch.isfinite(t.reshape(len(t), -1) if t.dim() else t.reshape(1, 1))
            bad = int((~finite.all(dim=1)).sum())
            if bad:
                raise DataError(f"dataset '{name}': {bad} row(s) of '{key}' contain NaN or Inf",
                                fix="clean or impute those inputs before training")


def check_data(data: Any, *, batch_size: int, world_size: int = 1, num_classes: Optional[int] = None,
               name: Optional[str] = None, where: str = "train.batch_size") -> None:
    """A dataset a stage can train on: not empty, at least one global batch, finite inputs, labels in range."""
    name = name or getattr(data, "name", "data")
    n = len(data)
    if n == 0:
        raise DataError(f"dataset '{name}' is empty", fix="check the data source, data.root and data.train_size")
    if n < batch_size * world_size:
        raise DataError(f"dataset '{name}' has {n} samples, fewer than one batch of {batch_size * world_size} "
                        f"({batch_size} x {world_size} processes)", where=where,
                        fix=f"use batch_size <= {max(1, n // world_size)}")
    tensors = getattr(data, "tensors", None)
    if not isinstance(tensors, Mapping):
        return
    check_finite(tensors, name)
    y = tensors.get("y")
    if num_classes is not None and torch.is_tensor(y) and len(y):
        valid = y[y != -100]
        if len(valid) and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
            raise DataError(f"dataset '{name}': labels outside 0..{num_classes - 1} "
                            f"(min {int(valid.min())}, max {int(valid.max())})",
                            fix="relabel to 0..num_classes-1, or use -100 for unlabeled rows")


def check_materialized(model: nn.Module, role: str) -> None:
    """WiringError when parameters or buffers are on the 'meta' device (shapes without weights): such a model
    cannot be moved, trained or saved."""
    if any(t.device.type == "meta" for t in list(model.parameters()) + list(model.buffers())):
        raise WiringError(f"the {role} has parameters on the 'meta' device (shapes without weights)",
                          fix="load or initialize the weights in the model factory (e.g. model.to_empty(...) and "
                              "load_state_dict) before training")


def check_models_materialized(distiller) -> None:
    """`check_materialized` for the student and a teacher model of a distiller (before the engine moves them)."""
    check_materialized(distiller.student, "student")
    teacher = _teacher_module(distiller)
    if teacher is not None:
        check_materialized(teacher, "teacher")


def check_placement(model: nn.Module, inputs: Any, role: str) -> None:
    """WiringError when a model's parameters cannot take `inputs`: another device, another float dtype, or
    'meta' (shapes without weights). Models spread over several devices (``device_map``) are not checked."""
    params = [p for p in model.parameters()]
    if not params:
        return
    check_materialized(model, role)
    devices = {p.device for p in params}
    tensors = _tensors(inputs)
    if not tensors:
        return
    x = tensors[0]
    if len(devices) == 1:
        (device,) = devices
        if device != x.device:
            raise WiringError(f"the {role}'s parameters are on {device} but the batch is on {x.device}",
                              fix="do not move the model in its factory; the engine places the models "
                                  "(set CUDA_VISIBLE_DEVICES / accelerate settings to choose the device)")
    float_inputs = {t.dtype for t in tensors if t.dtype.is_floating_point}
    float_params = {p.dtype for p in params if p.dtype.is_floating_point}
    if len(float_inputs) == 1 and len(float_params) == 1 and float_inputs != float_params:
        (p_dtype,), (x_dtype,) = float_params, float_inputs
        name = lambda d: str(d).replace("torch.", "")  # noqa: E731
        raise WiringError(f"the {role}'s parameters are {name(p_dtype)} but the inputs are {name(x_dtype)}",
                          fix=f"build the {role} in {name(x_dtype)} (e.g. model.float()); for lower precision "
                              "use train.mixed_precision instead of casting the model")


def check_vocabularies(student: nn.Module, teacher: Any, tokenizer: Any = None) -> None:
    """Two models that declare a vocabulary (``config.vocab_size``) and read the same token ids must share it
    (`kdistill.models.vocab.check_vocab`; with `tokenizer` a head padded beyond the tokenizer's size is allowed)."""
    if not (hasattr(getattr(student, "config", None), "vocab_size")
            and hasattr(getattr(teacher, "config", None), "vocab_size")):
        return
    from kdistill.models.vocab import check_vocab

    check_vocab(student, teacher, tokenizer=tokenizer)


def _teacher_module(distiller) -> Optional[nn.Module]:
    model = getattr(distiller.teacher, "model", distiller.teacher)
    return model if isinstance(model, nn.Module) else None


def dry_run(distiller, batch: Mapping[str, Any]) -> None:
    """Check the wiring of an objective (`kdistill.objective.Objective`) on one batch and build its lazy parts
    (its ``build``): one line per fault, raised before any optimizer step."""
    check_finite(batch, "first batch")
    student_inputs = batch.get("student_x", batch["x"])
    teacher_inputs = batch.get("teacher_x", batch["x"])
    check_placement(distiller.student, student_inputs, "student")
    teacher = _teacher_module(distiller)
    if teacher is not None:
        check_placement(teacher, teacher_inputs, "teacher")
        if "teacher_x" not in batch and "student_x" not in batch:  # both read the same ids
            check_vocabularies(distiller.student, teacher, getattr(distiller, "tokenizer", None))
    try:
        distiller.build(batch)
    except KDError:
        raise
    except _FORWARD_ERRORS as err:
        raise _diagnose(distiller, batch, err) from None


def _diagnose(distiller, batch: Mapping[str, Any], err: BaseException) -> WiringError:
    """Which side failed: re-run the teacher alone, then the student alone, on the same batch."""
    sides = []
    if distiller.teacher is not None:
        sides.append(("teacher", batch.get("teacher_x", batch["x"]), lambda: distiller.teacher(batch)))
    inputs = batch.get("student_x", batch["x"])
    run_student = getattr(distiller.side, "run_student", None)
    if run_student is not None:
        sides.append(("student", inputs, lambda: run_student(inputs)))
    for role, side_inputs, call in sides:
        try:
            with torch.no_grad():
                call()
        except _FORWARD_ERRORS as side_err:
            return WiringError(f"the {role}'s forward fails on the first batch (inputs {_describe(side_inputs)}): "
                               f"{_first_line(side_err)}",
                               fix=f"make the {role} accept the dataset's inputs (its factory receives "
                                   "input_shape and num_classes)")
    return WiringError(f"the objective fails on the first batch: {_first_line(err)}", where="distill.terms",
                       fix="check the terms' taps and params against docs/methods.md")


def preflight(stages: Iterable[tuple[str, Any, Any, Any]], *, device: Optional[torch.device] = None,
              world_size: int = 1, num_classes: Optional[int] = None) -> None:
    """Check every stage of a plan before the first one trains.

    `stages` holds (name, distiller, dataset, train_config); the distillers should hold throw-away copies of the
    models (the dry run freezes a teacher and builds adapters). RNG states are left as they were. A fault raises
    the `KDError` of `dry_run`/`check_data` with the stage's name added to its `where`."""
    from accelerate.utils import send_to_device

    from kdistill.seeding import preserved_global_rng

    device = device or torch.device("cpu")
    with torch.random.fork_rng(devices=[]), preserved_global_rng():
        for name, distiller, data, cfg in stages:
            try:
                check_data(data, batch_size=cfg.batch_size, world_size=world_size, num_classes=num_classes)
                if not hasattr(data, "batch"):
                    continue  # other datasets are checked by the engine's own dry run on its first batch
                micro = cfg.batch_size // cfg.grad_accum
                batch = send_to_device(data.batch(torch.arange(micro)), device)
                check_models_materialized(distiller)
                distiller.side.to(device)
                teacher = _teacher_module(distiller)
                if teacher is not None:
                    teacher.to(device)
                dry_run(distiller, batch)
            except KDError as err:
                where = f"stage '{name}'" + (f", {err.where}" if err.where else "")
                raise type(err)(err.what, where=where, fix=err.fix) from None
