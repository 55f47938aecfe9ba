"""Token-level distillation loss for causal LMs, computed from final hidden states without full logits.

For an LLM the logits tensor is the memory hog: ``N`` tokens x ``V`` = 49152 vocabulary entries x 4 bytes is
0.8 GB at ``N = 4096``, and a divergence keeps several such tensors (log-softmaxes, probabilities, their
gradients) for each of teacher and student. `token_kd_loss` takes the *final hidden states* and the *output
heads* instead and works through the valid tokens ``chunk_size`` rows at a time::

    for each chunk c of valid rows (labels != -100):
        z_s = cap_s * tanh(scale_s * (h_s W_s^T + b_s) / cap_s)      (C, V)   student logits
        z_t = cap_t * tanh(scale_t * (h_t W_t^T + b_t) / cap_t)      (C, V)   teacher logits (no grad)
        L_c = sum_rows D(P_t || Q_s)                                        one of the divergences below
        G_c = dL_c / d(h_s W_s^T + b_s)                              (C, V)   by autograd, inside the chunk
        grad_h_s[c] = G_c W_s,   grad_W_s += G_c^T h_s[c],   grad_b_s += sum_rows G_c

    loss = sum_c L_c / N_valid

The gradients of the student's hidden states, head weight and head bias are accumulated during the forward
pass (memory: one ``(N, H)`` and one ``(V, H)`` buffer), so the backward pass only scales them by the incoming
gradient: no ``(N, V)`` tensor of either model ever exists, and no logits are recomputed. The teacher gets no
gradient (its inputs are detached).

Divergences (``P = softmax(z_t / T)`` teacher, ``Q = softmax(z_s / T)`` student; no ``T^2`` factor), all
from :mod:`kdistill.losses.response`:

====================  ===========================================================
``forward_kl``         KL(P || Q)
``reverse_kl``         KL(Q || P)
``jsd``                beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q
                       (beta = 0 gives KL(P || Q), beta = 1 gives KL(Q || P))
``skew_kl``            KL(P || alpha P + (1 - alpha) Q)
``skew_reverse_kl``    KL(Q || alpha Q + (1 - alpha) P)
``tvd``                1/2 sum_v |P_v - Q_v|
====================  ===========================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.errors import WiringError
from kdistill.losses import response

__all__ = ["DIVERGENCES", "get_output_head", "token_kd_loss", "token_kd_loss_reference"]

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 256

_WHERE = "kdistill.llm.token_kd_loss"


def _divergence_fns() -> dict[str, Callable[..., Tensor]]:
    return {
        "forward_kl": lambda s, t, o: response.kl(s, t, temperature=o["temperature"], reduction="sum"),
        "reverse_kl": lambda s, t, o: response.kl(s, t, temperature=o["temperature"], reverse=True, reduction="sum"),
        "jsd": lambda s, t, o: response.jsd(s, t, beta=o["beta"], temperature=o["temperature"], reduction="sum"),
        "skew_kl": lambda s, t, o: response.skew_kl(
            s, t, alpha=o["alpha"], temperature=o["temperature"], reduction="sum"
        ),
        "skew_reverse_kl": lambda s, t, o: response.skew_kl(
            s, t, alpha=o["alpha"], reverse=True, temperature=o["temperature"], reduction="sum"
        ),
        "tvd": lambda s, t, o: response.tvd(s, t, temperature=o["temperature"], reduction="sum"),
    }


DIVERGENCES: tuple[str, ...] = tuple(_divergence_fns())


# ----------------------------------------------------------------------------------------------------------------
# heads, logits and argument checks
# ----------------------------------------------------------------------------------------------------------------


def _head_parts(head: Any, role: str) -> tuple[Tensor, Tensor | None]:
    """``(weight (V, H), bias (V,) or None)`` of an output head given as a module with ``.weight`` or a tensor."""
    if isinstance(head, Tensor):
        weight, bias = head, None
    elif isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), Tensor):
        weight, bias = head.weight, getattr(head, "bias", None)
    else:
        raise WiringError(
            f"{role} head must be an nn.Linear or a weight tensor of shape (V, H), got {type(head).__name__}",
            where=f"{_WHERE}({role}_head)",
            fix="pass model.get_output_embeddings() or its .weight (see kdistill.llm.get_output_head)",
        )
    if weight.ndim != 2:
        raise WiringError(
            f"{role} head weight must have shape (V, H), got {tuple(weight.shape)}",
            where=f"{_WHERE}({role}_head)",
            fix="pass the output projection (vocabulary x hidden)",
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise WiringError(
            f"{role} head bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)",
            where=f"{_WHERE}({role}_head)",
            fix="pass a bias with one entry per vocabulary row, or none",
        )
    return weight, bias


def _transform_logits(raw: Tensor, scale: float, softcap: float | None) -> Tensor:
    """``softcap * tanh(scale * raw / softcap)`` (or ``scale * raw`` without a cap), in float32 at least."""
    z = raw.to(torch.promote_types(raw.dtype, torch.float32))
    if scale != 1.0:
        z = z * scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


def _check_positive(name: str, value: float | None, *, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    v = float(value)  # type: ignore[arg-type]
    if not math.isfinite(v) or v <= 0:
        raise WiringError(
            f"{name} must be a finite number > 0, got {value!r}", where=_WHERE, fix=f"pass a positive {name}"
        )
    return v


def _check_inputs(
    student_hidden: Tensor,
    student_head: Any,
    teacher_hidden: Tensor,
    teacher_head: Any,
    labels: Tensor,
    divergence: str,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """Validate shapes and names; return ``(W_s, b_s, W_t, b_t)``."""
    if divergence not in DIVERGENCES:
        raise WiringError(
            f"unknown divergence {divergence!r}", where=f"{_WHERE}(divergence)", fix=f"use one of {list(DIVERGENCES)}"
        )
    w_s, b_s = _head_parts(student_head, "student")
    w_t, b_t = _head_parts(teacher_head, "teacher")
    if w_s.shape[0] != w_t.shape[0]:
        raise WiringError(
            f"student vocabulary size {w_s.shape[0]} != teacher vocabulary size {w_t.shape[0]}: token-level KD "
            "compares next-token distributions over one shared vocabulary",
            where=f"{_WHERE}(student_head, teacher_head)",
            fix="use sequence-level KD (train the student on teacher-generated text) for different tokenizers; "
            "if one head is only padded beyond the tokenizer, slice both heads to len(tokenizer) rows "
            "(kdistill.models.vocab.check_vocab returns that number)",
        )
    for role, hidden, weight in (("student", student_hidden, w_s), ("teacher", teacher_hidden, w_t)):
        if not isinstance(hidden, Tensor) or hidden.ndim < 2 or not hidden.is_floating_point():
            raise WiringError(
                f"{role}_hidden must be a float tensor of shape (B, T, H), got "
                f"{tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__}",
                where=f"{_WHERE}({role}_hidden)",
                fix="pass the final hidden states (outputs.hidden_states[-1] with output_hidden_states=True)",
            )
        if hidden.shape[-1] != weight.shape[1]:
            raise WiringError(
                f"{role}_hidden has size {hidden.shape[-1]} but the {role} head expects {weight.shape[1]} "
                f"(head weight {tuple(weight.shape)})",
                where=f"{_WHERE}({role}_hidden)",
                fix=f"pass the {role}'s final (post-norm) hidden states and its own output head",
            )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1] or labels.shape != student_hidden.shape[:-1]:
        raise WiringError(
            f"positions differ: student_hidden {tuple(student_hidden.shape)}, teacher_hidden "
            f"{tuple(teacher_hidden.shape)}, labels {tuple(labels.shape)}",
            where=_WHERE,
            fix="run both models on the same input_ids; labels must be (B, T) aligned with the hidden positions",
        )
    return w_s, b_s, w_t, b_t


def _valid_rows(hidden: Tensor, labels: Tensor) -> Tensor:
    """Rows of ``hidden.reshape(-1, H)`` at positions with ``labels != -100``: shape ``(N_valid, H)``."""
    return hidden.reshape(-1, hidden.shape[-1])[(labels.reshape(-1) != IGNORE_INDEX).to(hidden.device)]


def _sum_dtype(device: torch.device) -> torch.dtype:
    """Accumulator for the sum over chunks: float64, except on MPS (which has none)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _zero_loss(student_hidden: Tensor, w_s: Tensor) -> Tensor:
    """A 0 that is attached to the student graph (its gradients are zeros), for batches with no valid token."""
    return student_hidden.reshape(-1)[:0].sum().float() + w_s.reshape(-1)[:0].sum().float()


