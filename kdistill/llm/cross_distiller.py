"""Cross-tokenizer distillation of a causal LM on text views (`kdistill.llm.cross_data`), on the one Engine.

    view = text_view_dataset(text_windows(texts, student_tok, 128), teacher_tok, student_tok, block_size=128)
    terms = [Term("ce", "ce", 1.0), Term("gold", "gold", 1.0, params={"matched_weight": 1.0})]
    distiller = CrossTokenizerDistiller(student, teacher, terms, vocab_map=build_vocab_map(teacher_tok, student_tok))
    Engine(train_cfg, run_dir).fit(distiller, view)

Terms (each a registry loss with ``cross_vocab=True``, or ``ce``), means over the aligned spans of the batch:

* ``uld``: span-aligned ULD, ``sorted_l1(q^s_last, q^t_last)`` between the two distributions that predict each
  span's last token (`kdistill.llm.cross_tokenizer.span_uld_loss`). The ULD paper pairs the i-th answer token of
  each model instead; on running text the two sequences drift apart, so the pairing here follows the alignment.
* ``gold``: the GOLD-style loss (`kdistill.llm.cross_tokenizer.gold_loss`): sorted L1 between the merged span
  sub-distributions ``m(v) = prod_{j<b} q_j(x_j) * q_b(v)``, plus, with ``params.matched_weight > 0``, the hybrid
  exact-match part: ``matched_divergence`` (``jsd`` with ``beta`` by default) between the two last-token
  distributions restricted to the tokens whose text is in both vocabularies (``vocab_map``) and renormalized.
* ``ce``: the student's next-token cross-entropy on its own tokens (labels ``y``).

The teacher's side of every span is computed once per batch from its logits (`span_teacher_values`): the
descending top-k log-probabilities of its last-token distribution and the log of the mass left over, the span's
prefix log-probability, and the top-k of its shared-token distribution. A live teacher (`CrossTeacher`) uses all
entries by default (exact); `precompute_teacher` stores top-k values per span once (the teacher-output cache of
a cross-tokenizer run) and `ColumnTeacher` reads them back: the mass beyond the top-k is spread evenly over the
other entries in the sorted L1 (`kdistill.losses.cross_vocab.sorted_l1_topk`) and is one tail bucket in the
matched divergence (`kdistill.losses.sparse`), both exact when k covers the vocabulary.

Same-vocabulary token losses (``kl``, ``jsd``, ... and `kdistill.llm.LMDistiller`) still need one vocabulary
(`kdistill.models.vocab.check_vocab`); this objective is for the ``cross_vocab`` losses, and it needs text views:
a batch without them (e.g. pre-tokenized blocks) is refused at `build` with one line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.errors import WiringError
from kdistill.llm.cross_data import TEXT_VIEW_KEYS
from kdistill.llm.cross_tokenizer_align import VocabMap
from kdistill.llm.data import lm_inputs
from kdistill.losses.cross_vocab import sorted_l1_topk
from kdistill.losses.lm import IGNORE_INDEX, divergence_term, row_divergence, shift_labels
from kdistill.losses.registry import get_loss
from kdistill.losses.sparse import SparseDistribution
from kdistill.objective import SideObjective, Term
from kdistill.teachers.live import FrozenTeacher

__all__ = ["ColumnTeacher", "CrossSide", "CrossTeacher", "CrossTokenizerDistiller", "bits_per_char",
           "precompute_teacher", "span_teacher_values"]

_WHERE = "kdistill.llm.CrossTokenizerDistiller"
PREFIX = "teacher_span_"  # dataset columns of precomputed teacher values


def _token_log_probs(z: Tensor, lse: Tensor, ids: Tensor) -> Tensor:
    """``(B, N - 1)``: entry ``j - 1`` is ``log q_j(x_j)`` (row ``j - 1`` predicts token ``j``)."""
    return z[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) - lse[:, :-1]


def _span_parts(z: Tensor, lse: Tensor, token_lp: Tensor, spans: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per aligned span ``[a, b)`` (``-1`` padding) of scaled logits ``z`` ``(B, N, V)`` with ``lse =
    logsumexp(z)`` and `_token_log_probs`: ``(valid (B, P), prefix (B, P) float64 = sum_{j=a}^{b-2} log q_j(x_j),
    last-row log q (n, V) of the n valid spans)``."""
    valid = spans[..., 0] >= 1
    a = torch.where(valid, spans[..., 0], torch.ones_like(spans[..., 0]))
    b = torch.where(valid, spans[..., 1], torch.full_like(spans[..., 1], 2))
    cum = torch.cat([token_lp.new_zeros((z.shape[0], 1), dtype=torch.float64), token_lp.double().cumsum(-1)], -1)
    prefix = cum.gather(1, b - 2) - cum.gather(1, a - 1)
    rows = (b - 2)[valid]
    batch_idx = torch.arange(z.shape[0], device=z.device)[:, None].expand_as(valid)[valid]
    return valid, prefix, z[batch_idx, rows] - lse[batch_idx, rows][:, None]


