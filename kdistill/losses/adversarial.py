"""Adversarial distillation: a discriminator between teacher and student outputs, as a stateful loss term.

GAN-like KD (Xu, Hsu, Huang 2018, "Training shallow and thin networks for acceleration via knowledge distillation
with conditional adversarial networks"; Belagiannis et al. 2018; KDGAN, Wang et al. 2018): a small discriminator
``D`` learns to tell the teacher's output distribution ``p_t`` from the student's ``p_s``, and the student is trained
to make ``D`` call its outputs "teacher"::

    L_D = -mean_i [ log D(p_t,i) + log(1 - D(p_s,i)) ]        (trains D only)
    L_G = -mean_i log D(p_s,i)                                  (trains the student only; non-saturating form)

with ``p = softmax(logits / T)`` and ``D(p) = sigmoid(MLP(p))``. The term's value is ``L_G + L_D``: ``L_D`` is
computed on detached distributions (its gradient reaches only D) and ``L_G`` through D's detached weights (its
gradient reaches only the student), so one backward pass and one optimizer step make both players' updates.

Deviation from the papers: they alternate a D step and a student step on separate optimizers; here both updates
happen in the same step with the run's optimizer (simultaneous gradient play), which keeps the engine's one-step
contract. The discriminator sees softmax outputs (Xu et al. feed logits; softmax keeps D's input bounded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.errors import WiringError

_WHERE = "distill.terms (loss 'adversarial')"

__all__ = ["DiscriminatorLoss", "discriminator_losses"]


def discriminator_losses(d_teacher: Tensor, d_student: Tensor, d_student_for_generator: Tensor
                         ) -> tuple[Tensor, Tensor]:
    """``(L_D, L_G)`` from discriminator logits: teacher rows, student rows (detached inputs) and student rows
    seen by the student's update (detached weights). BCE in logit form (numerically stable)."""
    ones, zeros = torch.ones_like(d_teacher), torch.zeros_like(d_student)
    loss_d = F.binary_cross_entropy_with_logits(d_teacher, ones) + F.binary_cross_entropy_with_logits(d_student, zeros)
    loss_g = F.binary_cross_entropy_with_logits(d_student_for_generator, torch.ones_like(d_student_for_generator))
    return loss_d, loss_g


class DiscriminatorLoss(nn.Module):
    """The discriminator term (see the module docstring). Built from the first batch's widths by the distiller.

    Args:
        student_dim / teacher_dim: flattened widths of the student and teacher outputs (class counts; must match).
        hidden: width of the MLP's hidden layers (two layers, LeakyReLU 0.2).
        temperature: softmax temperature of the distributions D compares.
        disc_weight: weight of ``L_D`` inside the term (the student's ``L_G`` has weight 1; the term's own weight
            scales both).

    forward(student_logits ``(B, C)``, teacher_logits ``(B, C)``) -> scalar ``L_G + disc_weight * L_D``; the last
    values of both parts are kept in ``last`` (detached tensors, for inspection).
    """

    def __init__(self, student_dim: int, teacher_dim: int, hidden: int = 64, temperature: float = 1.0,
                 disc_weight: float = 1.0) -> None:
        super().__init__()
        if int(student_dim) != int(teacher_dim):
            raise WiringError(f"adversarial: student outputs ({student_dim}) and teacher outputs ({teacher_dim}) "
                              f"differ in width", where=_WHERE, fix="use it on logits of the same classes")
        if isinstance(hidden, bool) or int(hidden) != hidden or hidden < 1:
            raise WiringError(f"adversarial: hidden must be a positive integer, got {hidden!r}", where=_WHERE,
                              fix="use e.g. hidden: 64")
        if not float(temperature) > 0 or not float(disc_weight) >= 0:
            raise WiringError(f"adversarial: temperature must be > 0 and disc_weight >= 0, got {temperature!r}, "
                              f"{disc_weight!r}", where=_WHERE, fix="use temperature: 1, disc_weight: 1")
        self.temperature = float(temperature)
        self.disc_weight = float(disc_weight)
        width = int(student_dim)
        self.net = nn.Sequential(nn.Linear(width, int(hidden)), nn.LeakyReLU(0.2), nn.Linear(int(hidden), int(hidden)),
                                 nn.LeakyReLU(0.2), nn.Linear(int(hidden), 1))
        self.last: dict[str, Tensor] = {}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, disc_weight={self.disc_weight}"

    def discriminate(self, probs: Tensor, *, frozen: bool = False) -> Tensor:
        """D's logit per row; with `frozen` the weights are detached (gradients reach only `probs`)."""
        if not frozen:
            return self.net(probs).squeeze(-1)
        x = probs
        for layer in self.net:
            x = F.linear(x, layer.weight.detach(), layer.bias.detach()) if isinstance(layer, nn.Linear) else layer(x)
        return x.squeeze(-1)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        if student_logits.shape != teacher_logits.shape:
            raise WiringError(f"adversarial: student {tuple(student_logits.shape)} vs teacher "
                              f"{tuple(teacher_logits.shape)}", where=_WHERE, fix="feed logits of the same batch")
        dtype = self.net[0].weight.dtype
        p_s = torch.softmax(student_logits.to(dtype) / self.temperature, dim=-1)
        p_t = torch.softmax(teacher_logits.detach().to(dtype) / self.temperature, dim=-1)
        loss_d, loss_g = discriminator_losses(self.discriminate(p_t), self.discriminate(p_s.detach()),
                                              self.discriminate(p_s, frozen=True))
        self.last = {"discriminator": loss_d.detach(), "generator": loss_g.detach()}  # no host sync per step
        return loss_g + self.disc_weight * loss_d
