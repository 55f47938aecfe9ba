"""The config of a causal-LM distillation run (``task: causal_lm``, e.g. ``examples/smollm2.yaml``).

Strict pydantic models (`kdistill.configbase.Strict`: unknown keys are errors); reading the YAML, ``--set``
overrides and one-line `ConfigError`s are the shared `kdistill.tasks.load_any`, which picks this model by the
config's ``task: causal_lm`` line. The job is `kdistill.tasks.causal_lm`.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import ConfigDict, Field, field_validator, model_validator

from kdistill.compress.config import CompressStep, ExportConfig, check_steps
from kdistill.configbase import Strict
from kdistill.data.sources import TextCorpus
from kdistill.losses.lm import DIVERGENCES
from kdistill.train_config import TrainConfig

__all__ = ["CROSS_LOSSES", "LMCacheConfig", "LMDataConfig", "LMDistillConfig", "LMEvalConfig", "LMRunConfig",
           "LMStudentConfig", "LMStudentSize", "LMTeacherConfig", "LMTermConfig", "OnPolicyConfig"]

Divergence = Literal[DIVERGENCES]  # type: ignore[valid-type]  # forward_kl, reverse_kl, jsd, ...

class LMCacheConfig(Strict):
    """The teacher's next-token distributions over the training blocks, stored once (`kdistill cache build`)."""

    dir: Optional[str] = Field(None, description="cache folder (default: RUN_DIR/teacher-cache)")
    kind: Literal["topk", "dense"] = Field("topk", description="top-k + tail mass, or every logit")
    k: int = Field(64, ge=1, description="tokens kept per position")
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    batch_size: int = Field(8, ge=1, description="blocks per teacher forward while building")


class LMTeacherConfig(Strict):
    path: str = Field("smollm2", description="'smollm2' (the packaged SmolLM2-135M-Instruct) or a local folder")
    gguf_file: Optional[str] = Field(None, description="a .gguf file inside `path` (de-quantized to float32)")
    cache: Optional[LMCacheConfig] = Field(None, description="train from stored teacher outputs (no on-policy)")


class LMStudentSize(Strict):
    """A new Llama-style student (random initialisation) for a student tokenizer of its own."""

    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(512, ge=8)

    @model_validator(mode="after")
    def _heads(self) -> "LMStudentSize":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        return self


class LMStudentConfig(Strict):
    """The student: the teacher's class with a subset of its decoder layers (weights copied); or, with a
    `tokenizer` of its own, a new model of `size` (cross-tokenizer distillation, docs/llm.md)."""

    every: Optional[int] = Field(3, ge=1, description="keep teacher layers 0, every, 2*every, ...")
    layers: Optional[list[int]] = Field(None, description="or: explicit teacher layer indices (set every: null)")
    freeze_embeddings: bool = Field(False, description="keep the (tied) embeddings / output head fixed")
    tokenizer: Optional[str] = Field(None, description="a tokenizer of the student's own: 'minilm' (the BERT "
                                     "WordPiece tokenizer of the packaged all-MiniLM-L6-v2) or a local folder")
    size: LMStudentSize = Field(default_factory=LMStudentSize, description="the new student (with `tokenizer`)")

    @model_validator(mode="after")
    def _one_rule(self) -> "LMStudentConfig":
        if (self.every is None) == (self.layers is None):
            raise ValueError("give exactly one of 'every' and 'layers' (set the other to null)")
        if self.tokenizer is not None and (self.layers is not None or self.freeze_embeddings):
            raise ValueError("layers / freeze_embeddings pick teacher layers, but a student with its own tokenizer "
                             "is a new model: set its student.size instead")
        if self.tokenizer is None and self.size != LMStudentSize():
            raise ValueError("student.size builds a new model for a student tokenizer: set student.tokenizer too "
                             "(without it the student is cut from the teacher: every / layers)")
        return self


class LMDataConfig(Strict):
    """Text blocks from the Wikipedia articles in gensim's test data (or the user's own text: ``corpus: {path:
    FILE, ...}``, docs/data.md), held out by whole article / document."""

    corpus: TextCorpus = Field("wiki", description="'wiki' (gensim's Wikipedia test articles) or the user's text: "
                                                   "{path: .txt | table | datasets folder, column, separator}")
    seed: int = 0
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="fraction of articles held out")
    block_size: int = Field(128, ge=8, description="tokens per block")
    max_train_blocks: Optional[int] = Field(None, ge=1, description="keep the first N training blocks (after a "
                                                                    "seeded shuffle)")
    max_heldout_blocks: Optional[int] = Field(None, ge=1, description="held-out blocks used for perplexity")


class OnPolicyConfig(Strict):
    """GKD: with probability `lambda` per batch the student samples, the live teacher scores."""

    lambda_: float = Field(0.5, ge=0, le=1, alias="lambda")
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the student")
    top_p: float = Field(1.0, gt=0, le=1)
    prompt_tokens: int = Field(64, ge=1, description="the first N tokens of each block are the prompt")

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


CROSS_LOSSES = ("uld", "gold")  # cross-tokenizer terms (registry losses with cross_vocab=True)


