"""The run configuration: pydantic models of the YAML file, and the one place that knows field names.

A config is a YAML mapping; `load_config(path)` validates it and raises `ConfigError` with a one-line message
naming the field path, the problem and the allowed values. `dump_config(cfg)` writes the fully resolved config
(every default filled in) so that `kdistill run RUN_DIR/config.yaml` reproduces a run. The model, teacher and
cache sections live in `kdistill.schemes.sections`, each scheme's section next to its code
(`kdistill.schemes.<module>`); this module assembles them into `RunConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from kdistill.audit.config import AuditConfig
from kdistill.compress.config import CompressStep, ExportConfig, check_steps
from kdistill.configbase import Strict, read_yaml
from kdistill.data.munge import MungeConfig, MungeTransfer, transfer_form
from kdistill.data.sources import BUILTIN_TAG, FILES_TAG, SourceConfig, UserDataBase, data_form
from kdistill.datafree.config import BoundaryConfig, DataFreeConfig
from kdistill.schemes.assistant import AssistantScheme
from kdistill.schemes.cross_modal import CrossModalScheme
from kdistill.schemes.lifelong import LifelongScheme
from kdistill.schemes.multi_teacher import MultiTeacherScheme
from kdistill.schemes.mutual import MutualScheme
from kdistill.schemes.offline import OfflineScheme
from kdistill.schemes.sections import CacheConfig, ModelConfig, StudentConfig, TeacherConfig
from kdistill.schemes.selective import SelectiveScheme
from kdistill.schemes.self_distill import BornAgainScheme, ByotScheme, SnapshotScheme
from kdistill.schemes.specialists import SpecialistsScheme
from kdistill.search.config import SearchConfig
from kdistill.tasks import dump_config
from kdistill.train_config import ThreadsSetting, TrainConfig, check_threads


class TransferConfig(Strict):
    """Extra unlabeled inputs from the same generator, labelled only by the teacher (Bucila et al. 2006)."""

    size: int = Field(0, ge=0, description="number of extra unlabeled inputs (0 = none)")
    seed: int = Field(1, description="generator seed of the transfer set; must differ from the data seed")
    munge: Optional[MungeConfig] = Field(None, description="MUNGE pseudo-rows made from the training rows "
                                         "(kdistill.data.munge, docs/blackbox.md)")
    boundary: Optional[BoundaryConfig] = Field(None, description="boundary samples: PGD copies of each batch "
                                               "toward teacher-student disagreement (docs/data_free.md)")


class AugmentConfig(Strict):
    """Random shifts / flips of the training inputs (see `kdistill.data.augment`)."""

    max_shift: int = Field(0, ge=0, description="shift each sample by up to this many positions per spatial axis")
    flip: bool = Field(False, description="mirror half of the samples along the last axis")
    views: Optional[int] = Field(None, ge=1, description="fixed augmented views per sample (lets teacher.cache "
                                                         "store each view); unset = new randomness every step")


class DataConfig(Strict):
    """The built-in datasets (``data: {name: ...}``); the user's own files are `UserDataConfig`."""

    name: Literal["mnist1d", "digits", "fashion_mnist"] = "mnist1d"
    root: Optional[str] = Field(None, description="folder of the Fashion-MNIST IDX files")
    seed: int = Field(0, description="seed of the dataset generator / split")
    train_size: Optional[int] = Field(None, ge=1, description="keep only the first N training samples")
    test_size: Optional[int] = Field(None, ge=1, description="evaluate on the first N test samples only (quick runs)")
    transfer: TransferConfig = TransferConfig()
    augment: Optional[AugmentConfig] = Field(None, description="random augmentation of the training inputs")
    train: Optional[Literal["none"]] = Field(None, description="'none': read no training split (data-free "
                                             "distillation with a data_free section; docs/data_free.md)")

    @property
    def data_free(self) -> bool:
        """True when no training split is read (``train: none``)."""
        return self.train == "none"