def span_teacher_values(logits: Tensor, ids: Tensor, spans: Tensor, *, k: Optional[int] = None,
                        temperature: float = 1.0, vocab_map: Optional[VocabMap] = None,
                        matched_k: Optional[int] = None) -> dict[str, Tensor]:
    """The teacher's side of each aligned span from its logits ``(B, L, V_t)`` on `ids` ``(B, L)``.

    Returns ``sorted_logp`` ``(B, P, k)`` (descending top-k of ``log softmax(z_last / T)``), ``log_tail`` ``(B, P)``
    (log of the rest), ``prefix`` ``(B, P)`` (``sum_{j=a}^{b-2} log q_j(x_j)``) and, with a `vocab_map`,
    ``matched_idx`` / ``matched_logp`` / ``matched_log_tail``: the top-k of the distribution restricted to the
    shared tokens (indices into the map), as a `SparseDistribution` holds them. ``k = None``: every entry.
    """
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    valid, prefix, last = _span_parts(z, lse, _token_log_probs(z, lse, ids), spans)
    v_t = z.shape[-1]
    sparse = SparseDistribution.from_logits(last, min(k or v_t, v_t), 1.0)  # log-probs already: T applied
    shape = (*valid.shape, sparse.k)
    out = {"sorted_logp": _scatter_rows(sparse.log_probs, valid, shape, 0.0),
           "log_tail": _scatter_rows(sparse.log_tail, valid, valid.shape, float("-inf")),
           "prefix": prefix.float(), "valid": valid}
    if vocab_map is not None and len(vocab_map):
        shared = last[:, vocab_map.teacher_ids.to(last.device)]
        m = SparseDistribution.from_logits(shared, min(matched_k or len(vocab_map), len(vocab_map)), 1.0)
        shape = (*valid.shape, m.k)
        out.update(matched_idx=_scatter_rows(m.indices.to(torch.int32), valid, shape, 0),
                   matched_logp=_scatter_rows(m.log_probs, valid, shape, 0.0),
                   matched_log_tail=_scatter_rows(m.log_tail, valid, valid.shape, float("-inf")))
    return out


def _scatter_rows(rows: Tensor, valid: Tensor, shape: tuple, fill: float) -> Tensor:
    """The valid spans' rows put back into the padded ``(B, P, ...)`` layout."""
    out = rows.new_full(shape, fill)
    out[valid] = rows
    return out


class CrossTeacher(FrozenTeacher):
    """A frozen causal LM run live on the batch's ``teacher_x``; returns `span_teacher_values`."""

    grad_free = torch.no_grad

    def __init__(self, model: nn.Module, *, k: Optional[int] = None, temperature: float = 1.0,
                 vocab_map: Optional[VocabMap] = None, matched_k: Optional[int] = None):
        super().__init__(model)
        self.k, self.temperature, self.vocab_map, self.matched_k = k, temperature, vocab_map, matched_k

    def outputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        inputs = lm_inputs(batch["teacher_x"], batch["teacher_attention_mask"])
        logits = self.model(**inputs).logits
        return span_teacher_values(logits, batch["teacher_x"], batch["span_teacher"], k=self.k,
                                   temperature=self.temperature, vocab_map=self.vocab_map, matched_k=self.matched_k)


