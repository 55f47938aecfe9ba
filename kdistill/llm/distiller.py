"""Token-level distillation of causal LMs on the one Engine.

    teacher, tokenizer = load_smollm2()
    student = student_from_teacher(teacher, every=3)
    distiller = LMDistiller(student, teacher, tokenizer=tokenizer, divergence="forward_kl", kd_weight=1.0)
    Engine(train_cfg, run_dir).fit(distiller, block_dataset(lm_blocks(texts, tokenizer, 128)))

The objective per batch is ``kd_weight * D + ce_weight * CE``, both means over the *target* tokens:

* ``D`` (the term ``kd``): a divergence between the teacher's and the student's next-token distributions
  (``forward_kl``, ``reverse_kl``, ``jsd`` with ``beta``, ``skew_kl`` / ``skew_reverse_kl`` with ``alpha``,
  ``tvd``; softmax temperature ``temperature``, no ``T^2`` factor): a registry response loss with its params
  (`kdistill.losses.lm.divergence_term`, e.g. ``reverse_kl`` is ``Term("kd", "kl", params={"reverse": True})``);
* ``CE`` (the term ``ce``): next-token cross-entropy on the labels.

Labels ``y`` are aligned with the input ids (the Hugging Face convention) and ``-100`` marks prompt and padding
tokens; the hidden state at position ``t`` predicts token ``t + 1``, so position ``t`` counts when
``y[t + 1] != -100`` (`kdistill.losses.lm.shift_labels`). Nothing builds a ``(tokens, vocabulary)`` logits
tensor: the student runs its decoder to the final hidden states, and every loss works from hidden states and the
output head chunk by chunk.

The teacher is one of:

* a live Hugging Face causal LM (`LMTeacher`): its final hidden states and head feed `token_kd_loss`;
* a `kdistill.teachers.CachedTeacher` built once over the training blocks (`build_lm_cache`): top-k
  log-probabilities plus the tail mass (`sparse_token_kd_loss`), or dense logits (`dense_token_kd_loss`);
* None: only the CE term (plain fine-tuning, e.g. on teacher-generated text: sequence-level KD).

On-policy distillation (GKD) is ``on_policy=OnPolicy(lambda_, max_new_tokens, ...)``: on those batches the
student samples continuations, the live teacher scores them, and only the divergence on the sampled tokens is
trained (the CE term is 0 there).

Vocabulary safety: a live teacher is checked against the student (`check_vocab`, with the tokenizer when given,
so padded heads are allowed and compared on the shared rows) when the distiller is made; a cached teacher's
vocabulary size when it is built (before training). A mismatch raises `WiringError`.

`LMDistiller` implements the objective contract (`kdistill.objective`, a `SideObjective`): ``.side`` (`LMSide`,
the trainable module: ``forward(inputs, teacher_values, labels) -> (output, {term: weighted loss})``),
``.teacher`` (callable ``batch -> dict``), ``.build(batch)``, ``set_step``, ``export_student()`` and
``__call__(batch) -> DistillOutput``; its terms are `Term`s (``.terms``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.errors import WiringError
from kdistill.llm.data import lm_inputs, token_id
from kdistill.llm.heads import final_hidden_states, head_parts
from kdistill.llm.onpolicy import OnPolicy, sample_continuations
from kdistill.losses.lm import (DEFAULT_CHUNK_SIZE, dense_token_kd_loss, divergence_term, head_logits,
                                next_token_ce, shift_labels, sparse_token_kd_loss, token_kd_loss)
from kdistill.losses.sparse import SparseDistribution
from kdistill.models.vocab import check_vocab
from kdistill.objective import DistillOutput, SideObjective, Term
from kdistill.teachers.live import FrozenTeacher

__all__ = ["LMDistiller", "LMSide", "LMTeacher"]

_WHERE = "kdistill.llm.LMDistiller"
ON_POLICY = "on_policy"  # teacher-values flag: the batch's tokens were sampled by the student


class LMTeacher(FrozenTeacher):
    """A frozen causal LM run live (eval mode, no gradients).

    ``output="hidden"`` returns ``{"hidden": (B, T, H), "head": W (V, H), "head_bias", "softcap", "scale"}``
    for `token_kd_loss`; ``output="logits"`` returns ``{"logits": (B, T, V)}`` (what a teacher-output cache
    stores). `vocab_rows` keeps only the first rows of a padded head.
    """

    grad_free = torch.no_grad  # its head weights are handed to the loss as they are (no inference tensors)

    def __init__(self, model: nn.Module, *, output: str = "hidden", vocab_rows: Optional[int] = None):
        if output not in ("hidden", "logits"):
            raise WiringError(f"unknown teacher output {output!r}", where="kdistill.llm.LMTeacher",
                              fix="use 'hidden' (live KD) or 'logits' (cache building)")
        super().__init__(model)
        self.output = output
        self.vocab_rows = vocab_rows

    def outputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        inputs = lm_inputs(batch.get("teacher_x", batch["x"]) if "teacher_x" in batch else batch)
        hidden = final_hidden_states(self.model, inputs)
        head = head_parts(self.model, self.vocab_rows)
        if self.output == "logits":
            return {"logits": head_logits(F.linear(hidden, head["weight"], head["bias"]), head["scale"],
                                          head["softcap"])}
        return {"hidden": hidden, "head": head["weight"], "head_bias": head["bias"], "softcap": head["softcap"],
                "scale": head["scale"]}


class LMSide(nn.Module):
    """The trainable part: the student (and nothing else); computes the weighted terms from hidden states.

    `terms` are the objective's `Term`s: ``ce`` (next-token CE on the labels) and a response loss of the registry
    with its params (the divergence against the teacher)."""

    def __init__(self, student: nn.Module, terms: list[Term], *, chunk_size: int):
        super().__init__()
        self.student = student
        self.terms = terms
        self.chunk_size = chunk_size
        self.vocab_rows: Optional[int] = None
        self.step = 0

    def run_student(self, inputs: Mapping[str, Any]) -> tuple[Tensor, dict]:
        return final_hidden_states(self.student, inputs), {}

    def _kd(self, term: Term, hidden: Tensor, head: dict, teacher_values: Mapping[str, Any],
            shifted: Tensor) -> Tensor:
        opts = dict(loss=term.loss, params=term.params, chunk_size=self.chunk_size)
        if "hidden" in teacher_values:  # a live teacher
            return token_kd_loss(hidden, (head["weight"], head["bias"]), teacher_values["hidden"],
                                 (teacher_values["head"], teacher_values.get("head_bias")), shifted,
                                 student_softcap=head["softcap"], student_logit_scale=head["scale"],
                                 teacher_softcap=teacher_values.get("softcap"),
                                 teacher_logit_scale=teacher_values.get("scale", 1.0), **opts)
        target = teacher_values.get("logits")
        common = dict(logit_scale=head["scale"], softcap=head["softcap"], **opts)
        if isinstance(target, SparseDistribution):  # a top-k cache
            return sparse_token_kd_loss(hidden, head["weight"], head["bias"], target, shifted, **common)
        if torch.is_tensor(target):  # a dense cache
            return dense_token_kd_loss(hidden, head["weight"], head["bias"], target, shifted, **common)
        raise WiringError(f"the teacher gave neither 'hidden' nor 'logits' (got {sorted(teacher_values)})",
                          where=_WHERE, fix="use LMTeacher(model) or a CachedTeacher built by build_lm_cache")

    def forward(self, inputs: Mapping[str, Any], teacher_values: Mapping[str, Any], labels: Tensor):
        hidden = final_hidden_states(self.student, inputs)
        shifted = shift_labels(labels)
        head = head_parts(self.student, self.vocab_rows)
        terms: dict[str, Tensor] = {}
        for term in self.terms:
            if term.loss != "ce":
                value = self._kd(term, hidden, head, teacher_values, shifted)
            elif teacher_values.get(ON_POLICY):  # the student's own samples are no labels to imitate
                terms[term.name] = hidden.new_zeros((), dtype=torch.float32)
                continue
            else:
                value = next_token_ce(hidden, head["weight"], head["bias"], shifted, chunk_size=self.chunk_size,
                                      logit_scale=head["scale"], softcap=head["softcap"])
            terms[term.name] = value * term.weight_at(self.step)
        return {"hidden": hidden}, terms


class LMDistiller(SideObjective):
    """Student + (live, cached or no) teacher -> ``{"kd": ..., "ce": ...}`` per batch. See the module docstring.

    Args:
        student: a Hugging Face causal LM (trained).
        teacher: a causal LM (wrapped in `LMTeacher`), any callable ``batch -> {"hidden", "head", ...}`` or
            ``{"logits": SparseDistribution | Tensor}`` (a `CachedTeacher`), or None (CE only).
        kd_weight, ce_weight: weights of the divergence and of the next-token CE (a term of weight 0 is not
            computed).
        divergence, temperature, beta, alpha: the divergence (see `kdistill.llm.token_kd_loss`).
        chunk_size: tokens per chunk of the head computations.
        tokenizer: the shared tokenizer: lets `check_vocab` tell padded head rows from real tokens.
        on_policy: GKD settings (`OnPolicy`); needs a live teacher.
    """

    def __init__(self, student: nn.Module, teacher: Any = None, *, kd_weight: float = 1.0, ce_weight: float = 0.0,
                 divergence: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, tokenizer: Any = None, on_policy: Optional[OnPolicy] = None):
        loss, params = divergence_term(divergence, beta=beta, alpha=alpha, temperature=float(temperature))
        if kd_weight < 0 or ce_weight < 0 or (kd_weight == 0 and ce_weight == 0):
            raise WiringError(f"weights kd={kd_weight}, ce={ce_weight}: need non-negative weights, one of them > 0",
                              where=_WHERE, fix="e.g. kd_weight=1.0, ce_weight=0.0")
        if teacher is None and ce_weight == 0:
            raise WiringError("no teacher and ce_weight=0: nothing to train on", where=_WHERE,
                              fix="give a teacher, or set ce_weight > 0 (fine-tuning on the labels)")
        if isinstance(teacher, nn.Module):
            teacher = LMTeacher(teacher)
        if on_policy is not None and not isinstance(teacher, LMTeacher):
            raise WiringError("on-policy distillation needs a live teacher to score the student's samples",
                              where=f"{_WHERE}(on_policy)",
                              fix="pass the teacher model (a cache holds outputs for fixed tokens only)")
        terms = [Term("kd", loss, float(kd_weight), params=params)] if teacher is not None and kd_weight > 0 else []
        terms += [Term("ce", "ce", float(ce_weight))] if ce_weight > 0 else []
        super().__init__(LMSide(student, terms, chunk_size=chunk_size), teacher)
        self.tokenizer = tokenizer
        self.on_policy = on_policy
        self.step = 0
        self.last_on_policy = False
        self._check_live_vocab()

    # -- wiring ------------------------------------------------------------------------------------------------
    def _check_live_vocab(self) -> None:
        """`check_vocab` between the student and a live teacher; heads padded beyond the shared size are sliced."""
        if not isinstance(self.teacher, LMTeacher):
            return
        shared = check_vocab(self.student, self.teacher.model, tokenizer=self.tokenizer)
        self._use_rows(shared)
        self.teacher.vocab_rows = shared if shared < head_parts(self.teacher.model)["weight"].shape[0] else None

    def _use_rows(self, shared: int) -> None:
        rows = head_parts(self.student)["weight"].shape[0]
        self.side.vocab_rows = shared if shared < rows else None

    def _check_cached_vocab(self) -> None:
        fields = getattr(self.teacher, "fields", None)
        if not fields:
            return
        logits = next((f for f in fields if f.name == "logits"), None)
        if logits is None:
            return
        teacher_rows = int(logits.shape[-1])
        if self.tokenizer is not None:
            shared = check_vocab((self.student, self.tokenizer), self.tokenizer)
            if teacher_rows < shared:
                raise WiringError(f"the cached teacher has {teacher_rows} vocabulary entries but the tokenizer has "
                                  f"{shared} tokens", where=f"{_WHERE}(teacher)",
                                  fix="build the cache with a teacher of this tokenizer")
        student_rows = head_parts(self.student)["weight"].shape[0]
        if teacher_rows > student_rows or (self.tokenizer is None and teacher_rows != student_rows):
            raise WiringError(f"student vocabulary size {student_rows} != cached teacher vocabulary size "
                              f"{teacher_rows}: token-level KD needs one shared vocabulary",
                              where=f"{_WHERE}(teacher)",
                              fix="use sequence-level KD (train the student on teacher-generated text) for "
                                  "different tokenizers, or build the cache with a teacher of the student's "
                                  "vocabulary")
        self._use_rows(teacher_rows)

    @property
    def terms(self) -> list[Term]:
        return self.side.terms

    def set_step(self, step: int) -> None:
        self.step = step
        self.side.step = step

    @torch.no_grad()
    def build(self, batch: Mapping[str, Any]) -> None:
        """Dry-run one batch: vocabulary, labels and one evaluation of every term (nothing is trained)."""
        self._check_live_vocab()
        self._check_cached_vocab()
        labels = batch.get("y")
        inputs = lm_inputs(batch)
        ids = inputs["input_ids"]
        if labels is None or not torch.is_tensor(labels) or tuple(labels.shape) != tuple(ids.shape):
            got = tuple(labels.shape) if torch.is_tensor(labels) else labels
            raise WiringError(f"the batch needs labels 'y' shaped like its input ids {tuple(ids.shape)}, got {got}",
                              where=_WHERE, fix="use kdistill.llm.block_dataset or prompt_response_dataset")
        rows = self.side.vocab_rows or head_parts(self.student)["weight"].shape[0]
        for name, tensor in (("input ids", ids), ("labels", labels[labels != -100])):
            if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= rows):
                raise WiringError(f"{name} outside 0..{rows - 1} (min {int(tensor.min())}, max {int(tensor.max())})",
                                  where=_WHERE, fix="tokenize with the student's tokenizer")
        if self.on_policy is not None:
            self.on_policy.prompt_length(batch)
        was_training = self.side.training
        self.side.eval()
        try:
            self.side(inputs, self.teacher_values(batch), labels)
        finally:
            self.side.train(was_training)
        self.built = True

    # -- training ------------------------------------------------------------------------------------------------
    def sample(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The on-policy batch of this step: the student's continuations of the batch's prompts."""
        op = self.on_policy
        assert op is not None
        tok = self.tokenizer
        gen_cfg = getattr(self.student, "generation_config", None)
        eos = token_id(tok, "eos") if tok is not None else getattr(gen_cfg, "eos_token_id", None)
        pad = token_id(tok, "pad", "eos") if tok is not None else getattr(gen_cfg, "pad_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        return sample_continuations(self.student, batch, prompt_len=op.prompt_length(batch),
                                    max_new_tokens=op.max_new_tokens, temperature=op.temperature, top_p=op.top_p,
                                    eos_token_id=eos, pad_token_id=pad, seed=op.sampling_seed(self.step))

    def __call__(self, batch: Mapping[str, Any]) -> DistillOutput:
        on_policy = self.on_policy is not None and self.on_policy.use_at(self.step)
        if on_policy:
            batch = self.sample(batch)
        values = self.teacher_values(batch)
        if on_policy:
            values[ON_POLICY] = True
        self.last_on_policy = on_policy
        out, terms = self.module(lm_inputs(batch), values, batch["y"])
        return DistillOutput(out, terms)
