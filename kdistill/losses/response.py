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

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.errors import WiringError
from kdistill.losses.logit_checks import (_check_labels, _check_logits, _check_mask, _check_temperature,
                                            _check_unit_interval, _combine_mask, _compute_dtype, _forward_kl,
                                            _kl_from_log_probs, _log_mixture, _log_softmax, _where, reduce_positions)
from kdistill.losses.relational import dist, dkd  # noqa: F401  (re-exported)

__all__ = ["kd", "kl", "jsd", "skew_kl", "tvd", "dkd", "dist", "ce", "reduce_positions"]


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
