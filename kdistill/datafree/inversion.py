"""DeepInversion (Yin et al. 2020, "Dreaming to distill"): inputs synthesised from a BatchNorm teacher.

A batch of inputs ``x`` is optimised (Adam) so that, for target classes ``y`` drawn evenly,

    L(x) = ce_weight * CE(teacher(x), y)
         + bn_weight * R_feature(x)
         + tv_weight * R_tv(x) + l2_weight * R_l2(x)
         + compete_weight * (1 - JS(p_teacher(x) / T, p_student(x) / T))        (Adaptive DeepInversion)

    R_feature(x) = sum_l w_l (||mu_l(x) - mu_l^BN||_2 + ||sigma2_l(x) - sigma2_l^BN||_2)

where ``mu_l(x)``, ``sigma2_l(x)`` are the per-channel batch mean and (biased) variance of the input of BatchNorm
layer ``l`` (read by forward hooks, `BNStatistics`) and ``mu_l^BN``, ``sigma2_l^BN`` its running statistics;
``w_1 = first_bn_weight``, other ``w_l = 1``.

Priors as used here: ``R_tv(x) = mean over rows of the mean squared difference of neighbouring values along each
spatial axis`` (the paper combines l1 and l2 variants), ``R_l2(x) = mean over rows of ||x_i||_2``. The JS term
is the paper's competition term (the student disagreeing with the teacher is rewarded), with
``JS(p, q) = (KL(p || m) + KL(q || m)) / 2``, ``m = (p + q) / 2``. Random jitter (shift) and flips are applied at
every step and inputs are clamped to the data range, as in the paper's code description; the learning rate decays
with a cosine schedule.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.errors import WiringError

__all__ = ["BNStatistics", "bn_feature_loss", "competition_loss", "deepinversion_loss", "has_batchnorm",
           "l2_prior", "synthesize_batch", "tv_prior"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) and m.track_running_stats for m in model.modules())


class BNStatistics:
    """Forward hooks on every BatchNorm layer (with running statistics) of `model`: after a forward pass,
    ``pairs`` holds ``(batch_mean, batch_var, running_mean, running_var)`` per layer, in call order. Use as a
    context manager (hooks are removed on exit)."""

    def __init__(self, model: nn.Module, where: str = "teacher"):
        self.layers = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats
                       and m.running_mean is not None]
        if not self.layers:
            raise WiringError(f"the {where} has no BatchNorm layer with running statistics, so DeepInversion has "
                              f"no statistics to match", where=f"{where}.name",
                              fix="use data_free.method: dfad, or a teacher with BatchNorm layers")
        self.pairs: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self._handles: list = []

    def _hook(self, module: nn.Module, inputs, output) -> None:
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))  # every axis but the channels
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        self.pairs.append((mean, var, module.running_mean, module.running_var))

    def __enter__(self) -> "BNStatistics":
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def clear(self) -> None:
        self.pairs = []


def bn_feature_loss(pairs, first_weight: float = 1.0) -> Tensor:
    """``R_feature = sum_l w_l (||mu_l - mu_l^BN||_2 + ||var_l - var_l^BN||_2)`` over ``(mean, var, rmean, rvar)``
    tuples; ``w_1 = first_weight``."""
    total = 0.0
    for i, (mean, var, rmean, rvar) in enumerate(pairs):
        term = torch.linalg.vector_norm(mean - rmean.to(mean.dtype)) + torch.linalg.vector_norm(var - rvar.to(var.dtype))
        total = total + (first_weight if i == 0 else 1.0) * term
    return total if torch.is_tensor(total) else torch.zeros(())


def tv_prior(x: Tensor) -> Tensor:
    """Mean over rows of the mean squared difference of neighbouring values along every spatial axis of
    ``x (B, C, *spatial)`` (for ``(B, L)`` inputs: along L)."""
    x = x.unsqueeze(1) if x.dim() == 2 else x
    per_row = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for axis in range(2, x.dim()):
        if x.shape[axis] > 1:
            diff = x.diff(dim=axis)
            per_row = per_row + diff.pow(2).flatten(1).mean(1)
    return per_row.mean()


def l2_prior(x: Tensor) -> Tensor:
    """Mean over rows of ``||x_i||_2``."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).mean()


