"""Selective teacher intervention: the teacher speaks only where the student has gone astray.

At each position (a sample of 2-D logits, or a token of 3-D logits (B, T, C)) the divergence between student
and teacher is measured, detached:

* ``kl``:   KL(softmax(teacher) || softmax(student)) at temperature 1;
* ``top1``: 1 where their top-1 classes differ, else 0;

and the gated teacher terms count only where ``divergence > threshold(step)``::

    L_term = (1 / N) * sum_{positions i} [d_i > tau(step)] * loss_i

N being the number of valid positions (every sample; for tokens, those whose label is not -100 when labels
are given), so a position the student already gets right adds nothing and the others weigh as in plain KD.
``granularity: sample`` on 3-D logits gates whole sequences by their mean token divergence. The threshold
schedule is ``constant`` (tau) or ``linear`` (from tau to tau_end over the run). Terms on labels (``ce``) and
on taps are never gated.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional, Sequence, get_args

import torch
from pydantic import Field

from kdistill import losses
from kdistill.configbase import Strict
from kdistill.distiller import Distiller, StudentSide, Term, split_taps
from kdistill.errors import WiringError
from kdistill.evaluate import predict_logits
from kdistill.losses import call_term, get_loss, loss_names
from kdistill.outputs import LOGITS
from kdistill.schemes.common import SchemeJob, scheme_run

Divergence = Literal["kl", "top1"]
DIVERGENCES = get_args(Divergence)


class SelectiveScheme(Strict):
    """Selective teacher intervention: the teacher's terms count only at positions (samples, or tokens of
    3-D logits) where student and teacher diverge by more than a threshold."""

    name: Literal["selective"]
    divergence: Divergence = "kl"
    threshold: float = Field(0.1, ge=0)
    threshold_end: Optional[float] = Field(None, ge=0, description="final threshold (schedule: linear)")
    schedule: Literal["constant", "linear"] = "constant"
    granularity: Literal["token", "sample"] = "token"
    terms: Optional[list[str]] = Field(None, description="gated terms (default: every logit term of the teacher)")


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Per-position divergence (shape ``logits.shape[:-1]``) between teacher and student, detached."""
    s, t = student_logits.detach().float(), teacher_logits.detach().float()
    if kind == "kl":
        return losses.kl(s, t, reduction="none")
    if kind == "top1":
        return (s.argmax(-1) != t.argmax(-1)).float()
    raise WiringError(f"unknown divergence '{kind}'", fix=f"use one of {', '.join(DIVERGENCES)}")


def threshold_at(step: int, total_steps: int, start: float, end: Optional[float] = None,
                 schedule: str = "constant") -> float:
    if schedule == "constant" or end is None:
        return start
    if schedule == "linear":
        return start + (end - start) * min(1.0, step / max(1, total_steps - 1))
    raise WiringError(f"unknown threshold schedule '{schedule}'", fix="use 'constant' or 'linear'")


def intervention_mask(student_logits: torch.Tensor, teacher_logits: torch.Tensor, threshold: float,
                      kind: str = "kl", granularity: str = "token") -> torch.Tensor:
    """Bool (positions): where the teacher intervenes. 'sample' on 3-D logits gates whole sequences."""
    d = divergence(student_logits, teacher_logits, kind)
    if granularity == "sample" and d.dim() > 1:
        d = d.flatten(1).mean(1).view(-1, *([1] * (d.dim() - 1))).expand_as(d)
    return d > threshold


