"""Per-layer losses of encoder (BERT-family) distillation: hidden states, attention maps, self-attention relations,
and the batch similarity structure of sentence embeddings.

Pure functions, argument order ``(student, teacher, ...)``. Token-level inputs are laid out as

* hidden states / projections: ``(B, T, D)`` (a layer's output, or its query / key / value projection);
* attention probabilities: ``(B, H, T, T)`` (rows = queries, columns = keys; each valid row sums to 1);
* ``mask``: optional bool ``(B, T)``, ``True`` = a real token (``attention_mask.bool()``); padded tokens are left
  out as queries, and as keys they carry (near-)zero probability on both sides.

Computation in float32 at least (half inputs are upcast; float64 stays float64). The teacher is not detached.
Student and teacher must already have the same width where a loss compares vectors (``hidden_*``): put a learned
projection on the student side first (``kdistill.encoders`` does). Relation losses (``attention_*`` with
``average_heads``, ``self_relation``, ``similarity_matrix``) compare ``T x T`` or ``B x B`` matrices, so widths
may differ. Bad input raises :class:`kdistill.errors.WiringError`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.errors import WiringError
from kdistill.losses.feature import hint

__all__ = ["attention_kl", "attention_mse", "attention_probabilities", "embedding_cosine", "embedding_mse",
           "hidden_cosine", "hidden_mse", "self_relation", "similarity_matrix"]

# A finite stand-in for -inf on padded keys: exp() underflows to exactly 0 in float32/float64, and no inf - inf
# (NaN) can appear in the forward or the backward pass.
_MASKED_SCORE = -1e9


def _where(name: str) -> str:
    return f"kdistill.losses.{name}"


def _upcast(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check(name: str, role: str, x: Tensor, ndim: int, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise WiringError(f"{name}: {role} must be a torch.Tensor, got {type(x).__name__}", where=_where(name),
                          fix=f"pass a float tensor of shape {layout}")
    if not x.is_floating_point():
        raise WiringError(f"{name}: {role} must be floating point, got dtype {x.dtype}", where=_where(name),
                          fix=f"pass a float tensor of shape {layout}")
    if x.ndim != ndim:
        raise WiringError(f"{name}: {role} must have shape {layout}, got shape {tuple(x.shape)}",
                          where=_where(name), fix=f"pass a tensor of shape {layout}")


def _check_same_shape(name: str, student: Tensor, teacher: Tensor, fix: str) -> None:
    if student.shape != teacher.shape:
        raise WiringError(f"{name}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}",
                          where=_where(name), fix=fix)


def _token_mask(name: str, mask: Tensor | None, batch: int, tokens: int, device) -> Tensor:
    """The (B, T) bool mask, all True when None; checked."""
    if mask is None:
        return torch.ones(batch, tokens, dtype=torch.bool, device=device)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise WiringError(f"{name}: mask must be a bool tensor, got {got}", where=_where(name),
                          fix="pass attention_mask.bool() (True = real token)")
    if tuple(mask.shape) != (batch, tokens):
        raise WiringError(f"{name}: mask shape {tuple(mask.shape)} != (B, T) = {(batch, tokens)}",
                          where=_where(name), fix="pass the (B, T) attention mask of the same batch")
    return mask


def _masked_mean(per_position: Tensor, valid: Tensor) -> Tensor:
    """Mean over positions where `valid` is True (0, attached to the graph, when none is)."""
    total = torch.where(valid, per_position, per_position.new_zeros(())).sum()
    return total / valid.sum().clamp(min=1).to(total.dtype)


def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """Hidden-state (and embedding-layer) MSE of TinyBERT (Jiao et al. 2020, "TinyBERT: Distilling BERT for
    Natural Language Understanding", Findings of EMNLP 2020, arXiv:1909.10351, Eqs. 8-9)::

        L_hidn = MSE(H^S W_h, H^T) = 1/(n D) sum_{(b, t) valid} sum_d (h^S_{btd} - h^T_{btd})^2

    with ``n`` the number of valid tokens. ``W_h`` (the learned projection when the widths differ) is applied by
    the caller. On the embedding-layer outputs (hidden state 0) this is TinyBERT's ``L_embd`` (Eq. 10).

    Args:
        student_hidden: ``(B, T, D)``, already projected to the teacher's width.
        teacher_hidden: ``(B, T, D)``.
        mask: optional bool ``(B, T)``, True = real token.

    Returns:
        scalar.
    """
    name = "hidden_mse"
    _check(name, "student_hidden", student_hidden, 3, "(B, T, D)")
    _check(name, "teacher_hidden", teacher_hidden, 3, "(B, T, D)")
    _check_same_shape(name, student_hidden, teacher_hidden,
                      "project the student's hidden states to the teacher's width first (a learned nn.Linear, "
                      "as TinyBERT's W_h) and feed the same tokenized batch to both")
    b, t, d = student_hidden.shape
    valid = _token_mask(name, mask, b, t, student_hidden.device)
    per_token = (_upcast(student_hidden) - _upcast(teacher_hidden)).pow(2).mean(dim=-1)
    return _masked_mean(per_token, valid)


def hidden_cosine(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cosine loss between hidden states, DistilBERT's ``L_cos`` (Sanh et al. 2019, "DistilBERT, a distilled version
    of BERT", arXiv:1910.01108, Sec. 2)::

        L_cos = 1/n sum_{(b, t) valid} (1 - cos(h^S_{bt}, h^T_{bt}))

    with ``n`` the number of valid tokens (the mean of ``nn.CosineEmbeddingLoss`` with target 1 over the real
    tokens, as in the DistilBERT training code). Aligns the directions of the hidden vectors, not their norms.

    Args:
        student_hidden: ``(B, T, D)`` (projected to the teacher's width if they differ).
        teacher_hidden: ``(B, T, D)``.
        mask: optional bool ``(B, T)``, True = real token.

    Returns:
        scalar in ``[0, 2]``.
    """
    name = "hidden_cosine"
    _check(name, "student_hidden", student_hidden, 3, "(B, T, D)")
    _check(name, "teacher_hidden", teacher_hidden, 3, "(B, T, D)")
    _check_same_shape(name, student_hidden, teacher_hidden,
                      "project the student's hidden states to the teacher's width first (a learned nn.Linear)")
    b, t, _ = student_hidden.shape
    valid = _token_mask(name, mask, b, t, student_hidden.device)
    cos = F.cosine_similarity(_upcast(student_hidden), _upcast(teacher_hidden), dim=-1, eps=1e-8)
    return _masked_mean(1.0 - cos, valid)


def attention_probabilities(query: Tensor, key: Tensor, num_heads: int, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention probabilities of a self-attention layer from its query / key projections::

        A_a = softmax(Q_a K_a^T / sqrt(d_k))      per head a,  d_k = D / num_heads

    Padded keys (``mask`` False) get probability exactly 0. This is what a BERT layer computes before attention
    dropout, so it is the same in train and eval mode.

    Args:
        query: ``(B, T, D)``, the output of the layer's query projection (heads concatenated).
        key: ``(B, T, D)``, the output of its key projection.
        num_heads: number of heads ``H`` (``D % H == 0``).
        mask: optional bool ``(B, T)``, True = real token.

    Returns:
        ``(B, H, T, T)`` probabilities, rows = queries.
    """
    name = "attention_probabilities"
    _check(name, "query", query, 3, "(B, T, D)")
    _check(name, "key", key, 3, "(B, T, D)")
    _check_same_shape(name, query, key, "pass the query and key projections of the same layer and batch")
    scores = _relation_scores(name, _upcast(query), _upcast(key), num_heads, mask)
    return scores.softmax(dim=-1)


def _split_heads(name: str, x: Tensor, num_heads: int) -> Tensor:
    b, t, d = x.shape
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or d % num_heads:
        raise WiringError(f"{name}: num_heads={num_heads!r} does not divide the width {d}", where=_where(name),
                          fix=f"use a divisor of {d} (e.g. the model's number of attention heads)")
    return x.view(b, t, num_heads, d // num_heads).transpose(1, 2)  # (B, H, T, d_k)


def _relation_scores(name: str, left: Tensor, right: Tensor, num_heads: int, mask: Tensor | None) -> Tensor:
    """(B, H, T, T) scaled dot products left_a right_a^T / sqrt(d_k), padded keys set to a large negative."""
    b, t, _ = left.shape
    valid = _token_mask(name, mask, b, t, left.device)
    lh, rh = _split_heads(name, left, num_heads), _split_heads(name, right, num_heads)
    scores = lh @ rh.transpose(-1, -2) / math.sqrt(lh.shape[-1])
    return scores.masked_fill(~valid[:, None, None, :], _MASKED_SCORE)


def _check_attention_pair(name: str, student: Tensor, teacher: Tensor, mask: Tensor | None,
                          average_heads: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Validate (B, H, T, T) maps; returns (student, teacher, valid (B, T)), heads averaged if asked."""
    layout = "(B, H, T, T)"
    _check(name, "student_attention", student, 4, layout)
    _check(name, "teacher_attention", teacher, 4, layout)
    for role, x in (("student_attention", student), ("teacher_attention", teacher)):
        if x.shape[-1] != x.shape[-2]:
            raise WiringError(f"{name}: {role} must be square in its last two dims {layout}, got {tuple(x.shape)}",
                              where=_where(name), fix="pass self-attention probabilities (queries x keys)")
    s, t = _upcast(student), _upcast(teacher)
    if average_heads:
        s, t = s.mean(dim=1, keepdim=True), t.mean(dim=1, keepdim=True)
    if s.shape != t.shape:
        fix = "feed the same tokenized batch to both models"
        if s.shape[0] == t.shape[0] and s.shape[2:] == t.shape[2:]:
            fix = (f"the head counts differ ({student.shape[1]} vs {teacher.shape[1]}): pass average_heads=True, "
                   "use self_relation (any head count), or give the student as many heads as the teacher")
        raise WiringError(f"{name}: student attention {tuple(student.shape)} != teacher attention "
                          f"{tuple(teacher.shape)}", where=_where(name), fix=fix)
    valid = _token_mask(name, mask, s.shape[0], s.shape[-1], s.device)
    return s, t, valid


def _row_kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p || q) over the last dim, for probability rows; 0 * log 0 = 0 and finite gradients everywhere."""
    positive = p > 0
    log_p = torch.log(torch.where(positive, p, torch.ones_like(p)))
    log_q = torch.log(q.clamp(min=1e-12))
    return torch.where(positive, p * (log_p - log_q), p.new_zeros(())).sum(dim=-1)


def attention_kl(student_attention: Tensor, teacher_attention: Tensor, mask: Tensor | None = None,
                 average_heads: bool = False) -> Tensor:
    """Self-attention distribution transfer of MiniLM (Wang et al. 2020, "MiniLM: Deep Self-Attention
    Distillation for Task-Agnostic Compression of Pre-Trained Transformers", NeurIPS 2020, arXiv:2002.10957,
    Eq. 3)::

        L_AT = 1/(A_h n) sum_{a=1}^{A_h} sum_{(b, t) valid} KL(A^T_{a,b,t,:} || A^S_{a,b,t,:})

    over heads ``a`` and valid query tokens ``t`` (``n`` of them); each row is a distribution over keys.

    Args:
        student_attention: ``(B, H, T, T)`` attention probabilities.
        teacher_attention: ``(B, H, T, T)``; same head count unless `average_heads`.
        mask: optional bool ``(B, T)``, True = real token.
        average_heads: compare the head-averaged maps (``H`` = 1), for models with different head counts.

    Returns:
        scalar.
    """
    name = "attention_kl"
    s, t, valid = _check_attention_pair(name, student_attention, teacher_attention, mask, average_heads)
    per_row = _row_kl(t, s).mean(dim=1)  # (B, T): mean over heads
    return _masked_mean(per_row, valid)


def attention_mse(student_attention: Tensor, teacher_attention: Tensor, mask: Tensor | None = None,
                  average_heads: bool = False) -> Tensor:
    """Attention-based distillation of TinyBERT (Jiao et al. 2020, arXiv:1909.10351, Eq. 7)::

        L_attn = 1/h sum_{i=1}^{h} MSE(A_i^S, A_i^T)

    with the mean taken over valid (query, key) pairs: ``1/(h m) sum_i sum_{(b, q, k) valid} (A^S - A^T)^2``,
    ``m`` the number of pairs of real tokens. TinyBERT's code compares the unnormalized attention scores; this
    compares the probabilities (bounded, and defined the same way for padded keys).

    Args:
        student_attention: ``(B, H, T, T)`` attention probabilities.
        teacher_attention: ``(B, H, T, T)``; same head count unless `average_heads`.
        mask: optional bool ``(B, T)``, True = real token.
        average_heads: compare the head-averaged maps, for models with different head counts.

    Returns:
        scalar.
    """
    name = "attention_mse"
    s, t, valid = _check_attention_pair(name, student_attention, teacher_attention, mask, average_heads)
    pairs = valid[:, :, None] & valid[:, None, :]  # (B, T, T)
    per_pair = (s - t).pow(2).mean(dim=1)  # mean over heads
    return _masked_mean(per_pair, pairs)


def self_relation(student_vectors: Tensor, teacher_vectors: Tensor, num_heads: int,
                  mask: Tensor | None = None) -> Tensor:
    """Self-attention relation transfer of MiniLM (value relation, Wang et al. 2020, arXiv:2002.10957, Eqs. 4-5)
    and MiniLMv2 (query-query, key-key, value-value relations, Wang et al. 2021, "MiniLMv2: Multi-Head
    Self-Attention Relation Distillation", Findings of ACL 2021, arXiv:2012.15828, Eqs. 1-3)::

        R_a = softmax(V_a V_a^T / sqrt(d_r))            per relation head a, d_r = D / num_heads
        L_VR = 1/(A_r n) sum_{a=1}^{A_r} sum_{(b, t) valid} KL(R^T_{a,b,t,:} || R^S_{a,b,t,:})

    ``V`` is a layer's value (or query, or key) projection with the heads concatenated; it is re-split into
    ``num_heads`` relation heads on each side (the MiniLMv2 relation heads), so student and teacher widths and
    attention-head counts may differ. With ``num_heads`` equal to both models' attention heads this is MiniLM's
    value-relation loss.

    Args:
        student_vectors: ``(B, T, D_s)``.
        teacher_vectors: ``(B, T, D_t)``.
        num_heads: relation heads ``A_r``, the same on both sides (must divide ``D_s`` and ``D_t``).
        mask: optional bool ``(B, T)``, True = real token.

    Returns:
        scalar.
    """
    name = "self_relation"
    _check(name, "student_vectors", student_vectors, 3, "(B, T, D)")
    _check(name, "teacher_vectors", teacher_vectors, 3, "(B, T, D)")
    if student_vectors.shape[:2] != teacher_vectors.shape[:2]:
        raise WiringError(f"{name}: student {tuple(student_vectors.shape)} and teacher "
                          f"{tuple(teacher_vectors.shape)} differ in batch or sequence length", where=_where(name),
                          fix="feed the same tokenized batch to both models")
    s_scores = _relation_scores(name, _upcast(student_vectors), _upcast(student_vectors), num_heads, mask)
    t_scores = _relation_scores(name, _upcast(teacher_vectors), _upcast(teacher_vectors), num_heads, mask)
    log_q = s_scores.log_softmax(dim=-1)
    log_p = t_scores.log_softmax(dim=-1)
    p = log_p.exp()
    # padded keys: p == 0 exactly and both logs are finite (see _MASKED_SCORE), so they add exactly 0
    per_row = (p * (log_p - log_q)).sum(dim=-1).mean(dim=1)  # (B, T)
    b, t = student_vectors.shape[:2]
    return _masked_mean(per_row, _token_mask(name, mask, b, t, student_vectors.device))


def similarity_matrix(student_embeddings: Tensor, teacher_embeddings: Tensor) -> Tensor:
    """Similarity-structure (relation) loss on sentence embeddings: the student's matrix of pairwise cosine
    similarities in the batch should equal the teacher's::

        L_sim = 1/(B (B - 1)) sum_{i != j} (cos(s_i, s_j) - cos(t_i, t_j))^2

    Widths may differ (only ``B x B`` matrices are compared). It directly targets what retrieval uses (the
    ranking of cosine similarities), complementing the per-sample cosine / MSE between embeddings; it is the
    cosine-kernel, unnormalized form of similarity-preserving KD (Tung & Mori 2019, arXiv:1907.09682).

    Args:
        student_embeddings: ``(B, D_s)``, ``B >= 2``.
        teacher_embeddings: ``(B, D_t)``.

    Returns:
        scalar in ``[0, 4]``.
    """
    name = "similarity_matrix"
    _check(name, "student_embeddings", student_embeddings, 2, "(B, D)")
    _check(name, "teacher_embeddings", teacher_embeddings, 2, "(B, D)")
    b = student_embeddings.shape[0]
    if teacher_embeddings.shape[0] != b or b < 2:
        raise WiringError(f"{name}: needs the same batch of >= 2 samples on both sides, got "
                          f"{tuple(student_embeddings.shape)} and {tuple(teacher_embeddings.shape)}",
                          where=_where(name), fix="use a batch size >= 2 and the same batch for both models")
    s = F.normalize(_upcast(student_embeddings), dim=1, eps=1e-12)
    t = F.normalize(_upcast(teacher_embeddings), dim=1, eps=1e-12)
    diff = (s @ s.T - t @ t.T).pow(2)
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=diff.device)
    return diff[off_diagonal].mean()


def embedding_cosine(student_embeddings: Tensor, teacher_embeddings: Tensor) -> Tensor:
    """Per-sentence cosine distance between student and teacher sentence embeddings::

        L_cos = 1/B sum_i (1 - cos(s_i, t_i))

    Args:
        student_embeddings: ``(B, D)`` (project the student to the teacher's width first).
        teacher_embeddings: ``(B, D)``.
    """
    _check("embedding_cosine", "student_embeddings", student_embeddings, 2, "(B, D)")
    _check("embedding_cosine", "teacher_embeddings", teacher_embeddings, 2, "(B, D)")
    return hint(student_embeddings, teacher_embeddings, kind="cosine")


def embedding_mse(student_embeddings: Tensor, teacher_embeddings: Tensor) -> Tensor:
    """Mean squared error between student and teacher sentence embeddings::

        L_mse = 1/(B D) sum_{i, d} (s_id - t_id)^2

    Args:
        student_embeddings: ``(B, D)`` (project the student to the teacher's width first).
        teacher_embeddings: ``(B, D)``.
    """
    _check("embedding_mse", "student_embeddings", student_embeddings, 2, "(B, D)")
    _check("embedding_mse", "teacher_embeddings", teacher_embeddings, 2, "(B, D)")
    return hint(student_embeddings, teacher_embeddings, kind="mse")
