"""Functional distillation losses (``torch.nn.functional`` style). See ``docs/methods.md``.

Every loss takes ``(student, teacher, ...)``. Response (logit) losses accept ``(B, C)`` or ``(B, T, C)`` with
``mask=`` and ``reduction=`` keywords; feature / relation losses take per-sample tensors ``(B, *)``.

Registry conventions (for config-driven wiring):

* ``LOSSES[name]`` is a function called as ``fn(student, teacher, **kwargs)``, or
  ``fn(student, teacher, labels, **kwargs)`` for names in ``NEEDS_LABELS`` (labels = third positional
  argument). ``ce`` accepts that three-argument form and ignores the teacher; ``ce(student, labels)`` also works.
* ``MODULE_LOSSES[name]`` is an ``nn.Module`` class with parameters / state (construct it, then call it).
"""

from __future__ import annotations

from typing import Callable

from kdistill.losses.contrastive import CRDLoss
from kdistill.losses.encoder import (
    attention_kl,
    attention_mse,
    hidden_cosine,
    hidden_mse,
    self_relation,
    similarity_matrix,
)
from kdistill.losses.feature import attention_transfer, hint
from kdistill.losses.relation import correlation_congruence, pkt, rkd_angle, rkd_distance, similarity_preserving
from kdistill.losses.response import ce, dist, dkd, jsd, kd, kl, reduce_positions, skew_kl, tvd
from kdistill.losses.sparse import SPARSE_LOSSES, SparseDistribution, sparse_loss

LOSSES: dict[str, Callable[..., object]] = {
    "ce": ce,
    "kd": kd,
    "kl": kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "tvd": tvd,
    "dkd": dkd,
    "dist": dist,
    "hint": hint,
    "attention_transfer": attention_transfer,
    "at": attention_transfer,
    "rkd_distance": rkd_distance,
    "rkd_angle": rkd_angle,
    "similarity_preserving": similarity_preserving,
    "sp": similarity_preserving,
    "pkt": pkt,
    "correlation_congruence": correlation_congruence,
    "cc": correlation_congruence,
    # encoder (token-level: (B, T, D) / (B, H, T, T) with mask=; see kdistill.losses.encoder)
    "hidden_mse": hidden_mse,
    "hidden_cosine": hidden_cosine,
    "attention_kl": attention_kl,
    "attention_mse": attention_mse,
    "self_relation": self_relation,
    "similarity_matrix": similarity_matrix,
}

MODULE_LOSSES: dict[str, type] = {"crd": CRDLoss}

NEEDS_LABELS: tuple[str, ...] = ("ce", "dkd")

__all__ = [
    "CRDLoss",
    "LOSSES",
    "MODULE_LOSSES",
    "NEEDS_LABELS",
    "SPARSE_LOSSES",
    "SparseDistribution",
    "attention_kl",
    "attention_mse",
    "attention_transfer",
    "hidden_cosine",
    "hidden_mse",
    "self_relation",
    "similarity_matrix",
    "ce",
    "correlation_congruence",
    "dist",
    "dkd",
    "hint",
    "jsd",
    "kd",
    "kl",
    "pkt",
    "reduce_positions",
    "rkd_angle",
    "rkd_distance",
    "similarity_preserving",
    "skew_kl",
    "sparse_loss",
    "tvd",
]
