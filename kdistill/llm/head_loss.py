"""Losses on an LM's output head computed chunk by chunk from the final hidden states (no ``(N, V)`` logits).

`token_kd_loss` (token_loss.py) does this for a live teacher given by its hidden states and head. This module
covers the two other targets a causal-LM student trains on:

* the next-token labels (`next_token_ce`): cross-entropy ``-log Q(y_t)`` per valid token;
* a teacher read from a top-k cache (`sparse_token_kd_loss`): ``D(P~ || Q~)`` on the teacher's k + 1 buckets
  (its top-k tokens plus the tail mass, see `kdistill.losses.sparse`), or a dense cache of full teacher
  logits (`dense_token_kd_loss`).

All three share `chunked_head_loss`: for each chunk of ``chunk_size`` valid rows it forms the student logits
``z = cap * tanh(scale * (h W^T + b) / cap)``, evaluates the chunk's summed loss, takes its gradient with respect
to the raw head output inside the chunk and accumulates the gradients of ``h``, ``W`` and ``b`` right away, so the
backward pass only rescales them. Memory is ``O(chunk_size * V + N * H + V * H)``; the result is the mean over
valid rows.

Label alignment: the hidden state at position ``t`` predicts token ``t + 1``. `shift_labels` turns labels
aligned with the input ids (the Hugging Face convention, ``-100`` = not a target) into labels aligned with the
hidden states: ``shifted[:, t] = labels[:, t + 1]`` and ``shifted[:, -1] = -100``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.errors import WiringError
from kdistill.losses import response
from kdistill.losses.sparse import SparseDistribution, sparse_jsd, sparse_kl, sparse_skew_kl, sparse_tvd
from kdistill.llm.token_loss import DEFAULT_CHUNK_SIZE, DIVERGENCES, IGNORE_INDEX

__all__ = ["chunked_head_loss", "dense_token_kd_loss", "next_token_ce", "shift_labels", "sparse_token_kd_loss"]

_WHERE = "kdistill.llm.head_loss"

RowLoss = Callable[[Tensor, int, int], Tensor]  # (student logits of rows [start, stop), start, stop) -> summed loss


def shift_labels(labels: Tensor) -> Tensor:
    """Labels aligned with the input ids -> labels aligned with the hidden states that predict them.

    ``shifted[:, t] = labels[:, t + 1]``; the last position predicts nothing (``-100``).
    """
    if labels.ndim != 2:
        raise WiringError(f"labels must have shape (batch, tokens), got {tuple(labels.shape)}", where=_WHERE,
                          fix="pass one row of token ids (or -100) per sequence")
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


def _logits(raw: Tensor, scale: float, softcap: float | None) -> Tensor:
    z = raw.float() if raw.dtype in (torch.float16, torch.bfloat16) else raw
    if scale != 1.0:
        z = z * scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


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
        total = torch.zeros((), dtype=torch.float64 if h.device.type != "mps" else torch.float32, device=h.device)
        for start in range(0, n_rows, chunk_size):
            stop = min(start + chunk_size, n_rows)
            h_chunk = h[start:stop]
            raw = F.linear(h_chunk, w, b).detach().requires_grad_(True)
            with torch.enable_grad():
                loss = row_loss(_logits(raw, scale, softcap), start, stop)
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


def chunked_head_loss(hidden: Tensor, head_weight: Tensor, head_bias: Tensor | None, row_loss: RowLoss, *,
                      chunk_size: int = DEFAULT_CHUNK_SIZE, logit_scale: float = 1.0,
                      softcap: float | None = None) -> Tensor:
    """Mean over the rows of ``hidden`` (``(N, H)``, already restricted to valid positions) of a head loss.

    Args:
        hidden: ``(N, H)`` final hidden states of the rows that count.
        head_weight, head_bias: the output head, ``(V, H)`` and ``(V,)`` or None.
        row_loss: ``row_loss(logits, start, stop)`` -> the *summed* loss of rows ``[start, stop)`` given their
            logits ``(stop - start, V)`` (float32 at least).
        chunk_size: rows per chunk.
        logit_scale, softcap: the model's logit transform (see `kdistill.llm.get_output_head`).

    Returns:
        scalar mean loss (0 attached to the graph when ``N = 0``). Calling it without gradients takes a cheaper
        loss-only path; double backward is not supported.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise WiringError(f"chunk_size must be a positive integer, got {chunk_size!r}", where=_WHERE,
                          fix=f"use e.g. chunk_size={DEFAULT_CHUNK_SIZE}")
    if hidden.shape[0] == 0:
        return hidden.reshape(-1)[:0].sum().float() + head_weight.reshape(-1)[:0].sum().float()
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (hidden, head_weight, head_bias))
    if needs_grad:
        return _ChunkedHeadLoss.apply(hidden, head_weight, head_bias, row_loss, chunk_size, float(logit_scale),
                                      softcap)
    total = torch.zeros((), dtype=torch.float64 if hidden.device.type != "mps" else torch.float32,
                        device=hidden.device)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk_size):
            stop = min(start + chunk_size, hidden.shape[0])
            z = _logits(F.linear(hidden[start:stop], head_weight, head_bias), float(logit_scale), softcap)
            total += row_loss(z, start, stop).to(total.dtype)
    return (total / hidden.shape[0]).to(torch.promote_types(hidden.dtype, torch.float32))