@torch.no_grad()
def precompute_teacher(model: nn.Module, dataset: Any, *, k: int, temperature: float = 1.0,
                       vocab_map: Optional[VocabMap] = None, matched_k: Optional[int] = None, batch_size: int = 8,
                       dtype: torch.dtype = torch.float16,
                       log: Optional[Callable[[str], None]] = None) -> dict[str, Tensor]:
    """The teacher's span values (`span_teacher_values`, top-`k`) for every row of a text-view dataset, as
    ``{"teacher_span_<name>": (N, ...)}`` columns (log-probabilities in `dtype`) to add to the dataset."""
    teacher = CrossTeacher(model, k=k, temperature=temperature, vocab_map=vocab_map, matched_k=matched_k)
    parts: dict[str, list[Tensor]] = {}
    n = len(dataset)
    for start in range(0, n, batch_size):
        values = teacher(dataset.batch(torch.arange(start, min(start + batch_size, n))))
        for name, value in values.items():
            if name != "valid":
                parts.setdefault(name, []).append(value.to(dtype) if value.is_floating_point() else value)
        if log is not None:
            log(f"[cross-tokenizer] teacher values {min(start + batch_size, n)}/{n}")
    return {PREFIX + name: torch.cat(chunks) for name, chunks in parts.items()}


class ColumnTeacher:
    """Precomputed teacher values (`precompute_teacher` columns of the dataset) read back from each batch."""

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        out = {key[len(PREFIX):]: value for key, value in batch.items() if key.startswith(PREFIX)}
        if "sorted_logp" not in out:
            raise WiringError("the batch has no precomputed teacher values", where=f"{_WHERE}(teacher)",
                              fix="add precompute_teacher(...) columns to the text-view dataset")
        out["valid"] = batch["span_teacher"][..., 0] >= 1
        return out


