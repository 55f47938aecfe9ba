"""Logit losses that reshape the teacher's signal: DKD (Zhao et al. 2022) splits it into target and non-target
parts, DIST (Huang et al. 2022) matches Pearson relations between and within classes. Conventions as in
`kdistill.losses.response`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.errors import WiringError
from kdistill.losses.logit_checks import (_check_labels, _check_logits, _check_mask, _check_reduction,
                                            _check_temperature, _combine_mask, _compute_dtype, _kl_from_log_probs,
                                            _log_softmax, _where, reduce_positions)


def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    *,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Decoupled knowledge distillation (Zhao et al. 2022, "Decoupled Knowledge Distillation", CVPR 2022,
    arXiv:2203.08679, Eq. 7)::

        DKD = alpha * TCKD + beta * NCKD
        TCKD = T^2 * KL(b^T || b^S),      b = [p_target, 1 - p_target]            (binary target / rest)
        NCKD = T^2 * KL(p~^T || p~^S),    p~_c = softmax over non-target classes   (target excluded)

    where all distributions use temperature ``T``. The target class is excluded from the NCKD softmax exactly
    (its logit is set to ``-inf``), which is the limit of the paper's "subtract 1000 from the target logit"
    trick. Per-position losses are summed over classes; ``reduction="mean"`` then averages over positions
    (the paper's batch mean).

    Args:
        student_logits: student logits, shape ``(B, C)`` or ``(B, T, C)``, ``C >= 2``.
        teacher_logits: teacher logits, same shape.
        labels: integer class indices, shape ``input.shape[:-1]``.
        alpha: weight of TCKD (paper default 1.0).
        beta: weight of NCKD (paper default 8.0 on CIFAR-100).
        temperature: softmax temperature ``T > 0`` (paper default 4.0).
        ignore_index: label value for positions to skip (combined with ``mask``).
        mask: optional bool ``input.shape[:-1]``, True = position counts.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Returns:
        scalar, or shape ``input.shape[:-1]`` for ``reduction="none"``.
    """
    name = "dkd"
    _check_logits(name, student_logits, teacher_logits)
    temperature = _check_temperature(name, temperature)
    num_classes = student_logits.shape[-1]
    if num_classes < 2:
        raise WiringError(
            f"{name}: needs at least 2 classes, got logits of shape {tuple(student_logits.shape)}",
            where=_where(name),
            fix="DKD splits target vs non-target classes; use kd() for a single output",
        )
    _check_labels(name, labels, student_logits.shape[:-1], num_classes, ignore_index)
    _check_mask(name, mask, student_logits.shape[:-1])
    valid = _combine_mask(mask, labels, ignore_index)
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    is_target = F.one_hot(safe_labels, num_classes).bool()

    def parts(logits: Tensor) -> tuple[Tensor, Tensor]:
        z = logits.to(_compute_dtype(logits)) / temperature
        lse_all = torch.logsumexp(z, dim=-1)
        z_rest = z.masked_fill(is_target, float("-inf"))
        lse_rest = torch.logsumexp(z_rest, dim=-1)
        z_target = z.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
        log_binary = torch.stack([z_target - lse_all, lse_rest - lse_all], dim=-1)
        log_non_target = z_rest - lse_rest.unsqueeze(-1)  # log-softmax over non-target classes, -inf at target
        return log_binary, log_non_target

    s_bin, s_rest = parts(student_logits)
    t_bin, t_rest = parts(teacher_logits)
    t2 = temperature * temperature
    tckd = _kl_from_log_probs(t_bin, s_bin) * t2
    nckd = _kl_from_log_probs(t_rest, s_rest) * t2
    per_pos = alpha * tckd + beta * nckd
    return reduce_positions(per_pos, valid, reduction, name=name)


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation between matching rows of a and b (shape (N, K) -> (N,))."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """DIST: relation-based match of predictions (Huang et al. 2022, "Knowledge Distillation from A Stronger
    Teacher", NeurIPS 2022, arXiv:2205.10536, Eqs. 6-9)::

        Y^S = softmax(student / T), Y^T = softmax(teacher / T)           (N rows x C classes)
        inter = 1 - 1/N sum_i  rho(Y^S_{i,:}, Y^T_{i,:})                 (per-sample, across classes)
        intra = 1 - 1/C sum_j  rho(Y^S_{:,j}, Y^T_{:,j})                 (per-class, across samples)
        DIST  = T^2 * (beta * inter + gamma * intra)

    with ``rho`` the Pearson correlation ``cov(u, v) / (std(u) std(v))`` (an ``eps=1e-8`` is added to the
    denominator so constant vectors give ``rho = 0`` instead of NaN).

    The intra-class term correlates across the batch, so the loss is inherently batch-level: 3-D inputs
    ``(B, T, C)`` are flattened to rows (one per *valid* position, after ``mask``) before computing it.
    With fewer than 2 rows the intra-class Pearson correlation is undefined and that term is taken as 0;
    with no valid row the loss is 0.

    Args:
        student_logits: student logits, shape ``(B, C)`` or ``(B, T, C)``.
        teacher_logits: teacher logits, same shape.
        beta: weight of the inter-class term (paper default 1.0; 2.0 in some configs).
        gamma: weight of the intra-class term (paper default 1.0).
        temperature: softmax temperature ``T > 0`` (paper default 1.0; 4.0 on CIFAR).
        mask: optional bool ``input.shape[:-1]``, True = position (row) counts.
        reduction: ``"mean"`` or ``"sum"`` (identical: one batch-level value). ``"none"`` is not supported.

    Returns:
        scalar.
    """
    name = "dist"
    _check_logits(name, student_logits, teacher_logits)
    temperature = _check_temperature(name, temperature)
    if reduction == "none":
        raise WiringError(
            f"{name}: reduction='none' is not defined, DIST compares correlations across the whole batch "
            f"(input shape {tuple(student_logits.shape)})",
            where=_where(name),
            fix="use reduction='mean' (or 'sum', same value)",
        )
    _check_reduction(name, reduction, ("mean", "sum"))
    _check_mask(name, mask, student_logits.shape[:-1])
    num_classes = student_logits.shape[-1]
    y_s = _log_softmax(student_logits, temperature).exp().reshape(-1, num_classes)
    y_t = _log_softmax(teacher_logits, temperature).exp().reshape(-1, num_classes)
    if mask is not None:
        keep = mask.reshape(-1)
        y_s, y_t = y_s[keep], y_t[keep]
    rows = y_s.shape[0]
    if rows == 0:
        return y_s.sum() * 0.0  # empty selection: 0, still attached to the graph
    inter = 1.0 - _pearson_rows(y_s, y_t).mean()
    if rows >= 2:
        intra = 1.0 - _pearson_rows(y_s.t(), y_t.t()).mean()
    else:
        intra = y_s.new_zeros(())
    return (temperature * temperature) * (beta * inter + gamma * intra)
