"""Encoder distillation on the one Engine: per-layer terms between an HF encoder teacher and student.

    terms = tinybert_terms()                              # or distilbert_terms(), minilm_terms(), embedding_terms()
    distiller = EncoderDistiller(student, teacher, terms)
    Engine(train_cfg).fit(distiller, data)                # data: ArrayDataset(x=input_ids, attention_mask=...)

`EncoderDistiller` implements the objective contract of `kdistill.objective` (a `SideObjective`): ``.side`` (the
trainable `EncoderSide`: student, learned projections; ``forward(inputs, teacher_values, labels) -> (output,
{term: weighted loss})``), ``.teacher`` (a callable ``batch -> {feature: tensor}``: the live `EncoderTeacher`
or a `kdistill.teachers.CachedTeacher`), ``.build(batch)``, ``set_step``, ``export_student()`` and
``__call__(batch) -> DistillOutput``. Batches hold ``x`` (token ids, with ``attention_mask`` beside them, or a dict
of tensors passed as keyword arguments), optional ``y`` (labels) and ``index``; padding is trimmed per batch.

Terms are `kdistill.objective.Term`s of registered losses; the registry's metadata says what each reads
(`kdistill.encoders.terms`). A layer term pairs layers by a layer map (`kdistill.encoders.layer_map`; default
the loss's ``default_layers``) and averages its loss over the pairs:

| loss | compares | layers default |
|---|---|---|
| ``hidden_mse`` / ``hidden_cosine`` | hidden states (learned projection when widths differ) | ``uniform`` |
| ``embedding_layer`` | embedding-layer outputs, MSE (TinyBERT) | ``[[0, 0]]`` |
| ``attention_kl`` / ``attention_mse`` | attention probabilities per head | ``last-1`` / ``uniform`` |
| ``value_relation`` / ``query_relation`` / ``key_relation`` | self-relations (MiniLM, MiniLMv2) | ``last-1`` |
| ``kd`` (and other per-position response losses) | logits (masked-LM logits on real tokens) | -- |
| ``mlm`` / ``ce`` | masked-LM labels / class labels (no teacher) | -- |
| ``embedding_cosine`` / ``embedding_mse`` / ``similarity_matrix`` | sentence embeddings | -- |
| ``simcse`` | two dropout views of the student's embeddings (no teacher) | -- |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from kdistill.encoders.features import encoder_features, encoder_inputs, feature_key
from kdistill.encoders.layers import layer_map
from kdistill.encoders.models import encoder_layout
from kdistill.encoders.objectives import MaskedLM
from kdistill.encoders.terms import (RELATION_FEATURES, distilbert_terms, embedding_terms, encoder_spec,
                                     minilm_terms, tinybert_terms)
from kdistill.errors import WiringError
from kdistill.losses import LossSpec, call_term
from kdistill.objective import SchemeSide, SideObjective, Term
from kdistill.teachers.fingerprint import weights_fingerprint
from kdistill.teachers.live import FrozenTeacher

__all__ = [
    "EncoderDistiller",
    "EncoderSide",
    "EncoderTeacher",
    "distilbert_terms",
    "embedding_terms",
    "minilm_terms",
    "tinybert_terms",
]


@dataclass
class _Resolved:
    term: Term
    spec: LossSpec
    route: str  # see kdistill.encoders.terms
    pairs: list[tuple[int, int]]  # empty for output terms

    @property
    def feature(self) -> Optional[str]:
        return self.spec.feature if self.route == "layer" else None


class EncoderTeacher(FrozenTeacher):
    """A frozen encoder run live (eval mode, inference mode), returning the features the terms need."""

    def __init__(self, model: nn.Module, keys: set[str]):
        super().__init__(model)
        self.keys = set(keys)

    def outputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return encoder_features(self.model, encoder_inputs(batch, "teacher_x"), self.keys)[1]

    def fingerprint(self) -> dict:
        """What its outputs depend on (for the teacher-output cache): weights, pooling, normalization, features."""
        return {"weights": weights_fingerprint(self.model), "pooling": str(getattr(self.model, "pooling", None)),
                "normalize": str(getattr(self.model, "normalize", None)), "features": sorted(self.keys)}


# -- the trainable side -----------------------------------------------------------------------------------------

class EncoderSide(SchemeSide):
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
    def terms(self) -> list[Term]:
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
        term, spec, params = r.term, r.spec, dict(r.term.params)
        if r.route == "layer":
            heads = ()
            if r.feature in RELATION_FEATURES:
                params.pop("num_heads", None)
                heads = (self.relation_heads[term.name],)
            values = [spec.fn(self._project(term.name, feats[feature_key(r.feature, s_layer)]),
                              teacher[feature_key(r.feature, t_layer)], *heads, mask=feats["mask"], **params)
                      for s_layer, t_layer in r.pairs]
            return torch.stack(values).mean()
        if r.route == "logits":
            if feats["logits"].ndim == 3:
                params["mask"] = feats["mask"]  # token-level logits: real tokens only
            return call_term(spec, feats["logits"], teacher["logits"], None, params)
        if r.route == "labels":
            return call_term(spec, feats["logits"], None, labels["mlm" if term.loss == "mlm" else "y"], params)
        if r.route == "embedding":
            return call_term(spec, self._project(term.name, feats["embedding"]), teacher["embedding"], None, params)
        return call_term(spec, feats["embedding"], second_view, None, params)  # views: two dropout passes

    def forward(self, inputs: Mapping[str, torch.Tensor], teacher_values: Mapping[str, Any],
                labels: Optional[Mapping[str, Any]] = None):
        output, feats = encoder_features(self.student, inputs, self.student_keys)
        second_view = None
        if any(r.route == "views" for r in self.resolved):
            _, again = encoder_features(self.student, inputs, {"embedding"})
            second_view = again["embedding"]
        labels = labels or {}
        terms = {}
        for r in self.resolved:
            terms[r.term.name] = self.term_value(r, feats, teacher_values, labels, second_view) \
                * r.term.weight_at(self.step)
        return output, terms


def _depth(model: Any) -> Optional[int]:
    """Transformer layers of a model, or the ``num_layers`` a cached teacher declares; None if unknown."""
    if isinstance(model, nn.Module):
        try:
            return encoder_layout(model).num_layers
        except WiringError:
            return None
    depth = getattr(model, "num_layers", None)
    return depth if isinstance(depth, int) and depth > 0 else None


# route -> (student feature keys, teacher feature keys) of output terms
_OUTPUT_KEYS = {"logits": ({"logits"}, {"logits"}), "labels": ({"logits"}, set()),
                "embedding": ({"embedding"}, {"embedding"}), "views": ({"embedding"}, set())}


class EncoderDistiller(SideObjective):
    """Student encoder + teacher + per-layer terms, for `kdistill.engine.Engine`. See the module docstring.

    Args:
        student: an HF encoder (any head) or a `SentenceEncoder`.
        teacher: an HF encoder / `SentenceEncoder` (run live, frozen), any callable ``batch -> {feature: tensor}``
            (e.g. a `kdistill.teachers.CachedTeacher` of sentence embeddings), or None when every term is
            teacher-free (``mlm``, ``ce``, ``simcse``).
        terms: the objective (`kdistill.objective.Term`s; see the presets ``*_terms``).
        mlm: masked-LM corruption applied to each batch before both models see it (for ``mlm`` terms).
    """

    def __init__(self, student: nn.Module, teacher: Any = None, terms: Optional[list[Term]] = None, *,
                 mlm: Optional[MaskedLM] = None):
        if not terms:
            raise WiringError("the objective has no loss terms", where="EncoderDistiller",
                              fix="pass terms, e.g. embedding_terms() or tinybert_terms()")
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise WiringError(f"two terms share a name in {names}", where="EncoderDistiller",
                              fix="give each term a distinct name")
        specs = [encoder_spec(t) for t in terms]
        needs_teacher = [t.name for t, (spec, _) in zip(terms, specs) if spec.needs_teacher]
        if needs_teacher and teacher is None:
            raise WiringError(f"terms {needs_teacher} need a teacher but none is given", where="EncoderDistiller",
                              fix="pass a teacher, or use only teacher-free terms (mlm, ce, simcse)")
        if any(t.loss == "mlm" for t in terms) and mlm is None:
            raise WiringError("an 'mlm' term needs masked inputs", where="EncoderDistiller",
                              fix="pass mlm=MaskedLM.from_tokenizer(tokenizer)")
        teacher_model = teacher if isinstance(teacher, nn.Module) else None
        s_depth, t_depth = _depth(student), _depth(teacher)
        resolved, s_keys, t_keys, rel_heads = [], {"mask"}, {"mask"}, {}
        for term, (spec, route) in zip(terms, specs):
            pairs: list[tuple[int, int]] = []
            if route == "layer":
                where = f"term '{term.name}'"
                if s_depth is None:
                    encoder_layout(student)  # raises the WiringError naming the unsupported architecture
                if t_depth is None:
                    raise WiringError(f"term '{term.name}' ({term.loss}) needs the teacher's layers, but the teacher "
                                      f"is {type(teacher).__name__}", where=where,
                                      fix="pass the teacher model itself, or a cached teacher that declares "
                                          "num_layers and holds those layers")
                pairs = layer_map(term.layers if term.layers is not None else spec.default_layers, s_depth, t_depth,
                                  min_layer=spec.min_layer, where=where)
                s_keys.update(feature_key(spec.feature, s) for s, _ in pairs)
                t_keys.update(feature_key(spec.feature, t) for _, t in pairs)
                if spec.feature in RELATION_FEATURES:
                    heads = term.params.get("num_heads")
                    if not heads and teacher_model is None:
                        raise WiringError(f"term '{term.name}' needs params.num_heads with a cached teacher",
                                          where=where, fix="set params: {num_heads: H}")
                    rel_heads[term.name] = int(heads or encoder_layout(teacher_model).num_heads)
            else:
                s_keys |= _OUTPUT_KEYS[route][0]
                t_keys |= _OUTPUT_KEYS[route][1]
            resolved.append(_Resolved(term, spec, route, pairs))
        super().__init__(EncoderSide(student, resolved, s_keys, rel_heads),
                         EncoderTeacher(teacher_model, t_keys) if teacher_model is not None else teacher)
        self.mlm = mlm

    @property
    def terms(self) -> list[Term]:
        return self.side.terms

    def layer_pairs(self) -> dict[str, list[tuple[int, int]]]:
        """The resolved ``(student_layer, teacher_layer)`` pairs of each layer term."""
        return {r.term.name: list(r.pairs) for r in self.side.resolved if r.pairs}

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

    def side_args(self, batch: Mapping[str, Any]) -> tuple:
        inputs, teacher_batch, labels = self._prepare(batch)
        return inputs, self.teacher_values(teacher_batch), labels

    @torch.no_grad()
    def build(self, batch: Mapping[str, Any]) -> None:
        """Dry-run one batch: build the projections where widths differ and evaluate every term once, so wiring
        errors (depths, widths, heads, tokenization, labels) surface before training."""
        inputs, tv, labels = self.side_args(batch)
        side = self.side
        was_training = side.training
        side.eval()
        try:
            _, feats = encoder_features(side.student, inputs, side.student_keys)
            for r in side.resolved:
                if r.spec.needs_teacher:
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
            return [feature_key(r.feature, t) for _, t in r.pairs]
        return sorted(_OUTPUT_KEYS[r.route][1])

    def _maybe_adapter(self, r: _Resolved, feats: dict, tv: Mapping[str, Any]) -> None:
        """A learned projection of the student's feature to the teacher's width, for losses comparing element by
        element (``same_shape``) when the widths differ."""
        if r.term.name in self.side.adapters or not r.spec.same_shape:
            return
        if r.pairs:
            s_width = feats[feature_key(r.feature, r.pairs[0][0])].shape[-1]
            t_width = tv[feature_key(r.feature, r.pairs[0][1])].shape[-1]
        elif r.route == "embedding":
            s_width, t_width = feats["embedding"].shape[-1], tv["embedding"].shape[-1]
        else:
            return
        if s_width != t_width:
            ref = next(self.side.student.parameters())
            self.side.adapters[r.term.name] = nn.Linear(s_width, t_width).to(device=ref.device, dtype=ref.dtype)
