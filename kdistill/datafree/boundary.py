"""Boundary samples: inputs pushed toward where teacher and student disagree, added to the transfer set.

For inputs ``x_0`` PGD ascends the disagreement (Madry et al. 2018's projected signed-gradient steps; the target
is the KD divergence, in the spirit of Heo et al. 2019's boundary-supporting samples and of adversarial /
"boundary" transfer-set enrichment)::

    x_{k+1} = clip_[x_0 - eps, x_0 + eps]( x_k + step_size * sign(grad_x KL(p_t(x_k) || p_s(x_k))) )

with ``p = softmax(logits / T)``, optionally clamped to the data range. Teacher and student are in eval mode
during the search (their BatchNorm statistics do not move) and get no gradient. `BoundaryDistiller` adds such
copies of a fraction of every training batch, found against the current student (the teacher labels them:
they carry no hard label), so the transfer set follows the student as it learns.

Deviation: Heo et al. attack the teacher toward a chosen boundary class and build the samples once; here the
samples are rebuilt every step against the student being trained (teacher-student disagreement).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.distiller import Distiller
from kdistill.objective import DistillOutput
from kdistill.outputs import logits_of

__all__ = ["BoundaryDistiller", "boundary_samples", "disagreement"]


def disagreement(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-row ``KL(softmax(t/T) || softmax(s/T))``."""
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def boundary_samples(teacher: nn.Module, student: nn.Module, x: Tensor, *, steps: int = 3, step_size: float = 0.05,
                     epsilon: float = 0.15, temperature: float = 1.0,
                     clamp: Optional[tuple[float, float]] = None) -> Tensor:
    """PGD copies of `x` that increase ``KL(teacher || student)`` (see the module docstring); detached."""
    models = [m for m in (teacher, student)]
    modes = [m.training for m in models]
    params = [p for m in models for p in m.parameters()]
    grads = [p.requires_grad for p in params]
    origin = x.detach()
    adv = origin.clone()
    try:
        for m in models:
            m.eval()
        for p in params:
            p.requires_grad_(False)
        for _ in range(int(steps)):
            adv.requires_grad_(True)
            with torch.enable_grad():
                gap = disagreement(logits_of(teacher(adv)).float(), logits_of(student(adv)).float(), temperature).sum()
                (grad,) = torch.autograd.grad(gap, adv)
            with torch.no_grad():
                adv = adv + step_size * grad.sign()
                adv = torch.max(torch.min(adv, origin + epsilon), origin - epsilon)
                if clamp is not None:
                    adv = adv.clamp(*clamp)
    finally:
        for p, g in zip(params, grads):
            p.requires_grad_(g)
        for m, mode in zip(models, modes):
            m.train(mode)
    return adv.detach()


class BoundaryDistiller(Distiller):
    """A `Distiller` whose every batch gets ``round(fraction * B)`` boundary copies of its first rows (found
    against the current student with `boundary_samples`, labelled ``-100``: only the teacher's terms see them).
    Needs a live teacher module (`teacher_model`)."""

    def __init__(self, *args, teacher_model: nn.Module, boundary, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model
        self.boundary = boundary

    def with_boundary(self, batch: Mapping[str, Any]) -> dict:
        x = batch["x"]
        n = max(1, min(len(x), round(self.boundary.fraction * len(x))))
        reps = -(-n // len(x))
        base = x.repeat(reps, *([1] * (x.dim() - 1)))[:n]
        b = self.boundary
        self.teacher_model.to(x.device)
        adv = boundary_samples(self.teacher_model, self.student, base, steps=b.steps, step_size=b.step_size,
                               epsilon=b.epsilon, temperature=b.temperature, clamp=b.clamp)
        out = {"x": torch.cat([x, adv])}
        if "y" in batch:
            out["y"] = torch.cat([batch["y"], torch.full((n,), -100, dtype=batch["y"].dtype, device=x.device)])
        if "index" in batch:
            out["index"] = torch.cat([batch["index"], batch["index"].new_full((n,), -1)])
        return out

    def __call__(self, batch: Mapping[str, Any]) -> DistillOutput:
        return super().__call__(self.with_boundary(batch))