class CrossSide(nn.Module):
    """The trainable part: the student; computes the weighted cross-tokenizer terms of one batch."""

    def __init__(self, student: nn.Module, terms: list[Term], *, teacher_vocab: int, temperature: float,
                 vocab_map: Optional[VocabMap]):
        super().__init__()
        self.student, self.terms = student, terms
        self.teacher_vocab, self.temperature, self.vocab_map = int(teacher_vocab), float(temperature), vocab_map
        self.step = 0

    def forward(self, batch: Mapping[str, Tensor], teacher_values: Mapping[str, Tensor], labels: Tensor):
        logits = self.student(**lm_inputs(batch)).logits
        z = logits.float() / self.temperature if self.temperature != 1 else logits.float()
        terms: dict[str, Tensor] = {}
        lse = torch.logsumexp(z, dim=-1)
        token_lp = _token_log_probs(z, lse, batch["x"])
        if any(t.loss != "ce" for t in self.terms):
            valid, prefix, last = _span_parts(z, lse, token_lp, batch["span_student"])
            keep = teacher_values["valid"].to(valid.device)
            last, valid = last[keep[valid]], valid & keep
        for term in self.terms:
            if term.loss == "ce":
                shifted = shift_labels(labels)
                if self.temperature == 1:  # the next-token NLL: minus the token log-probs already taken
                    mask = shifted[:, :-1] != IGNORE_INDEX
                    value = -(token_lp * mask).sum() / mask.sum().clamp_min(1)
                else:
                    value = F.cross_entropy(logits.float().reshape(-1, z.shape[-1]), shifted.reshape(-1),
                                            ignore_index=IGNORE_INDEX)
            elif not int(valid.sum()):
                value = z.reshape(-1)[:0].sum()
            else:
                value = self._cross(term, valid, prefix, last, teacher_values, z, batch)
            terms[term.name] = value * term.weight_at(self.step)
        return {"logits": logits}, terms

    def _cross(self, term: Term, valid: Tensor, prefix: Tensor, last: Tensor, tv: Mapping[str, Tensor], z: Tensor,
               batch: Mapping[str, Tensor]) -> Tensor:
        top, tail = tv["sorted_logp"][valid].float(), tv["log_tail"][valid].float()
        s_last = last
        if term.loss == "gold":  # merged span sub-distributions: the prefix probability times the last row
            t_prefix = tv["prefix"][valid].float()
            s_last = s_last + prefix[valid].to(s_last.dtype)[:, None]
            top, tail = top + t_prefix[:, None], tail + t_prefix
        value = sorted_l1_topk(s_last.exp(), top.exp(), tail.exp(), self.teacher_vocab).mean()
        weight = float(term.params.get("matched_weight", 0.0))
        if term.loss == "gold" and weight > 0:
            value = value + weight * self._matched(term, valid, z, batch, tv, int(valid.sum()))
        return value

    def _matched(self, term: Term, valid: Tensor, z: Tensor, batch: Mapping[str, Tensor], tv: Mapping[str, Tensor],
                 n: int) -> Tensor:
        if self.vocab_map is None or "matched_idx" not in tv:
            raise WiringError("the gold term's matched part needs the shared-vocabulary map and the teacher's "
                              "matched values", where=f"{_WHERE}({term.name})",
                              fix="pass vocab_map=build_vocab_map(teacher_tokenizer, student_tokenizer), or set "
                                  "matched_weight: 0")
        spans = batch["span_student"]
        rows = (spans[..., 1] - 2).clamp_min(0)[valid]
        b_idx = torch.arange(spans.shape[0], device=spans.device)[:, None].expand_as(spans[..., 0])[valid]
        shared = z[b_idx, rows][:, self.vocab_map.student_ids.to(z.device)]
        teacher = SparseDistribution(tv["matched_idx"][valid].long(), tv["matched_logp"][valid].float(),
                                     tv["matched_log_tail"][valid].float(), len(self.vocab_map), self.temperature)
        loss, params = divergence_term(term.params.get("matched_divergence", "jsd"),
                                       beta=float(term.params.get("beta", 0.5)), temperature=self.temperature)
        return row_divergence(loss, params)(shared, teacher) / n