# ----------------------------------------------------------------------------------------------------------------
# the chunked loss
# ----------------------------------------------------------------------------------------------------------------


class _ChunkedTokenKD(torch.autograd.Function):
    """Mean divergence over rows; gradients for the student accumulated chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, spec):  # type: ignore[override]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n_rows = h_s.shape[0]
        acc_dtype = torch.promote_types(w_s.dtype, torch.float32)
        grad_h = torch.empty_like(h_s) if need_h else None
        grad_w = torch.zeros(w_s.shape, dtype=acc_dtype, device=w_s.device) if need_w else None
        grad_b = torch.zeros(w_s.shape[0], dtype=acc_dtype, device=w_s.device) if need_b else None
        total = torch.zeros((), dtype=_sum_dtype(h_s.device), device=h_s.device)
        for start in range(0, n_rows, spec["chunk_size"]):
            stop = min(start + spec["chunk_size"], n_rows)
            h_s_chunk = h_s[start:stop]
            z_t = _transform_logits(F.linear(h_t[start:stop], w_t, b_t), spec["teacher_scale"], spec["teacher_cap"])
            raw_s = F.linear(h_s_chunk, w_s, b_s).detach().requires_grad_(True)
            with torch.enable_grad():
                z_s = _transform_logits(raw_s, spec["student_scale"], spec["student_cap"])
                chunk_loss = spec["fn"](z_s, z_t, spec)
            (grad_raw,) = torch.autograd.grad(chunk_loss, raw_s)
            total += chunk_loss.detach().to(total.dtype)
            del z_t, z_s, raw_s, chunk_loss
            grad_raw = grad_raw.to(w_s.dtype)
            if need_h:
                torch.mm(grad_raw, w_s, out=grad_h[start:stop])
            if need_w:
                grad_w.addmm_(grad_raw.t().to(acc_dtype), h_s_chunk.to(acc_dtype))
            if need_b:
                grad_b += grad_raw.sum(0, dtype=acc_dtype)
            del grad_raw
        inv_n = 1.0 / n_rows
        grads = []
        for grad, like in ((grad_h, h_s), (grad_w, w_s), (grad_b, b_s)):
            grads.append(None if grad is None else grad.mul_(inv_n).to(like.dtype))
        ctx.grads = grads
        return (total * inv_n).to(torch.promote_types(h_s.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        scaled = []
        one = bool(grad_loss == 1)
        for grad in ctx.grads:
            scaled.append(None if grad is None else (grad if one else grad * grad_loss.to(grad.dtype)))
        return scaled[0], scaled[1], scaled[2], None, None, None, None


def _chunked_sum_no_grad(h_s, w_s, b_s, h_t, w_t, b_t, spec) -> Tensor:
    """Sum of per-row divergences, chunk by chunk, without any gradient bookkeeping (evaluation)."""
    total = torch.zeros((), dtype=_sum_dtype(h_s.device), device=h_s.device)
    with torch.no_grad():
        for start in range(0, h_s.shape[0], spec["chunk_size"]):
            stop = min(start + spec["chunk_size"], h_s.shape[0])
            z_t = _transform_logits(F.linear(h_t[start:stop], w_t, b_t), spec["teacher_scale"], spec["teacher_cap"])
            z_s = _transform_logits(F.linear(h_s[start:stop], w_s, b_s), spec["student_scale"], spec["student_cap"])
            total += spec["fn"](z_s, z_t, spec).to(total.dtype)
    return total


def _spec(divergence, beta, alpha, temperature, chunk_size, softcaps, scales) -> dict[str, Any]:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise WiringError(
            f"chunk_size must be a positive integer, got {chunk_size!r}",
            where=f"{_WHERE}(chunk_size)",
            fix=f"use e.g. chunk_size={DEFAULT_CHUNK_SIZE}",
        )
    return {
        "fn": _divergence_fns()[divergence],
        "beta": beta,
        "alpha": alpha,
        "temperature": temperature,
        "chunk_size": chunk_size,
        "student_cap": _check_positive("student_softcap", softcaps[0], allow_none=True),
        "teacher_cap": _check_positive("teacher_softcap", softcaps[1], allow_none=True),
        "student_scale": _check_positive("student_logit_scale", scales[0], allow_none=False),
        "teacher_scale": _check_positive("teacher_logit_scale", scales[1], allow_none=False),
    }


def token_kd_loss(
    student_hidden: Tensor,
    student_head: nn.Module | Tensor,
    teacher_hidden: Tensor,
    teacher_head: nn.Module | Tensor,
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
) -> Tensor:
    """Mean per-token divergence between teacher and student next-token distributions, chunked over tokens.

    Args:
        student_hidden: student final (post-norm) hidden states, shape ``(B, T, H_s)`` (or any ``(..., H_s)``).
        student_head: student output head: an ``nn.Linear`` (bias optional) or its weight ``(V, H_s)``.
        teacher_hidden: teacher final hidden states ``(B, T, H_t)``; detached (the teacher is frozen).
        teacher_head: teacher output head, ``nn.Linear`` or weight ``(V, H_t)``; same ``V`` as the student.
        labels: ``(B, T)`` token ids aligned with the hidden positions; positions equal to -100 are skipped
            (only their presence matters, not the ids).
        divergence: one of ``forward_kl``, ``reverse_kl``, ``jsd``, ``skew_kl``, ``skew_reverse_kl``, ``tvd``
            (equations in the module docstring; computed by :mod:`kdistill.losses.response`).
        beta: JSD mixture weight of the teacher, in ``[0, 1]``.
        alpha: skew of ``skew_kl`` / ``skew_reverse_kl``, in ``[0, 1]``.
        temperature: softmax temperature ``T`` for both models (no ``T^2`` factor).
        chunk_size: rows (tokens) per chunk; peak extra memory is about ``8 * chunk_size * V * 4`` bytes.
        student_softcap, teacher_softcap: Gemma-2 style final logit soft-capping ``cap * tanh(z / cap)``.
        student_logit_scale, teacher_logit_scale: multiply the head output before capping (Cohere's
            ``logit_scale``, ``1 / logits_scaling`` for Granite); see :func:`get_output_head`.

    Returns:
        scalar ``sum_{valid tokens} D / N_valid`` (float32 at least); ``0`` attached to the graph when no label
        is valid. Gradients flow to ``student_hidden`` and the student head's weight and bias only.

    Memory: ``O(chunk_size * V + N * H + V * H)``; no ``(N, V)`` logits tensor is ever built. The student's
    gradients are computed during the forward pass, so calling it under ``torch.no_grad()`` (or with nothing
    requiring grad) takes a cheaper loss-only path. Double backward is not supported.
    """
    w_s, b_s, w_t, b_t = _check_inputs(student_hidden, student_head, teacher_hidden, teacher_head, labels, divergence)
    spec = _spec(
        divergence,
        beta,
        alpha,
        temperature,
        chunk_size,
        (student_softcap, teacher_softcap),
        (student_logit_scale, teacher_logit_scale),
    )
    h_s = _valid_rows(student_hidden, labels)
    h_t = _valid_rows(teacher_hidden.detach(), labels)
    w_t = w_t.detach()
    b_t = None if b_t is None else b_t.detach()
    if h_s.shape[0] == 0:
        return _zero_loss(student_hidden, w_s)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h_s, w_s, b_s))
    if not needs_grad:
        total = _chunked_sum_no_grad(h_s, w_s, b_s, h_t, w_t, b_t, spec)
        return (total / h_s.shape[0]).to(torch.promote_types(h_s.dtype, torch.float32))
    return _ChunkedTokenKD.apply(h_s, w_s, b_s, h_t, w_t, b_t, spec)


def token_kd_loss_reference(
    student_hidden: Tensor,
    student_head: nn.Module | Tensor,
    teacher_hidden: Tensor,
    teacher_head: nn.Module | Tensor,
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
) -> Tensor:
    """Plain version of :func:`token_kd_loss` (same signature and value) that builds the full ``(B, T, V)``
    logits of both models and lets autograd store everything; for tests and benchmarks. `chunk_size` is
    accepted and ignored."""
    w_s, b_s, w_t, b_t = _check_inputs(student_hidden, student_head, teacher_hidden, teacher_head, labels, divergence)
    spec = _spec(
        divergence,
        beta,
        alpha,
        temperature,
        DEFAULT_CHUNK_SIZE,
        (student_softcap, teacher_softcap),
        (student_logit_scale, teacher_logit_scale),
    )
    z_s = _transform_logits(F.linear(student_hidden, w_s, b_s), spec["student_scale"], spec["student_cap"])
    with torch.no_grad():
        z_t = _transform_logits(F.linear(teacher_hidden, w_t, b_t), spec["teacher_scale"], spec["teacher_cap"])
    valid = labels.to(z_s.device) != IGNORE_INDEX
    if not bool(valid.any()):
        return _zero_loss(student_hidden, w_s)
    return spec["fn"](z_s[valid], z_t[valid], spec) / valid.sum()


# ----------------------------------------------------------------------------------------------------------------
# reading the head of a Hugging Face model
# ----------------------------------------------------------------------------------------------------------------


def get_output_head(model: nn.Module) -> tuple[Tensor, Tensor | None, float | None, float]:
    """The pieces of a Hugging Face causal LM that turn final hidden states into logits.

    Returns:
        ``(head_weight (V, H), head_bias (V,) or None, softcap or None, scale)`` such that the model's logits
        are ``softcap * tanh(scale * (h W^T + b) / softcap)`` (without the tanh when ``softcap`` is None):

        * ``softcap``: ``config.final_logit_softcapping`` (Gemma-2/3/4), else None;
        * ``scale``: ``config.logit_scale`` (Cohere, Cohere2), ``1 / config.logits_scaling`` (Granite family),
          ``config.logits_scaling`` (HyperCLOVA X, which multiplies), ``config.output_multiplier``; else 1.

    Pass them to :func:`token_kd_loss` as ``*_head``, ``*_softcap`` and ``*_logit_scale``; the hidden states
    must be the post-final-norm ones (``outputs.hidden_states[-1]`` for Llama/GPT-2 style models).
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise WiringError(
            f"{type(model).__name__} has no output embeddings (get_output_embeddings() returned {head!r})",
            where="kdistill.llm.get_output_head",
            fix="pass a causal LM with a language-model head (e.g. AutoModelForCausalLM)",
        )
    config = getattr(model, "config", None)
    configs = [c for c in (config, _text_config(config)) if c is not None]

    def first(name: str) -> Any:
        for c in configs:
            value = getattr(c, name, None)
            if value is not None:
                return value
        return None

    softcap = first("final_logit_softcapping")
    softcap = float(softcap) if softcap else None
    scale = 1.0
    model_type = str(getattr(config, "model_type", "") or "")
    if first("logit_scale") is not None:
        scale *= float(first("logit_scale"))
    if first("logits_scaling") is not None:
        value = float(first("logits_scaling"))
        scale *= value if model_type.startswith("hyperclovax") else 1.0 / value
    if first("output_multiplier") is not None:
        scale *= float(first("output_multiplier"))
    return head.weight, getattr(head, "bias", None), softcap, scale


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    if not callable(getter):
        return None
    try:
        return getter()
    except (TypeError, ValueError):
        return None
