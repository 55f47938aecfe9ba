"""The run configuration: pydantic models of the YAML file, and the one place that knows field names.

A config is a YAML mapping; `load_config(path)` validates it and raises `ConfigError` with a one-line message
naming the field path, the problem and the allowed values. `dump_config(cfg)` writes the fully resolved config
(every default filled in) so that `kdistill run RUN_DIR/config.yaml` reproduces a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import Field, field_validator, model_validator

from kdistill.configbase import Strict, format_validation_error, read_yaml, validate
from kdistill.errors import ConfigError
from kdistill.train_config import TrainConfig


class TransferConfig(Strict):
    """Extra unlabeled inputs from the same generator, labelled only by the teacher (Bucila et al. 2006)."""

    size: int = Field(0, ge=0, description="number of extra unlabeled inputs (0 = none)")
    seed: int = Field(1, description="generator seed of the transfer set; must differ from the data seed")


class AugmentConfig(Strict):
    """Random shifts / flips of the training inputs (see `kdistill.data.augment`)."""

    max_shift: int = Field(0, ge=0, description="shift each sample by up to this many positions per spatial axis")
    flip: bool = Field(False, description="mirror half of the samples along the last axis")
    views: Optional[int] = Field(None, ge=1, description="fixed augmented views per sample (lets teacher.cache "
                                                         "store each view); unset = new randomness every step")


class DataConfig(Strict):
    name: Literal["mnist1d", "digits", "fashion_mnist"] = "mnist1d"
    root: Optional[str] = Field(None, description="folder of the Fashion-MNIST IDX files")
    seed: int = Field(0, description="seed of the dataset generator / split")
    train_size: Optional[int] = Field(None, ge=1, description="keep only the first N training samples")
    transfer: TransferConfig = TransferConfig()
    augment: Optional[AugmentConfig] = Field(None, description="random augmentation of the training inputs")


class ModelConfig(Strict):
    """A built-in model by name (`mlp`, `cnn1d`, `cnn2d`, `resnet`) or any factory by import path."""

    name: str = Field(..., description="built-in name or 'package.module:factory'")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: Optional[str] = Field(None, description="a .safetensors (or .pt/.pth) file of trained weights")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from kdistill.models import BUILTIN_MODELS

        if v not in BUILTIN_MODELS and ":" not in v:
            allowed = ", ".join(sorted(BUILTIN_MODELS))
            raise ValueError(f"unknown model '{v}'; allowed: {allowed}, or 'package.module:factory'")
        return v


class TermConfig(Strict):
    """One named loss term of the objective: weight * loss(student[tap], teacher[tap], **params)."""

    name: Optional[str] = Field(None, description="name in the logs (defaults to the loss name)")
    loss: str
    weight: float = Field(1.0, ge=0)
    student: str = Field("logits", description="student tap ('logits' = the model output)")
    teacher: str = Field("logits", description="teacher tap ('logits' = the model output)")
    params: dict[str, Any] = Field(default_factory=dict)
    warmup_steps: int = Field(0, ge=0, description="linear ramp of the weight from 0 over these steps (as in DKD)")

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        from kdistill.losses import is_registered, loss_names

        if not is_registered(v):
            raise ValueError(f"unknown loss '{v}'; allowed: {', '.join(loss_names())}")
        return v


class DistillConfig(Strict):
    """The objective. Either `terms` (full control) or the Hinton shorthand `alpha`/`temperature`:
    loss = (1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))."""

    alpha: float = Field(0.9, ge=0, le=1, description="weight of the KD term (1 - alpha weighs CE)")
    temperature: float = Field(4.0, gt=0)
    terms: Optional[list[TermConfig]] = None
    taps: dict[str, str] = Field(default_factory=dict, description="extra taps: name -> 'module.path[:selector]'")

    @model_validator(mode="after")
    def _taps_defined(self) -> "DistillConfig":
        import difflib

        for i, term in enumerate(self.terms or []):
            sides = [("student", term.student)] + ([("teacher", term.teacher)] if term.loss != "ce" else [])
            for side, tap in sides:
                if tap != "logits" and tap not in self.taps:
                    close = difflib.get_close_matches(tap, list(self.taps), n=3, cutoff=0.5)
                    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
                    defined = ", ".join(sorted(self.taps)) or "none"
                    raise ValueError(f"terms[{i}].{side}: tap '{tap}' is not defined under distill.taps; {hint}"
                                     f"defined: {defined} (or 'logits')")
        return self

    def resolved_terms(self) -> list[TermConfig]:
        if self.terms:
            return list(self.terms)
        terms = []
        if self.alpha < 1:
            terms.append(TermConfig(name="ce", loss="ce", weight=1 - self.alpha))
        if self.alpha > 0:
            terms.append(TermConfig(name="kd", loss="kd", weight=self.alpha,
                                    params={"temperature": self.temperature}))
        return terms


class CacheConfig(Strict):
    """Store the teacher's outputs once (`kdistill cache build`) and train the student from them."""

    dir: Optional[str] = Field(None, description="cache folder (default: RUN_DIR/teacher-cache)")
    kind: Literal["dense", "topk"] = Field("dense", description="all logits, or the top-k plus the tail mass")
    k: int = Field(32, ge=1, description="classes kept per position for kind: topk")
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    shard_rows: Optional[int] = Field(None, ge=1, description="samples per shard (default: ~64 MiB shards)")


