"""The YAML of a causal-LM distillation run (``task: causal_lm``, e.g. ``examples/smollm2.yaml``).

Pydantic models, unknown keys are errors, validation problems become one-line `ConfigError`s naming the field
path. `kdistill run` and `kdistill cache build` recognise an LM config by its ``task: causal_lm`` line
(`is_lm_config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdistill.configbase import format_validation_error
from kdistill.train_config import TrainConfig
from kdistill.errors import ConfigError

__all__ = ["LMRunConfig", "TASK", "is_lm_config", "load_lm_config", "parse_lm_config"]

TASK = "causal_lm"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LMCacheConfig(_Strict):
    """The teacher's next-token distributions over the training blocks, stored once (`kdistill cache build`)."""

    dir: Optional[str] = Field(None, description="cache folder (default: RUN_DIR/teacher-cache)")
    kind: Literal["topk", "dense"] = Field("topk", description="top-k + tail mass, or every logit")
    k: int = Field(64, ge=1, description="tokens kept per position")
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    batch_size: int = Field(8, ge=1, description="blocks per teacher forward while building")


class LMTeacherConfig(_Strict):
    path: str = Field("smollm2", description="'smollm2' (the packaged SmolLM2-135M-Instruct) or a local folder")
    gguf_file: Optional[str] = Field(None, description="a .gguf file inside `path` (de-quantized to float32)")
    cache: Optional[LMCacheConfig] = Field(None, description="train from stored teacher outputs (no on-policy)")


class LMStudentConfig(_Strict):
    """The student: the teacher's class with a subset of its decoder layers (weights copied)."""

    every: Optional[int] = Field(3, ge=1, description="keep teacher layers 0, every, 2*every, ...")
    layers: Optional[list[int]] = Field(None, description="or: explicit teacher layer indices (set every: null)")
    freeze_embeddings: bool = Field(False, description="keep the (tied) embeddings / output head fixed")

    @model_validator(mode="after")
    def _one_rule(self) -> "LMStudentConfig":
        if (self.every is None) == (self.layers is None):
            raise ValueError("give exactly one of 'every' and 'layers' (set the other to null)")
        return self


class LMDataConfig(_Strict):
    """Text blocks from the Wikipedia articles in gensim's test data, held out by whole article."""

    corpus: Literal["wiki"] = "wiki"
    seed: int = 0
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="fraction of articles held out")
    block_size: int = Field(128, ge=8, description="tokens per block")
    max_train_blocks: Optional[int] = Field(None, ge=1, description="keep the first N training blocks (after a "
                                                                    "seeded shuffle)")
    max_heldout_blocks: Optional[int] = Field(None, ge=1, description="held-out blocks used for perplexity")


class OnPolicyConfig(_Strict):
    """GKD: with probability `lambda` per batch the student samples, the live teacher scores."""

    lambda_: float = Field(0.5, ge=0, le=1, alias="lambda")
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the student")
    top_p: float = Field(1.0, gt=0, le=1)
    prompt_tokens: int = Field(64, ge=1, description="the first N tokens of each block are the prompt")

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class LMDistillConfig(_Strict):
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"] = "forward_kl"
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
        return self


class LMEvalConfig(_Strict):
    batch_size: int = Field(8, ge=1, description="blocks per forward for perplexity")


class LMRunConfig(_Strict):
    task: Literal["causal_lm"] = TASK
    seed: int = 0
    teacher: LMTeacherConfig = LMTeacherConfig()
    student: LMStudentConfig = LMStudentConfig()
    data: LMDataConfig = LMDataConfig()
    distill: LMDistillConfig = LMDistillConfig()
    train: TrainConfig = TrainConfig(steps=120, batch_size=4, lr=3e-4, schedule="cosine", warmup_steps=10,
                                     weight_decay=0.0, clip_grad_norm=1.0, log_every=10)
    baseline: bool = Field(True, description="also train the student with next-token CE only, same steps and data")
    eval: LMEvalConfig = LMEvalConfig()

    @model_validator(mode="after")
    def _cache_or_on_policy(self) -> "LMRunConfig":
        if self.teacher.cache is not None and self.distill.on_policy is not None:
            raise ValueError("teacher.cache and distill.on_policy exclude each other: the student's samples need a "
                             "live teacher; remove one")
        return self


def parse_lm_config(data: Any, source: str = "config") -> LMRunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of fields, got {type(data).__name__}",
                          fix="see examples/smollm2.yaml")
    try:
        return LMRunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", fix="give the path of a YAML file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML syntax error: {getattr(err, 'problem', None) or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None


def load_lm_config(path: Union[str, Path]) -> LMRunConfig:
    path = Path(path)
    return parse_lm_config(_read_yaml(path), str(path))


def is_lm_config(path: Union[str, Path]) -> bool:
    """Whether the YAML file at `path` is a causal-LM run (``task: causal_lm``); False when unreadable."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("task") == TASK


def dump_lm_config(cfg: LMRunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