class UserDataConfig(UserDataBase):
    """The user's own data (``data: {train: ..., test: ..., validation: ..., transfer: ...}``; docs/data.md)."""

    augment: Optional[AugmentConfig] = Field(None, description="random augmentation of the training inputs")
    transfer: Optional[Annotated[Union[Annotated[MungeTransfer, Tag("munge")], Annotated[SourceConfig, Tag("source")]],
                                 Discriminator(transfer_form)]] = Field(
        None, description="unlabeled inputs the teacher labels (labels in the source are ignored), or {munge: {...}}: "
                          "MUNGE rows of the training split (docs/blackbox.md)")


# ``data:`` is the built-in form or the files form, told apart by its keys (kdistill.data.sources.data_form)
DataChoice = Annotated[Union[Annotated[DataConfig, Tag(BUILTIN_TAG)], Annotated[UserDataConfig, Tag(FILES_TAG)]],
                       Discriminator(data_form)]


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
        from kdistill.losses import get_loss, is_registered, loss_names

        if not is_registered(v) or not get_loss(v).on_taps:
            what = f"unknown loss '{v}'" if not is_registered(v) else \
                f"loss '{v}' needs the encoder distiller (task: sentence_embedding)"
            raise ValueError(f"{what}; allowed: {', '.join(loss_names(on_taps=True))}")
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

        from kdistill.losses import get_loss

        for i, term in enumerate(self.terms or []):
            reads_teacher = get_loss(term.loss).needs_teacher
            sides = [("student", term.student)] + ([("teacher", term.teacher)] if reads_teacher else [])
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


class EvalConfig(Strict):
    latency_repeats: int = Field(50, ge=1, description="timed batch-1 forwards per model and thread count")
    throughput_batch: int = Field(256, ge=1)
    ece_bins: int = Field(15, ge=2)
    threads: ThreadsSetting = Field("auto", description="CPU threads of the latency and throughput measurement: "
                                    "'auto' measures at 1 thread and at all cores (both reported; the summary's "
                                    "latency_ms, throughput and speedup are the 1-thread ones), or one number")

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, value):
        return check_threads(value)


# -- training schemes: who teaches whom, and when (see docs/schemes.md); each scheme module owns its section ----
SchemeConfig = Union[OfflineScheme, MutualScheme, BornAgainScheme, ByotScheme, SnapshotScheme, MultiTeacherScheme,
                     SpecialistsScheme, AssistantScheme, LifelongScheme, CrossModalScheme, SelectiveScheme]
SCHEMES_WITH_TEACHER = ("offline", "specialists", "assistant", "cross_modal", "selective")


