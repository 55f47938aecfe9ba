"""Config sections the schemes share with `kdistill.config.RunConfig`: a model, a teacher and its cache.

They sit here, below both, so that each scheme module can declare its own config class (`MutualScheme.peers`
are models, `MultiTeacherScheme.teachers` are teachers) and `kdistill.config` can import those classes without
an import cycle. Only ground-floor modules are imported.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from kdistill.configbase import Strict
from kdistill.train_config import TrainConfig


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


__all__ = ["CacheConfig", "ModelConfig", "TeacherConfig"]
