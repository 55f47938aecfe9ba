"""Several teachers at once: one soft target from K frozen teachers of any architectures.

With teacher k's logits z_k, its softened prediction P_k = softmax(z_k / T) and per-sample weights w_k(x)
(summing to 1 over k), the combined target is ``P(x) = sum_k w_k(x) P_k(x)``. The teacher callable returns
``T * log P`` as its logits, so that the usual KD loss at temperature T sees exactly P. Weights:

* ``mean``: w_k = 1 / K (the ensemble average of probabilities, Hinton et al. 2015; You et al. 2017);
* ``weights``: fixed w_k given by the user, normalized to sum 1;
* ``agreement``: per input, each teacher is weighted by its agreement with the consensus of the other teachers
  (in the spirit of multi-teacher agreement KD: trust a teacher where the rest agree with it)::

      c_k(x) = mean_{l != k} p_l(x),   A_k(x) = sum_c p_k(x)_c * c_k(x)_c,   w_k(x) = softmax_k(A_k(x) / tau)

  with p_k = softmax(z_k) at temperature 1 and tau the agreement temperature (default 0.05). A_k is the
  probability that a class drawn from teacher k equals one drawn from the others' consensus: high where k
  confidently agrees with them, about 1/C for a near-uniform (barely trained) teacher and near 0 for a
  confidently wrong one, so such a teacher gets a small weight. The leave-one-out consensus keeps a teacher
  from vouching for itself.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional, Sequence, get_args

import torch
from pydantic import Field, model_validator
from torch import nn

from kdistill.configbase import Strict
from kdistill.distiller import Term
from kdistill.errors import WiringError
from kdistill.evaluate import predict_logits
from kdistill.losses import get_loss
from kdistill.outputs import LOGITS
from kdistill.schemes.common import SchemeJob, scheme_run
from kdistill.schemes.sections import TeacherConfig
from kdistill.teachers.live import LiveTeacher

Combine = Literal["mean", "weights", "agreement"]


class MultiTeacherScheme(Strict):
    """Several teachers (any architectures) combined into one soft target."""

    name: Literal["multi_teacher"]
    teachers: list[TeacherConfig] = Field(..., min_length=2)
    combine: Combine = "mean"
    weights: Optional[list[float]] = Field(None, description="fixed teacher weights (combine: weights)")
    agreement_temperature: float = Field(0.05, gt=0, description="sharpness of the agreement weighting")

    @model_validator(mode="after")
    def _weights_match(self) -> "MultiTeacherScheme":
        if self.combine == "weights":
            if not self.weights or len(self.weights) != len(self.teachers) or min(self.weights) < 0 \
                    or sum(self.weights) <= 0:
                raise ValueError(f"combine 'weights' needs {len(self.teachers)} non-negative weights, one per teacher")
        elif self.weights is not None:
            raise ValueError(f"'weights' is only used with combine: weights (combine is '{self.combine}')")
        return self


COMBINE = get_args(Combine)


def agreement_weights(teacher_logits: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Per-position teacher weights (K, ...) from stacked logits (K, ..., C): softmax over k of
    A_k = <p_k, mean of the other teachers' p> / `temperature` (p at softmax temperature 1)."""
    k = teacher_logits.shape[0]
    if k < 2:
        raise WiringError("agreement weighting needs at least 2 teachers")
    p = torch.softmax(teacher_logits.float(), -1)
    total = p.sum(0)
    agreement = torch.stack([(p[i] * (total - p[i]) / (k - 1)).sum(-1) for i in range(k)])
    return torch.softmax(agreement / temperature, dim=0)


