"""Shared checks and helpers of the logit losses (`kdistill.losses.response`, `kdistill.losses.relational`):
shapes, temperatures, masks and reductions, each failing with a one-line `WiringError`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.errors import WiringError

_REDUCTIONS = ("mean", "sum", "none")


def _where(name: str) -> str:
    return f"kdistill.losses.{name}"


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _check_logits(name: str, student: Tensor, teacher: Tensor | None = None) -> None:
    """Validate logit inputs: floating point, ndim >= 2, same shape as each other."""
    for role, x in (("student", student), ("teacher", teacher)):
        if x is None:
            continue
        if not isinstance(x, Tensor):
            raise WiringError(
                f"{name}: {role} logits must be a torch.Tensor, got {type(x).__name__}",
                where=_where(name),
                fix="pass the model's output logits tensor",
            )
        if not x.is_floating_point():
            raise WiringError(
                f"{name}: {role} logits must be floating point, got dtype {x.dtype} with shape {tuple(x.shape)}",
                where=_where(name),
                fix="pass raw logits (float), not class indices",
            )
        if x.ndim < 2:
            raise WiringError(
                f"{name}: {role} logits must have shape (B, C) or (B, T, C), got shape {tuple(x.shape)}",
                where=_where(name),
                fix="add a batch dimension, e.g. logits.unsqueeze(0)",
            )
    if teacher is not None and student.shape != teacher.shape:
        if student.shape[:-1] == teacher.shape[:-1]:
            fix = (
                f"the class counts differ ({student.shape[-1]} vs {teacher.shape[-1]}); give student and teacher "
                "the same label space / vocabulary, or map one onto the other first"
            )
        else:
            fix = "student and teacher logits must have identical shapes (B, C) or (B, T, C); check batching/padding"
        raise WiringError(
            f"{name}: student logits shape {tuple(student.shape)} != teacher logits shape {tuple(teacher.shape)}",
            where=_where(name),
            fix=fix,
        )


def _check_temperature(name: str, temperature: float) -> float:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise WiringError(
            f"{name}: temperature must be a finite number > 0, got {temperature!r}",
            where=_where(name),
            fix="use e.g. temperature=1.0 (or 2.0-4.0 for classic KD)",
        )
    return t


def _check_unit_interval(name: str, arg: str, value: float) -> float:
    v = float(value)
    if not (0.0 <= v <= 1.0):
        raise WiringError(
            f"{name}: {arg} must be in [0, 1], got {value!r}",
            where=_where(name),
            fix=f"choose {arg} between 0 and 1",
        )
    return v


def _check_reduction(name: str, reduction: str, allowed: tuple[str, ...] = _REDUCTIONS) -> None:
    if reduction not in allowed:
        raise WiringError(
            f"{name}: unknown reduction {reduction!r}",
            where=_where(name),
            fix=f"use one of {', '.join(repr(r) for r in allowed)}",
        )


def _check_mask(name: str, mask: Tensor | None, positions_shape: torch.Size) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise WiringError(
            f"{name}: mask must be a bool tensor, got {got}",
            where=_where(name),
            fix="pass e.g. attention_mask.bool() (True = position counts)",
        )
    if mask.shape != positions_shape:
        raise WiringError(
            f"{name}: mask shape {tuple(mask.shape)} != input.shape[:-1] {tuple(positions_shape)}",
            where=_where(name),
            fix="the mask needs one entry per position (all dims except the class dim)",
        )


def reduce_positions(
    per_position: Tensor, mask: Tensor | None = None, reduction: str = "mean", *, name: str = "loss"
) -> Tensor:
    """Apply the shared mask / reduction convention to a per-position loss.

    Args:
        per_position: loss per position, shape ``input.shape[:-1]`` (e.g. ``(B,)`` or ``(B, T)``).
        mask: optional bool tensor of the same shape, ``True`` = position counts.
        reduction: ``"mean"`` (mean over valid positions; 0 if none is valid), ``"sum"`` or ``"none"``
            (returns ``per_position`` with masked positions set to 0).
        name: loss name used in error messages.

    Masked positions are removed with ``torch.where``, so a NaN/Inf at a masked position never reaches the
    result, nor the gradient of any valid position.
    """
    _check_reduction(name, reduction)
    _check_mask(name, mask, per_position.shape)
    if mask is not None:
        per_position = torch.where(mask, per_position, per_position.new_zeros(()))
    if reduction == "none":
        return per_position
    if mask is None and reduction == "mean" and per_position.numel():
        return per_position.mean()
    total = per_position.sum()
    if reduction == "sum":
        return total
    if mask is None:
        return total / max(per_position.numel(), 1)
    return total / mask.sum().clamp(min=1).to(total.dtype)


def _log_softmax(x: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(x.to(_compute_dtype(x)) / temperature, dim=-1)


def _kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(P || Q) = sum_c p_c (log p_c - log q_c) over the last dim, with the convention 0 * log 0 = 0.

    Classes with p_c == 0 (e.g. a teacher logit of -inf) contribute exactly 0, also to the gradient.
    """
    p = log_p.exp()
    absent = p == 0
    log_p = log_p.masked_fill(absent, 0.0)
    log_q = log_q.masked_fill(absent, 0.0)
    return (p * (log_p - log_q)).sum(dim=-1)