class LMTermConfig(Strict):
    """One term of ``distill.terms``: ``ce``, a same-vocabulary divergence (``forward_kl``, ``jsd``, ...) or a
    cross-tokenizer loss (``uld``, ``gold``)."""

    loss: Literal[("ce", *DIVERGENCES, *CROSS_LOSSES)]  # type: ignore[valid-type]
    weight: float = Field(1.0, gt=0)
    name: Optional[str] = Field(None, description="the term's name in the logs (default: the loss)")
    matched_weight: float = Field(0.0, ge=0, description="gold: weight of the exact-match part on the tokens both "
                                  "vocabularies share (the hybrid); 0 = sorted L1 only")
    matched_divergence: Divergence = Field("jsd", description="gold: the divergence of the exact-match part")

    @model_validator(mode="after")
    def _gold_only(self) -> "LMTermConfig":
        if self.loss != "gold" and (self.matched_weight != 0 or self.matched_divergence != "jsd"):
            raise ValueError(f"matched_weight / matched_divergence belong to the gold loss, not '{self.loss}'")
        return self


class LMDistillConfig(Strict):
    terms: Optional[list[LMTermConfig]] = Field(None, description="the objective as terms (instead of "
                                                "divergence / kd_weight / ce_weight); needed for uld / gold")
    teacher_k: Optional[int] = Field(None, ge=1, description="cross-tokenizer terms with a live teacher: keep its "
                                     "top-k per span (None: every entry, exact)")
    divergence: Divergence = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.5, ge=0, le=1, description="jsd: weight of the teacher in the mixture")
    alpha: float = Field(0.1, ge=0, le=1, description="skew_kl: skew")
    kd_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(0.0, ge=0, description="next-token cross-entropy on the text")
    chunk_size: int = Field(256, ge=1, description="tokens per chunk of the head computations")
    on_policy: Optional[OnPolicyConfig] = None

    @model_validator(mode="after")
    def _something(self) -> "LMDistillConfig":
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd_weight and ce_weight are both 0: nothing to train")
        if self.terms is not None:
            if not self.terms:
                raise ValueError("terms is empty: give at least one term (or remove terms)")
            defaults = {"divergence": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.0}
            clash = sorted(k for k, v in defaults.items() if getattr(self, k) != v)
            if clash:
                raise ValueError(f"give the objective either as terms or as {', '.join(clash)}, not both")
            names = [t.name or t.loss for t in self.terms]
            if len(set(names)) != len(names):
                raise ValueError(f"term names repeat ({names}): give each term its own name")
            if sum(t.loss in DIVERGENCES for t in self.terms) > 1:
                raise ValueError("at most one same-vocabulary divergence term (forward_kl, jsd, ...)")
        return self

    def token_objective(self) -> tuple[str, float, float]:
        """``(divergence, kd_weight, ce_weight)`` of a same-vocabulary objective (from `terms` when given)."""
        if self.terms is None:
            return self.divergence, self.kd_weight, self.ce_weight
        kd = [t for t in self.terms if t.loss in DIVERGENCES]
        ce = sum(t.weight for t in self.terms if t.loss == "ce")
        return (kd[0].loss, kd[0].weight, ce) if kd else (self.divergence, 0.0, ce)

    @property
    def cross_tokenizer(self) -> bool:
        """Whether the objective has cross-tokenizer terms (uld, gold)."""
        return any(t.loss in CROSS_LOSSES for t in self.terms or ())


class LMEvalConfig(Strict):
    batch_size: int = Field(8, ge=1, description="blocks per forward for perplexity")


class LMRunConfig(Strict):
    task: Literal["causal_lm"] = "causal_lm"
    seed: int = 0
    teacher: LMTeacherConfig = LMTeacherConfig()
    student: LMStudentConfig = LMStudentConfig()
    data: LMDataConfig = LMDataConfig()
    distill: LMDistillConfig = LMDistillConfig()
    train: TrainConfig = TrainConfig(steps=120, batch_size=4, lr=3e-4, schedule="cosine", warmup_steps=10,
                                     weight_decay=0.0, clip_grad_norm=1.0, log_every=10)
    baseline: bool = Field(True, description="also train the student with next-token CE only, same steps and data")
    eval: LMEvalConfig = LMEvalConfig()
    compress: list[CompressStep] = Field(default_factory=list, description="prune / low_rank / quantize stages "
                                         "after distillation, each with KD recovery")
    export: Optional[ExportConfig] = Field(None, description="ONNX export (fp32, int8) of the final LM")

    @field_validator("compress")
    @classmethod
    def _compress_order(cls, v):
        return check_steps(v)

    @model_validator(mode="after")
    def _cache_or_on_policy(self) -> "LMRunConfig":
        cross = self.distill.cross_tokenizer or self.student.tokenizer is not None
        if cross and (self.compress or self.export is not None):
            raise ValueError("compress / export stages are not wired for cross-tokenizer runs yet: run them on the "
                             "saved student (RUN_DIR/student) with a same-tokenizer config")
        if self.distill.cross_tokenizer and self.distill.on_policy is not None:
            raise ValueError("distill.on_policy works with same-vocabulary divergences, not uld / gold terms; remove one")
        if self.distill.cross_tokenizer and self.teacher.cache is not None and self.teacher.cache.kind != "topk":
            raise ValueError("a cross-tokenizer run caches the teacher's top-k per aligned span: use teacher.cache.kind "
                             "topk")
        if self.teacher.cache is not None and self.distill.on_policy is not None:
            raise ValueError("teacher.cache and distill.on_policy exclude each other: the student's samples need a "
                             "live teacher; remove one")
        return self
