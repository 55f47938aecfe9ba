"""Response-based (logit) distillation losses, as pure functions in the style of ``torch.nn.functional``.

Conventions shared by every function here:

* Argument order is always ``(student, teacher, ...)``; inputs are **logits**, never probabilities.
* Inputs have shape ``(B, C)`` or ``(B, T, C)`` -- in general any leading dims with the class axis last.
  A "position" is one index into ``input.shape[:-1]``.
* ``mask``: optional bool tensor of shape ``input.shape[:-1]``; ``True`` means the position counts.
* ``reduction``:

  - ``"mean"`` -- mean over valid positions (the batch mean for 2-D inputs, the mean over valid tokens for
    3-D inputs). With no valid position at all the result is ``0`` (still attached to the graph).
  - ``"sum"`` -- sum over valid positions.
  - ``"none"`` -- per-position loss of shape ``input.shape[:-1]``; masked positions are ``0``.

* Computation is done in float32 at least: half / bfloat16 inputs are upcast, float64 inputs stay float64.
  The result dtype is ``torch.promote_types(input.dtype, torch.float32)``.
* The teacher is **not** detached: for ordinary offline KD pass ``teacher.detach()`` (or compute the teacher
  under ``torch.no_grad()``); for online / mutual distillation gradients flow to both sides.
* Notation in the docstrings: ``T`` = temperature, ``P = softmax(teacher / T)``, ``Q = softmax(student / T)``.
* Bad input raises :class:`kdistill.errors.WiringError` naming the shapes and the fix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.errors import WiringError

__all__ = ["kd", "kl", "jsd", "skew_kl", "tvd", "dkd", "dist", "ce", "reduce_positions"]

_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------------------------


def kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reverse: bool = False,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Kullback-Leibler divergence between teacher and student distributions (no ``T^2`` factor).

    Forward (default, "mean-seeking")::

        KL(P || Q) = sum_c P_c (log P_c - log Q_c)

    Reverse (``reverse=True``, "mode-seeking", as used for LLM distillation e.g. MiniLLM, Gu et al. 2024)::

        KL(Q || P) = sum_c Q_c (log Q_c - log P_c)

    with ``P = softmax(teacher / T)``, ``Q = softmax(student / T)`` (Kullback & Leibler, 1951).

    Args:
        student_logits: student logits, shape ``(B, C)`` or ``(B, T, C)``.
        teacher_logits: teacher logits, same shape.
        temperature: softmax temperature ``T > 0``.
        reverse: compute KL(Q || P) instead of KL(P || Q).
        mask: optional bool ``input.shape[:-1]``, True = position counts.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (see module docstring).

    Returns:
        scalar, or shape ``input.shape[:-1]`` for ``reduction="none"``.
    """
    name = "kl"
    _check_logits(name, student_logits, teacher_logits)
    temperature = _check_temperature(name, temperature)
    log_q = _log_softmax(student_logits, temperature)
    log_p = _log_softmax(teacher_logits, temperature)
    per_pos = _kl_from_log_probs(log_q, log_p) if reverse else _kl_from_log_probs(log_p, log_q)
    return reduce_positions(per_pos, mask, reduction, name=name)


def kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Classic knowledge distillation loss (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
    Neural Network", arXiv:1503.02531)::

        L_KD = T^2 * KL(P || Q),   P = softmax(teacher / T),  Q = softmax(student / T)

    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures (Hinton et al., Sec. 2).
    For 2-D inputs with ``reduction="mean"`` this equals the usual idiom
    ``F.kl_div(F.log_softmax(s/T, -1), F.softmax(t/T, -1), reduction="batchmean") * T * T``.

    Args:
        student_logits: student logits, shape ``(B, C)`` or ``(B, T, C)``.
        teacher_logits: teacher logits, same shape.
        temperature: softmax temperature ``T > 0`` (default 4.0).
        mask: optional bool ``input.shape[:-1]``, True = position counts.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Returns:
        scalar, or shape ``input.shape[:-1]`` for ``reduction="none"``.
    """
    name = "kd"
    _check_logits(name, student_logits, teacher_logits)
    temperature = _check_temperature(name, temperature)
    per_pos = _forward_kl(teacher_logits, student_logits, temperature)
    per_pos = per_pos * (temperature * temperature)
    return reduce_positions(per_pos, mask, reduction, name=name)


def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Generalized Jensen-Shannon divergence, as in GKD (Agarwal et al. 2024, "On-Policy Distillation of
    Language Models: Learning from Self-Generated Mistakes", ICLR 2024, arXiv:2306.13649)::

        M = beta * P + (1 - beta) * Q
        JSD_beta(P || Q) = beta * KL(P || M) + (1 - beta) * KL(Q || M)        for 0 < beta < 1

    ``beta = 0.5`` is the ordinary (symmetric) Jensen-Shannon divergence.

    Endpoint convention: the formula above is identically 0 at ``beta = 0`` and ``beta = 1`` (M collapses onto
    one of the two distributions). Following GKD's public implementation (TRL ``GKDTrainer``), the endpoints
    are defined as the two KL directions instead::

        beta == 0  ->  KL(P || Q)   (forward KL, same as ``kl(student, teacher)``)
        beta == 1  ->  KL(Q || P)   (reverse KL, same as ``kl(student, teacher, reverse=True)``)

    so the value is discontinuous at the endpoints (small ``beta`` behaves like ``beta * KL(P || Q)``).

    Args:
        student_logits: student logits, shape ``(B, C)`` or ``(B, T, C)``.
        teacher_logits: teacher logits, same shape.
        beta: mixture weight of the teacher, in ``[0, 1]``.
        temperature: softmax temperature ``T > 0``.
        mask: optional bool ``input.shape[:-1]``, True = position counts.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Returns:
        scalar, or shape ``input.shape[:-1]`` for ``reduction="none"``.
    """
    name = "jsd"
    _check_logits(name, student_logits, teacher_logits)
    temperature = _check_temperature(name, temperature)
    beta = _check_unit_interval(name, "beta", beta)
    if beta == 0.0:
        return kl(student_logits, teacher_logits, temperature, reverse=False, mask=mask, reduction=reduction)
    if beta == 1.0:
        return kl(student_logits, teacher_logits, temperature, reverse=True, mask=mask, reduction=reduction)
    log_q = _log_softmax(student_logits, temperature)
    log_p = _log_softmax(teacher_logits, temperature)
    log_m = _log_mixture(log_p, log_q, beta)
    per_pos = beta * _kl_from_log_probs(log_p, log_m) + (1.0 - beta) * _kl_from_log_probs(log_q, log_m)
    return reduce_positions(per_pos, mask, reduction, name=name)


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    alpha: float = 0.1,
    reverse: bool = False,
    temperature: float = 1.0,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Skew KL divergence from DistiLLM (Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large
    Language Models", ICML 2024, arXiv:2402.03898, Eq. 3)::

        SKL_alpha(P, Q)  = KL(P || alpha * P + (1 - alpha) * Q)          (reverse=False)
        SRKL_alpha(P, Q) = KL(Q || alpha * Q + (1 - alpha) * P)          (reverse=True)

    Skewing the second argument towards the first keeps the divergence bounded (by ``log(1/alpha)``) and
    stabilizes gradients. ``alpha = 0`` gives plain forward / reverse KL; ``alpha = 1`` gives 0.
    The log of the mixture is computed stably as ``logaddexp(log A + log alpha, log B + log(1 - alpha))``.

    Args:
        student_logits: student logits, shape ``(B, C)`` or ``(B, T, C)``.
        teacher_logits: teacher logits, same shape.
        alpha: skew weight in ``[0, 1]`` (paper default 0.1).
        reverse: skew reverse KL (SRKL) instead of skew forward KL (SKL).
        temperature: softmax temperature ``T > 0``.
        mask: optional bool ``input.shape[:-1]``, True = position counts.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Returns:
        scalar, or shape ``input.shape[:-1]`` for ``reduction="none"``.
    """
    name = "skew_kl"
    _check_logits(name, student_logits, teacher_logits)
    temperature = _check_temperature(name, temperature)
    alpha = _check_unit_interval(name, "alpha", alpha)
    log_q = _log_softmax(student_logits, temperature)
    log_p = _log_softmax(teacher_logits, temperature)
    first, second = (log_q, log_p) if reverse else (log_p, log_q)
    if alpha == 0.0:
        log_mix = second
    elif alpha == 1.0:
        log_mix = first
    else:
        log_mix = _log_mixture(first, second, alpha)
    per_pos = _kl_from_log_probs(first, log_mix)
    return reduce_positions(per_pos, mask, reduction, name=name)


def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Total variation distance between teacher and student distributions::

        TVD(P, Q) = 1/2 * sum_c |P_c - Q_c|          (in [0, 1])

    A symmetric, bounded f-divergence, used as a distillation objective e.g. by Wen et al. 2023
    ("f-Divergence Minimization for Sequence-Level Knowledge Distillation", ACL 2023, arXiv:2307.15190).

    Args:
        student_logits: student logits, shape ``(B, C)`` or ``(B, T, C)``.
        teacher_logits: teacher logits, same shape.
        temperature: softmax temperature ``T > 0``.
        mask: optional bool ``input.shape[:-1]``, True = position counts.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Returns:
        scalar, or shape ``input.shape[:-1]`` for ``reduction="none"``.
    """
    name = "tvd"
    _check_logits(name, student_logits, teacher_logits)
    temperature = _check_temperature(name, temperature)
    q = _log_softmax(student_logits, temperature).exp()
    p = _log_softmax(teacher_logits, temperature).exp()
    per_pos = 0.5 * (p - q).abs().sum(dim=-1)
    return reduce_positions(per_pos, mask, reduction, name=name)


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


def ce(
    student_logits: Tensor,
    labels: Tensor,
    *extra: Tensor,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of the student against hard labels::

        CE = -log softmax(student)_y

    Called as ``ce(student, labels)``. For the registry's uniform ``(student, teacher, labels)`` convention
    (see ``kdistill.losses.NEEDS_LABELS``) it also accepts ``ce(student, teacher, labels)``: with three
    positional tensors the middle one (the teacher) is ignored.

    Unlike ``F.cross_entropy``, ``reduction="mean"`` returns ``0`` (attached to the graph, so ``.backward()``
    works) when every label is ignored / masked, instead of NaN.

    Args:
        student_logits: student logits, shape ``(B, C)`` or ``(B, T, C)``.
        labels: integer class indices, shape ``input.shape[:-1]``.
        ignore_index: label value for positions to skip (combined with ``mask``).
        mask: optional bool ``input.shape[:-1]``, True = position counts.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Returns:
        scalar, or shape ``input.shape[:-1]`` for ``reduction="none"``.
    """
    name = "ce"
    if extra:
        if len(extra) != 1:
            raise WiringError(
                f"{name}: expected ce(student, labels) or ce(student, teacher, labels), got {2 + len(extra)} "
                "positional tensors",
                where=_where(name),
                fix="pass the labels as the last positional argument",
            )
        labels = extra[0]
    _check_logits(name, student_logits)
    fused = mask is None and reduction == "mean"
    _check_labels(name, labels, student_logits.shape[:-1], student_logits.shape[-1], ignore_index,
                  check_range=not fused)
    _check_mask(name, mask, student_logits.shape[:-1])
    if fused:
        # one cross_entropy kernel (it checks the label range itself, at no extra cost), divided by the number of
        # labelled positions (0 when none are labelled, instead of F.cross_entropy's NaN)
        logits = student_logits.to(_compute_dtype(student_logits))
        try:
            total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
                                    ignore_index=ignore_index, reduction="sum")
        except (IndexError, RuntimeError):
            _check_labels(name, labels, student_logits.shape[:-1], student_logits.shape[-1], ignore_index)
            raise
        return total / (labels != ignore_index).sum().clamp(min=1).to(total.dtype)
    valid = _combine_mask(mask, labels, ignore_index)
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    log_q = _log_softmax(student_logits, 1.0)
    per_pos = -log_q.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return reduce_positions(per_pos, valid, reduction, name=name)