def _valid(hidden: Tensor, shifted_labels: Tensor) -> tuple[Tensor, Tensor]:
    """(rows of hidden at valid positions ``(N, H)``, the flat boolean mask ``(B * T,)``)."""
    if hidden.shape[:-1] != shifted_labels.shape:
        raise WiringError(f"hidden states {tuple(hidden.shape)} and labels {tuple(shifted_labels.shape)} are not "
                          f"aligned", where=_WHERE, fix="labels must be (batch, tokens) like the input ids")
    mask = (shifted_labels != IGNORE_INDEX).reshape(-1).to(hidden.device)
    return hidden.reshape(-1, hidden.shape[-1])[mask], mask


def next_token_ce(hidden: Tensor, head_weight: Tensor, head_bias: Tensor | None, shifted_labels: Tensor, *,
                  chunk_size: int = DEFAULT_CHUNK_SIZE, logit_scale: float = 1.0,
                  softcap: float | None = None) -> Tensor:
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


def _dense_fn(divergence: str, beta: float, alpha: float, temperature: float) -> Callable[[Tensor, Tensor], Tensor]:
    fns = {
        "forward_kl": lambda s, t: response.kl(s, t, temperature, reduction="sum"),
        "reverse_kl": lambda s, t: response.kl(s, t, temperature, reverse=True, reduction="sum"),
        "jsd": lambda s, t: response.jsd(s, t, beta, temperature, reduction="sum"),
        "skew_kl": lambda s, t: response.skew_kl(s, t, alpha, False, temperature, reduction="sum"),
        "skew_reverse_kl": lambda s, t: response.skew_kl(s, t, alpha, True, temperature, reduction="sum"),
        "tvd": lambda s, t: response.tvd(s, t, temperature, reduction="sum"),
    }
    return fns[_check_divergence(divergence)]


def _sparse_fn(divergence: str, beta: float, alpha: float,
               temperature: float) -> Callable[[Tensor, SparseDistribution], Tensor]:
    fns = {
        "forward_kl": lambda s, t: sparse_kl(s, t, temperature, reduction="sum"),
        "reverse_kl": lambda s, t: sparse_kl(s, t, temperature, reverse=True, reduction="sum"),
        "jsd": lambda s, t: sparse_jsd(s, t, beta, temperature, reduction="sum"),
        "skew_kl": lambda s, t: sparse_skew_kl(s, t, alpha, False, temperature, reduction="sum"),
        "skew_reverse_kl": lambda s, t: sparse_skew_kl(s, t, alpha, True, temperature, reduction="sum"),
        "tvd": lambda s, t: sparse_tvd(s, t, temperature, reduction="sum"),
    }
    return fns[_check_divergence(divergence)]


def _check_divergence(divergence: str) -> str:
    if divergence not in DIVERGENCES:
        raise WiringError(f"unknown divergence {divergence!r}", where=f"{_WHERE}(divergence)",
                          fix=f"use one of {list(DIVERGENCES)}")
    return divergence


