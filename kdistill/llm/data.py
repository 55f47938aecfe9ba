"""Token datasets for causal-LM distillation, as `ArrayDataset`s the Engine batches by fancy indexing.

Two layouts, both with ``x`` (input ids) and ``y`` (labels aligned with ``x``, ``-100`` =
not a target; the loss shifts them so that position ``t`` predicts token ``t + 1``):

* `block_dataset`: fixed-length blocks of a text stream (`kdistill.data.text.lm_blocks`); every token after
  the first is a target; no padding, so no attention mask.
* `prompt_response_dataset`: one prompt + response per row, in a fixed frame of ``P + R`` columns::

      [pad ... pad  prompt tokens | response tokens  eos  pad ... pad]
       <------------ P ---------->  <--------------- R -------------->

  the prompt is left-padded into the first ``P`` columns and the response right-padded into the last ``R``,
  so every prompt ends at column ``P`` (batched generation continues all rows from there) and ``prompt_len``
  (= P) is stored per row with the ``attention_mask``. Labels are ``-100`` on the prompt and on padding: only
  response tokens count.
  Position ids are computed from the attention mask (`lm_inputs`), so left padding does not shift them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from kdistill.data.arrays import ArrayDataset
from kdistill.errors import DataError
from kdistill.losses.lm import IGNORE_INDEX

__all__ = ["block_dataset", "lm_inputs", "prompt_response_dataset", "token_id"]

_WHERE = "kdistill.llm.data"


def token_id(tokenizer: Any, name: str, fallback: str | None = None) -> int | None:
    """``tokenizer.<name>_token_id`` (e.g. ``pad``), else the ``fallback`` one's (e.g. ``eos``), else None."""
    for attr in (name, fallback):
        if attr is None:
            continue
        value = getattr(tokenizer, f"{attr}_token_id", None)
        if value is not None:
            return int(value)
    return None


def block_dataset(blocks: Tensor, name: str = "blocks") -> ArrayDataset:
    """An `ArrayDataset` of token blocks ``(N, T)``: ``x = y = blocks`` (no padding, so no attention mask)."""
    if not torch.is_tensor(blocks) or blocks.ndim != 2 or blocks.dtype not in (torch.int32, torch.int64):
        raise DataError(f"blocks must be an integer tensor (N, T), got "
                        f"{tuple(blocks.shape) if torch.is_tensor(blocks) else type(blocks).__name__}",
                        where=_WHERE, fix="use kdistill.data.text.lm_blocks(texts, tokenizer, block_size)")
    blocks = blocks.long()
    return ArrayDataset({"x": blocks, "y": blocks.clone()}, name)


def prompt_response_dataset(prompts: Sequence[str], responses: Sequence[str] | None, tokenizer: Any, *,
                            max_prompt_tokens: int, max_response_tokens: int, add_eos: bool = True,
                            name: str = "prompt-response") -> ArrayDataset:
    """Prompt + response rows in the fixed ``P + R`` frame of the module docstring.

    Args:
        prompts: prompt texts; a prompt longer than `max_prompt_tokens` keeps its *last* tokens.
        responses: response texts (None: prompts only, for on-policy distillation; the response columns are
            then padding). A response longer than `max_response_tokens` (eos included) is cut.
        tokenizer: a Hugging Face tokenizer (called with ``add_special_tokens=False``); its pad id (else eos) fills.
        max_prompt_tokens, max_response_tokens: ``P`` and ``R``.
        add_eos: end each response with the eos token (the student learns to stop).

    Returns:
        ``ArrayDataset`` with ``x``, ``attention_mask``, ``y`` of shape ``(N, P + R)`` and ``prompt_len`` ``(N,)``.
    """
    if responses is not None and len(responses) != len(prompts):
        raise DataError(f"{len(prompts)} prompts but {len(responses)} responses", where=_WHERE,
                        fix="pass one response per prompt")
    if not prompts:
        raise DataError("no prompts", where=_WHERE, fix="pass at least one prompt")
    for arg, value in (("max_prompt_tokens", max_prompt_tokens), ("max_response_tokens", max_response_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{arg} must be a positive integer, got {value!r}", where=_WHERE, fix=f"e.g. {arg}=64")
    pad = token_id(tokenizer, "pad", "eos")
    eos = token_id(tokenizer, "eos")
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an eos token", where=_WHERE,
                        fix="set tokenizer.pad_token before building the dataset")
    p_len, r_len = max_prompt_tokens, max_response_tokens
    n = len(prompts)
    x = torch.full((n, p_len + r_len), pad, dtype=torch.long)
    mask = torch.zeros((n, p_len + r_len), dtype=torch.long)
    y = torch.full((n, p_len + r_len), IGNORE_INDEX, dtype=torch.long)
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False, verbose=False)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False, verbose=False)["input_ids"] \
        if responses is not None else [[] for _ in prompts]
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        p = list(p)[-p_len:]
        if not p:
            raise DataError(f"prompt {i} is empty after tokenization", where=_WHERE,
                            fix="drop empty prompts (generation needs at least one prompt token)")
        r = list(r)
        if responses is not None and add_eos and eos is not None:
            r = r + [eos]
        r = r[:r_len]
        x[i, p_len - len(p):p_len] = torch.tensor(p)
        mask[i, p_len - len(p):p_len] = 1
        if r:
            x[i, p_len:p_len + len(r)] = torch.tensor(r)
            mask[i, p_len:p_len + len(r)] = 1
            y[i, p_len:p_len + len(r)] = torch.tensor(r)
    return ArrayDataset({"x": x, "attention_mask": mask, "y": y,
                         "prompt_len": torch.full((n,), p_len, dtype=torch.long)}, name)


def lm_inputs(batch_or_x: Any, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Keyword arguments for a Hugging Face causal LM: ``input_ids``, ``attention_mask`` and ``position_ids``
    counted over real tokens (``cumsum(mask) - 1``, so a left-padded row's first token has position 0).

    Accepts a batch dict (``x`` tensor or dict of tensors, optional ``attention_mask``) or the ids themselves.
    """
    if isinstance(batch_or_x, Mapping):
        x = batch_or_x["x"] if "x" in batch_or_x else batch_or_x
        if isinstance(x, Mapping):
            attention_mask = x.get("attention_mask", attention_mask)
            x = x["input_ids"]
        elif attention_mask is None:
            attention_mask = batch_or_x.get("attention_mask")
    else:
        x = batch_or_x
    out = {"input_ids": x}
    if attention_mask is not None:
        out["attention_mask"] = attention_mask
        out["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    return out
