"""The run configuration: pydantic models of the YAML file, and the one place that knows field names.

A config is a YAML mapping; `load_config(path)` validates it and raises `ConfigError` with a one-line message
naming the field path, the problem and the allowed values. `dump_config(cfg)` writes the fully resolved config
(every default filled in) so that `kdistill run RUN_DIR/config.yaml` reproduces a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdistill.errors import ConfigError


class _Strict(BaseModel):
    """Unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TransferConfig(_Strict):
    """Extra unlabeled inputs from the same generator, labelled only by the teacher (Bucila et al. 2006)."""

    size: int = Field(0, ge=0, description="number of extra unlabeled inputs (0 = none)")
    seed: int = Field(1, description="generator seed of the transfer set; must differ from the data seed")


class DataConfig(_Strict):
    name: Literal["mnist1d", "digits", "fashion_mnist"] = "mnist1d"
    root: Optional[str] = Field(None, description="folder of the Fashion-MNIST IDX files")
    seed: int = Field(0, description="seed of the dataset generator / split")
    train_size: Optional[int] = Field(None, ge=1, description="keep only the first N training samples")
    transfer: TransferConfig = TransferConfig()


class ModelConfig(_Strict):
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


class TermConfig(_Strict):
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
        from kdistill.distiller import known_losses

        names = known_losses()
        if v not in names:
            raise ValueError(f"unknown loss '{v}'; allowed: {', '.join(sorted(names))}")
        return v


class DistillConfig(_Strict):
    """The objective. Either `terms` (full control) or the Hinton shorthand `alpha`/`temperature`:
    loss = (1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))."""

    alpha: float = Field(0.9, ge=0, le=1, description="weight of the KD term (1 - alpha weighs CE)")
    temperature: float = Field(4.0, gt=0)
    terms: Optional[list[TermConfig]] = None
    taps: dict[str, str] = Field(default_factory=dict, description="extra taps: name -> 'module.path[:selector]'")

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


class TrainConfig(_Strict):
    steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(128, ge=1, description="samples per optimizer step and per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (batch_size must divide)")
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["constant", "cosine", "linear", "onecycle"] = "onecycle"
    warmup_steps: int = Field(0, ge=0)
    clip_grad_norm: Optional[float] = Field(None, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0 = only at the end)")
    log_every: int = Field(50, ge=1, description="host sync and metrics line every N steps")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = Field(2, ge=1)
    deterministic: bool = False
    nonfinite: Literal["skip", "stop"] = "stop"
    num_workers: int = Field(0, ge=0)
    pin_memory: bool = False
    channels_last: bool = False
    compile: bool = False

    @model_validator(mode="after")
    def _accum_divides(self) -> "TrainConfig":
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        return self


class TeacherConfig(ModelConfig):
    """The teacher. With no `weights`, it is first trained on the labelled data with `train`."""

    train: Optional[TrainConfig] = None


class EvalConfig(_Strict):
    latency_repeats: int = Field(50, ge=1)
    throughput_batch: int = Field(256, ge=1)
    ece_bins: int = Field(15, ge=2)


class RunConfig(_Strict):
    seed: int = 0
    data: DataConfig = DataConfig()
    teacher: TeacherConfig
    student: ModelConfig
    distill: DistillConfig = DistillConfig()
    train: TrainConfig = TrainConfig()
    baseline: bool = Field(True, description="also train the student without a teacher, same budget")
    eval: EvalConfig = EvalConfig()


def _field_path(loc: tuple[Union[int, str], ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("function-") or part.endswith("]"):
            continue
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    """One line: the first problem, its field path, and what is allowed."""
    first = err.errors()[0]
    path = _field_path(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    msg = first.get("msg", "invalid value")
    if kind == "extra_forbidden":
        msg = "unknown field; remove it or check its spelling"
    elif kind == "missing":
        msg = "required field is missing"
    elif kind == "literal_error":
        expected = (first.get("ctx") or {}).get("expected", "")
        msg = f"got {first.get('input')!r}; allowed: {expected}"
    elif "input" in first and kind not in ("value_error",):
        msg = f"{msg} (got {first.get('input')!r})"
    msg = msg.replace("Value error, ", "")
    more = len(err.errors()) - 1
    tail = f" (+{more} more problem{'s' if more > 1 else ''})" if more else ""
    return " ".join(f"{source}: {path}: {msg}{tail}".split())


def parse_config(data: Any, source: str = "config") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of fields, got {type(data).__name__}",
                          fix="see examples/*.yaml")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: Union[str, Path]) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", fix="give the path of a YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(err, "problem", None) or "malformed YAML"
        raise ConfigError(f"{path}: YAML syntax error at {where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    return parse_config(data, str(path))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
