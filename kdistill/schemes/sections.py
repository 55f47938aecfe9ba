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


class TeacherConfig(ModelConfig):
    """The teacher. With no `weights`, it is first trained on the labelled data with `train`."""

    train: Optional[TrainConfig] = None
    cache: Optional[CacheConfig] = Field(None, description="train the student from stored teacher outputs")


__all__ = ["CacheConfig", "FromTeacher", "ModelConfig", "StudentConfig", "TeacherConfig"]
