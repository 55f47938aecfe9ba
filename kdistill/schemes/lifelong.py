"""Lifelong distillation: Learning without Forgetting (Li & Hoiem 2016, "Learning without Forgetting").

One network with one output per class; a task is a set of classes and reads only its own outputs (the
multi-head, task-aware setting of LwF: old-task accuracy is the argmax over the old classes' outputs).

1. ``old``: the model learns the old task (cross-entropy over the old classes' outputs, old-class data).
2. The old model is frozen; on the *new* task's data (no old data is kept), the model learns

       L = CE(z_new, y) + lambda_o * KL( softmax(z*_old / T) || softmax(z_old / T) )

   z*_old being the frozen old model's outputs for the old classes on the same new-task input, T = 2 as in the
   paper (KL and the paper's soft cross-entropy differ by the teacher's entropy, a constant: same gradient).
   Plain fine-tuning is the same round without the second term. Forgetting = old-task accuracy before - after.
   Before it, the paper's warm-up step (sec. 3): the shared and old-task parameters frozen, only the new task's
   head learns (CE over the new classes' outputs) for ``warmup_steps``; here the new head is the new classes'
   rows of the model's last linear layer, trained as a separate parameter (so no optimizer or weight decay
   touches anything else, BatchNorm statistics included) and written back. LwF and fine-tuning both start from
   the warmed-up model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from pydantic import Field, model_validator
from torch import nn

from kdistill.configbase import Strict
from kdistill.data import ArrayDataset
from kdistill.errors import ConfigError, WiringError
from kdistill.evaluate import accuracy, predict_logits
from kdistill.losses import ce, kl
from kdistill.objective import SchemeSide, SideObjective
from kdistill.outputs import call_model, logits_of
from kdistill.schemes.common import SchemeJob, freeze, scheme_run
from kdistill.tasks.job import run_stage
from kdistill.train_config import TrainConfig


class LifelongScheme(Strict):
    """Learning without Forgetting (Li & Hoiem 2016): learn new classes while distilling the old model's
    outputs on the new data; compared with plain fine-tuning."""

    name: Literal["lifelong"]
    old_classes: list[int] = Field(..., min_length=1)
    new_classes: list[int] = Field(..., min_length=1)
    lwf_weight: float = Field(1.0, ge=0)
    temperature: float = Field(2.0, gt=0)
    old_train: Optional[TrainConfig] = Field(None, description="training of the old task (default: train)")
    warmup_steps: Optional[int] = Field(None, ge=0, description="steps training only the new head first "
                                                               "(default: train.steps // 10; 0: no warm-up)")
    finetune: bool = Field(True, description="also fine-tune without distillation for comparison")

    @model_validator(mode="after")
    def _disjoint(self) -> "LifelongScheme":
        both = set(self.old_classes) & set(self.new_classes)
        if both or len(set(self.old_classes)) != len(self.old_classes) or \
                len(set(self.new_classes)) != len(self.new_classes):
            raise ValueError(f"old_classes and new_classes must be distinct and disjoint (shared: {sorted(both)})")
        return self


def task_data(data: ArrayDataset, classes: Sequence[int], name: str = "") -> ArrayDataset:
    """The labelled rows of `classes` (labels unchanged)."""
    y = data.tensors["y"]
    rows = torch.isin(y, torch.as_tensor(list(classes))).nonzero().flatten()
    if len(rows) == 0:
        raise ConfigError(f"no examples of classes {list(classes)} in '{data.name}'", where="scheme")
    return ArrayDataset({k: v[rows] for k, v in data.tensors.items() if k != "index"}, name or f"{data.name}-task")


class TaskSide(SchemeSide):
    """forward -> (output, {"ce": CE over `task_classes` outputs, "lwf": KL on `keep_classes` outputs vs teacher})."""

    def __init__(self, model: nn.Module, task_classes: Sequence[int], keep_classes: Sequence[int] = (),
                 lwf_weight: float = 1.0, temperature: float = 2.0):
        super().__init__()
        self.student = model
        self.task_classes = list(task_classes)
        self.keep_classes = list(keep_classes)
        self.lwf_weight, self.temperature = lwf_weight, temperature
        self.step = 0

    def _local_labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        lookup = torch.full((num_classes + 1,), -100, dtype=torch.long, device=labels.device)
        lookup[torch.as_tensor(self.task_classes, device=labels.device)] = torch.arange(
            len(self.task_classes), device=labels.device)
        return lookup[torch.where(labels < 0, torch.full_like(labels, num_classes), labels)]

    def build(self, inputs, teacher_values, labels) -> None:
        z = logits_of(call_model(self.student, inputs))
        top = max(self.task_classes + self.keep_classes)
        if top >= z.shape[-1]:
            raise WiringError(f"class {top} is beyond the model's {z.shape[-1]} outputs", where="scheme",
                              fix="give the model one output per class of every task")
        if labels is None:
            raise WiringError("learning a task needs labels 'y'")
        if self.keep_classes and "logits" not in teacher_values:
            raise WiringError("LwF needs the old model's logits", fix="pass the frozen old model as the teacher")

    def forward(self, inputs, teacher_values, labels):
        out = call_model(self.student, inputs)
        z = logits_of(out)
        terms = {"ce": ce(z[..., self.task_classes], self._local_labels(labels, z.shape[-1]))}
        if self.keep_classes:
            old = teacher_values["logits"][..., self.keep_classes]
            terms["lwf"] = self.lwf_weight * kl(z[..., self.keep_classes], old, self.temperature)
        return out, terms


class WarmupSide(SchemeSide):
    """The warm-up of LwF: only the new classes' rows of the model's last linear layer learn; everything else is
    frozen (eval mode). forward -> (output with the new rows' logits, {"ce": CE over the new classes})."""

    def __init__(self, model: nn.Module, new_classes: Sequence[int]):
        super().__init__()
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise WiringError("the LwF warm-up needs the model's output layer to be an nn.Linear",
                              where="scheme.warmup_steps", fix="set scheme.warmup_steps: 0")
        self.head = linears[-1]
        self.new_classes = list(new_classes)
        rows = torch.as_tensor(self.new_classes)
        self.weight = nn.Parameter(self.head.weight.detach()[rows].clone())
        self.bias = nn.Parameter(self.head.bias.detach()[rows].clone()) if self.head.bias is not None else None
        object.__setattr__(self, "student", model)   # not a child: its parameters are not trained here
        self.step = 0

    def run_student(self, inputs):
        self.student.eval()
        return call_model(self.student, inputs), {}

    def build(self, inputs, teacher_values, labels) -> None:
        self.student.eval()
        z = logits_of(call_model(self.student, inputs))
        if z.shape[-1] != self.head.out_features or max(self.new_classes) >= z.shape[-1]:
            raise WiringError(f"the model's last linear layer gives {self.head.out_features} outputs, its output "
                              f"has {z.shape[-1]}", where="scheme.warmup_steps",
                              fix="end the model with its classifier layer, or set scheme.warmup_steps: 0")
        if labels is None:
            raise WiringError("learning a task needs labels 'y'")

    def forward(self, inputs, teacher_values, labels):
        captured = {}
        hook = self.head.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0]))
        self.student.eval()
        try:
            with torch.no_grad():
                out = logits_of(call_model(self.student, inputs))
        finally:
            hook.remove()
        new = torch.nn.functional.linear(captured["x"], self.weight, self.bias)
        out = out.clone()
        out[..., self.new_classes] = new
        lookup = torch.full((out.shape[-1] + 1,), -100, dtype=torch.long, device=labels.device)
        lookup[torch.as_tensor(self.new_classes, device=labels.device)] = torch.arange(len(self.new_classes),
                                                                                       device=labels.device)
        local = lookup[torch.where(labels < 0, torch.full_like(labels, out.shape[-1]), labels)]
        return out, {"ce": ce(new, local)}

    def export_student(self) -> nn.Module:
        with torch.no_grad():
            rows = torch.as_tensor(self.new_classes, device=self.head.weight.device)
            self.head.weight[rows] = self.weight.to(self.head.weight.dtype)
            if self.bias is not None:
                self.head.bias[rows] = self.bias.to(self.head.bias.dtype)
        return self.student