def combine_teachers(teacher_logits: Sequence[torch.Tensor], combine: str = "mean",
                     weights: Optional[Sequence[float]] = None, temperature: float = 1.0,
                     agreement_temperature: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(combined logits T * log sum_k w_k softmax(z_k / T), weights (K, ...)). See the module docstring."""
    if combine not in COMBINE:
        raise WiringError(f"unknown teacher combination '{combine}'", fix=f"use one of {', '.join(COMBINE)}")
    stacked = torch.stack([z.float() for z in teacher_logits])
    k = stacked.shape[0]
    positions = stacked.shape[1:-1]
    if combine == "agreement":
        w = agreement_weights(stacked, agreement_temperature)
    else:
        if combine == "weights":
            if weights is None or len(weights) != k:
                got = "none" if weights is None else len(weights)
                raise WiringError(f"combine 'weights' needs {k} weights, got {got}", fix="give one weight per teacher")
            fixed = torch.as_tensor(weights, dtype=torch.float32, device=stacked.device)
        else:
            fixed = torch.ones(k, device=stacked.device)
        w = (fixed / fixed.sum()).view(k, *([1] * len(positions))).expand(k, *positions)
    log_probs = torch.log_softmax(stacked / temperature, -1)
    combined = torch.logsumexp(log_probs + w.clamp_min(1e-30).log().unsqueeze(-1), dim=0)
    return temperature * combined, w


class MultiTeacher:
    """A teacher callable over K teachers (frozen models, or teacher callables ``batch -> {"logits": ...}``):
    ``batch -> {"logits": combined, "teacher_weights": (B, K)}``.

    Set `temperature` to the temperature of the KD term that reads these logits."""

    def __init__(self, teachers: Sequence[nn.Module], combine: str = "mean",
                 weights: Optional[Sequence[float]] = None, temperature: float = 1.0,
                 agreement_temperature: float = 0.05):
        if len(teachers) < 2:
            raise WiringError(f"multi-teacher distillation needs at least 2 teachers, got {len(teachers)}")
        if combine not in COMBINE:
            raise WiringError(f"unknown teacher combination '{combine}'", fix=f"use one of {', '.join(COMBINE)}")
        # models run live (frozen); any other teacher callable (cached, black-box) is used as it is
        self.teachers = [LiveTeacher(t) if isinstance(t, nn.Module) else t for t in teachers]
        self.combine, self.weights = combine, weights
        self.temperature, self.agreement_temperature = temperature, agreement_temperature

    def to(self, device) -> "MultiTeacher":
        for t in self.teachers:
            if hasattr(t, "to"):
                t.to(device)
        return self

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        outputs = [t(batch)[LOGITS] for t in self.teachers]
        shapes = {tuple(o.shape) for o in outputs}
        if len(shapes) != 1:
            raise WiringError(f"the teachers' outputs differ in shape: {sorted(shapes)}",
                              fix="every teacher must predict the same classes")
        with torch.no_grad():
            logits, w = combine_teachers(outputs, self.combine, self.weights, self.temperature,
                                         self.agreement_temperature)
        return {LOGITS: logits, "teacher_weights": w.movedim(0, -1)}


def kd_temperature(terms: Sequence[Term]) -> float:
    """The temperature of the first logit term that has one (1.0 if none): where the teachers are combined."""
    for term in terms:
        if get_loss(term.loss).needs_teacher and term.teacher == LOGITS and "temperature" in term.params:
            return float(term.params["temperature"])
    return 1.0


class _CombinedModel(nn.Module):
    """The combined teachers as a model (for evaluation): x -> log P at temperature 1."""

    def __init__(self, teachers: Sequence[nn.Module], teacher: MultiTeacher):
        super().__init__()
        self.members = nn.ModuleList(teachers)
        self.teacher = teacher

    def forward(self, x):
        return self.teacher({"x": x})[LOGITS] / self.teacher.temperature


@scheme_run
def run(job: SchemeJob) -> dict:
    cfg, scheme = job.cfg, job.cfg.scheme
    terms, _ = job.terms()
    if any(t.teacher != LOGITS for t in terms if get_loss(t.loss).needs_teacher):
        raise WiringError("multi-teacher terms can read only the combined 'logits' of the teachers",
                          where="distill.terms", fix="drop teacher taps from the terms")
    teachers = ready_teachers(job)
    from kdistill.audit.stage import audit_record_for_summary, audit_stage

    audit = audit_stage(job, audit_model(job, teachers), {f"teacher{k}": t for k, t in enumerate(teachers)},
                        name=f"teachers combined ({scheme.combine})")
    teacher = MultiTeacher(teachers, scheme.combine, scheme.weights, kd_temperature(terms),
                           scheme.agreement_temperature)
    student = job.distill("student", job.student(), teacher, seed=cfg.seed + 3)
    combined = _CombinedModel(teachers, MultiTeacher(teachers, scheme.combine, scheme.weights, 1.0,
                                                     scheme.agreement_temperature))
    combined_logits = predict_logits(combined, job.bundle.test)
    models = {f"teacher{k}": job.evaluate(t) for k, t in enumerate(teachers)}
    models[f"teachers combined ({scheme.combine})"] = job.evaluate(combined, cost=False)
    if cfg.baseline:
        models["student, no teacher"] = job.evaluate(job.baseline(), reference_logits=combined_logits)
    models["student"] = job.evaluate(student, reference_logits=combined_logits)
    test_batch = {"x": job.bundle.test.tensors["x"]}
    mean_weights = teacher(test_batch)["teacher_weights"].reshape(-1, len(teachers)).mean(0)
    inherited = {"teachers combined": audit_model(job, teachers), "student": student}
    return job.finish(models, combine=scheme.combine,
                      mean_teacher_weights_test=[float(w) for w in mean_weights],
                      audit=audit_record_for_summary(audit, job, inherited))


def ready_teachers(job: SchemeJob) -> list[nn.Module]:
    """The configured teachers, frozen, each loaded or trained as its stage ``teacher<k>`` (as `run` does)."""
    cfg = job.cfg
    return [job.teacher(tc, seed=cfg.seed + 1000 * (k + 1), stage=f"teacher{k}", where=f"scheme.teachers[{k}]")
            for k, tc in enumerate(cfg.scheme.teachers)]


def audit_model(job: SchemeJob, teachers: Sequence[nn.Module]) -> nn.Module:
    """The teachers as one differentiable classifier for the audit: the (weighted) mean of their probabilities
    at temperature 1 (combine 'agreement' is audited as the plain mean)."""
    from kdistill.schemes.common import ProbabilityEnsemble

    scheme = job.cfg.scheme
    return ProbabilityEnsemble(teachers, scheme.weights if scheme.combine == "weights" else None)


__all__ = ["MultiTeacher", "MultiTeacherScheme", "agreement_weights", "audit_model", "combine_teachers",
           "kd_temperature", "ready_teachers", "run"]