def _forward_kl(teacher_logits: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """KL(P || Q) per position with P = softmax(teacher/T), Q = softmax(student/T): the hot path of `kd`.

    One fused ``F.kl_div(log q, log p, log_target=True)`` (``p * (log p - log q)``) instead of the masked form.
    Both log-probabilities are clamped to the most negative finite float, so a class with p_c == 0 (a teacher
    logit of -inf) contributes exactly 0, also when the student's logit is -inf there, and gradients stay finite
    (the same convention as `_kl_from_log_probs`).
    """
    dtype = _compute_dtype(student_logits)
    lowest = torch.finfo(dtype).min
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1).clamp(min=lowest)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1).clamp(min=lowest)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w * A + (1 - w) * B) computed stably as a logsumexp of log-probs plus log-weights, 0 < w < 1.

    Classes where both log-probs are -inf get -inf with a zero (not NaN) gradient.
    """
    both_absent = torch.isneginf(log_a) & torch.isneginf(log_b)
    zero = log_a.new_zeros(())
    log_a = torch.where(both_absent, zero, log_a)
    log_b = torch.where(both_absent, zero, log_b)
    mixed = torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))
    return mixed.masked_fill(both_absent, float("-inf"))


def _check_labels(name: str, labels: Tensor, positions_shape: torch.Size, num_classes: int, ignore_index: int,
                  check_range: bool = True) -> None:
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise WiringError(
            f"{name}: labels must be an integer tensor of class indices, got {got}",
            where=_where(name),
            fix="pass labels as a LongTensor of shape input.shape[:-1]",
        )
    if labels.shape != positions_shape:
        raise WiringError(
            f"{name}: labels shape {tuple(labels.shape)} != input.shape[:-1] {tuple(positions_shape)}",
            where=_where(name),
            fix="give one class index per position (shape (B,) for (B, C) logits, (B, T) for (B, T, C))",
        )
    # The value range is checked where it costs no device sync (CPU tensors); on accelerators the distiller's
    # dry run (`Distiller.build`) checks the labels before training instead of syncing on every step.
    if not check_range or labels.device.type != "cpu" or labels.numel() == 0:
        return
    lo, hi = torch.aminmax(torch.where(labels == ignore_index, 0, labels))
    if lo < 0 or hi >= num_classes:
        valid = labels != ignore_index
        bad = labels[valid & ((labels < 0) | (labels >= num_classes))]
        raise WiringError(
            f"{name}: label {int(bad[0])} out of range for {num_classes} classes",
            where=_where(name),
            fix=f"labels must be in [0, {num_classes - 1}] or equal ignore_index={ignore_index}",
        )


def _combine_mask(mask: Tensor | None, labels: Tensor, ignore_index: int) -> Tensor:
    keep = labels != ignore_index
    return keep if mask is None else (mask & keep)