class WarmupObjective(SideObjective):
    def export_student(self) -> nn.Module:
        return self.side.export_student()


def warm_up(model: nn.Module, data: ArrayDataset, new_classes: Sequence[int], train_cfg: TrainConfig, *,
            seed: int = 0, stage: str = "warmup", run_dir: Optional[Path] = None, progress: bool = False,
            log=print) -> nn.Module:
    """LwF's warm-up: train only the new classes' rows of `model`'s last linear layer on `data` (the rest of
    the model frozen, in eval mode); returns `model` with those rows updated."""
    objective = WarmupObjective(WarmupSide(model, new_classes))
    return run_stage(stage, objective, data, train_cfg, seed=seed, run_dir=run_dir, progress=progress, log=log)[0]


def learn_task(model: nn.Module, data: ArrayDataset, task_classes: Sequence[int], train_cfg: TrainConfig, *,
               old_model: Optional[nn.Module] = None, keep_classes: Sequence[int] = (), lwf_weight: float = 1.0,
               temperature: float = 2.0, seed: int = 0, stage: str = "task", run_dir: Optional[Path] = None,
               progress: bool = False, log=print) -> nn.Module:
    """Train `model` on `task_classes`; with `old_model` and `keep_classes`, also keep the old model's outputs
    on those classes (LwF). Without them this is plain fine-tuning."""
    if keep_classes and old_model is None:
        raise WiringError("keep_classes needs the old model", fix="pass old_model=")
    side = TaskSide(model, task_classes, keep_classes if old_model is not None else (), lwf_weight, temperature)
    objective = SideObjective(side, freeze(old_model) if old_model is not None else None)
    return run_stage(stage, objective, data, train_cfg, seed=seed, run_dir=run_dir, progress=progress, log=log)[0]


