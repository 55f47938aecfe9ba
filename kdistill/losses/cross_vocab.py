"""Losses between next-token distributions over two *different* vocabularies (cross-tokenizer LM distillation).

Token identity means nothing across tokenizers, so these compare what does not depend on it: the probability
vectors sorted in descending order (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
Distillation Loss for LLMs", arXiv:2402.12030: the closed-form Wasserstein distance under a uniform cost)::

    sorted_l1(p_s, p_t) = sum_i | sort_desc(p_s)_i - sort_desc(p_t)_i |        (shorter vector zero-padded)

* `sorted_l1`: rows of two dense probability (or sub-probability) vectors;
* `sorted_l1_topk`: the teacher given as its k largest entries (descending) plus the mass left over, which is
  spread evenly over its ``V_t - k`` other entries (the dense reading of a top-k cache,
  `kdistill.losses.sparse.SparseDistribution.dense_log_probs`); exact when ``k = V_t`` or the tail is 0;
* `uld`: the registry's ``uld`` response loss, ``mean_rows sorted_l1(softmax(z_s / T), softmax(z_t / T))``;
* `gold_sorted_l1`: the registry's ``gold`` loss on merged span log-probabilities ``log m`` (a span's
  sub-distribution, see `kdistill.llm.cross_tokenizer.merged_span_log_probs`):
  ``mean_rows sorted_l1(exp(log m_s), exp(log m_t))``.

These are pure tensor functions; pairing rows (which student row meets which teacher row) is the job of the text
alignment in `kdistill.llm.cross_tokenizer_align`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.errors import WiringError

__all__ = ["gold_sorted_l1", "sorted_l1", "sorted_l1_topk", "uld"]

_WHERE = "kdistill.losses.cross_vocab"


def _rows(name: str, *tensors: Tensor) -> None:
    if any(t.ndim != 2 for t in tensors) or len({t.shape[0] for t in tensors}) != 1:
        raise WiringError(f"{name} needs (N, V) rows with the same N, got {[tuple(t.shape) for t in tensors]}",
                          where=f"{_WHERE}.{name}", fix="pair one student row with one teacher row")


def sorted_l1(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """``sum_i |sort_desc(p_s)_i - sort_desc(p_t)_i|`` per row of ``(N, V_s)`` and ``(N, V_t)`` non-negative
    vectors, the shorter zero-padded to the longer vocabulary; returns ``(N,)``.

    Entries are >= 0, so padding before or after the descending sort gives the same order: zeros go last.
    """
    _rows("sorted_l1", student_probs, teacher_probs)
    s = student_probs.sort(dim=-1, descending=True).values
    t = teacher_probs.sort(dim=-1, descending=True).values
    width = max(s.shape[-1], t.shape[-1])
    return (F.pad(s, (0, width - s.shape[-1])) - F.pad(t, (0, width - t.shape[-1]))).abs().sum(-1)


def sorted_l1_topk(student_probs: Tensor, teacher_top: Tensor, teacher_tail: Tensor, teacher_vocab: int) -> Tensor:
    """`sorted_l1` against a teacher known by its top-k: ``(N,)``.

    Args:
        student_probs: ``(N, V_s)`` non-negative (any order).
        teacher_top: ``(N, k)`` the teacher's k largest entries, in descending order.
        teacher_tail: ``(N,)`` the teacher's remaining mass, taken as ``c = tail / (V_t - k)`` on each of its
            ``V_t - k`` other entries (so ``c <= top[:, -1]`` keeps the vector sorted for any real top-k).
        teacher_vocab: ``V_t``.

    With ``t = (top, c, ..., c, 0, ...)`` and ``s`` sorted and zero-padded, the sum splits into the first k entries,
    the entries ``k .. V_t - 1`` (against ``c``; the student's zero padding there adds ``c`` each) and the student's
    entries beyond ``V_t`` (against 0): no ``(N, max(V_s, V_t))`` teacher vector is built. When ``V_s <= V_t`` the
    entries after the k-th all meet ``c``, so only the student's top-k is sorted (``topk``), not its whole vector.
    """
    _rows("sorted_l1_topk", student_probs, teacher_top)
    k, v_t = teacher_top.shape[1], int(teacher_vocab)
    if not 1 <= k <= v_t or tuple(teacher_tail.shape) != (teacher_top.shape[0],):
        raise WiringError(f"teacher top-k {tuple(teacher_top.shape)}, tail {tuple(teacher_tail.shape)} and "
                          f"vocabulary {v_t} do not fit", where=f"{_WHERE}.sorted_l1_topk",
                          fix="pass (N, k) top entries with 1 <= k <= V_t and an (N,) tail")
    v_s = student_probs.shape[1]
    top = teacher_top.to(student_probs.dtype)
    fill = (teacher_tail.to(top.dtype) / (v_t - k)) if v_t > k else torch.zeros_like(top[:, 0])
    if v_s <= v_t and k < v_s:
        # the entries after the k-th all meet the same c (or the zero padding, which adds c each): their order does
        # not matter, so the student's top-k (not a full sort) is enough
        s_top = student_probs.topk(k, dim=-1).values
        rest = (student_probs - fill[:, None]).abs().sum(-1) - (s_top - fill[:, None]).abs().sum(-1)
        return (s_top - top).abs().sum(-1) + rest + (v_t - v_s) * fill
    s = student_probs.sort(dim=-1, descending=True).values
    if v_s < k:
        s = F.pad(s, (0, k - v_s))
    head = (s[:, :k] - top).abs().sum(-1)
    mid = (s[:, k:min(v_s, v_t)] - fill[:, None]).abs().sum(-1) + max(v_t - max(v_s, k), 0) * fill
    beyond = s[:, v_t:].sum(-1) if v_s > v_t else torch.zeros_like(head)
    return head + mid + beyond


def uld(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, *,
        reduction: str = "mean") -> Tensor:
    """ULD between paired rows ``(N, V_s)`` / ``(N, V_t)``: ``sorted_l1(softmax(z_s / T), softmax(z_t / T))``,
    mean (or ``sum``) over rows; the teacher is detached, the softmaxes are taken in float32 at least."""
    _rows("uld", student_logits, teacher_logits)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    p_s = torch.softmax(student_logits.to(dtype) / temperature, dim=-1)
    p_t = torch.softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    per_row = sorted_l1(p_s, p_t)
    return per_row.sum() if reduction == "sum" else per_row.mean()


def gold_sorted_l1(student_log_m: Tensor, teacher_log_m: Tensor, *, reduction: str = "mean") -> Tensor:
    """The sorted-L1 part of the GOLD-style loss: ``sorted_l1(exp(log m_s), exp(log m_t))`` per aligned span,
    mean (or ``sum``) over spans; ``log m`` are merged span log-probabilities (sub-distributions)."""
    _rows("gold_sorted_l1", student_log_m, teacher_log_m)
    per_row = sorted_l1(student_log_m.exp(), teacher_log_m.detach().exp())
    return per_row.sum() if reduction == "sum" else per_row.mean()