class TeacherConfig(ModelConfig):
    """The teacher. With no `weights`, it is first trained on the labelled data with `train`."""

    train: Optional[TrainConfig] = None
    cache: Optional[CacheConfig] = Field(None, description="train the student from stored teacher outputs")


class EvalConfig(Strict):
    latency_repeats: int = Field(50, ge=1)
    throughput_batch: int = Field(256, ge=1)
    ece_bins: int = Field(15, ge=2)


# -- training schemes: who teaches whom, and when (see docs/schemes.md) ----------------------------------------
class OfflineScheme(Strict):
    """A frozen teacher (trained first when it has no weights) teaches the student (Hinton et al. 2015)."""

    name: Literal["offline"] = "offline"


class MutualScheme(Strict):
    """Deep mutual learning (Zhang et al. 2018): peers trained together from scratch, each with CE plus
    KL to the average of the other peers' predictions."""

    name: Literal["mutual"]
    peers: Union[list[ModelConfig], int] = Field(2, description="number of copies of `student`, or the peer models")
    temperature: float = Field(1.0, gt=0)
    kl_weight: float = Field(1.0, ge=0)

    @field_validator("peers")
    @classmethod
    def _two_or_more(cls, v):
        if (v if isinstance(v, int) else len(v)) < 2:
            raise ValueError("mutual learning needs at least 2 peers")
        return v


class BornAgainScheme(Strict):
    """Born-again networks (Furlanello et al. 2018): generation k+1 (the student's architecture) learns from
    the frozen generation k with the `distill` objective; generation 0 learns from labels."""

    name: Literal["born_again"]
    generations: int = Field(3, ge=1, description="distilled generations after generation 0")
    ensemble: bool = Field(True, description="also evaluate the ensemble of generations 1..K")


class ByotScheme(Strict):
    """Be Your Own Teacher (Zhang et al. 2019): auxiliary classifier exits on intermediate student taps,
    supervised by the labels and by the final output."""

    name: Literal["byot"]
    exits: dict[str, str] = Field(..., min_length=1, description="exit name -> student module path")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KD term of each exit (1 - alpha weighs CE)")
    temperature: float = Field(3.0, gt=0)
    pool: int = Field(4, ge=1, description="adaptive-pool size of conv features before an exit head")
    hidden: int = Field(128, ge=1, description="hidden width of an exit head")


