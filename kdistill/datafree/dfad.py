"""DFAD (Fang et al. 2019, "Data-free adversarial distillation"): a generator against the student.

A generator ``G(z)`` maps noise to inputs. Each iteration:

1. generator step (Adam): maximise the discrepancy ``D = mean |teacher(G(z)) - student(G(z))|`` (MAE of logits),
   i.e. minimise ``-D`` (+ optionally ``bn_weight * R_feature`` of the teacher on ``G(z)``, see
   `kdistill.datafree.inversion`: 0 by default, which is plain DFAD);
2. ``student_steps`` student steps (SGD, momentum 0.9, weight decay 5e-4): minimise ``D`` on fresh ``G(z)``
   (generator and teacher fixed).

The generator follows the paper's DCGAN-style design (linear -> 2w channels at 1/4 resolution -> upsample ->
conv 2w -> upsample -> conv w -> conv C, BatchNorm and LeakyReLU between; the paper's w is 64); its output is a
sigmoid scaled to the data range (``clamp``), where the paper uses tanh and a final BatchNorm for standardised
images. For inputs
that are not images (``(L)`` or ``(C, L)``) a two-layer MLP generator is used. The student learning rate decays
with a cosine schedule (the paper uses step decay).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from kdistill.datafree.inversion import BNStatistics, bn_feature_loss
from kdistill.outputs import logits_of

__all__ = ["Generator", "discrepancy", "dfad_generator_step", "dfad_student_step", "train_dfad"]


def discrepancy(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """DFAD's model discrepancy: the mean absolute error between teacher and student logits."""
    return (teacher_logits - student_logits).abs().mean()


class Generator(nn.Module):
    """``G(z)``: noise ``(B, z_dim)`` -> inputs ``(B, *input_shape)`` in the ``clamp`` range (or unbounded)."""

    def __init__(self, input_shape: Sequence[int], z_dim: int = 100, clamp: Optional[tuple[float, float]] = (0.0, 1.0),
                 width: int = 64):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.z_dim = int(z_dim)
        self.width = int(width)
        self.clamp = tuple(clamp) if clamp is not None else None
        wide = 2 * self.width
        if len(self.input_shape) == 3:
            c, h, w = self.input_shape
            self.h0, self.w0 = math.ceil(h / 4), math.ceil(w / 4)
            self.project = nn.Sequential(nn.Linear(self.z_dim, wide * self.h0 * self.w0),
                                         nn.BatchNorm1d(wide * self.h0 * self.w0))
            self.body = nn.Sequential(
                nn.Upsample(scale_factor=2), nn.Conv2d(wide, wide, 3, padding=1, bias=False), nn.BatchNorm2d(wide),
                nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2), nn.Conv2d(wide, self.width, 3, padding=1, bias=False),
                nn.BatchNorm2d(self.width), nn.LeakyReLU(0.2), nn.Conv2d(self.width, c, 3, padding=1))
        else:
            width = int(math.prod(self.input_shape))
            self.project = nn.Sequential(nn.Linear(self.z_dim, 4 * self.width), nn.BatchNorm1d(4 * self.width),
                                         nn.LeakyReLU(0.2))
            self.body = nn.Sequential(nn.Linear(4 * self.width, 4 * self.width), nn.BatchNorm1d(4 * self.width),
                                      nn.LeakyReLU(0.2), nn.Linear(4 * self.width, width))

    def forward(self, z: Tensor) -> Tensor:
        x = self.project(z)
        if len(self.input_shape) == 3:
            x = self.body(x.view(-1, 2 * self.width, self.h0, self.w0))[..., :self.input_shape[1], :self.input_shape[2]]
        else:
            x = self.body(x).view(-1, *self.input_shape)
        if self.clamp is None:
            return x
        low, high = self.clamp
        return low + (high - low) * torch.sigmoid(x)


def dfad_generator_step(generator: Generator, teacher: nn.Module, student: nn.Module, optimizer, z: Tensor, *,
                        bn_weight: float = 0.0, stats: Optional[BNStatistics] = None) -> dict[str, Tensor]:
    """One generator step: minimise ``-D`` (+ ``bn_weight * R_feature``). Teacher and student are not updated
    (their parameters get no gradient: the caller keeps them frozen / eval for this step)."""
    generator.train()
    x = generator(z)
    if stats is not None:
        stats.clear()
    t = logits_of(teacher(x))
    s = logits_of(student(x))
    gap = discrepancy(t, s)
    loss = -gap
    terms = {"discrepancy": gap.detach()}
    if bn_weight > 0 and stats is not None:
        bn = bn_feature_loss(stats.pairs)
        loss = loss + bn_weight * bn
        terms["bn"] = bn.detach()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return terms


def dfad_student_step(generator: Generator, teacher: nn.Module, student: nn.Module, optimizer, z: Tensor) -> Tensor:
    """One student step on ``G(z)`` (generator fixed): minimise ``D``. Returns the discrepancy (detached)."""
    with torch.no_grad():
        generator.eval()
        x = generator(z)
        t = logits_of(teacher(x))
    student.train()
    gap = discrepancy(t, logits_of(student(x)))
    optimizer.zero_grad(set_to_none=True)
    gap.backward()
    optimizer.step()
    return gap.detach()


def train_dfad(teacher: nn.Module, student: nn.Module, input_shape, settings, *, seed: int,
               device: torch.device | str = "cpu", on_iteration: Optional[Callable[[int, dict], None]] = None
               ) -> tuple[nn.Module, Generator]:
    """Train `student` from `teacher` alone (DFAD); returns ``(student, generator)``. The teacher stays frozen in
    eval mode; the student's parameters are updated in place."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        generator = Generator(input_shape, settings.z_dim, settings.clamp, settings.width).to(device)
    noise = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
    teacher.eval()
    frozen = [p.requires_grad for p in teacher.parameters()]
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt_g = torch.optim.Adam(generator.parameters(), lr=settings.generator_lr)
    opt_s = torch.optim.SGD(student.parameters(), lr=settings.student_lr, momentum=0.9, weight_decay=5e-4)
    total = settings.iterations
    sched_s = torch.optim.lr_scheduler.LambdaLR(opt_s, lambda i: 0.5 * (1 + math.cos(math.pi * i / total)))

    def draw() -> Tensor:
        return torch.randn(settings.batch_size, settings.z_dim, generator=noise).to(device)

    stats = BNStatistics(teacher) if settings.bn_weight > 0 else None
    try:
        for it in range(total):
            student.eval()  # the generator step must not move the student's BatchNorm statistics
            if stats is not None:
                with stats:
                    terms = dfad_generator_step(generator, teacher, student, opt_g, draw(),
                                                bn_weight=settings.bn_weight, stats=stats)
            else:
                terms = dfad_generator_step(generator, teacher, student, opt_g, draw())
            for _ in range(settings.student_steps):
                terms["student_discrepancy"] = dfad_student_step(generator, teacher, student, opt_s, draw())
            sched_s.step()
            if on_iteration is not None:
                on_iteration(it, terms)
    finally:
        for p, g in zip(teacher.parameters(), frozen):
            p.requires_grad_(g)
    student.eval()
    return student, generator
