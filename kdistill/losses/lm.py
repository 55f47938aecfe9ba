"""Losses on a language model's output head, computed chunk by chunk from final hidden states.

The logits tensor is an LLM's memory hog (``N`` tokens x ``V`` = 49152 entries x 4 bytes is 0.8 GB at
``N = 4096``, and a divergence keeps several such tensors). Every loss here takes the student's *final hidden
states* and *output head* instead and works through the valid tokens ``chunk_size`` rows at a time, in one
autograd function (`chunked_head_loss`)::

    for each chunk c of valid rows (labels != -100):
        z_c = cap * tanh(scale * (h_c W^T + b) / cap)      (C, V)   student logits (`head_logits`)
        L_c = row_loss(z_c)                                        summed loss of the chunk's rows
        G_c = dL_c / d(h_c W^T + b)                        (C, V)   by autograd, inside the chunk
        grad_h[c] = G_c W,   grad_W += G_c^T h_c,   grad_b += sum_rows G_c
    loss = sum_c L_c / N_valid

The gradients are accumulated during the forward pass, so the backward pass only scales them: no ``(N, V)``
tensor ever exists and no logits are recomputed (memory ``O(chunk_size * V + N * H + V * H)``). Row losses:
`token_kd_loss` (a live teacher given by its hidden states and head; its logits are formed chunk by chunk too),
`sparse_token_kd_loss` (a top-k cache: k + 1 buckets, `kdistill.losses.sparse`), `dense_token_kd_loss` (full
cached teacher logits) and `next_token_ce` (``-log Q(y_t)`` on the labels).

Divergences (``P = softmax(z_t / T)`` teacher, ``Q = softmax(z_s / T)`` student, no ``T^2``) are registry response
losses, named for LM users by `DIVERGENCE_LOSSES`: ``forward_kl`` = kl: KL(P || Q); ``reverse_kl`` = kl with
reverse: KL(Q || P); ``jsd`` = jsd with beta: beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q;
``skew_kl`` = skew_kl with alpha: KL(P || alpha P + (1 - alpha) Q); ``skew_reverse_kl`` = skew_kl with alpha and
reverse: KL(Q || alpha Q + (1 - alpha) P); ``tvd`` = tvd: 1/2 sum_v |P_v - Q_v|. A registered response loss with a
top-k version can also be given directly (``loss=``, ``params=``).

Labels: the hidden state at ``t`` predicts token ``t + 1`` (`shift_labels`; ``-100`` = no target).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.errors import WiringError
from kdistill.losses.sparse import SparseDistribution

__all__ = ["DEFAULT_CHUNK_SIZE", "DIVERGENCES", "DIVERGENCE_LOSSES", "IGNORE_INDEX", "chunked_head_loss",
           "dense_token_kd_loss", "divergence_term", "head_logits", "next_token_ce", "row_divergence",
           "shift_labels", "sparse_token_kd_loss", "token_kd_loss", "token_kd_inputs"]

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 256
_WHERE = "kdistill.losses.lm"

# LM divergence name -> (registry response loss, fixed params, user params it reads)
DIVERGENCE_LOSSES: dict[str, tuple[str, dict, tuple[str, ...]]] = {
    "forward_kl": ("kl", {}, ()),
    "reverse_kl": ("kl", {"reverse": True}, ()),
    "jsd": ("jsd", {}, ("beta",)),
    "skew_kl": ("skew_kl", {}, ("alpha",)),
    "skew_reverse_kl": ("skew_kl", {"reverse": True}, ("alpha",)),
    "tvd": ("tvd", {}, ()),
}
DIVERGENCES: tuple[str, ...] = tuple(DIVERGENCE_LOSSES)

RowLoss = Callable[[Tensor, int, int], Tensor]  # (student logits of rows [start, stop), start, stop) -> summed loss


def divergence_term(divergence: str, *, beta: float = 0.5, alpha: float = 0.1,
                    temperature: float = 1.0) -> tuple[str, dict]:
    """``(registry loss, params)`` of an LM divergence name, e.g. ``reverse_kl -> ("kl", {reverse, temperature})``."""
    if divergence not in DIVERGENCE_LOSSES:
        raise WiringError(f"unknown divergence {divergence!r}", where=f"{_WHERE}(divergence)",
                          fix=f"use one of {list(DIVERGENCES)}")
    loss, fixed, reads = DIVERGENCE_LOSSES[divergence]
    given = {"beta": beta, "alpha": alpha}
    return loss, {**fixed, **{name: given[name] for name in reads}, "temperature": temperature}


def row_divergence(loss: str, params: Mapping[str, Any]) -> Callable[[Tensor, Any], Tensor]:
    """``fn(student_logits (C, V), teacher) -> summed loss over the C rows`` of a registry response loss; the teacher
    is logits ``(C, V)`` or a top-k `SparseDistribution` (its k + 1 bucket version, `kdistill.losses.sparse`)."""
    from kdistill.losses.registry import call_term, get_loss

    spec = get_loss(loss, where=f"{_WHERE}(loss)", kinds=("response",))
    if spec.needs_labels or spec.sparse is None:
        raise WiringError(f"loss '{loss}' is not a per-token divergence", where=f"{_WHERE}(loss)",
                          fix="use kd, kl, jsd, skew_kl or tvd (or a divergence name: "
                              f"{', '.join(DIVERGENCES)})")
    summed = {**params, "reduction": "sum"}
    return lambda student, teacher: call_term(spec, student, teacher, None, summed)


def _check_positive(name: str, value: Optional[float], *, allow_none: bool) -> Optional[float]:
    if value is None and allow_none:
        return None
    if not math.isfinite(v := float(value)) or v <= 0:  # type: ignore[arg-type]
        raise WiringError(f"{name} must be a finite number > 0, got {value!r}", where=_WHERE,
                          fix=f"pass a positive {name}")
    return v


def _check_chunk_size(chunk_size: Any) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise WiringError(f"chunk_size must be a positive integer, got {chunk_size!r}", where=f"{_WHERE}(chunk_size)",
                          fix=f"use e.g. chunk_size={DEFAULT_CHUNK_SIZE}")
    return chunk_size


def head_logits(raw: Tensor, scale: float = 1.0, softcap: Optional[float] = None) -> Tensor:
    """The model's logit transform ``softcap * tanh(scale * raw / softcap)`` (``scale * raw`` without a cap) of the
    raw head output ``raw = h W^T + b``, in float32 at least."""
    z = raw.to(torch.promote_types(raw.dtype, torch.float32))
    if scale != 1.0:
        z = z * scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


def _sum_dtype(device: torch.device) -> torch.dtype:  # the sum over chunks: float64, except on MPS (none there)
    return torch.float32 if device.type == "mps" else torch.float64


class _ChunkedHeadLoss(torch.autograd.Function):
    """``sum_chunks row_loss(z_chunk) / N``; the gradients of h, W, b are accumulated in the forward pass."""

    @staticmethod
    def forward(ctx, h, w, b, row_loss, chunk_size, scale, softcap):  # type: ignore[override]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n_rows = h.shape[0]
        acc = torch.promote_types(w.dtype, torch.float32)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
        grad_b = torch.zeros(w.shape[0], dtype=acc, device=w.device) if need_b else None
        total = torch.zeros((), dtype=_sum_dtype(h.device), device=h.device)
        for start in range(0, n_rows, chunk_size):
            stop = min(start + chunk_size, n_rows)
            h_chunk = h[start:stop]
            raw = F.linear(h_chunk, w, b).detach().requires_grad_(True)
            with torch.enable_grad():
                loss = row_loss(head_logits(raw, scale, softcap), start, stop)
            (grad_raw,) = torch.autograd.grad(loss, raw)
            total += loss.detach().to(total.dtype)
            del raw, loss
            grad_raw = grad_raw.to(w.dtype)
            if need_h:
                torch.mm(grad_raw, w, out=grad_h[start:stop])
            if need_w:
                grad_w.addmm_(grad_raw.t().to(acc), h_chunk.to(acc))
            if need_b:
                grad_b += grad_raw.sum(0, dtype=acc)
            del grad_raw
        inv_n = 1.0 / n_rows
        ctx.grads = [None if g is None else g.mul_(inv_n).to(like.dtype)
                     for g, like in ((grad_h, h), (grad_w, w), (grad_b, b))]
        return (total * inv_n).to(torch.promote_types(h.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        one = bool(grad_loss == 1)
        grads = [None if g is None else (g if one else g * grad_loss.to(g.dtype)) for g in ctx.grads]
        ctx.grads = None
        return grads[0], grads[1], grads[2], None, None, None, None


def chunked_head_loss(hidden: Tensor, head_weight: Tensor, head_bias: Optional[Tensor], row_loss: RowLoss, *,
                      chunk_size: int = DEFAULT_CHUNK_SIZE, logit_scale: float = 1.0,
                      softcap: Optional[float] = None) -> Tensor:
    """Mean over the rows of `hidden` ``(N, H)`` (the valid positions only) of a loss on the head's logits.

    `row_loss(logits, start, stop)` returns the *summed* loss of rows ``[start, stop)`` given their logits
    ``(stop - start, V)`` (float32 at least, after the model's transform `logit_scale`, `softcap`: `head_logits`).
    Returns the scalar mean (0 attached to the graph when ``N = 0``). Without gradients it takes a cheaper
    loss-only path; double backward is not supported.
    """
    chunk_size = _check_chunk_size(chunk_size)
    if hidden.shape[0] == 0:
        return hidden.reshape(-1)[:0].sum().float() + head_weight.reshape(-1)[:0].sum().float()
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (hidden, head_weight, head_bias))
    if needs_grad:
        return _ChunkedHeadLoss.apply(hidden, head_weight, head_bias, row_loss, chunk_size, float(logit_scale),
                                      softcap)
    total = torch.zeros((), dtype=_sum_dtype(hidden.device), device=hidden.device)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk_size):
            stop = min(start + chunk_size, hidden.shape[0])
            z = head_logits(F.linear(hidden[start:stop], head_weight, head_bias), float(logit_scale), softcap)
            total += row_loss(z, start, stop).to(total.dtype)
    return (total / hidden.shape[0]).to(torch.promote_types(hidden.dtype, torch.float32))




def shift_labels(labels: Tensor) -> Tensor:
    """Labels aligned with the input ids -> labels aligned with the hidden states that predict them.

    ``shifted[:, t] = labels[:, t + 1]``; the last position predicts nothing (``-100``).
    """
    if labels.ndim != 2:
        raise WiringError(f"labels must have shape (batch, tokens), got {tuple(labels.shape)}", where=_WHERE,
                          fix="pass one row of token ids (or -100) per sequence")
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


def _valid(hidden: Tensor, shifted_labels: Tensor) -> tuple[Tensor, Tensor]:
    """(rows of hidden at valid positions ``(N, H)``, the flat boolean mask ``(B * T,)``)."""
    if hidden.shape[:-1] != shifted_labels.shape:
        raise WiringError(f"hidden states {tuple(hidden.shape)} and labels {tuple(shifted_labels.shape)} are not "
                          f"aligned", where=_WHERE, fix="labels must be (batch, tokens) like the input ids")
    mask = (shifted_labels != IGNORE_INDEX).reshape(-1).to(hidden.device)
    return hidden.reshape(-1, hidden.shape[-1])[mask], mask


def _kd_fn(divergence, beta, alpha, temperature, loss, params) -> Callable[[Tensor, Any], Tensor]:
    term = (loss, params or {}) if loss else divergence_term(divergence, beta=beta, alpha=alpha,
                                                             temperature=temperature)
    return row_divergence(*term)




def next_token_ce(hidden: Tensor, head_weight: Tensor, head_bias: Optional[Tensor], shifted_labels: Tensor, *,
                  chunk_size: int = DEFAULT_CHUNK_SIZE, logit_scale: float = 1.0,
                  softcap: Optional[float] = None) -> Tensor:
    """Next-token cross-entropy ``mean_t -log softmax(z_t)[y_t]`` over positions with ``shifted_labels != -100``.

    `hidden` is ``(B, T, H)`` and `shifted_labels` ``(B, T)`` aligned with it (see `shift_labels`).
    """
    rows, mask = _valid(hidden, shifted_labels)
    targets = shifted_labels.reshape(-1).to(hidden.device)[mask]
    vocab = head_weight.shape[0]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise WiringError(f"label ids outside 0..{vocab - 1} (min {int(targets.min())}, max {int(targets.max())})",
                          where=_WHERE, fix="labels are token ids of the student's vocabulary, or -100")

    def row_loss(logits: Tensor, start: int, stop: int) -> Tensor:
        return F.cross_entropy(logits, targets[start:stop], reduction="sum")

    return chunked_head_loss(rows, head_weight, head_bias, row_loss, chunk_size=chunk_size,
                             logit_scale=logit_scale, softcap=softcap)


def sparse_token_kd_loss(hidden: Tensor, head_weight: Tensor, head_bias: Optional[Tensor],
                         teacher: SparseDistribution, shifted_labels: Tensor, *, divergence: str = "forward_kl",
                         beta: float = 0.5, alpha: float = 0.1, temperature: float = 1.0,
                         chunk_size: int = DEFAULT_CHUNK_SIZE, logit_scale: float = 1.0,
                         softcap: Optional[float] = None, loss: Optional[str] = None,
                         params: Optional[Mapping[str, Any]] = None) -> Tensor:
    """Mean per-token divergence between a top-k teacher (k + 1 buckets) and the student, from hidden states.

    `hidden` ``(B, T, H)``: student final hidden states; `teacher`: the cached teacher at the same positions, a
    ``SparseDistribution`` of shape ``(B, T, V)`` at temperature `temperature`; `shifted_labels` ``(B, T)``:
    positions equal to -100 are skipped. The divergence (as in `token_kd_loss`) is taken on the bucket
    distributions ``(P~, Q~)`` (`kdistill.losses.sparse`); with ``k = V`` it equals the dense divergence.
    """
    if not isinstance(teacher, SparseDistribution):
        raise WiringError(f"the cached teacher must be a SparseDistribution, got {type(teacher).__name__}",
                          where=_WHERE, fix="use dense_token_kd_loss for full teacher logits")
    if tuple(teacher.log_tail.shape) != tuple(hidden.shape[:-1]):
        raise WiringError(f"the cached teacher covers positions {tuple(teacher.log_tail.shape)} but the student's "
                          f"hidden states are {tuple(hidden.shape[:-1])}", where=_WHERE,
                          fix="the cache must be built on the same token blocks the student trains on")
    if teacher.num_classes != head_weight.shape[0]:
        raise WiringError(f"the cached teacher has {teacher.num_classes} vocabulary entries but the student head "
                          f"has {head_weight.shape[0]}", where=_WHERE,
                          fix="token-level KD needs one shared vocabulary; use sequence-level KD across tokenizers")
    fn = _kd_fn(divergence, beta, alpha, temperature, loss, params)
    rows, mask = _valid(hidden, shifted_labels)
    k, device = teacher.k, hidden.device
    indices = teacher.indices.reshape(-1, k).to(device)[mask]
    log_probs = teacher.log_probs.reshape(-1, k).to(device)[mask]
    log_tail = teacher.log_tail.reshape(-1).to(device)[mask]

    def row_loss(logits: Tensor, start: int, stop: int) -> Tensor:
        part = SparseDistribution(indices[start:stop], log_probs[start:stop], log_tail[start:stop],
                                  teacher.num_classes, teacher.temperature)
        return fn(logits, part)

    return chunked_head_loss(rows, head_weight, head_bias, row_loss, chunk_size=chunk_size,
                             logit_scale=logit_scale, softcap=softcap)


def dense_token_kd_loss(hidden: Tensor, head_weight: Tensor, head_bias: Optional[Tensor], teacher_logits: Tensor,
                        shifted_labels: Tensor, *, divergence: str = "forward_kl", beta: float = 0.5,
                        alpha: float = 0.1, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                        logit_scale: float = 1.0, softcap: Optional[float] = None, loss: Optional[str] = None,
                        params: Optional[Mapping[str, Any]] = None) -> Tensor:
    """Like `sparse_token_kd_loss` for full teacher logits ``(B, T, V)`` (a dense cache)."""
    if tuple(teacher_logits.shape[:-1]) != tuple(hidden.shape[:-1]) or \
            teacher_logits.shape[-1] != head_weight.shape[0]:
        raise WiringError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's positions "
                          f"{tuple(hidden.shape[:-1])} and vocabulary {head_weight.shape[0]}", where=_WHERE,
                          fix="build the cache on the same token blocks, with a teacher of the same vocabulary")
    fn = _kd_fn(divergence, beta, alpha, temperature, loss, params)
    rows, mask = _valid(hidden, shifted_labels)
    targets = teacher_logits.reshape(-1, teacher_logits.shape[-1]).to(hidden.device)[mask].detach()

    def row_loss(logits: Tensor, start: int, stop: int) -> Tensor:
        return fn(logits, targets[start:stop].to(logits.dtype))

    return chunked_head_loss(rows, head_weight, head_bias, row_loss, chunk_size=chunk_size,
                             logit_scale=logit_scale, softcap=softcap)


HeadArg = Any  # nn.Linear-like module with .weight (and .bias), a weight tensor (V, H), or a (weight, bias) pair


def _weight_and_bias(head: HeadArg, role: str) -> tuple[Tensor, Optional[Tensor]]:
    """``(weight (V, H), bias (V,) or None)`` of a head argument."""
    if isinstance(head, Tensor):
        weight, bias = head, None
    elif isinstance(head, tuple) and len(head) == 2 and isinstance(head[0], Tensor):
        weight, bias = head
    elif isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), Tensor):
        weight, bias = head.weight, getattr(head, "bias", None)
    else:
        raise WiringError(f"{role} head must be an nn.Linear, a weight tensor of shape (V, H) or a (weight, bias) "
                          f"pair, got {type(head).__name__}", where=f"{_WHERE}({role}_head)",
                          fix="pass model.get_output_embeddings() or its .weight (see kdistill.llm.head_parts)")
    if weight.ndim != 2 or (bias is not None and tuple(bias.shape) != (weight.shape[0],)):
        got = f"weight {tuple(weight.shape)}" + ("" if bias is None else f", bias {tuple(bias.shape)}")
        raise WiringError(f"{role} head must be a weight (V, H) and an optional bias (V,), got {got}",
                          where=f"{_WHERE}({role}_head)", fix="pass the output projection (vocabulary x hidden)")
    return weight, bias


def token_kd_inputs(student_hidden: Tensor, student_head: HeadArg, teacher_hidden: Tensor, teacher_head: HeadArg,
                    labels: Tensor) -> tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
    """Check the arguments of `token_kd_loss`; ``(W_s, b_s, W_t, b_t)``."""
    w_s, b_s = _weight_and_bias(student_head, "student")
    w_t, b_t = _weight_and_bias(teacher_head, "teacher")
    if w_s.shape[0] != w_t.shape[0]:
        raise WiringError(
            f"student vocabulary size {w_s.shape[0]} != teacher vocabulary size {w_t.shape[0]}: token-level KD "
            "compares next-token distributions over one shared vocabulary",
            where=f"{_WHERE}(student_head, teacher_head)",
            fix="use sequence-level KD (train the student on teacher-generated text) for different tokenizers; "
                "if one head is only padded beyond the tokenizer, slice both heads to len(tokenizer) rows "
                "(kdistill.models.vocab.check_vocab returns that number)")
    for role, hidden, weight in (("student", student_hidden, w_s), ("teacher", teacher_hidden, w_t)):
        if not isinstance(hidden, Tensor) or hidden.ndim < 2 or not hidden.is_floating_point():
            got = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            raise WiringError(f"{role}_hidden must be a float tensor of shape (B, T, H), got {got}",
                              where=f"{_WHERE}({role}_hidden)",
                              fix="pass the final hidden states (outputs.hidden_states[-1], output_hidden_states=True)")
        if hidden.shape[-1] != weight.shape[1]:
            raise WiringError(f"{role}_hidden has size {hidden.shape[-1]} but the {role} head expects "
                              f"{weight.shape[1]} (head weight {tuple(weight.shape)})",
                              where=f"{_WHERE}({role}_hidden)",
                              fix=f"pass the {role}'s final (post-norm) hidden states and its own output head")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1] or labels.shape != student_hidden.shape[:-1]:
        raise WiringError(f"positions differ: student_hidden {tuple(student_hidden.shape)}, teacher_hidden "
                          f"{tuple(teacher_hidden.shape)}, labels {tuple(labels.shape)}", where=_WHERE,
                          fix="run both models on the same input_ids; labels must be (B, T) aligned with the hidden "
                              "positions")
    return w_s, b_s, w_t, b_t


def token_kd_loss(student_hidden: Tensor, student_head: HeadArg, teacher_hidden: Tensor, teacher_head: HeadArg,
                  labels: Tensor, *, divergence: str = "forward_kl", beta: float = 0.5, alpha: float = 0.1,
                  temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                  student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0, loss: Optional[str] = None,
                  params: Optional[Mapping[str, Any]] = None) -> Tensor:
    """Mean per-token divergence between a live teacher's and the student's next-token distributions.

    Args:
        student_hidden, teacher_hidden: final (post-norm) hidden states ``(B, T, H_s)`` / ``(B, T, H_t)``; the
            teacher's are detached (it is frozen).
        student_head, teacher_head: output heads with the same ``V``: an ``nn.Linear``, a weight ``(V, H)`` or a
            ``(weight, bias)`` pair.
        labels: ``(B, T)`` aligned with the hidden positions; positions equal to -100 are skipped.
        divergence, beta, alpha, temperature: one of `DIVERGENCES` (module docstring) and its settings: JSD
            teacher weight, skew, softmax temperature of both models (no ``T^2``); or `loss` and `params`: a
            registry response loss and its params.
        chunk_size: tokens per chunk; peak extra memory is about ``8 * chunk_size * V * 4`` bytes.
        student_softcap, teacher_softcap, student_logit_scale, teacher_logit_scale: each model's logit transform
            (`head_logits`; `kdistill.llm.head_parts` reads them from a Hugging Face model).

    Returns:
        scalar ``sum_{valid tokens} D / N_valid`` (float32 at least); ``0`` attached to the graph when no label
        is valid. Gradients flow to ``student_hidden`` and the student head's weight and bias only; the teacher's
        logits are formed chunk by chunk as well, so no ``(N, V)`` tensor of either model is ever built.
    """
    w_s, b_s, w_t, b_t = token_kd_inputs(student_hidden, student_head, teacher_hidden, teacher_head, labels)
    fn = _kd_fn(divergence, beta, alpha, temperature, loss, params)
    chunk_size = _check_chunk_size(chunk_size)
    s_cap = _check_positive("student_softcap", student_softcap, allow_none=True)
    t_cap = _check_positive("teacher_softcap", teacher_softcap, allow_none=True)
    s_scale = _check_positive("student_logit_scale", student_logit_scale, allow_none=False)
    t_scale = _check_positive("teacher_logit_scale", teacher_logit_scale, allow_none=False)
    rows, mask = _valid(student_hidden, labels)
    teacher_rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])[mask.to(teacher_hidden.device)]
    w_t, b_t = w_t.detach(), None if b_t is None else b_t.detach()

    def row_loss(logits: Tensor, start: int, stop: int) -> Tensor:
        with torch.no_grad():
            z_t = head_logits(F.linear(teacher_rows[start:stop], w_t, b_t), t_scale, t_cap)
        return fn(logits, z_t)

    return chunked_head_loss(rows, w_s, b_s, row_loss, chunk_size=chunk_size, logit_scale=s_scale, softcap=s_cap)