class SnapshotScheme(Strict):
    """Progressive self-knowledge distillation (Kim et al. 2021): the target is (1 - a_t) y + a_t p_prev(x),
    p_prev the model's own prediction for x in the previous epoch, a_t rising linearly to `alpha`."""

    name: Literal["snapshot"]
    alpha: float = Field(0.8, ge=0, le=1)


class MultiTeacherScheme(Strict):
    """Several teachers (any architectures) combined into one soft target."""

    name: Literal["multi_teacher"]
    teachers: list[TeacherConfig] = Field(..., min_length=2)
    combine: Literal["mean", "weights", "agreement"] = "mean"
    weights: Optional[list[float]] = Field(None, description="fixed teacher weights (combine: weights)")
    agreement_temperature: float = Field(0.05, gt=0, description="sharpness of the agreement weighting")

    @model_validator(mode="after")
    def _weights_match(self) -> "MultiTeacherScheme":
        if self.combine == "weights":
            if not self.weights or len(self.weights) != len(self.teachers) or min(self.weights) < 0 \
                    or sum(self.weights) <= 0:
                raise ValueError(f"combine 'weights' needs {len(self.teachers)} non-negative weights, one per teacher")
        elif self.weights is not None:
            raise ValueError(f"'weights' is only used with combine: weights (combine is '{self.combine}')")
        return self


class SpecialistsScheme(Strict):
    """Specialist ensembles (Hinton et al. 2015, sec. 5): the teacher is the generalist; specialists learn
    confusable class groups (plus a dustbin class); generalist + specialists teach the student."""

    name: Literal["specialists"]
    num_specialists: int = Field(2, ge=1)
    group_size: int = Field(2, ge=2)
    specialist: Optional[ModelConfig] = Field(None, description="specialist model (default: the teacher's)")
    specialist_train: Optional[TrainConfig] = Field(None, description="default: teacher.train or train")
    dustbin_ratio: float = Field(1.0, gt=0, description="dustbin examples per in-group example")
    top_k: int = Field(2, ge=1, description="a specialist is used when its group meets the generalist's top k")


class AssistantScheme(Strict):
    """Teacher-assistant chain (Mirzadeh et al. 2020): teacher -> assistant(s) -> student."""

    name: Literal["assistant"]
    assistants: Optional[list[ModelConfig]] = Field(None, description="explicit assistants, largest first")
    num_assistants: int = Field(1, ge=1, description="without `assistants`: this many, spaced geometrically in "
                                                     "parameter count between teacher and student")
    direct: bool = Field(True, description="also distil the student directly from the teacher")


class LifelongScheme(Strict):
    """Learning without Forgetting (Li & Hoiem 2016): learn new classes while distilling the old model's
    outputs on the new data; compared with plain fine-tuning."""

    name: Literal["lifelong"]
    old_classes: list[int] = Field(..., min_length=1)
    new_classes: list[int] = Field(..., min_length=1)
    lwf_weight: float = Field(1.0, ge=0)
    temperature: float = Field(2.0, gt=0)
    old_train: Optional[TrainConfig] = Field(None, description="training of the old task (default: train)")
    finetune: bool = Field(True, description="also fine-tune without distillation for comparison")

    @model_validator(mode="after")
    def _disjoint(self) -> "LifelongScheme":
        both = set(self.old_classes) & set(self.new_classes)
        if both or len(set(self.old_classes)) != len(self.old_classes) or \
                len(set(self.new_classes)) != len(self.new_classes):
            raise ValueError(f"old_classes and new_classes must be distinct and disjoint (shared: {sorted(both)})")
        return self


class CrossModalScheme(Strict):
    """Teacher and student read different views of the same sample: 'identity', 'downsample:F',
    'noise:STD', or a chain like 'downsample:2+noise:0.5'."""

    name: Literal["cross_modal"]
    teacher_view: str = "identity"
    student_view: str = "downsample:2"


