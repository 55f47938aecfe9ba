"""The objective contract: what the engine calls, declared once.

Every distiller (classification `Distiller`, the selective scheme's gated one, the encoder and LM distillers,
the schemes' own objectives) implements `Objective`:

* ``build(batch)``: a dry run on the first batch (lazy adapters and stateful losses, wiring checks);
* ``__call__(batch) -> DistillOutput``: one forward of the teacher (or one read of its cache), one forward of
  the student, a dict of *named, weighted* loss terms;
* ``side``: the trainable ``nn.Module`` (student + adapters + stateful losses): what the engine optimizes,
  checkpoints and wraps for DDP; it has ``.student``, ``.step`` and ``run_student(inputs) -> (output, taps)``
  (the wiring check uses it to tell which model fails);
* ``module``: writable; the engine puts the (DDP-)wrapped side there and ``__call__`` runs through it;
* ``teacher``: a callable ``batch -> {name: value}`` or None (moved with ``.to(device)`` when it can);
* ``set_step(step)``: the optimizer step about to run (weight warm-ups, schedules, on-policy sampling);
* ``export_student()``: the plain student, without hooks, adapters or loss modules.

`Term` is the one term type (a loss of the registry, its weight, the taps or layer pairs it reads) and
`DistillOutput` the one output type. `SideObjective` implements the contract over any side module whose
``forward(student_inputs, teacher_values, labels)`` returns ``(output, {term: weighted loss})``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol, Union, runtime_checkable

import torch
from torch import nn

from kdistill.outputs import LOGITS, call_model

LayerSpec = Union[str, list]


@dataclass
class Term:
    """One named term of the objective: ``weight * loss(student[student_tap], teacher[teacher_tap], **params)``.

    ``layers`` (encoder terms) pairs student and teacher layers (``uniform``, ``last-K`` or explicit pairs); the
    term is then the mean of the loss over the pairs. ``warmup_steps`` ramps the weight linearly from 0."""

    name: str
    loss: str
    weight: float = 1.0
    student: str = LOGITS
    teacher: str = LOGITS
    params: dict = field(default_factory=dict)
    warmup_steps: int = 0
    layers: Optional[LayerSpec] = None

    def weight_at(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.weight * (step + 1) / self.warmup_steps
        return self.weight


@dataclass
class DistillOutput:
    """The student's output and the weighted loss terms of one batch."""

    output: Any
    terms: dict[str, torch.Tensor]

    @property
    def loss(self) -> torch.Tensor:
        return sum(self.terms.values())


@runtime_checkable
class Objective(Protocol):
    """What `kdistill.engine.Engine` calls (see the module docstring)."""

    side: nn.Module
    module: nn.Module
    teacher: Optional[Callable[[Mapping[str, Any]], dict]]

    @property
    def student(self) -> nn.Module: ...

    def build(self, batch: Mapping[str, Any]) -> None: ...

    def __call__(self, batch: Mapping[str, Any]) -> DistillOutput: ...

    def set_step(self, step: int) -> None: ...

    def export_student(self) -> nn.Module: ...


class SchemeSide(nn.Module):
    """Base of custom sides: holds ``student`` (set by subclasses) and ``step``."""

    step: int = 0

    def run_student(self, inputs: Any) -> tuple[Any, dict]:
        """The student alone on `inputs` (the engine's wiring check uses it to tell which side fails)."""
        return call_model(self.student, inputs), {}


class SideObjective:
    """The contract over a custom side module.

    The side's ``forward(*self.side_args(batch))`` returns ``(output, {term: loss})``; its optional
    ``build(*self.side_args(batch))`` makes lazy modules and checks the wiring. A teacher given as a module is
    wrapped in `kdistill.teachers.LiveTeacher` (frozen, eval mode, inference mode).
    """

    def __init__(self, side: nn.Module, teacher: Optional[Callable[[Mapping], dict]] = None):
        if isinstance(teacher, nn.Module):
            from kdistill.teachers.live import LiveTeacher

            teacher = LiveTeacher(teacher)
        self.side = side
        self.module: nn.Module = side
        self.teacher = teacher
        self.built = False

    @property
    def student(self) -> nn.Module:
        return self.side.student

    def teacher_values(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return self.teacher(batch) if self.teacher is not None else {}

    def side_args(self, batch: Mapping[str, Any]) -> tuple:
        return batch.get("student_x", batch["x"]), self.teacher_values(batch), batch.get("y")

    def set_step(self, step: int) -> None:
        self.side.step = step

    @torch.no_grad()
    def build(self, batch: Mapping[str, Any]) -> None:
        if hasattr(self.side, "build"):
            was = self.side.training
            self.side.eval()
            try:
                self.side.build(*self.side_args(batch))
            finally:
                self.side.train(was)
        self.built = True

    def __call__(self, batch: Mapping[str, Any]) -> DistillOutput:
        out, terms = self.module(*self.side_args(batch))
        return DistillOutput(out, terms)

    def export_student(self) -> nn.Module:
        return self.side.student