def competition_loss(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 3.0) -> Tensor:
    """``1 - JS(softmax(t/T), softmax(s/T))`` averaged over rows (natural log): the ADI competition term."""
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return (1.0 - 0.5 * (kl_pm + kl_qm)).mean()


def deepinversion_loss(x: Tensor, teacher_logits: Tensor, targets: Tensor, pairs, settings,
                       student_logits: Optional[Tensor] = None) -> dict[str, Tensor]:
    """The weighted terms of L(x) (module docstring) as a dict: ``ce``, ``bn``, ``tv``, ``l2`` (+ ``compete``)."""
    terms = {"ce": settings.ce_weight * F.cross_entropy(teacher_logits, targets),
             "bn": settings.bn_weight * bn_feature_loss(pairs, settings.first_bn_weight),
             "tv": settings.tv_weight * tv_prior(x),
             "l2": settings.l2_weight * l2_prior(x)}
    if student_logits is not None and settings.compete_weight > 0:
        terms["compete"] = settings.compete_weight * competition_loss(teacher_logits, student_logits,
                                                                      settings.compete_temperature)
    return terms


def _jitter(x: Tensor, settings, generator: torch.Generator) -> Tensor:
    """Random shift (roll) of the spatial axes by up to `jitter` and a random flip of the last axis."""
    if settings.jitter and x.dim() >= 3:
        shifts = torch.randint(-settings.jitter, settings.jitter + 1, (x.dim() - 2,), generator=generator).tolist()
        x = torch.roll(x, shifts=shifts, dims=tuple(range(2, x.dim())))
    if settings.flip and x.dim() >= 3 and bool(torch.rand((), generator=generator) < 0.5):
        x = x.flip(-1)
    return x


def balanced_targets(n: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """``n`` class targets, every class equally often (up to one), in random order."""
    return torch.arange(n)[torch.randperm(n, generator=generator)] % num_classes


def synthesize_batch(teacher: nn.Module, input_shape, num_classes: int, settings, *, seed: int,
                     student: Optional[nn.Module] = None, device: torch.device | str = "cpu",
                     on_step: Optional[Callable[[int, dict], None]] = None) -> tuple[Tensor, Tensor]:
    """One DeepInversion batch: ``(inputs (batch_size, *input_shape), targets)``; the teacher (and the student,
    for the adaptive term) stay in eval mode and are not changed. `on_step(step, terms)` sees each step's terms."""
    generator = torch.Generator().manual_seed(int(seed))
    n = settings.batch_size
    targets = balanced_targets(n, num_classes, generator).to(device)
    init = torch.randn((n, *input_shape), generator=generator) * settings.init_std
    if settings.clamp is not None:
        low, high = settings.clamp
        init = (low + high) / 2 + init * (high - low) / 2
        init = init.clamp(low, high)
    x = init.to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=settings.lr, betas=(0.5, 0.9))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / settings.steps)))
    was = {m: m.training for m in (teacher, student) if m is not None}
    params = [p for m in (teacher, student) if m is not None for p in m.parameters()]
    grads = [p.requires_grad for p in params]
    teacher.eval()
    if student is not None:
        student.eval()
    try:
        for p in params:
            p.requires_grad_(False)
        with BNStatistics(teacher) as stats:
            for step in range(settings.steps):
                stats.clear()
                inputs = _jitter(x, settings, generator)
                teacher_logits = teacher(inputs)
                student_logits = student(inputs) if student is not None and settings.compete_weight > 0 else None
                terms = deepinversion_loss(inputs, teacher_logits, targets, stats.pairs, settings, student_logits)
                loss = sum(terms.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                if settings.clamp is not None:
                    with torch.no_grad():
                        x.clamp_(*settings.clamp)
                if on_step is not None:
                    on_step(step, terms)
    finally:
        for p, g in zip(params, grads):
            p.requires_grad_(g)
        for m, mode in was.items():
            m.train(mode)
    return x.detach().cpu(), targets.cpu()
