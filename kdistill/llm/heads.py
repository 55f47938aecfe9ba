"""What the chunked head losses read from a Hugging Face causal LM: its final hidden states and its output head.

The losses (`kdistill.losses.lm`) never build a ``(tokens, vocabulary)`` logits tensor: a model runs its decoder
to the final (post-norm) hidden states (`final_hidden_states`) and the head's pieces (`head_parts`) turn them
into logits chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from torch import Tensor, nn

from kdistill.errors import WiringError

__all__ = ["final_hidden_states", "head_parts"]


def final_hidden_states(model: nn.Module, inputs: Mapping[str, Any]) -> Tensor:
    """The final (post-norm) hidden states ``(B, T, H)`` of a causal LM, without computing its logits.

    Runs the decoder (``model.base_model``: ``model.model`` for Llama-family models, ``model.transformer`` for
    GPT-2) when the model has one; otherwise the whole model with ``output_hidden_states=True``.
    """
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        out = base(**inputs, use_cache=False)
        hidden = getattr(out, "last_hidden_state", None)
        return hidden if hidden is not None else out[0]
    out = model(**inputs, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1]


def head_parts(model: nn.Module, vocab_rows: Optional[int] = None) -> dict[str, Any]:
    """``{"weight" (V, H), "bias" (V,) or None, "softcap", "scale"}`` of a causal LM's output head, such that its
    logits are ``softcap * tanh(scale * (h W^T + b) / softcap)`` (without the tanh when ``softcap`` is None):

    * ``softcap``: ``config.final_logit_softcapping`` (Gemma-2/3/4), else None;
    * ``scale``: ``config.logit_scale`` (Cohere, Cohere2), ``1 / config.logits_scaling`` (Granite family),
      ``config.logits_scaling`` (HyperCLOVA X, which multiplies), ``config.output_multiplier``; else 1.

    `vocab_rows` keeps the first rows of a head padded beyond the shared vocabulary. The hidden states must be
    the post-final-norm ones (`final_hidden_states`).
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise WiringError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() returned "
                          f"{head!r})", where="kdistill.llm.head_parts",
                          fix="pass a causal LM with a language-model head (e.g. AutoModelForCausalLM)")
    config = getattr(model, "config", None)
    configs = [c for c in (config, _text_config(config)) if c is not None]

    def first(name: str) -> Any:
        for c in configs:
            value = getattr(c, name, None)
            if value is not None:
                return value
        return None

    softcap = first("final_logit_softcapping")
    scale = 1.0
    model_type = str(getattr(config, "model_type", "") or "")
    if first("logit_scale") is not None:
        scale *= float(first("logit_scale"))
    if first("logits_scaling") is not None:
        value = float(first("logits_scaling"))
        scale *= value if model_type.startswith("hyperclovax") else 1.0 / value
    if first("output_multiplier") is not None:
        scale *= float(first("output_multiplier"))
    weight, bias = head.weight, getattr(head, "bias", None)
    if vocab_rows is not None and vocab_rows < weight.shape[0]:
        weight = weight[:vocab_rows]
        bias = None if bias is None else bias[:vocab_rows]
    return {"weight": weight, "bias": bias, "softcap": float(softcap) if softcap else None, "scale": scale}


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    if not callable(getter):
        return None
    try:
        return getter()
    except (TypeError, ValueError):
        return None
