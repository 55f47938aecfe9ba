"""Cross-tokenizer distillation losses for causal LMs whose teacher and student use different vocabularies.

Token-level KD (`kdistill.losses.lm`) compares distributions over one shared vocabulary; here the two vocabularies
differ in size and meaning, so the losses compare what does not depend on token identity. Notation: ``z`` are a
model's logits at input positions (HF ``outputs.logits``: row ``i`` predicts token ``i + 1``), ``T`` the
temperature, ``q_j = softmax(z[j - 1] / T)`` the model's distribution over token ``j`` given the tokens before it.

* **ULD** (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for
  LLMs", arXiv:2402.12030): the closed-form Wasserstein distance under a uniform cost, i.e. both probability vectors
  sorted in descending order, the shorter one zero-padded to the longer vocabulary, and the L1 distance::

      ULD(p_s, p_t) = sum_i | sort_desc(p_s)_i - sort_desc(p_t)_i |    (`sorted_l1`, kdistill.losses.cross_vocab)

  averaged over the paired positions. `uld_loss` pairs the i-th student answer position with the i-th teacher
  answer position and truncates to the shorter answer (the paper's pairing); `uld_objective` adds the student's
  next-token CE: ``L = CE + uld_weight * ULD``. `span_uld_loss` is the span-aligned variant: for each aligned span
  (`kdistill.llm.cross_tokenizer_align`) it pairs the two distributions that predict the span's last token.

* **GOLD-style span loss** (`gold_loss`, following the description of TRL's GOLD trainer): for an aligned span
  whose tokens are ``x_a .. x_b`` in one tokenization, the span's merged (sub-)distribution is::

      m(v) = [ prod_{j=a}^{b-1} q_j(x_j) ] * q_b(v)          (log m = sum_{j<b} log q_j(x_j) + log q_b(v))

  the distribution over the span's last token, weighted by the probability the model gives to the span's tokens
  before it; ``m(x_b)`` is the model's probability of the whole span text in its tokenization, and ``sum m <= 1``
  (no renormalization). For a one-token span ``m = q_b``. The loss is ``uld_weight * mean_spans sorted_l1(m_s,
  m_t) + matched_weight * mean_spans D(P~ || Q~)``, where ``P~``, ``Q~`` are ``m_t``, ``m_s`` restricted to the
  tokens whose text is in both vocabularies (`build_vocab_map`) and renormalized over them (equal to a softmax of
  the last-token logits over those ids: the prefix weight cancels) and ``D`` one of `kdistill.losses.lm.DIVERGENCES`
  (``jsd`` with ``beta`` by default, ``forward_kl`` = KL(teacher || student)).

Spans are usable when their first token has a predicting row on both sides (token index >= 1): with no BOS token,
the text's first span is skipped. The teacher is always detached. Work is in float32 at least.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.llm.cross_tokenizer_align import (SCHEMES, AlignedSpan, Alignment, AlignmentError, VocabMap,
                                                align_offsets, align_texts, build_vocab_map, detect_scheme,
                                                offsets_from_pieces, pieces_from_tokenizer, token_bytes)
from kdistill.losses.cross_vocab import sorted_l1
from kdistill.losses.lm import IGNORE_INDEX, divergence_term, row_divergence, shift_labels

__all__ = ["SCHEMES", "AlignedSpan", "Alignment", "AlignmentError", "VocabMap", "align_offsets", "align_texts",
           "build_vocab_map", "detect_scheme", "gold_loss", "merged_span_log_probs", "offsets_from_pieces",
           "pieces_from_tokenizer", "sorted_l1", "span_uld_loss", "token_bytes", "uld_loss", "uld_objective"]

_WHERE = "kdistill.llm.cross_tokenizer"
Spans = Union[Alignment, Sequence[AlignedSpan]]


def _temperature(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise AlignmentError(f"temperature must be a finite number > 0, got {value!r}", where=f"{_WHERE}(temperature)",
                             fix="pass e.g. temperature=1.0")
    return float(value)


def _float(logits: Tensor) -> Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _zero(*tensors: Tensor) -> Tensor:
    """0 attached to the graph of every tensor given."""
    return sum((_float(t).reshape(-1)[:0].sum() for t in tensors), torch.zeros((), device=tensors[0].device))


def _batched(name: str, logits: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    if not isinstance(logits, Tensor) or logits.ndim not in (2, 3) or not logits.is_floating_point():
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise AlignmentError(f"{name} must be float logits (T, V) or (B, T, V), got {got}", where=f"{_WHERE}({name})",
                             fix="pass the model's output logits")
    if logits.ndim == 2:
        logits = logits.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    if mask is None:
        mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    if tuple(mask.shape) != tuple(logits.shape[:2]):
        raise AlignmentError(f"the mask of {name} has shape {tuple(mask.shape)}, the logits {tuple(logits.shape)}",
                             where=f"{_WHERE}({name})", fix="one boolean per position: (B, T) like the logits")
    return logits, mask.to(device=logits.device, dtype=torch.bool)


def uld_loss(student_logits: Tensor, teacher_logits: Tensor, *, student_mask: Optional[Tensor] = None,
             teacher_mask: Optional[Tensor] = None, temperature: float = 1.0) -> Tensor:
    """ULD with the paper's positional pairing: ``mean over pairs of sorted_l1(softmax(z_s/T), softmax(z_t/T))``.

    Args:
        student_logits, teacher_logits: ``(T_s, V_s)`` / ``(T_t, V_t)`` or batched ``(B, T_s, V_s)`` /
            ``(B, T_t, V_t)``; the vocabularies and lengths may differ.
        student_mask, teacher_mask: ``(B, T)`` booleans selecting each sequence's answer positions (the rows that
            predict answer tokens); None = every position. In each sequence the i-th selected student row is paired
            with the i-th selected teacher row, and the longer answer is truncated to the shorter.
        temperature: softmax temperature of both models.

    Returns:
        scalar mean over all pairs of the batch (0 attached to the graph when there is none).
    """
    temperature = _temperature(temperature)
    s_logits, s_mask = _batched("student_logits", student_logits, student_mask)
    t_logits, t_mask = _batched("teacher_logits", teacher_logits, teacher_mask)
    if s_logits.shape[0] != t_logits.shape[0]:
        raise AlignmentError(f"batch sizes differ: student {s_logits.shape[0]}, teacher {t_logits.shape[0]}",
                             where=_WHERE, fix="pass the same examples to both models")
    s_rows, t_rows = [], []
    for b in range(s_logits.shape[0]):
        s_b, t_b = s_logits[b][s_mask[b]], t_logits[b][t_mask[b]]
        n = min(s_b.shape[0], t_b.shape[0])
        s_rows.append(s_b[:n])
        t_rows.append(t_b[:n])
    s_cat, t_cat = torch.cat(s_rows), torch.cat(t_rows).detach()
    if s_cat.shape[0] == 0:
        return _zero(student_logits)
    p_s = torch.softmax(_float(s_cat) / temperature, dim=-1)
    p_t = torch.softmax(_float(t_cat) / temperature, dim=-1)
    return sorted_l1(p_s, p_t).mean()


def uld_objective(student_logits: Tensor, student_labels: Tensor, teacher_logits: Tensor, teacher_labels: Tensor, *,
                  uld_weight: float = 1.0, temperature: float = 1.0) -> dict[str, Tensor]:
    """The ULD paper's objective ``L = CE + uld_weight * ULD`` on one batch of answers.

    Args:
        student_logits, teacher_logits: ``(B, T_s, V_s)`` / ``(B, T_t, V_t)`` logits of each model on its own
            tokenization of the same examples (``(T, V)`` for one example).
        student_labels, teacher_labels: ``(B, T_s)`` / ``(B, T_t)`` labels aligned with each model's input ids, -100
            outside the answer (HF convention: row ``t`` of the logits predicts label ``t + 1``). The teacher's
            labels only mark its answer positions.
        uld_weight: ``lambda``; temperature: of the ULD softmaxes (the CE uses the raw logits).

    Returns:
        ``{"ce": next-token CE of the student on its labels, "uld": uld_loss on the answer positions,
        "loss": ce + uld_weight * uld}``.
    """
    if not math.isfinite(float(uld_weight)) or uld_weight < 0:
        raise AlignmentError(f"uld_weight must be a finite number >= 0, got {uld_weight!r}", where=_WHERE,
                             fix="pass e.g. uld_weight=1.0")
    s_logits, _ = _batched("student_logits", student_logits, None)
    t_logits, _ = _batched("teacher_logits", teacher_logits, None)
    s_labels = shift_labels(student_labels if student_labels.ndim != 1 else student_labels.unsqueeze(0))
    t_labels = shift_labels(teacher_labels if teacher_labels.ndim != 1 else teacher_labels.unsqueeze(0))
    for role, labels, logits in (("student", s_labels, s_logits), ("teacher", t_labels, t_logits)):
        if tuple(labels.shape) != tuple(logits.shape[:2]):
            raise AlignmentError(f"{role} labels {tuple(labels.shape)} do not match its logits "
                                 f"{tuple(logits.shape)}", where=f"{_WHERE}({role}_labels)",
                                 fix="labels are (B, T) aligned with that model's input ids")
    s_mask, t_mask = s_labels != IGNORE_INDEX, t_labels != IGNORE_INDEX
    if s_mask.any():
        ce = F.cross_entropy(_float(s_logits[s_mask]), s_labels[s_mask].to(s_logits.device))
    else:
        ce = _zero(student_logits)
    uld = uld_loss(s_logits, t_logits, student_mask=s_mask, teacher_mask=t_mask, temperature=temperature)
    return {"ce": ce, "uld": uld, "loss": ce + uld_weight * uld}


# ------------------------------------------------------------------------------------------------ span losses


def _span_list(alignment: Spans) -> list[AlignedSpan]:
    spans = list(alignment.spans if isinstance(alignment, Alignment) else alignment)
    if not spans:
        raise AlignmentError("empty alignment: no aligned span to distill on", where=f"{_WHERE}(alignment)",
                             fix="align two non-empty tokenizations of the same text (align_offsets)")
    return spans


def _check_side(role: str, logits: Tensor, ids: Optional[Tensor], spans: list[AlignedSpan]) -> None:
    if not isinstance(logits, Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise AlignmentError(f"{role}_logits must be float (N, V) logits of one sequence, got {got}",
                             where=f"{_WHERE}({role}_logits)", fix="pass logits[b] of one example")
    n = logits.shape[0]
    if ids is not None and (ids.ndim != 1 or ids.shape[0] != n):
        raise AlignmentError(f"{role}_ids has shape {tuple(ids.shape)} but the logits {tuple(logits.shape)}",
                             where=f"{_WHERE}({role}_ids)", fix="pass the (N,) input ids the logits were computed on")
    if ids is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= logits.shape[1]):
        raise AlignmentError(f"{role}_ids outside 0..{logits.shape[1] - 1}", where=f"{_WHERE}({role}_ids)",
                             fix=f"pass the {role}'s own token ids")
    last = max(getattr(s, role)[1] for s in spans)
    if last > n:
        raise AlignmentError(f"the alignment reaches {role} token {last - 1} but the {role} has {n} positions",
                             where=f"{_WHERE}(alignment)", fix="align the same token sequences the models ran on")


def _usable(spans: list[AlignedSpan]) -> list[AlignedSpan]:
    return [s for s in spans if s.teacher[0] >= 1 and s.student[0] >= 1]


def merged_span_log_probs(logits: Tensor, token_ids: Tensor, ranges: Sequence[tuple[int, int]], *,
                          temperature: float = 1.0) -> Tensor:
    """``log m`` ``(S, V)`` of each token range ``[a, b)`` (``a >= 1``; last token ``x_{b-1}``)::

        log m(v) = sum_{j=a}^{b-2} log q_j(x_j) + log q_{b-1}(v),     q_j = softmax(logits[j - 1] / T)

    `logits` ``(N, V)`` are the model's outputs on `token_ids` ``(N,)`` (row ``i`` predicts token ``i + 1``).
    The prefix sums are taken in float64; only the ``S`` last-token rows are normalized in full.
    """
    temperature = _temperature(temperature)
    if not ranges:
        return _float(logits)[:0]
    a = torch.tensor([r[0] for r in ranges], device=logits.device)
    b = torch.tensor([r[1] for r in ranges], device=logits.device)
    if int(a.min()) < 1 or bool((b <= a).any()) or int(b.max()) > logits.shape[0]:
        raise AlignmentError("token ranges must satisfy 1 <= a < b <= N", where=f"{_WHERE}.merged_span_log_probs",
                             fix="token 0 has no predicting row: skip spans that start at token 0")
    z = _float(logits) / temperature
    lse = torch.logsumexp(z, dim=-1)
    ids = token_ids.to(logits.device).long()
    token_lp = z[:-1].gather(1, ids[1:, None]).squeeze(1) - lse[:-1]  # [j - 1] = log q_j(x_j)
    cum = torch.cat([token_lp.new_zeros(1, dtype=torch.float64), token_lp.double().cumsum(0)])
    prefix = (cum[b - 2] - cum[a - 1]).to(z.dtype)  # tokens a .. b-2
    rows = b - 2
    return z[rows] - lse[rows, None] + prefix[:, None]


def span_uld_loss(student_logits: Tensor, teacher_logits: Tensor, alignment: Spans, *,
                  temperature: float = 1.0) -> Tensor:
    """Span-aligned ULD: ``mean over spans of sorted_l1(q^s_{last}, q^t_{last})``, the two distributions that predict
    each aligned span's last token (student row ``student[1] - 2``, teacher row ``teacher[1] - 2``).

    `student_logits` ``(N_s, V_s)`` / `teacher_logits` ``(N_t, V_t)``: one sequence each, the token sequences the
    `alignment` (an `Alignment` or some of its spans, e.g. ``alignment.within(answer_start)``) was computed on.
    """
    temperature = _temperature(temperature)
    spans = _span_list(alignment)
    _check_side("student", student_logits, None, spans)
    _check_side("teacher", teacher_logits, None, spans)
    usable = _usable(spans)
    if not usable:
        return _zero(student_logits)
    s_rows = torch.tensor([s.student[1] - 2 for s in usable], device=student_logits.device)
    t_rows = torch.tensor([s.teacher[1] - 2 for s in usable], device=teacher_logits.device)
    p_s = torch.softmax(_float(student_logits[s_rows]) / temperature, dim=-1)
    p_t = torch.softmax(_float(teacher_logits.detach()[t_rows]) / temperature, dim=-1)
    return sorted_l1(p_s, p_t.to(p_s.device)).mean()


def gold_loss(student_logits: Tensor, student_ids: Tensor, teacher_logits: Tensor, teacher_ids: Tensor,
              alignment: Spans, *, vocab_map: Optional[VocabMap] = None, uld_weight: float = 1.0,
              matched_weight: float = 1.0, matched_divergence: str = "jsd", beta: float = 0.5,
              temperature: float = 1.0) -> dict[str, Tensor]:
    """GOLD-style span-aligned loss (module docstring) on one sequence pair.

    Args:
        student_logits, teacher_logits: ``(N_s, V_s)`` / ``(N_t, V_t)`` outputs on `student_ids` ``(N_s,)`` /
            `teacher_ids` ``(N_t,)``, the token sequences `alignment` was computed on.
        alignment: an `Alignment` or a sequence of its spans (e.g. ``alignment.within(answer_start)``).
        vocab_map: `build_vocab_map` of the two tokenizers, for the matched part; None = no matched part.
        uld_weight, matched_weight: weights of the sorted-L1 part and of the matched-vocabulary part.
        matched_divergence, beta: the divergence on the shared tokens (`kdistill.losses.lm.DIVERGENCES`:
            ``jsd`` with teacher weight `beta`, ``forward_kl``, ``reverse_kl``, ...).
        temperature: softmax temperature of both models (prefix probabilities included).

    Returns:
        ``{"uld": mean sorted-L1 of the merged span distributions, "matched": mean divergence on the shared
        tokens (0 without a map), "loss": uld_weight * uld + matched_weight * matched}``; each is 0 attached to
        the graph when no span is usable.
    """
    temperature = _temperature(temperature)
    for name, w in (("uld_weight", uld_weight), ("matched_weight", matched_weight)):
        if not math.isfinite(float(w)) or w < 0:
            raise AlignmentError(f"{name} must be a finite number >= 0, got {w!r}", where=f"{_WHERE}({name})",
                                 fix=f"pass e.g. {name}=1.0")
    spans = _span_list(alignment)
    _check_side("student", student_logits, student_ids, spans)
    _check_side("teacher", teacher_logits, teacher_ids, spans)
    usable = _usable(spans)
    if not usable:
        zero = _zero(student_logits)
        return {"uld": zero, "matched": zero, "loss": zero}
    teacher_logits = teacher_logits.detach()
    log_m_s = merged_span_log_probs(student_logits, student_ids, [s.student for s in usable], temperature=temperature)
    with torch.no_grad():
        log_m_t = merged_span_log_probs(teacher_logits, teacher_ids, [s.teacher for s in usable],
                                        temperature=temperature)
    uld = sorted_l1(log_m_s.exp(), log_m_t.exp().to(log_m_s.device)).mean()
    matched = _zero(student_logits)
    if vocab_map is not None and len(vocab_map) and matched_weight > 0:
        if int(vocab_map.student_ids.max()) >= student_logits.shape[1] or \
                int(vocab_map.teacher_ids.max()) >= teacher_logits.shape[1]:
            raise AlignmentError("the vocabulary map has ids beyond the logits' vocabularies",
                                 where=f"{_WHERE}(vocab_map)",
                                 fix="build_vocab_map(teacher_tokenizer, student_tokenizer): teacher first")
        s_rows = torch.tensor([s.student[1] - 2 for s in usable], device=student_logits.device)
        t_rows = torch.tensor([s.teacher[1] - 2 for s in usable], device=teacher_logits.device)
        z_s = _float(student_logits[s_rows][:, vocab_map.student_ids.to(student_logits.device)])
        z_t = _float(teacher_logits[t_rows][:, vocab_map.teacher_ids.to(teacher_logits.device)]).to(z_s.device)
        loss_name, params = divergence_term(matched_divergence, beta=beta, temperature=temperature)
        matched = row_divergence(loss_name, params)(z_s, z_t) / len(usable)
    return {"uld": uld, "matched": matched, "loss": uld_weight * uld + matched_weight * matched}
