"""Config sections the schemes share with `kdistill.config.RunConfig`: a model, a teacher and its cache.

They sit here, below both, so that each scheme module can declare its own config class (`MutualScheme.peers`
are models, `MultiTeacherScheme.teachers` are teachers) and `kdistill.config` can import those classes without
an import cycle. Only ground-floor modules are imported.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from kdistill.configbase import Strict
from kdistill.train_config import TrainConfig


class ModelConfig(Strict):
    """A built-in model by name (`mlp`, `cnn1d`, `cnn2d`, `resnet`) or any factory by import path."""

    name: str = Field(..., description="built-in name or 'package.module:factory'")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: Optional[str] = Field(None, description="a .safetensors (or .pt/.pth) file of trained weights")

    @field_validator("name")
    @classmethod
    def _known(cls, v: Optional[str]) -> Optional[str]:
        from kdistill.models import BUILTIN_MODELS

        if v is None:  # StudentConfig with from_teacher only
            return v
        if v not in BUILTIN_MODELS and ":" not in v:
            allowed = ", ".join(sorted(BUILTIN_MODELS))
            raise ValueError(f"unknown model '{v}'; allowed: {allowed}, or 'package.module:factory'")
        return v


class FromTeacher(Strict):
    """A student of the teacher's built-in family, scaled (`kdistill.models.builders.student_from_teacher`)."""

    width: Optional[float] = Field(None, gt=0, le=1, description="widths as a fraction of the teacher's, in (0, 1]")
    depth: Optional[float] = Field(None, gt=0, description="depth as a factor of the teacher's (layers, blocks)")

    @model_validator(mode="after")
    def _something(self) -> "FromTeacher":
        if self.width is None and self.depth is None:
            raise ValueError("give width and/or depth, e.g. from_teacher: {width: 0.5}")
        return self


class StudentConfig(ModelConfig):
    """The student: a model as for the teacher, or ``from_teacher: {width, depth}`` (then `name` may be left out:
    the teacher's family; `kwargs` override the derived ones)."""

    name: Optional[str] = Field(None, description="built-in name or 'package.module:factory' (optional with "
                                                  "from_teacher)")
    from_teacher: Optional[FromTeacher] = Field(None, description="a scaled copy of the teacher's architecture")

    @model_validator(mode="after")
    def _named(self) -> "StudentConfig":
        if self.name is None and self.from_teacher is None:
            raise ValueError("student needs a 'name' (or from_teacher: {width, depth})")
        return self


class CacheConfig(Strict):
    """Store the teacher's outputs once (`kdistill cache build`) and train the student from them."""

    dir: Optional[str] = Field(None, description="cache folder (default: RUN_DIR/teacher-cache)")
    kind: Literal["dense", "topk"] = Field("dense", description="all logits, or the top-k plus the tail mass")
    k: int = Field(32, ge=1, description="classes kept per position for kind: topk")
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    shard_rows: Optional[int] = Field(None, ge=1, description="samples per shard (default: ~64 MiB shards)")


class ApiFields(Strict):
    """The JSON field names of an HTTP teacher (request and answer)."""

    inputs: str = "inputs"
    labels: str = "labels"
    probs: str = "probs"
    topk: str = "topk"
    indices: str = "indices"
    topk_probs: str = Field("probs", description="the probabilities inside the top-k object")


class ApiTeacherConfig(Strict):
    """A black-box teacher (`kdistill.teachers.api`, docs/blackbox.md): a Python callable or a local HTTP endpoint
    answering labels, probabilities or top-k; budget, batching, retries and a persistent answer cache."""

    call: Optional[str] = Field(None, description="'package.module:function' (rows -> answer); with teacher.kwargs "
                                                  "a factory called once with them")
    url: Optional[str] = Field(None, description="HTTP endpoint: POST {inputs: [[...]]} -> {labels|probs|topk}")
    fields: ApiFields = ApiFields()
    as_torch: bool = Field(False, description="pass the callable a torch tensor instead of a numpy array")
    budget: Optional[int] = Field(None, ge=1, description="most rows ever sent to the teacher (across restarts)")
    batch_size: int = Field(64, ge=1, description="rows per request")
    retries: int = Field(4, ge=0, le=20, description="extra attempts on connection errors, HTTP 5xx and 429")
    backoff: float = Field(0.5, ge=0, description="first wait before a retry (seconds), doubled each attempt")
    max_backoff: float = Field(30.0, ge=0, description="longest wait between attempts (seconds)")
    timeout: float = Field(30.0, gt=0, description="seconds per HTTP request")
    answers: Optional[str] = Field(None, description="answer cache (SQLite file; default "
                                                     "RUN_DIR/teacher-answers.sqlite)")
    identity: str = Field("", description="extra text in the cache key (e.g. the remote model's version)")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="hard-label answers: (1 - eps) one-hot + eps / C")

    @model_validator(mode="after")
    def _one_source(self) -> "ApiTeacherConfig":
        if (self.call is None) == (self.url is None):
            raise ValueError("kind: api needs exactly one of 'call' (package.module:function) or 'url'")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url '{self.url}' must start with http:// or https://")
        if self.call is not None and ":" not in self.call:
            raise ValueError(f"call '{self.call}' must be 'package.module:function'")
        return self


class TeacherConfig(ModelConfig):
    """The teacher. With no `weights`, it is first trained on the labelled data with `train`. With ``kind: api``
    it is a black box (`api`; its fields may also be written directly under ``teacher:``)."""

    kind: Literal["model", "api"] = Field("model", description="'model' (a torch model) or 'api' (a black box)")
    name: Optional[str] = Field(None, description="built-in name or 'package.module:factory' (kind: model)")
    train: Optional[TrainConfig] = None
    cache: Optional[CacheConfig] = Field(None, description="train the student from stored teacher outputs")
    api: Optional[ApiTeacherConfig] = Field(None, description="the black box (kind: api)")

    @model_validator(mode="before")
    @classmethod
    def _api_fields_inline(cls, data: Any) -> Any:
        """``teacher: {kind: api, url: ..., budget: ...}``: fields of the black box written under ``teacher:``
        are moved into ``teacher.api``."""
        if isinstance(data, dict) and data.get("kind") == "api":
            inline = [k for k in data if k in ApiTeacherConfig.model_fields]
            if inline:
                data = dict(data)
                api = dict(data.get("api") or {})
                for key in inline:
                    api[key] = data.pop(key)
                data["api"] = api
        return data

    @model_validator(mode="after")
    def _kind_fits(self) -> "TeacherConfig":
        if self.kind == "model":
            if self.name is None:
                raise ValueError("teacher needs a 'name' (or kind: api with call / url)")
            if self.api is not None:
                raise ValueError("teacher.api is for kind: api; add 'kind: api' or remove it")
            return self
        if self.api is None:
            raise ValueError("kind: api needs 'call' (package.module:function) or 'url'")
        given = [k for k in ("name", "weights", "train", "cache") if getattr(self, k) is not None]
        if given:
            raise ValueError(f"a kind: api teacher does not use {', '.join(given)} (its answers are cached in "
                             f"teacher.answers); remove {'it' if len(given) == 1 else 'them'}")
        return self


__all__ = ["ApiFields", "ApiTeacherConfig", "CacheConfig", "FromTeacher", "ModelConfig", "StudentConfig",
           "TeacherConfig"]
