"""Training settings of one stage (`TrainConfig`): stands alone, shared by every task, scheme and the engine."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from kdistill.configbase import Strict

__all__ = ["TRACKERS", "TrainConfig", "check_threads", "check_trackers"]

ThreadsSetting = Union[Literal["auto"], int]
TRACKERS = ("tensorboard", "wandb", "mlflow")  # Accelerate's trackers kdistill logs to (`train.log_with`)


def check_trackers(value) -> list:
    """A ``log_with`` setting as a list of installed tracker names ('tensorboard' alone is a one-item list); an
    unknown or not installed tracker is a ValueError naming the package to install."""
    from importlib.util import find_spec

    names = [value] if isinstance(value, str) else list(value or [])
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker {name!r}; allowed: {', '.join(TRACKERS)}")
        if find_spec(name) is None:
            raise ValueError(f"tracker {name!r} is not installed; pip install {name}, or remove it from log_with")
    return list(dict.fromkeys(names))


def check_threads(value):
    """A thread-count setting: 'auto' or a number >= 1 (bools and numeric strings are refused)."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"got {value!r}; allowed: 'auto' or a number of threads >= 1")


class DistributedConfig(Strict):
    """How a multi-process launch (`accelerate launch`, `torchrun`) splits the work (docs/distributed.md).

    ``ddp`` (the default without this section): every process holds the whole student and teacher, gradients are
    averaged. ``fsdp2``: the student's parameters, gradients and optimizer state are sharded across the processes
    (PyTorch FSDP2 through Accelerate, one unit per layer), and the frozen teacher too with `shard_teacher`."""

    kind: Literal["ddp", "fsdp2"] = "ddp"
    shard_teacher: bool = Field(True, description="fsdp2: shard the frozen teacher like the student; false keeps a "
                                "whole copy on each process's device (a cached teacher has nothing to shard)")
    mixed_precision: Literal["no", "bf16"] = Field("no", description="fsdp2: bf16 compute, float32 weights, "
                                                   "optimizer state and gradient reduction")
    activation_checkpointing: bool = Field(False, description="fsdp2: recompute each layer's activations in "
                                           "the backward pass (less memory, about one more forward of compute)")
    reshard_after_forward: bool = Field(True, description="fsdp2: free each layer's gathered weights after its "
                                        "forward (gathered again for the backward); false keeps them (more memory, "
                                        "less communication)")
    layer_classes: Optional[list[str]] = Field(None, description="fsdp2: class names of the modules sharded as "
                                               "one unit each (default: the model's _no_split_modules, e.g. "
                                               "LlamaDecoderLayer)")


class TrainConfig(Strict):
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
    group_by_length: bool = Field(False, description="batches of similar lengths (rows' attention_mask sums): "
                                  "less padding for variable-length text; see kdistill.engine.sampler")
    threads: ThreadsSetting = Field("auto", description="CPU threads of the training steps: 'auto' "
                                                 "measures 1 thread against all cores at the stage start and when "
                                                 "the steps slow down (see kdistill.engine.threads), or a number")
    log_with: list[str] = Field(default_factory=list, description="experiment trackers (Accelerate's) that get the "
                                "scalars of metrics.jsonl, in RUN_DIR/tracking/<stage>: tensorboard, wandb, mlflow")
    distributed: Optional[DistributedConfig] = Field(None, description="multi-process strategy: ddp (default) or "
                                                     "fsdp2 (sharded student and teacher)")

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, value):
        return check_threads(value)

    @field_validator("log_with", mode="before")
    @classmethod
    def _trackers(cls, value):
        return check_trackers(value)

    @model_validator(mode="after")
    def _accum_divides(self) -> "TrainConfig":
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.distributed is not None and self.distributed.kind == "fsdp2":
            clash = [f"{name}: {value}" for name, value in (("mixed_precision", self.mixed_precision),
                                                            ("compile", self.compile),
                                                            ("channels_last", self.channels_last))
                     if value not in ("no", False)]
            if clash:
                raise ValueError(f"distributed.kind fsdp2 cannot be combined with {', '.join(clash)}: use "
                                 "train.distributed.mixed_precision for bf16, and leave compile and channels_last off")
        return self