class RunConfig(Strict):
    task: Literal["classification"] = "classification"
    seed: int = 0
    data: DataChoice = Field(default_factory=DataConfig, description="built-in data {name: ...} or the user's "
                             "own {train, validation, test, transfer} (docs/data.md)")
    teacher: Optional[TeacherConfig] = Field(None, description="required by schemes offline, specialists, assistant, "
                                                                 "cross_modal, selective")
    student: StudentConfig
    distill: DistillConfig = DistillConfig()
    train: TrainConfig = TrainConfig()
    baseline: bool = Field(True, description="also train the student without a teacher, same budget")
    eval: EvalConfig = EvalConfig()
    scheme: SchemeConfig = Field(default_factory=OfflineScheme, discriminator="name",
                                 description="who teaches whom: 'offline' (default), 'mutual', 'born_again', ...")
    compress: list[CompressStep] = Field(default_factory=list, description="prune / low_rank / quantize stages "
                                         "after distillation, each with KD recovery (scheme offline)")
    export: Optional[ExportConfig] = Field(None, description="ONNX export (fp32, int8) of the final model")
    audit: Optional[AuditConfig] = Field(None, description="audit the teacher before distillation (scheme offline, "
                                         "multi_teacher; docs/audit.md); a violated threshold stops the run")
    search: Optional[SearchConfig] = Field(None, description="what `kdistill search` varies and optimizes "
                                           "(docs/search.md); `kdistill run` ignores it")
    data_free: Optional[DataFreeConfig] = Field(None, description="train the student on inputs synthesised from "
                                                "the teacher (deepinversion | dfad; docs/data_free.md)")

    @field_validator("compress")
    @classmethod
    def _compress_order(cls, v):
        return check_steps(v)

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
    def _data_free_section(self) -> "RunConfig":
        """``data_free`` / ``data.train: none`` / ``data.transfer.boundary``: kdistill.datafree.config.check_run."""
        from kdistill.datafree.config import check_run

        check_run(self)
        return self

    @model_validator(mode="after")
    def _api_teacher_fits(self) -> "RunConfig":
        """A black-box teacher (teacher.kind: api) answers fixed inputs once: scheme offline, no augmentation,
        no audit (its probes would be new queries), no student derived from its (unknown) architecture."""
        if self.teacher is None or self.teacher.kind != "api":
            return self
        if any(getattr(t, "kind", "model") == "api" for t in getattr(self.scheme, "teachers", [])):
            raise ValueError("teacher kind: api is supported by scheme 'offline' only")
        for bad, why in ((self.scheme.name != "offline", f"scheme '{self.scheme.name}' (use scheme offline)"),
                         (getattr(self.data, "augment", None) is not None, "data.augment (every new view would be "
                                                                            "a new paid query; remove it)"),
                         (self.audit is not None, "audit (its probes would be new queries; remove it)"),
                         (getattr(self.student, "from_teacher", None) is not None,
                          "student.from_teacher (the black box has no architecture; name the student)")):
            if bad:
                raise ValueError(f"teacher kind: api does not support {why}")
        return self

    @model_validator(mode="after")
    def _student_from_teacher(self) -> "RunConfig":
        """``student: {from_teacher: {width, depth}}``: the student's name and kwargs from the teacher's family
        (`kdistill.models.builders`), filled in so every reader of ``cfg.student`` sees a plain model section."""
        from kdistill.errors import KDError
        from kdistill.models.builders import resolved_student_config

        try:
            object.__setattr__(self, "student", resolved_student_config(self.student, self.teacher))
        except KDError as err:
            raise ValueError(str(err)) from None
        return self

    @model_validator(mode="after")
    def _compress_needs_offline(self) -> "RunConfig":
        if (self.compress or self.export is not None) and self.scheme.name != "offline":
            raise ValueError(f"compress / export run after scheme 'offline' only, not '{self.scheme.name}': "
                             "remove compress / export, or distil with scheme 'offline'")
        return self

    @model_validator(mode="after")
    def _audit_needs_a_teacher(self) -> "RunConfig":
        if self.audit is not None and self.scheme.name not in ("offline", "multi_teacher"):
            raise ValueError(f"audit: the teacher audit runs with scheme 'offline' or 'multi_teacher', not "
                             f"'{self.scheme.name}' (it trains its teachers during the run); remove audit")
        return self

    @model_validator(mode="after")
    def _teacher_train_inherits(self) -> "RunConfig":
        """`teacher.train` takes every field it does not set from `train` (so the teacher stage checkpoints too);
        written out resolved, so the run's config.yaml shows what the teacher stage uses."""
        from kdistill.schemes.common import inherit_train

        for teacher in [self.teacher] + list(getattr(self.scheme, "teachers", [])):
            if teacher is not None and teacher.train is not None:
                try:
                    merged = inherit_train(teacher.train, self.train)
                except ValidationError as err:
                    raise ValueError(f"teacher.train (with the fields it takes from train): "
                                     f"{err.errors()[0].get('msg', 'invalid')}") from None
                object.__setattr__(teacher, "train", merged)
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
    """A validated `RunConfig` of a raw mapping; every mistake is a one-line `ConfigError`."""
    from kdistill.tasks import get_task

    return get_task("classification").parse(data, source)


def load_config(path: Union[str, Path]) -> RunConfig:
    return parse_config(read_yaml(path), str(path))


__all__ = ["AugmentConfig", "CacheConfig", "DataChoice", "DataConfig", "DistillConfig", "EvalConfig", "ModelConfig",
           "RunConfig", "SCHEMES_WITH_TEACHER", "SchemeConfig", "SourceConfig", "TeacherConfig", "TermConfig",
           "TrainConfig", "TransferConfig", "UserDataConfig", "dump_config", "load_config", "parse_config"]