class SelectiveSide(StudentSide):
    """A `StudentSide` whose gated logit terms count only at the positions `intervention_mask` selects."""

    def __init__(self, student, terms: list[Term], student_taps: Mapping[str, str], *, gated: Sequence[str],
                 kind: str = "kl", threshold: float = 0.1, threshold_end: Optional[float] = None,
                 schedule: str = "constant", granularity: str = "token", total_steps: int = 1):
        super().__init__(student, terms, student_taps)
        self.gated = set(gated)
        self.kind, self.granularity = kind, granularity
        self.threshold, self.threshold_end, self.schedule = threshold, threshold_end, schedule
        self.total_steps = total_steps
        self.last_fraction: Optional[torch.Tensor] = None   # share of positions the teacher spoke at, last step

    def current_threshold(self) -> float:
        return threshold_at(self.step, self.total_steps, self.threshold, self.threshold_end, self.schedule)

    def before_terms(self, values: Mapping[str, Any], teacher_values: Mapping[str, Any], labels) -> None:
        select = intervention_mask(values[LOGITS], teacher_values[LOGITS], self.current_threshold(), self.kind,
                                   self.granularity)
        valid = torch.ones_like(select)
        if labels is not None and labels.shape == select.shape and select.dim() > 1:
            valid = labels != -100
        self._select, self._valid = select & valid, valid
        self.last_fraction = self._select.float().sum() / valid.float().sum().clamp_min(1)

    def value_of(self, term: Term, spec, student: Any, teacher: Any, labels: Optional[torch.Tensor]):
        if term.name not in self.gated:
            return super().value_of(term, spec, student, teacher, labels)
        per_position = call_term(spec, student, teacher, labels, {**term.params, "reduction": "none"})
        return torch.where(self._select, per_position, per_position.new_zeros(())).sum() \
            / self._valid.sum().clamp_min(1).to(per_position.dtype)


class SelectiveDistiller(Distiller):
    """A `Distiller` whose teacher terms apply only where student and teacher diverge (see the module doc).

    Args:
        gated: names of the terms to gate (default: every logit term of the teacher: kd, kl, jsd, skew_kl, tvd).
        divergence: 'kl' or 'top1'; threshold / threshold_end / schedule: the threshold over the run;
        granularity: 'token' or 'sample' (3-D logits); total_steps: the length of the run (for the schedule).
    """

    def __init__(self, student, teacher, terms: list[Term], *, gated: Optional[Sequence[str]] = None,
                 divergence: str = "kl", threshold: float = 0.1, threshold_end: Optional[float] = None,
                 schedule: str = "constant", granularity: str = "token", total_steps: int = 1,
                 student_taps: Optional[Mapping[str, str]] = None, teacher_taps: Optional[Mapping[str, str]] = None):
        super().__init__(student, teacher, terms, student_taps=student_taps, teacher_taps=teacher_taps)
        candidates = [t.name for t in terms if get_loss(t.loss).gating and t.student == LOGITS and t.teacher == LOGITS]
        gateable = ", ".join(n for n in loss_names("response") if get_loss(n).gating)
        gated = list(gated) if gated is not None else candidates
        wrong = [g for g in gated if g not in candidates]
        if wrong:
            raise WiringError(f"cannot gate term(s) {wrong}: only logit terms of the teacher can be gated "
                              f"({gateable} on 'logits')", where="scheme.terms",
                              fix=f"choose among {candidates or 'none'}")
        if not gated:
            raise WiringError("selective intervention has no teacher term to gate", where="distill.terms",
                              fix=f"add a logit term ({gateable})")
        if divergence not in DIVERGENCES:
            raise WiringError(f"unknown divergence '{divergence}'", fix=f"use one of {', '.join(DIVERGENCES)}")
        base = self.side
        self.side = SelectiveSide(base.student, base.terms, base.student_tap_specs, gated=gated, kind=divergence,
                                  threshold=threshold, threshold_end=threshold_end, schedule=schedule,
                                  granularity=granularity, total_steps=total_steps)
        self.module = self.side


@scheme_run
def run(job: SchemeJob) -> dict:
    cfg, s = job.cfg, job.cfg.scheme
    terms, taps = job.terms()
    teacher = job.teacher()
    student_taps, teacher_taps = split_taps(terms, taps)
    objective = SelectiveDistiller(job.student(), teacher, terms, gated=s.terms, divergence=s.divergence,
                                   threshold=s.threshold, threshold_end=s.threshold_end, schedule=s.schedule,
                                   granularity=s.granularity, total_steps=cfg.train.steps, student_taps=student_taps,
                                   teacher_taps=teacher_taps)
    student = job.stage("student", objective, job.bundle.distill_set(), seed=cfg.seed + 3)
    teacher_logits = predict_logits(teacher, job.bundle.test)
    models = {"teacher": job.evaluate(teacher)}
    if cfg.baseline:
        models["student, no teacher"] = job.evaluate(job.baseline(), reference_logits=teacher_logits)
    models["student, selective KD"] = job.evaluate(student, reference_logits=teacher_logits)
    return job.finish(models)
