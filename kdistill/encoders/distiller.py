"""Encoder distillation on the one Engine: per-layer terms between an HF encoder teacher and student.

    terms = tinybert_terms()                              # or distilbert_terms(), minilm_terms(), embedding_terms()
    distiller = EncoderDistiller(student, teacher, terms)
    Engine(train_cfg).fit(distiller, data)                # data: ArrayDataset(x=input_ids, attention_mask=...)

`EncoderDistiller` has the contract of `kdistill.distiller.Distiller` that the Engine relies on: ``.side`` (the
trainable `nn.Module`: student, learned projections; ``forward(inputs, teacher_values, labels) -> (output,
{term: weighted loss})``), ``.teacher`` (a callable ``batch -> {feature: tensor}``), ``.build(batch)``,
``set_step``, ``export_student()`` and ``__call__(batch)``. Batches hold ``x`` (token ids, with
``attention_mask`` beside them, or a dict of tensors passed as keyword arguments), optional ``y`` (labels) and
``index``; padding is trimmed per batch.

A term pairs layers by a layer map (`kdistill.encoders.layer_map`) and averages its loss over the pairs:

| loss | compares | layers default |
|---|---|---|
| ``hidden_mse`` / ``hidden_cosine`` | hidden states (learned projection when widths differ) | ``uniform`` |
| ``embedding_layer`` | embedding-layer outputs, MSE (TinyBERT) | ``[[0, 0]]`` |
| ``attention_kl`` / ``attention_mse`` | attention probabilities per head | ``last-1`` / ``uniform`` |
| ``value_relation`` / ``query_relation`` / ``key_relation`` | self-relations (MiniLM, MiniLMv2) | ``last-1`` |
| ``kd`` | logits (prediction layer; masked-LM logits on real tokens) | -- |
| ``mlm`` / ``ce`` | masked-LM labels / class labels (no teacher) | -- |
| ``embedding_cosine`` / ``embedding_mse`` / ``similarity_matrix`` | sentence embeddings | -- |
| ``simcse`` | two dropout views of the student's embeddings (no teacher) | -- |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from kdistill.encoders.features import encoder_features, encoder_inputs, feature_key
from kdistill.encoders.layers import LayerSpec, layer_map
from kdistill.encoders.models import SentenceEncoder, encoder_layout
from kdistill.encoders.objectives import MaskedLM, simcse
from kdistill.errors import WiringError
from kdistill.losses.encoder import (
    attention_kl,
    attention_mse,
    hidden_cosine,
    hidden_mse,
    self_relation,
    similarity_matrix,
)
from kdistill.losses.feature import hint
from kdistill.losses.response import ce, kd

__all__ = [
    "CachedEmbeddings",
    "EncoderDistiller",
    "EncoderSide",
    "EncoderTeacher",
    "EncoderTerm",
    "ENCODER_LOSSES",
    "distilbert_terms",
    "embedding_terms",
    "minilm_terms",
    "tinybert_terms",
]

# loss name -> (feature kind, function, smallest layer, default layer map)
LAYER_LOSSES: dict[str, tuple[str, Callable, int, LayerSpec]] = {
    "hidden_mse": ("hidden", hidden_mse, 0, "uniform"),
    "hidden_cosine": ("hidden", hidden_cosine, 0, "uniform"),
    "embedding_layer": ("hidden", hidden_mse, 0, [[0, 0]]),
    "attention_kl": ("attention", attention_kl, 1, "last-1"),
    "attention_mse": ("attention", attention_mse, 1, "uniform"),
    "value_relation": ("value", self_relation, 1, "last-1"),
    "query_relation": ("query", self_relation, 1, "last-1"),
    "key_relation": ("key", self_relation, 1, "last-1"),
}
OUTPUT_LOSSES = ("kd", "mlm", "ce", "embedding_cosine", "embedding_mse", "similarity_matrix", "simcse")
NO_TEACHER = ("mlm", "ce", "simcse")
ENCODER_LOSSES = tuple(LAYER_LOSSES) + OUTPUT_LOSSES
_RELATIONS = ("value", "query", "key")


@dataclass
class EncoderTerm:
    """One named term: weight * mean over layer pairs of loss(student feature, teacher feature, **params)."""

    name: str
    loss: str
    weight: float = 1.0
    layers: Optional[LayerSpec] = None
    params: dict = field(default_factory=dict)
    warmup_steps: int = 0

    def weight_at(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.weight * (step + 1) / self.warmup_steps
        return self.weight


@dataclass
class _Resolved:
    term: EncoderTerm
    pairs: list[tuple[int, int]]  # empty for output terms

    @property
    def kind(self) -> Optional[str]:
        spec = LAYER_LOSSES.get(self.term.loss)
        return spec[0] if spec else None


# -- presets ----------------------------------------------------------------------------------------------------

def distilbert_terms(temperature: float = 2.0, kd_weight: float = 5.0, mlm_weight: float = 2.0,
                     cosine_weight: float = 1.0) -> list[EncoderTerm]:
    """The DistilBERT triple loss (Sanh et al. 2019): 5 * KD of the masked-LM logits (T = 2, over real tokens)
    + 2 * masked-LM + 1 * cosine of the last hidden states. Needs masked-LM heads and ``mlm=MaskedLM(...)``."""
    return [EncoderTerm("kd", "kd", kd_weight, params={"temperature": temperature}),
            EncoderTerm("mlm", "mlm", mlm_weight),
            EncoderTerm("cos", "hidden_cosine", cosine_weight, layers="last-1")]


def tinybert_terms(layers: LayerSpec = "uniform", prediction: bool = False,
                   temperature: float = 1.0) -> list[EncoderTerm]:
    """TinyBERT's layer-wise objective (Jiao et al. 2020): embedding-layer MSE + hidden-state MSE + attention MSE
    on the mapped layers, and (``prediction=True``) soft cross-entropy on the logits."""
    terms = [EncoderTerm("embd", "embedding_layer"), EncoderTerm("hidn", "hidden_mse", layers=layers),
             EncoderTerm("attn", "attention_mse", layers=layers)]
    if prediction:
        terms.append(EncoderTerm("pred", "kd", params={"temperature": temperature}))
    return terms


def minilm_terms(num_heads: Optional[int] = None, layers: LayerSpec = "last-1",
                 average_heads: bool = False) -> list[EncoderTerm]:
    """MiniLM (Wang et al. 2020): attention-distribution KL + value-relation KL on the last layers. `num_heads`
    sets the relation heads (default: the teacher's attention heads), so the value relation works across widths
    (MiniLMv2); with different attention-head counts pass ``average_heads=True`` for the attention term."""
    rel = {"num_heads": num_heads} if num_heads else {}
    return [EncoderTerm("at", "attention_kl", layers=layers, params={"average_heads": average_heads}),
            EncoderTerm("vr", "value_relation", layers=layers, params=rel)]


def embedding_terms(cosine: float = 1.0, similarity: float = 1.0, mse: float = 0.0) -> list[EncoderTerm]:
    """Sentence-embedding distillation: per-sentence cosine (and optionally MSE) to the teacher's embedding plus the
    batch similarity-matrix relation loss."""
    terms = []
    if cosine:
        terms.append(EncoderTerm("cos", "embedding_cosine", cosine))
    if mse:
        terms.append(EncoderTerm("mse", "embedding_mse", mse))
    if similarity:
        terms.append(EncoderTerm("sim", "similarity_matrix", similarity))
    return terms


# -- teachers ---------------------------------------------------------------------------------------------------

class EncoderTeacher:
    """A frozen encoder run live (eval mode, inference mode), returning the features the terms need."""

    def __init__(self, model: nn.Module, keys: set[str]):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.keys = set(keys)

    def to(self, device) -> "EncoderTeacher":
        self.model.to(device)
        return self

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        inputs = encoder_inputs(batch, "teacher_x")
        if self.model.training:
            self.model.eval()
        with torch.inference_mode():
            _, feats = encoder_features(self.model, inputs, self.keys)
        # inference tensors cannot be saved for backward: clone into normal tensors
        return {k: v.clone() for k, v in feats.items()}


class CachedEmbeddings:
    """A teacher that is a table of precomputed sentence embeddings, looked up by the batch's ``index``."""

    def __init__(self, embeddings: torch.Tensor):
        if not torch.is_tensor(embeddings) or embeddings.ndim != 2:
            raise WiringError("cached teacher embeddings must be a (N, D) tensor", where="CachedEmbeddings",
                              fix="encode the training sentences with the teacher first")
        self.embeddings = embeddings

    def to(self, device) -> "CachedEmbeddings":
        self.embeddings = self.embeddings.to(device)
        return self

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        index = batch.get("index")
        if index is None:
            raise WiringError("the batch has no 'index' to look cached embeddings up", where="CachedEmbeddings",
                              fix="use an ArrayDataset (it adds 'index')")
        if int(index.max()) >= len(self.embeddings):
            raise WiringError(f"batch index {int(index.max())} is outside the {len(self.embeddings)} cached "
                              "embeddings", where="CachedEmbeddings", fix="cache embeddings of the same dataset")
        return {"embedding": self.embeddings[index.to(self.embeddings.device)]}


# -- the trainable side -----------------------------------------------------------------------------------------

class EncoderSide(nn.Module):
    """The student plus learned projections (``adapters``), evaluating the terms of one batch."""

    def __init__(self, student: nn.Module, resolved: list[_Resolved], student_keys: set[str],
                 relation_heads: dict[str, int]):
        super().__init__()
        self.student = student
        self.adapters = nn.ModuleDict()
        self.resolved = resolved
        self.student_keys = set(student_keys)
        self.relation_heads = dict(relation_heads)
        self.step = 0

    @property
    def terms(self) -> list[EncoderTerm]:
        return [r.term for r in self.resolved]

    def run_student(self, inputs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        """The student's output and features on `inputs` (keyword tensors, or a tensor of token ids)."""
        if torch.is_tensor(inputs):
            inputs = {"input_ids": inputs}
        return encoder_features(self.student, inputs, self.student_keys)

    def _project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.adapters[name](x) if name in self.adapters else x

    def term_value(self, r: _Resolved, feats: dict, teacher: Mapping[str, Any], labels: Mapping[str, Any],
                   second_view: Optional[torch.Tensor]) -> torch.Tensor:
        term, loss = r.term, r.term.loss
        params = dict(term.params)
        mask = feats["mask"]
        if loss in LAYER_LOSSES:
            kind, fn, _, _ = LAYER_LOSSES[loss]
            values = []
            for s_layer, t_layer in r.pairs:
                s = feats[feature_key(kind, s_layer)]
                t = teacher[feature_key(kind, t_layer)]
                if kind == "hidden":
                    s = self._project(term.name, s)
                if kind in _RELATIONS:
                    extra = {k: v for k, v in params.items() if k != "num_heads"}
                    values.append(fn(s, t, self.relation_heads[term.name], mask=mask, **extra))
                else:
                    values.append(fn(s, t, mask=mask, **params))
            return torch.stack(values).mean()
        if loss == "kd":
            s, t = feats["logits"], teacher["logits"]
            return kd(s, t, mask=mask if s.ndim == 3 else None, **params)
        if loss == "mlm":
            return ce(feats["logits"], labels["mlm"], **params)
        if loss == "ce":
            return ce(feats["logits"], labels["y"], **params)
        if loss in ("embedding_cosine", "embedding_mse"):
            s = self._project(term.name, feats["embedding"])
            return hint(s, teacher["embedding"], kind="cosine" if loss == "embedding_cosine" else "mse")
        if loss == "similarity_matrix":
            return similarity_matrix(feats["embedding"], teacher["embedding"])
        return simcse(feats["embedding"], second_view, **params)  # simcse

    def forward(self, inputs: Mapping[str, torch.Tensor], teacher_values: Mapping[str, Any],
                labels: Optional[Mapping[str, Any]] = None):
        output, feats = encoder_features(self.student, inputs, self.student_keys)
        second_view = None
        if any(r.term.loss == "simcse" for r in self.resolved):
            _, again = encoder_features(self.student, inputs, {"embedding"})
            second_view = again["embedding"]
        labels = labels or {}
        terms = {}
        for r in self.resolved:
            terms[r.term.name] = self.term_value(r, feats, teacher_values, labels, second_view) \
                * r.term.weight_at(self.step)
        return output, terms


@dataclass
class EncoderOutput:
    output: Any
    terms: dict[str, torch.Tensor]

    @property
    def loss(self) -> torch.Tensor:
        return sum(self.terms.values())


def _depth(model: Any) -> Optional[int]:
    """Transformer layers of a model, or the ``num_layers`` a cached teacher declares; None if unknown."""
    if isinstance(model, nn.Module):
        try:
            return encoder_layout(model).num_layers
        except WiringError:
            return None
    depth = getattr(model, "num_layers", None)
    return depth if isinstance(depth, int) and depth > 0 else None


class EncoderDistiller:
    """Student encoder + teacher + per-layer terms, for `kdistill.engine.Engine`. See the module docstring.

    Args:
        student: an HF encoder (any head) or a `SentenceEncoder`.
        teacher: an HF encoder / `SentenceEncoder` (run live, frozen), any callable ``batch -> {feature: tensor}``
            (e.g. `CachedEmbeddings`), or None when every term is teacher-free (``mlm``, ``ce``, ``simcse``).
        terms: the objective (see the presets ``*_terms``).
        mlm: masked-LM corruption applied to each batch before both models see it (for ``mlm`` terms).
    """

    def __init__(self, student: nn.Module, teacher: Any = None, terms: Optional[list[EncoderTerm]] = None, *,
                 mlm: Optional[MaskedLM] = None):
        if not terms:
            raise WiringError("the objective has no loss terms", where="EncoderDistiller",
                              fix="pass terms, e.g. embedding_terms() or tinybert_terms()")
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise WiringError(f"two terms share a name in {names}", where="EncoderDistiller",
                              fix="give each term a distinct name")
        unknown = [t.loss for t in terms if t.loss not in ENCODER_LOSSES]
        if unknown:
            raise WiringError(f"unknown encoder loss {unknown[0]!r}", where="EncoderDistiller",
                              fix=f"use one of {', '.join(ENCODER_LOSSES)}")
        needs_teacher = [t.name for t in terms if t.loss not in NO_TEACHER]
        if needs_teacher and teacher is None:
            raise WiringError(f"terms {needs_teacher} need a teacher but none is given", where="EncoderDistiller",
                              fix="pass a teacher, or use only teacher-free terms (mlm, ce, simcse)")
        if any(t.loss == "mlm" for t in terms) and mlm is None:
            raise WiringError("an 'mlm' term needs masked inputs", where="EncoderDistiller",
                              fix="pass mlm=MaskedLM.from_tokenizer(tokenizer)")
        teacher_model = teacher if isinstance(teacher, nn.Module) else None
        s_depth, t_depth = _depth(student), _depth(teacher)
        resolved, s_keys, t_keys, rel_heads = [], {"mask"}, {"mask"}, {}
        for term in terms:
            pairs: list[tuple[int, int]] = []
            if term.loss in LAYER_LOSSES:
                kind, _, min_layer, default = LAYER_LOSSES[term.loss]
                where = f"term '{term.name}'"
                if s_depth is None:
                    encoder_layout(student)  # raises the WiringError naming the unsupported architecture
                if t_depth is None:
                    raise WiringError(f"term '{term.name}' ({term.loss}) needs the teacher's layers, but the teacher "
                                      f"is {type(teacher).__name__}", where=where,
                                      fix="pass the teacher model itself, or a cached teacher that declares "
                                          "num_layers and holds those layers (CachedFeatures)")
                pairs = layer_map(term.layers if term.layers is not None else default, s_depth, t_depth,
                                  min_layer=min_layer, where=where)
                for s_layer, t_layer in pairs:
                    s_keys.add(feature_key(kind, s_layer))
                    t_keys.add(feature_key(kind, t_layer))
                if kind in _RELATIONS:
                    heads = term.params.get("num_heads")
                    if not heads and teacher_model is None:
                        raise WiringError(f"term '{term.name}' needs params.num_heads with a cached teacher",
                                          where=where, fix="set params: {num_heads: H}")
                    rel_heads[term.name] = int(heads or encoder_layout(teacher_model).num_heads)
            elif term.loss in ("kd", "mlm", "ce"):
                s_keys.add("logits")
                if term.loss == "kd":
                    t_keys.add("logits")
            else:
                s_keys.add("embedding")
                if term.loss != "simcse":
                    t_keys.add("embedding")
            resolved.append(_Resolved(term, pairs))
        self.teacher = EncoderTeacher(teacher_model, t_keys) if teacher_model is not None else teacher
        self.mlm = mlm
        self.side = EncoderSide(student, resolved, s_keys, rel_heads)
        self.module: nn.Module = self.side  # the Engine replaces this with the (DDP-)prepared side
        self.built = False

    @property
    def student(self) -> nn.Module:
        return self.side.student

    @property
    def terms(self) -> list[EncoderTerm]:
        return self.side.terms

    def layer_pairs(self) -> dict[str, list[tuple[int, int]]]:
        """The resolved ``(student_layer, teacher_layer)`` pairs of each layer term."""
        return {r.term.name: list(r.pairs) for r in self.side.resolved if r.pairs}

    def set_step(self, step: int) -> None:
        self.side.step = step

    def _prepare(self, batch: Mapping[str, Any]) -> tuple[dict, dict, dict]:
        """(student inputs, teacher batch, labels) of one batch: padding trimmed, masked-LM corruption applied."""
        inputs = encoder_inputs(batch, "student_x")
        labels = {"y": batch.get("y")}
        teacher_batch = dict(batch)
        if self.mlm is not None:
            if "teacher_x" in batch or "student_x" in batch:
                raise WiringError("masked-LM terms need one input shared by teacher and student",
                                  where="EncoderDistiller", fix="drop teacher_x / student_x from the batch")
            corrupted, labels["mlm"] = self.mlm(inputs["input_ids"], inputs["attention_mask"])
            inputs = {**inputs, "input_ids": corrupted}
            teacher_batch = {k: v for k, v in batch.items() if k not in ("attention_mask", "token_type_ids")}
            teacher_batch["x"] = inputs
        return inputs, teacher_batch, labels

    def teacher_values(self, teacher_batch: Mapping[str, Any]) -> dict[str, Any]:
        return self.teacher(teacher_batch) if self.teacher is not None else {}

    @torch.no_grad()
    def build(self, batch: Mapping[str, Any]) -> None:
        """Dry-run one batch: build the projections where widths differ and evaluate every term once, so wiring
        errors (depths, widths, heads, tokenization, labels) surface before training."""
        inputs, teacher_batch, labels = self._prepare(batch)
        tv = self.teacher_values(teacher_batch)
        side = self.side
        was_training = side.training
        side.eval()
        try:
            _, feats = encoder_features(side.student, inputs, side.student_keys)
            for r in side.resolved:
                loss = r.term.loss
                if loss not in NO_TEACHER:
                    missing = [k for k in self._teacher_keys(r) if k not in tv]
                    if missing:
                        raise WiringError(f"the teacher gave no {missing} for term '{r.term.name}'",
                                          where="EncoderDistiller.build",
                                          fix="a cached teacher gives 'embedding' only; use the live teacher")
                if r.pairs and "mask" in tv and tv["mask"].shape == feats["mask"].shape \
                        and not torch.equal(tv["mask"].to(feats["mask"].device), feats["mask"]):
                    raise WiringError(f"term '{r.term.name}': teacher and student see different tokens",
                                      where="EncoderDistiller.build",
                                      fix="token-level terms need the same tokenizer for both models")
                self._maybe_adapter(r, feats, tv)
            side(inputs, tv, labels)
        finally:
            side.train(was_training)
        self.built = True

    @staticmethod
    def _teacher_keys(r: _Resolved) -> list[str]:
        if r.pairs:
            return [feature_key(r.kind, t) for _, t in r.pairs]
        return ["logits"] if r.term.loss == "kd" else ["embedding"]

    def _maybe_adapter(self, r: _Resolved, feats: dict, tv: Mapping[str, Any]) -> None:
        if r.term.name in self.side.adapters:
            return
        if r.kind == "hidden":
            s_width = feats[feature_key("hidden", r.pairs[0][0])].shape[-1]
            t_width = tv[feature_key("hidden", r.pairs[0][1])].shape[-1]
        elif r.term.loss in ("embedding_cosine", "embedding_mse"):
            s_width, t_width = feats["embedding"].shape[-1], tv["embedding"].shape[-1]
        else:
            return
        if s_width != t_width:
            ref = next(self.side.student.parameters())
            self.side.adapters[r.term.name] = nn.Linear(s_width, t_width).to(device=ref.device, dtype=ref.dtype)

    def __call__(self, batch: Mapping[str, Any]) -> EncoderOutput:
        inputs, teacher_batch, labels = self._prepare(batch)
        tv = self.teacher_values(teacher_batch)
        output, terms = self.module(inputs, tv, labels)
        return EncoderOutput(output, terms)

    def export_student(self) -> nn.Module:
        """The plain student (HF model or `SentenceEncoder`): no hooks, no projections of the loss terms."""
        return self.side.student