class SelectiveScheme(Strict):
    """Selective teacher intervention: the teacher's terms count only at positions (samples, or tokens of
    3-D logits) where student and teacher diverge by more than a threshold."""

    name: Literal["selective"]
    divergence: Literal["kl", "top1"] = "kl"
    threshold: float = Field(0.1, ge=0)
    threshold_end: Optional[float] = Field(None, ge=0, description="final threshold (schedule: linear)")
    schedule: Literal["constant", "linear"] = "constant"
    granularity: Literal["token", "sample"] = "token"
    terms: Optional[list[str]] = Field(None, description="gated terms (default: every logit term of the teacher)")


SchemeConfig = Union[OfflineScheme, MutualScheme, BornAgainScheme, ByotScheme, SnapshotScheme, MultiTeacherScheme,
                     SpecialistsScheme, AssistantScheme, LifelongScheme, CrossModalScheme, SelectiveScheme]
SCHEMES_WITH_TEACHER = ("offline", "specialists", "assistant", "cross_modal", "selective")


class RunConfig(Strict):
    task: Literal["classification"] = "classification"
    seed: int = 0
    data: DataConfig = DataConfig()
    teacher: Optional[TeacherConfig] = Field(None, description="required by schemes offline, specialists, assistant, "
                                                                 "cross_modal, selective")
    student: ModelConfig
    distill: DistillConfig = DistillConfig()
    train: TrainConfig = TrainConfig()
    baseline: bool = Field(True, description="also train the student without a teacher, same budget")
    eval: EvalConfig = EvalConfig()
    scheme: SchemeConfig = Field(default_factory=OfflineScheme, discriminator="name",
                                 description="who teaches whom: 'offline' (default), 'mutual', 'born_again', ...")

    @field_validator("scheme", mode="before")
    @classmethod
    def _scheme_shorthand(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _teacher_fits_scheme(self) -> "RunConfig":
        name = self.scheme.name
        if name in SCHEMES_WITH_TEACHER and self.teacher is None:
            raise ValueError(f"scheme '{name}' needs a 'teacher'")
        if name not in SCHEMES_WITH_TEACHER and self.teacher is not None:
            where = "scheme.teachers" if name == "multi_teacher" else "nothing: the scheme trains its own teachers"
            raise ValueError(f"scheme '{name}' does not use 'teacher' (it uses {where}); remove it")
        if name != "offline":  # the schemes' rounds read the data and run their teachers live
            teachers = [self.teacher] + list(getattr(self.scheme, "teachers", []))
            if any(t is not None and t.cache is not None for t in teachers):
                raise ValueError(f"teacher.cache is only supported by scheme 'offline', not '{name}'; remove it")
            if self.data.augment is not None:
                raise ValueError(f"data.augment is only supported by scheme 'offline', not '{name}'; remove it")
        return self

    @model_validator(mode="after")
    def _cache_is_possible(self) -> "RunConfig":
        if self.teacher is None or self.teacher.cache is None:
            return self
        if self.scheme.name != "offline":
            raise ValueError(f"teacher.cache is used by scheme 'offline' only, not '{self.scheme.name}'; remove it")
        if self.data.augment is not None and self.data.augment.views is None:
            raise ValueError("teacher.cache: data.augment draws new random inputs every step, so stored teacher "
                             "outputs would be targets for inputs the student never sees; set data.augment.views: N "
                             "(the cache then stores N views per sample) or remove teacher.cache")
        return self


def parse_config(data: Any, source: str = "config") -> RunConfig:
    cfg = validate(RunConfig, data, source)
    try:
        dump_config(cfg)  # free-form values (kwargs, params) must be writable to the run's config.yaml
    except (ValueError, RecursionError):  # a YAML alias cycle (&a ... *a) or absurdly deep nesting
        raise ConfigError(f"{source}: a value refers to itself (a YAML alias cycle) or is nested too deeply",
                          fix="write the value out instead of using an alias") from None
    return cfg


def load_config(path: Union[str, Path]) -> RunConfig:
    return parse_config(read_yaml(path), str(path))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