def task_accuracy(model: nn.Module, data: ArrayDataset, classes: Sequence[int]) -> float:
    """Task-aware accuracy: on the examples of `classes`, the argmax over those classes' outputs."""
    sub = task_data(data, classes)
    logits = predict_logits(model, sub)[:, list(classes)]
    lookup = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([lookup[int(c)] for c in sub.tensors["y"]])
    return accuracy(logits, labels)


def joint_accuracy(model: nn.Module, data: ArrayDataset, classes: Sequence[int]) -> float:
    """Class-incremental accuracy: on the examples of `classes`, the argmax over every output."""
    sub = task_data(data, classes)
    return accuracy(predict_logits(model, sub), sub.tensors["y"])


def lifelong(make_model, bundle, old_classes: Sequence[int], new_classes: Sequence[int], train_cfg: TrainConfig, *,
             old_train: Optional[TrainConfig] = None, lwf_weight: float = 1.0, temperature: float = 2.0,
             finetune: bool = True, warmup_steps: Optional[int] = None, seed: int = 0, run_dir: Optional[Path] = None,
             progress: bool = False, log=print) -> dict:
    """Old task, the warm-up of the new head (`warmup_steps`, default train_cfg.steps // 10), then the new task
    with LwF (and with plain fine-tuning); returns the models and accuracies."""
    old_train_data = task_data(bundle.train, old_classes, "old-task")
    new_train_data = task_data(bundle.train, new_classes, "new-task")
    old = learn_task(make_model(), old_train_data, old_classes, old_train or train_cfg, seed=seed, stage="old",
                     run_dir=run_dir, progress=progress, log=log)
    old = freeze(old)
    warmup_steps = train_cfg.steps // 10 if warmup_steps is None else warmup_steps
    if warmup_steps:
        warm = make_model()
        warm.load_state_dict(old.state_dict())
        warmup_cfg = train_cfg.model_copy(update={"steps": warmup_steps, "eval_every": 0,
                                                  "checkpoint_every": min(train_cfg.checkpoint_every, warmup_steps)})
        warm = warm_up(warm, new_train_data, new_classes, warmup_cfg, seed=seed + 2, run_dir=run_dir,
                       progress=progress, log=log)
        state = {k: v.detach().clone() for k, v in warm.state_dict().items()}
    else:
        state = {k: v.clone() for k, v in old.state_dict().items()}
    rounds = {"lwf": dict(old_model=old, keep_classes=old_classes)}
    if finetune:
        rounds["finetune"] = {}
    result = {"old": {"model": old, "old_task": task_accuracy(old, bundle.test, old_classes)}}
    for name, extra in rounds.items():
        model = make_model()
        model.load_state_dict(state)                     # both start from the (warmed-up) old model
        model = learn_task(model, new_train_data, new_classes, train_cfg, lwf_weight=lwf_weight,
                           temperature=temperature, seed=seed + 1, stage=name, run_dir=run_dir, progress=progress,
                           log=log, **extra)
        result[name] = {"model": model, "old_task": task_accuracy(model, bundle.test, old_classes),
                        "new_task": task_accuracy(model, bundle.test, new_classes),
                        "old_task_joint": joint_accuracy(model, bundle.test, old_classes),
                        "new_task_joint": joint_accuracy(model, bundle.test, new_classes)}
        result[name]["forgetting"] = result["old"]["old_task"] - result[name]["old_task"]
    return result


@scheme_run
def run(job: SchemeJob) -> dict:
    cfg, s = job.cfg, job.cfg.scheme
    classes = job.bundle.num_classes
    for c in s.old_classes + s.new_classes:
        if not 0 <= c < classes:
            raise ConfigError(f"class {c} is not one of the data's classes 0..{classes - 1}",
                              where="scheme.old_classes/new_classes")
    result = lifelong(job.student, job.bundle, s.old_classes, s.new_classes, cfg.train, old_train=s.old_train,
                      lwf_weight=s.lwf_weight, temperature=s.temperature, finetune=s.finetune,
                      warmup_steps=s.warmup_steps, seed=cfg.seed + 3,
                      **job.stage_options)
    models = {"old model (before the new task)": {"accuracy": result["old"]["old_task"]}}
    tasks = {"old model": {"old_task_accuracy": result["old"]["old_task"]}}
    for name, label in (("lwf", "LwF"), ("finetune", "fine-tuning")):
        if name in result:
            r = result[name]
            models[f"{label}: old task"] = {"accuracy": r["old_task"]}
            models[f"{label}: new task"] = {"accuracy": r["new_task"]}
            tasks[label] = {k: v for k, v in r.items() if k != "model"}
    return job.finish(models, old_classes=s.old_classes, new_classes=s.new_classes, tasks=tasks)