def sparse_token_kd_loss(hidden: Tensor, head_weight: Tensor, head_bias: Tensor | None,
                         teacher: SparseDistribution, shifted_labels: Tensor, *, divergence: str = "forward_kl",
                         beta: float = 0.5, alpha: float = 0.1, temperature: float = 1.0,
                         chunk_size: int = DEFAULT_CHUNK_SIZE, logit_scale: float = 1.0,
                         softcap: float | None = None) -> Tensor:
    """Mean per-token divergence between a top-k teacher (k + 1 buckets) and the student, from hidden states.

    Args:
        hidden: student final hidden states ``(B, T, H)``.
        teacher: the cached teacher at the same positions: ``SparseDistribution`` with shape ``(B, T, V)``
            (indices / log_probs ``(B, T, k)``, log_tail ``(B, T)``), at temperature `temperature`.
        shifted_labels: ``(B, T)`` aligned with `hidden`; positions equal to -100 are skipped.
        divergence, beta, alpha, temperature: as in `token_kd_loss`, applied to the bucket distributions
            ``(P~, Q~)`` (`kdistill.losses.sparse`); with ``k = V`` the value equals the dense divergence.
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
    fn = _sparse_fn(divergence, beta, alpha, temperature)
    rows, mask = _valid(hidden, shifted_labels)
    k = teacher.k
    device = hidden.device
    indices = teacher.indices.reshape(-1, k).to(device)[mask]
    log_probs = teacher.log_probs.reshape(-1, k).to(device)[mask]
    log_tail = teacher.log_tail.reshape(-1).to(device)[mask]

    def row_loss(logits: Tensor, start: int, stop: int) -> Tensor:
        part = SparseDistribution(indices[start:stop], log_probs[start:stop], log_tail[start:stop],
                                  teacher.num_classes, teacher.temperature)
        return fn(logits, part)

    return chunked_head_loss(rows, head_weight, head_bias, row_loss, chunk_size=chunk_size,
                             logit_scale=logit_scale, softcap=softcap)


def dense_token_kd_loss(hidden: Tensor, head_weight: Tensor, head_bias: Tensor | None, teacher_logits: Tensor,
                        shifted_labels: Tensor, *, divergence: str = "forward_kl", beta: float = 0.5,
                        alpha: float = 0.1, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                        logit_scale: float = 1.0, softcap: float | None = None) -> Tensor:
    """Like `sparse_token_kd_loss` for full teacher logits ``(B, T, V)`` (a dense cache)."""
    if tuple(teacher_logits.shape[:-1]) != tuple(hidden.shape[:-1]) or \
            teacher_logits.shape[-1] != head_weight.shape[0]:
        raise WiringError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's positions "
                          f"{tuple(hidden.shape[:-1])} and vocabulary {head_weight.shape[0]}", where=_WHERE,
                          fix="build the cache on the same token blocks, with a teacher of the same vocabulary")
    fn = _dense_fn(divergence, beta, alpha, temperature)
    rows, mask = _valid(hidden, shifted_labels)
    targets = teacher_logits.reshape(-1, teacher_logits.shape[-1]).to(hidden.device)[mask].detach()

    def row_loss(logits: Tensor, start: int, stop: int) -> Tensor:
        return fn(logits, targets[start:stop].to(logits.dtype))

    return chunked_head_loss(rows, head_weight, head_bias, row_loss, chunk_size=chunk_size,
                             logit_scale=logit_scale, softcap=softcap)


def head_parts(model: Any, vocab_rows: int | None = None) -> dict[str, Any]:
    """``{"weight", "bias", "softcap", "scale"}`` of a causal LM's output head (`get_output_head`), the weight and
    bias sliced to the first `vocab_rows` rows when the head is padded beyond the shared vocabulary."""
    from kdistill.llm.token_loss import get_output_head

    weight, bias, softcap, scale = get_output_head(model)
    if vocab_rows is not None and vocab_rows < weight.shape[0]:
        weight = weight[:vocab_rows]
        bias = None if bias is None else bias[:vocab_rows]
    return {"weight": weight, "bias": bias, "softcap": softcap, "scale": scale}
