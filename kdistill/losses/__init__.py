"""Functional distillation losses (``torch.nn.functional`` style). See ``docs/methods.md``.

Every loss takes ``(student, teacher, ...)``. Response (logit) losses accept ``(B, C)`` or ``(B, T, C)`` with
``mask=`` and ``reduction=`` keywords; feature / relation losses take per-sample tensors ``(B, *)``.

Registry conventions (for config-driven wiring):

every loss is registered once in `kdistill.losses.registry` with its metadata (kind, labels, teacher, top-k
version, gating, adapters, stateful module); ``get_loss(name)`` gives its `LossSpec` and ``call_term`` calls it.
"""

from __future__ import annotations


from kdistill.losses.adversarial import DiscriminatorLoss
from kdistill.losses.contrastive import CRDLoss, simcse
from kdistill.losses.cross_vocab import gold_sorted_l1, uld
from kdistill.losses.encoder import (
    attention_kl,
    attention_mse,
    embedding_cosine,
    embedding_mse,
    hidden_cosine,
    hidden_mse,
    self_relation,
    similarity_matrix,
)
from kdistill.losses.feature import attention_transfer, hint
from kdistill.losses.relation import correlation_congruence, pkt, rkd_angle, rkd_distance, similarity_preserving
from kdistill.losses.response import ce, dist, dkd, jsd, kd, kl, reduce_positions, skew_kl, tvd
from kdistill.losses.sparse import SPARSE_LOSSES, SparseDistribution, sparse_loss

from kdistill.losses.registry import LossSpec, call_term, get_loss, is_registered, loss_names, register


# -- classification and any logits ------------------------------------------------------------------------------
register(LossSpec("ce", "label", ce, needs_labels=True, needs_teacher=False,
                  summary="cross-entropy on the labels (-100 = unlabeled)"))
register(LossSpec("kd", "response", kd, sparse="kd", gating=True, summary="Hinton KD: T^2 KL(p_t^T || p_s^T)"))
register(LossSpec("kl", "response", kl, sparse="kl", gating=True, summary="KL, forward or reverse"))
register(LossSpec("jsd", "response", jsd, sparse="jsd", gating=True, summary="generalized Jensen-Shannon"))
register(LossSpec("skew_kl", "response", skew_kl, sparse="skew_kl", gating=True, summary="skew KL (DistiLLM)"))
register(LossSpec("tvd", "response", tvd, sparse="tvd", gating=True, summary="total variation distance"))
register(LossSpec("dkd", "response", dkd, needs_labels=True, summary="decoupled KD: TCKD + beta NCKD"))
register(LossSpec("dist", "response", dist, summary="DIST: inter- and intra-class Pearson relations"))
# -- features and relations ------------------------------------------------------------------------------------
register(LossSpec("hint", "feature", hint, same_shape=True, summary="FitNets hint (adapter when shapes differ)"))
register(LossSpec("attention_transfer", "feature", attention_transfer, summary="attention transfer"), "at")
register(LossSpec("rkd_distance", "relation", rkd_distance, summary="RKD distance"))
register(LossSpec("rkd_angle", "relation", rkd_angle, summary="RKD angle"))
register(LossSpec("similarity_preserving", "relation", similarity_preserving, summary="similarity-preserving"),
         "sp")
register(LossSpec("pkt", "relation", pkt, summary="probabilistic knowledge transfer"))
register(LossSpec("correlation_congruence", "relation", correlation_congruence, summary="correlation congruence"),
         "cc")
register(LossSpec("crd", "contrastive", module=CRDLoss, summary="contrastive representation distillation"))
register(LossSpec("adversarial", "response", module=DiscriminatorLoss,
                  summary="GAN-like KD: a discriminator tells teacher from student outputs"))
# -- encoders: token-level tensors with mask= (also usable on tapped tensors of any model) --------------------
# ``feature`` / ``min_layer`` / ``default_layers`` tell the encoder distiller (kdistill.encoders) which per-layer
# feature a term reads and how it pairs layers; the tap losses among them keep their kind ``feature``.
register(LossSpec("hidden_mse", "feature", hidden_mse, same_shape=True, feature="hidden", default_layers="uniform",
                  summary="masked hidden-state MSE"))
register(LossSpec("hidden_cosine", "feature", hidden_cosine, same_shape=True, feature="hidden",
                  default_layers="uniform", summary="masked hidden cosine"))
register(LossSpec("attention_kl", "feature", attention_kl, feature="attention", min_layer=1, default_layers="last-1",
                  summary="attention-distribution KL (MiniLM)"))
register(LossSpec("attention_mse", "feature", attention_mse, feature="attention", min_layer=1,
                  default_layers="uniform", summary="attention-probability MSE (TinyBERT)"))
register(LossSpec("self_relation", "feature", self_relation, summary="self-relation KL (MiniLMv2)"))
register(LossSpec("embedding_layer", "layer", hidden_mse, same_shape=True, feature="hidden", default_layers=[[0, 0]],
                  on_taps=False, summary="embedding-layer output MSE (TinyBERT)"))
for _feature in ("value", "query", "key"):
    register(LossSpec(f"{_feature}_relation", "layer", self_relation, feature=_feature, min_layer=1,
                      default_layers="last-1", on_taps=False, summary=f"{_feature}-{_feature} self-relation KL (MiniLM, MiniLMv2)"))
del _feature
register(LossSpec("embedding_cosine", "embedding", embedding_cosine, same_shape=True,
                  summary="per-sentence embedding cosine distance"))
register(LossSpec("embedding_mse", "embedding", embedding_mse, same_shape=True, summary="sentence-embedding MSE"))
register(LossSpec("similarity_matrix", "embedding", similarity_matrix, summary="batch cosine-similarity matrix"))
register(LossSpec("simcse", "contrastive", simcse, needs_teacher=False, on_taps=False, summary="SimCSE on two dropout views"))
register(LossSpec("mlm", "label", ce, needs_teacher=False, on_taps=False,  # its labels come from the masking, not the batch's y
                  summary="masked-LM cross-entropy on the masked positions (kdistill.encoders.MaskedLM)"))

# cross-tokenizer LM distillation: rows of two vocabularies paired by a text alignment (kdistill.llm.cross_distiller)
register(LossSpec("uld", "response", uld, on_taps=False, cross_vocab=True,
                  summary="ULD: L1 between sorted next-token distributions of two vocabularies (span-aligned)"))
register(LossSpec("gold", "response", gold_sorted_l1, on_taps=False, cross_vocab=True,
                  summary="GOLD-style: sorted L1 of merged span distributions (+ exact-match part on shared tokens)"))

# LM token-level distillation uses the response losses above on (B, T, V) logits, chunk by chunk from hidden
# states (kdistill.losses.lm); its divergence names (forward_kl, reverse_kl, ...) are response losses with params.

__all__ = [
    "CRDLoss",
    "LossSpec",
    "call_term",
    "get_loss",
    "is_registered",
    "loss_names",
    "register",
    "simcse",
    "SPARSE_LOSSES",
    "SparseDistribution",
    "attention_kl",
    "attention_mse",
    "attention_transfer",
    "embedding_cosine",
    "embedding_mse",
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
