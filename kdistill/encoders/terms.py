"""Encoder loss terms: which registered losses an encoder objective can use, what each reads, and the presets.

A term is the one `kdistill.objective.Term`; its loss is looked up in the one registry (`kdistill.losses`), whose
metadata decides what the term reads (`encoder_route`):

| route | losses (registry metadata) | compares |
|---|---|---|
| ``layer`` | a ``feature`` of ``hidden`` / ``attention`` / ``value`` / ``query`` / ``key`` (``hidden_mse``, ``hidden_cosine``, ``embedding_layer``, ``attention_kl``, ``attention_mse``, ``*_relation``) | per-layer features, averaged over the layer pairs (``layers``, default the loss's ``default_layers``) |
| ``logits`` | per-position response losses (``kd``, ``kl``, ...) | logits (masked-LM logits: real tokens only) |
| ``labels`` | label losses (``ce`` on ``y``, ``mlm`` on the masked-LM labels) | no teacher |
| ``embedding`` | kind ``embedding`` (``embedding_cosine``, ``embedding_mse``, ``similarity_matrix``) | sentence embeddings |
| ``views`` | teacher-free contrastive losses (``simcse``) | two dropout views of the student's embeddings |
"""

from __future__ import annotations

from typing import Optional

from kdistill.errors import WiringError
from kdistill.losses import LossSpec, get_loss, loss_names
from kdistill.objective import LayerSpec, Term

__all__ = ["LAYER_FEATURES", "RELATION_FEATURES", "distilbert_terms", "embedding_terms", "encoder_loss_names",
           "encoder_route", "encoder_spec", "minilm_terms", "tinybert_terms"]

LAYER_FEATURES = ("hidden", "attention", "value", "query", "key")
RELATION_FEATURES = ("value", "query", "key")  # self-relations: need a number of relation heads


def encoder_route(spec: LossSpec) -> Optional[str]:
    """What an encoder term of this loss reads (see the module table); None when an encoder cannot use it."""
    if spec.feature in LAYER_FEATURES and spec.default_layers is not None:
        return "layer"
    if spec.kind == "embedding":
        return "embedding"
    if spec.kind == "response" and spec.gating and not spec.needs_labels:
        return "logits"
    if spec.kind == "label":
        return "labels"
    if spec.kind == "contrastive" and spec.fn is not None and not spec.needs_teacher:
        return "views"
    return None


def encoder_loss_names() -> list[str]:
    """The registered losses an encoder objective can use."""
    return [name for name in loss_names() if encoder_route(get_loss(name)) is not None]


def encoder_spec(term: Term) -> tuple[LossSpec, str]:
    """(registry spec, route) of a term; a loss an encoder cannot use is a `WiringError` naming the ones it can."""
    where = f"term '{term.name}'"
    spec = get_loss(term.loss, where=where)
    route = encoder_route(spec)
    if route is None:
        raise WiringError(f"loss '{term.loss}' ({spec.kind}) cannot be used by an encoder objective", where=where,
                          fix=f"use one of {', '.join(encoder_loss_names())}")
    return spec, route


# -- presets ----------------------------------------------------------------------------------------------------

def distilbert_terms(temperature: float = 2.0, kd_weight: float = 5.0, mlm_weight: float = 2.0,
                     cosine_weight: float = 1.0) -> list[Term]:
    """The DistilBERT triple loss (Sanh et al. 2019): 5 * KD of the masked-LM logits (T = 2, over real tokens)
    + 2 * masked-LM + 1 * cosine of the last hidden states. Needs masked-LM heads and ``mlm=MaskedLM(...)``."""
    return [Term("kd", "kd", kd_weight, params={"temperature": temperature}),
            Term("mlm", "mlm", mlm_weight),
            Term("cos", "hidden_cosine", cosine_weight, layers="last-1")]


def tinybert_terms(layers: LayerSpec = "uniform", prediction: bool = False, temperature: float = 1.0) -> list[Term]:
    """TinyBERT's layer-wise objective (Jiao et al. 2020): embedding-layer MSE + hidden-state MSE + attention MSE
    on the mapped layers, and (``prediction=True``) soft cross-entropy on the logits."""
    terms = [Term("embd", "embedding_layer"), Term("hidn", "hidden_mse", layers=layers),
             Term("attn", "attention_mse", layers=layers)]
    if prediction:
        terms.append(Term("pred", "kd", params={"temperature": temperature}))
    return terms


def minilm_terms(num_heads: Optional[int] = None, layers: LayerSpec = "last-1", average_heads: bool = False
                 ) -> list[Term]:
    """MiniLM (Wang et al. 2020): attention-distribution KL + value-relation KL on the last layers. `num_heads`
    sets the relation heads (default: the teacher's attention heads), so the value relation works across widths
    (MiniLMv2); with different attention-head counts pass ``average_heads=True`` for the attention term."""
    rel = {"num_heads": num_heads} if num_heads else {}
    return [Term("at", "attention_kl", layers=layers, params={"average_heads": average_heads}),
            Term("vr", "value_relation", layers=layers, params=rel)]


def embedding_terms(cosine: float = 1.0, similarity: float = 1.0, mse: float = 0.0) -> list[Term]:
    """Sentence-embedding distillation: per-sentence cosine (and optionally MSE) to the teacher's embedding plus the
    batch similarity-matrix relation loss."""
    terms = []
    if cosine:
        terms.append(Term("cos", "embedding_cosine", cosine))
    if mse:
        terms.append(Term("mse", "embedding_mse", mse))
    if similarity:
        terms.append(Term("sim", "similarity_matrix", similarity))
    return terms
