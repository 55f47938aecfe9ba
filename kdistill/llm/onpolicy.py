"""On-policy distillation (GKD, Agarwal et al. 2024): the student samples, the teacher scores its samples.

Generalized knowledge distillation trains on a mixture of fixed sequences (the dataset's responses) and
sequences the student generates itself: with probability ``lambda`` per batch the student samples a
continuation of each prompt (``max_new_tokens`` at most, temperature ``T_sample``), the teacher scores the
sampled tokens, and the chosen divergence ``D(P_teacher || Q_student)`` is minimised on the generated tokens
only (prompt and anything after the first end-of-sequence token are masked). Training on its own samples
removes the train/inference mismatch of fixed-sequence KD (exposure bias); with ``lambda = 0`` it is plain
supervised KD, with ``lambda = 1`` purely on-policy. Gradients do not flow through the sampling.

Reproducibility: the on-policy decision and the sampling seed are pure functions of ``(seed, step)``, so a
resumed run takes the same path and draws the same samples at every step as an uninterrupted one (given the
same weights), and every DDP rank takes the same path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from kdistill.errors import WiringError
from kdistill.losses.lm import IGNORE_INDEX

__all__ = ["OnPolicy", "sample_continuations"]

_WHERE = "kdistill.llm.OnPolicy"


def _mix(seed: int, step: int, salt: int) -> int:
    """A non-negative 63-bit seed from (seed, step, salt)."""
    return (int(seed) * 1_000_003 + int(step) * 7_919 + salt * 104_729) % (2**63 - 1)


@dataclass(frozen=True)
class OnPolicy:
    """Settings of on-policy distillation.

    Args:
        lambda_: probability that a batch is on-policy (student samples); ``0`` never, ``1`` always.
        max_new_tokens: tokens the student generates per prompt at most.
        temperature: sampling temperature of the student's generation (not the divergence's).
        top_p: nucleus sampling threshold (1 = sample the full distribution, as GKD does).
        prompt_tokens: for batches without ``prompt_len`` (text blocks): the first N tokens are the prompt.
        seed: seed of the per-step decision and of the sampling.
    """

    lambda_: float = 0.5
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    prompt_tokens: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.lambda_, (int, float)) and 0.0 <= float(self.lambda_) <= 1.0):
            raise WiringError(f"lambda_ must be in [0, 1], got {self.lambda_!r}", where=f"{_WHERE}(lambda_)",
                              fix="use e.g. 0.5 (half the batches on-policy)")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or \
                self.max_new_tokens < 1:
            raise WiringError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}",
                              where=f"{_WHERE}(max_new_tokens)", fix="use e.g. 64")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise WiringError(f"temperature must be > 0, got {self.temperature!r}", where=f"{_WHERE}(temperature)",
                              fix="use 1.0 to sample the student's distribution")
        if not 0.0 < self.top_p <= 1.0:
            raise WiringError(f"top_p must be in (0, 1], got {self.top_p!r}", where=f"{_WHERE}(top_p)",
                              fix="use 1.0")
        if self.prompt_tokens is not None and self.prompt_tokens < 1:
            raise WiringError(f"prompt_tokens must be >= 1, got {self.prompt_tokens!r}",
                              where=f"{_WHERE}(prompt_tokens)", fix="e.g. half the block length")

    def use_at(self, step: int) -> bool:
        """Whether the batch of `step` is on-policy: ``U(seed, step) < lambda_`` (a pure function of the step)."""
        if self.lambda_ <= 0.0:
            return False
        if self.lambda_ >= 1.0:
            return True
        gen = torch.Generator().manual_seed(_mix(self.seed, step, 1))
        return bool(torch.rand((), generator=gen) < self.lambda_)

    def sampling_seed(self, step: int) -> int:
        return _mix(self.seed, step, 2)

    def prompt_length(self, batch: Mapping[str, Any]) -> int:
        """The prompt's column count for this batch: its ``prompt_len`` (one value for all rows), else
        `prompt_tokens`."""
        prompt_len = batch.get("prompt_len")
        if prompt_len is not None:
            values = torch.as_tensor(prompt_len).reshape(-1)
            first = int(values[0])
            if bool((values != first).any()):
                raise WiringError("rows of one batch have different prompt_len", where=_WHERE,
                                  fix="build the data with kdistill.llm.prompt_response_dataset (one prompt frame)")
            return first
        if self.prompt_tokens is None:
            raise WiringError("on-policy distillation needs to know where the prompt ends: the batch has no "
                              "'prompt_len' and OnPolicy.prompt_tokens is not set", where=_WHERE,
                              fix="use kdistill.llm.prompt_response_dataset, or set prompt_tokens (e.g. half the "
                                  "block length) for text blocks")
        return int(self.prompt_tokens)


def sample_continuations(student: nn.Module, batch: Mapping[str, Any], *, prompt_len: int, max_new_tokens: int,
                         temperature: float = 1.0, top_p: float = 1.0, eos_token_id: Optional[int] = None,
                         pad_token_id: Optional[int] = None, seed: int = 0) -> dict[str, Any]:
    """Replace the responses of `batch` by the student's own samples (batched ``generate``).

    The first `prompt_len` columns of ``batch["x"]`` are the prompts (left-padded, as `prompt_response_dataset`
    lays them out); the student continues all rows from there. Returns a copy of the batch whose ``x`` is
    ``prompt + sample`` (``prompt_len + max_new_tokens`` columns), ``attention_mask`` marks the prompt's real
    tokens and the sampled tokens up to and including the first eos, and ``y`` is ``-100`` everywhere except on
    those sampled tokens. Sampling runs in eval mode, without gradients, under a forked RNG seeded with `seed`.
    """
    x = batch["x"]
    if isinstance(x, Mapping):
        mask = x.get("attention_mask")
        x = x["input_ids"]
    else:
        mask = batch.get("attention_mask")
    if not 1 <= prompt_len <= x.shape[1]:
        raise WiringError(f"prompt_len {prompt_len} is outside the batch's {x.shape[1]} columns", where=_WHERE,
                          fix="prompt_len counts the prompt columns of each row")
    prompt = x[:, :prompt_len]
    prompt_mask = mask[:, :prompt_len] if mask is not None else torch.ones_like(prompt)
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = student.generate(input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                                   min_new_tokens=0, do_sample=True, temperature=float(temperature),
                                   top_p=float(top_p), top_k=0, eos_token_id=eos_token_id,
                                   pad_token_id=pad_token_id)
    finally:
        student.train(was_training)
    generated = out[:, prompt_len:]
    if generated.shape[1] < max_new_tokens:  # every row finished early: pad to the frame
        fill = generated.new_full((generated.shape[0], max_new_tokens - generated.shape[1]), pad_token_id)
        generated = torch.cat([generated, fill], dim=1)
    real = _up_to_first_eos(generated, eos_token_id)
    new_x = torch.cat([prompt, torch.where(real, generated, torch.full_like(generated, pad_token_id))], dim=1)
    new_mask = torch.cat([prompt_mask.to(torch.long), real.long()], dim=1)
    labels = torch.cat([torch.full_like(prompt, IGNORE_INDEX),
                        torch.where(real, generated, torch.full_like(generated, IGNORE_INDEX))], dim=1)
    sampled = {k: v for k, v in batch.items() if k not in ("x", "attention_mask", "y", "prompt_len")}
    sampled.update(x=new_x, attention_mask=new_mask, y=labels,
                   prompt_len=torch.full((x.shape[0],), prompt_len, dtype=torch.long, device=x.device))
    return sampled


def _up_to_first_eos(tokens: Tensor, eos_token_id: Optional[int]) -> Tensor:
    """True at tokens up to and including each row's first eos (all True without an eos id)."""
    if eos_token_id is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    is_eos = (tokens == eos_token_id).long()
    before = is_eos.cumsum(dim=1) - is_eos  # eos tokens strictly before each position
    return before == 0
