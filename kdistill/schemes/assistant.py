"""Teacher-assistant chains (Mirzadeh et al. 2020, "Improved Knowledge Distillation via Teacher Assistant").

When the teacher is much larger than the student, distil in steps: teacher -> assistant 1 -> ... -> student,
each link an offline KD round from the frozen previous model. Assistants are given, or spaced geometrically
in parameter count between teacher and student: assistant j of k has about
``P_student * (P_teacher / P_student) ** (j / (k + 1))`` parameters, built from the student's architecture by
scaling its width knobs (``hidden``, ``channels``, ``width``) by one common factor.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import torch
from pydantic import Field
from torch import nn

from kdistill.configbase import Strict
from kdistill.distiller import Term
from kdistill.errors import ConfigError
from kdistill.evaluate import predict_logits
from kdistill.models import build_model, resolve_factory
from kdistill.schemes.common import SchemeJob, distill, freeze, scheme_run
from kdistill.schemes.sections import ModelConfig
from kdistill.train_config import TrainConfig


class AssistantScheme(Strict):
    """Teacher-assistant chain (Mirzadeh et al. 2020): teacher -> assistant(s) -> student."""

    name: Literal["assistant"]
    assistants: Optional[list[ModelConfig]] = Field(None, description="explicit assistants, largest first")
    num_assistants: int = Field(1, ge=1, description="without `assistants`: this many, spaced geometrically in "
                                                     "parameter count between teacher and student")
    direct: bool = Field(True, description="also distil the student directly from the teacher")


WIDTH_KEYS = ("hidden", "channels", "width")


def width_kwargs(model_cfg: ModelConfig) -> dict[str, Any]:
    """The model's width knobs with their values (configured, or the factory's defaults)."""
    try:
        params = inspect.signature(resolve_factory(model_cfg.name)).parameters
    except (TypeError, ValueError):
        params = {}
    out = {}
    for key in WIDTH_KEYS:
        if key in model_cfg.kwargs:
            out[key] = model_cfg.kwargs[key]
        elif key in params and params[key].default is not inspect.Parameter.empty:
            out[key] = params[key].default
    return out


def _scale(value, factor: float):
    if isinstance(value, (list, tuple)):
        return [max(1, round(v * factor)) for v in value]
    return max(1, round(value * factor))


def param_count(model_cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> int:
    """Parameters of a configured model, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = build_model(model_cfg.name, model_cfg.kwargs, input_shape=input_shape, num_classes=num_classes)
    return sum(p.numel() for p in model.parameters())


def scaled_config(model_cfg: ModelConfig, factor: float) -> ModelConfig:
    widths = width_kwargs(model_cfg)
    kwargs = dict(model_cfg.kwargs)
    kwargs.update({k: _scale(v, factor) for k, v in widths.items()})
    return ModelConfig(name=model_cfg.name, kwargs=kwargs)


def geometric_sizes(student_params: int, teacher_params: int, count: int) -> list[float]:
    """Target parameter counts of `count` assistants, largest first, geometrically between the two."""
    ratio = teacher_params / student_params
    return [student_params * ratio ** (j / (count + 1)) for j in range(count, 0, -1)]


def geometric_assistants(student_cfg: ModelConfig, teacher_params: int, input_shape: Sequence[int],
                         num_classes: int, count: int = 1) -> list[ModelConfig]:
    """`count` assistants of the student's architecture, widths scaled to the geometric target sizes."""
    if not width_kwargs(student_cfg):
        raise ConfigError(f"cannot size assistants for model '{student_cfg.name}': it has no width knob "
                          f"({', '.join(WIDTH_KEYS)})", where="scheme.num_assistants",
                          fix="list the assistants explicitly under scheme.assistants")
    student_params = param_count(student_cfg, input_shape, num_classes)
    if teacher_params <= student_params:
        raise ConfigError(f"the teacher ({teacher_params:,} parameters) is not larger than the student "
                          f"({student_params:,})", where="scheme", fix="list the assistants explicitly")
    out = []
    for target in geometric_sizes(student_params, teacher_params, count):
        lo, hi = 0.0, math.log(teacher_params / student_params) + 1.0  # log width factor; params grow with it
        for _ in range(40):
            mid = (lo + hi) / 2
            if param_count(scaled_config(student_cfg, math.exp(mid)), input_shape, num_classes) < target:
                lo = mid
            else:
                hi = mid
        candidates = [scaled_config(student_cfg, math.exp(v)) for v in (lo, hi)]
        out.append(min(candidates, key=lambda c: abs(math.log(param_count(c, input_shape, num_classes) / target))))
    return out


def train_chain(teacher: nn.Module, chain: Sequence[nn.Module], data, train_cfg: TrainConfig, *,
                terms: Optional[list[Term]] = None, taps: Optional[Mapping[str, str]] = None, seed: int = 0,
                names: Optional[Sequence[str]] = None, run_dir: Optional[Path] = None, progress: bool = False,
                log=print) -> list[nn.Module]:
    """Distil along `chain` (assistants largest first, the student last): link j learns from the frozen
    link j - 1 (link 0 from `teacher`). Returns the trained links."""
    names = list(names) if names is not None else [f"assistant{j + 1}" for j in range(len(chain) - 1)] + ["student"]
    previous = freeze(teacher)
    trained = []
    for j, (name, model) in enumerate(zip(names, chain)):
        model = distill(name, model, previous, data, train_cfg, seed=seed + j, terms=terms, taps=taps,
                        run_dir=run_dir, progress=progress, log=log)
        trained.append(model)
        previous = freeze(model)
    return trained


@scheme_run
def run(job: SchemeJob) -> dict:
    cfg, s = job.cfg, job.cfg.scheme
    terms, taps = job.terms()
    teacher = job.teacher()
    if s.assistants:
        assistant_cfgs = list(s.assistants)
    else:
        teacher_params = sum(p.numel() for p in teacher.parameters())
        assistant_cfgs = geometric_assistants(cfg.student, teacher_params, job.bundle.input_shape,
                                              job.bundle.num_classes, s.num_assistants)
    for j, a in enumerate(assistant_cfgs):
        job.log(f"[assistant] assistant{j + 1}: {a.name} {a.kwargs}")
    chain = [job.model(a, cfg.seed + 404 + j, f"scheme.assistants[{j}]") for j, a in enumerate(assistant_cfgs)]
    chain.append(job.student())
    trained = train_chain(teacher, chain, job.bundle.distill_set(), cfg.train, terms=terms, taps=taps,
                          seed=cfg.seed + 3, **job.stage_options)
    teacher_logits = predict_logits(teacher, job.bundle.test)
    models = {"teacher": job.evaluate(teacher)}
    for j, model in enumerate(trained[:-1]):
        models[f"assistant{j + 1}"] = job.evaluate(model, reference_logits=teacher_logits)
    if cfg.baseline:
        models["student, no teacher"] = job.evaluate(job.baseline(), reference_logits=teacher_logits)
    if s.direct:
        direct = job.distill("direct", job.student(), teacher, seed=cfg.seed + 3 + len(chain) - 1)
        models["student, KD from teacher"] = job.evaluate(direct, reference_logits=teacher_logits)
    models["student, KD via assistants"] = job.evaluate(trained[-1], reference_logits=teacher_logits)
    return job.finish(models, assistants=[a.model_dump(mode="json") for a in assistant_cfgs])
