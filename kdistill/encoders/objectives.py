"""Teacher-free pieces of encoder training: masked-LM input corruption and the SimCSE contrastive objective.

`MaskedLM` corrupts a batch the way BERT / DistilBERT pre-training does (the masked-LM term of the DistilBERT
triple loss needs it); `simcse` is the unsupervised contrastive loss used to train the "scratch" baseline (the
same student architecture trained on the same sentences without a teacher).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from kdistill.errors import WiringError
from kdistill.losses.contrastive import simcse  # noqa: F401  (re-exported)

__all__ = ["MaskedLM", "simcse"]


@dataclass(frozen=True)
class MaskedLM:
    """Masked-LM corruption (Devlin et al. 2019, Sec. 3.1): each real, non-special token is selected with
    probability `probability`; a selected token becomes ``[MASK]`` (80%), a random token (10%) or stays (10%).
    The labels are the original ids at selected positions and -100 elsewhere.
    """

    mask_token_id: int
    vocab_size: int
    special_token_ids: Sequence[int] = ()
    probability: float = 0.15

    def __post_init__(self):
        if not 0.0 < float(self.probability) < 1.0:
            raise WiringError(f"masking probability must be in (0, 1), got {self.probability!r}",
                              where="kdistill.encoders.MaskedLM", fix="use 0.15 (BERT, DistilBERT)")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, probability: float = 0.15) -> "MaskedLM":
        if tokenizer.mask_token_id is None:
            raise WiringError(f"{type(tokenizer).__name__} has no [MASK] token", where="MaskedLM.from_tokenizer",
                              fix="use the tokenizer of a masked-LM model")
        return cls(int(tokenizer.mask_token_id), len(tokenizer), tuple(int(i) for i in tokenizer.all_special_ids),
                   probability)

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(corrupted input_ids, labels)``; uses `generator` (default: the global torch RNG)."""
        ids = input_ids
        candidates = torch.ones_like(ids, dtype=torch.bool)
        if attention_mask is not None:
            candidates &= attention_mask.bool()
        for special in self.special_token_ids:
            candidates &= ids != special

        def uniform() -> torch.Tensor:
            return torch.rand(ids.shape, generator=generator, device="cpu").to(ids.device)

        selected = candidates & (uniform() < self.probability)
        labels = torch.where(selected, ids, torch.full_like(ids, -100))
        roll = uniform()
        to_mask = selected & (roll < 0.8)
        to_random = selected & (roll >= 0.8) & (roll < 0.9)
        random_ids = torch.randint(self.vocab_size, ids.shape, generator=generator, device="cpu").to(ids.device)
        corrupted = torch.where(to_mask, torch.full_like(ids, self.mask_token_id), ids)
        corrupted = torch.where(to_random, random_ids, corrupted)
        return corrupted, labels