class CrossTokenizerDistiller(SideObjective):
    """Student + teacher with different tokenizers -> ``{term: weighted loss}`` per text-view batch.

    Args:
        student: a Hugging Face causal LM of the student tokenizer (trained).
        teacher: the teacher causal LM (run live, `CrossTeacher`), `ColumnTeacher()` for precomputed values, or
            None (only ``ce`` terms).
        terms: `Term`s of loss ``ce``, ``uld`` or ``gold`` (``params``: ``matched_weight``,
            ``matched_divergence``, ``beta``); other losses are refused (same-vocabulary losses: `LMDistiller`).
        teacher_vocab: the teacher's vocabulary size (default: its ``config.vocab_size``).
        vocab_map: `build_vocab_map(teacher_tokenizer, student_tokenizer)` (the gold term's matched part).
        temperature: softmax temperature of both models; teacher_k: top-k of a live teacher (None: all entries).
    """

    def __init__(self, student: nn.Module, teacher: Any, terms: list[Term], *, teacher_vocab: Optional[int] = None,
                 vocab_map: Optional[VocabMap] = None, temperature: float = 1.0, teacher_k: Optional[int] = None):
        for term in terms:
            spec = get_loss(term.loss, where=f"{_WHERE}(terms.{term.name})")
            if term.loss != "ce" and not spec.cross_vocab:
                raise WiringError(f"term '{term.name}' uses '{term.loss}', which compares one shared vocabulary",
                                  where=f"{_WHERE}(terms.{term.name})",
                                  fix="use uld or gold across tokenizers (same-vocabulary losses need one tokenizer)")
        if not terms or (teacher is None and any(t.loss != "ce" for t in terms)):
            raise WiringError("no terms, or cross-tokenizer terms without a teacher", where=f"{_WHERE}(terms)",
                              fix="give a teacher and uld / gold terms, or ce alone")
        if not math.isfinite(float(temperature)) or temperature <= 0:
            raise WiringError(f"temperature must be > 0, got {temperature!r}", where=f"{_WHERE}(temperature)",
                              fix="e.g. temperature=1.0")
        if isinstance(teacher, nn.Module):
            teacher_vocab = teacher_vocab or int(teacher.config.vocab_size)
            teacher = CrossTeacher(teacher, k=teacher_k, temperature=temperature, vocab_map=vocab_map)
        side = CrossSide(student, list(terms), teacher_vocab=int(teacher_vocab or 0), temperature=temperature,
                         vocab_map=vocab_map)
        super().__init__(side, teacher)

    @property
    def terms(self) -> list[Term]:
        return self.side.terms

    def side_args(self, batch: Mapping[str, Any]) -> tuple:
        return batch, self.teacher_values(batch), batch["y"]

    @torch.no_grad()
    def build(self, batch: Mapping[str, Any]) -> None:
        """Check the text view and the vocabularies on one batch, then evaluate every term once."""
        cross = [t.name for t in self.terms if t.loss != "ce"]
        missing = [k for k in TEXT_VIEW_KEYS if k not in batch]
        if cross and missing:
            raise WiringError(f"the cross-tokenizer terms {cross} need a text view of the data (both tokenizations "
                              f"of the same text), the batch has no {', '.join(missing)}", where=f"{_WHERE}(data)",
                              fix="build the data with kdistill.llm.text_view_dataset (pre-tokenized blocks carry "
                                  "no text); or train with ce / same-tokenizer losses")
        rows = int(self.student.get_output_embeddings().weight.shape[0])
        for name, key in (("student input ids", "x"), ("labels", "y")):
            ids = batch[key][batch[key] != IGNORE_INDEX]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
                raise WiringError(f"{name} outside the student vocabulary 0..{rows - 1} (max {int(ids.max())})",
                                  where=_WHERE, fix="tokenize the student side with the student's tokenizer")
        if cross and self.side.teacher_vocab < 1:
            raise WiringError("the teacher's vocabulary size is unknown", where=f"{_WHERE}(teacher_vocab)",
                              fix="pass teacher_vocab= with precomputed teacher values")
        was = self.side.training
        self.side.eval()
        try:
            self.side(*self.side_args(batch))
        finally:
            self.side.train(was)
        self.built = True


@torch.no_grad()
def bits_per_char(model: nn.Module, dataset: Any, *, side: str = "student", batch_size: int = 8) -> float:
    """Held-out bits per character: the model's next-token NLL (bits) summed over every token that carries text,
    divided by the number of characters of the texts. ``side="teacher"`` scores ``teacher_x`` (its first token,
    the context token, is not scored)."""
    was = model.training
    model.eval()
    total, device = 0.0, next(model.parameters()).device
    try:
        for start in range(0, len(dataset), batch_size):
            batch = dataset.batch(torch.arange(start, min(start + batch_size, len(dataset))))
            if side == "teacher":
                ids, mask = batch["teacher_x"], batch["teacher_attention_mask"]
                off = batch["teacher_offsets"]
                labels = torch.where(off[..., 1] > off[..., 0], ids, torch.full_like(ids, IGNORE_INDEX))
            else:
                ids, mask, labels = batch["x"], batch["attention_mask"], batch["y"]
            z = model(**lm_inputs(ids.to(device), mask.to(device))).logits.float()
            shifted = shift_labels(labels).to(device)
            total += float(F.cross_entropy(z.reshape(-1, z.shape[-1]), shifted.reshape(-1),
                                           ignore_index=IGNORE_INDEX, reduction="sum"))
    finally:
        model.train(was)
    return total / math.log(2) / int(dataset.tensors["chars"].sum())
