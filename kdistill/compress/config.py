"""The ``compress:`` and ``export:`` sections of a run's config, shared by every task.

```yaml
compress:                       # stages run in order after distillation, each on the previous one's model
  - prune: {target: 0.5, of: macs, scope: global, importance: l2, recovery: {steps: 500}}
  - low_rank: {energy: 0.9}
  - quantize: {mode: qat, recovery: {steps: 300, objective: kd}}
export: {format: onnx, int8: [dynamic, static]}
```
Each stage is resumable (``checkpoints/<stage>/``, ``<stage>.safetensors``) and ends with a recovery phase: the
run's own distillation terms from the teacher (``objective: kd``, the default) or the labels alone (``ce``).
"""

from __future__ import annotations

from typing import Iterable, Literal, Optional

from pydantic import Field, field_validator, model_serializer, model_validator

from kdistill.configbase import Strict

__all__ = ["CompressStep", "ExportConfig", "LowRankConfig", "PruneConfig", "QuantizeConfig", "RecoveryConfig",
           "check_steps", "stage_names"]


class RecoveryConfig(Strict):
    """Training after a compression step. Fields not set are the run's ``train`` settings."""

    steps: int = Field(500, ge=0, description="optimizer steps of the recovery (0: none)")
    objective: Literal["kd", "ce"] = Field("kd", description="kd: the run's distillation terms from the teacher; "
                                                            "ce: the labels alone (the no-teacher comparison)")
    lr: Optional[float] = Field(None, gt=0, description="default: the run's train.lr / 10")
    batch_size: Optional[int] = Field(None, ge=1)
    schedule: Optional[Literal["constant", "cosine", "linear", "onecycle"]] = "cosine"


def _open_unit(value: float, name: str) -> float:
    if not 0 < value < 1:
        raise ValueError(f"{name} {value} must lie strictly between 0 and 1 (the fraction removed), e.g. 0.5")
    return value


class PruneConfig(Strict):
    """Structured channel pruning (torch-pruning, DepGraph): whole channels removed, a smaller plain model."""

    target: float = Field(0.5, description="fraction of the MACs (or parameters) removed, in (0, 1)")
    of: Literal["macs", "params"] = "macs"
    scope: Literal["global", "uniform"] = "global"
    importance: Literal["l2", "l1", "taylor", "random"] = "l2"
    ignore: list[str] = Field(default_factory=list, description="module paths never pruned "
                                                                "(the output layer is never pruned)")
    recovery: RecoveryConfig = RecoveryConfig()

    @field_validator("target")
    @classmethod
    def _target(cls, v):
        return _open_unit(v, "target")


class LowRankConfig(Strict):
    """SVD factorization of Linear layers and 1x1 convolutions: W ~ U_r S_r V_r^T as two smaller layers."""

    rank: Optional[int] = Field(None, ge=1)
    energy: Optional[float] = Field(None, gt=0, le=1, description="keep this fraction of sum(sigma^2)")
    skip: list[str] = Field(default_factory=list, description="module paths never factorized")
    recovery: RecoveryConfig = RecoveryConfig()

    @model_validator(mode="after")
    def _one(self) -> "LowRankConfig":
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give exactly one of rank (e.g. 16) or energy (e.g. 0.9)")
        return self


class QuantizeConfig(Strict):
    """int8: ``qat`` trains with fake-quantized int8 weights and activations against the float teacher (torchao
    fake quantizers), then converts to an int8 ONNX model (onnxruntime static QDQ, calibrated); ``static`` and
    ``dynamic`` are post-training int8 without training (the no-training baselines)."""

    mode: Literal["qat", "static", "dynamic"] = "qat"
    calibration_batches: int = Field(16, ge=1, description="training batches that calibrate static int8")
    recovery: RecoveryConfig = RecoveryConfig()


class CompressStep(Strict):
    """One stage of ``compress:``: exactly one of ``prune``, ``low_rank``, ``quantize``."""

    prune: Optional[PruneConfig] = None
    low_rank: Optional[LowRankConfig] = None
    quantize: Optional[QuantizeConfig] = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v):
        if isinstance(v, str):  # "- prune" = prune with its defaults
            return {v: {}}
        if isinstance(v, dict):
            given = {k: item for k, item in v.items() if item is not None}
            if not given and len(v) == 1:  # "- prune:" (YAML null) = prune with its defaults
                return {k: {} for k in v}
            return given
        return v

    @model_serializer(mode="wrap")
    def _only_the_step(self, handler):
        """Written out as the one step it is (``{prune: {...}}``), not with the other kinds as nulls."""
        return {k: item for k, item in handler(self).items() if item is not None}

    @model_validator(mode="after")
    def _exactly_one(self) -> "CompressStep":
        given = [k for k in ("prune", "low_rank", "quantize") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"each compress step names exactly one of prune, low_rank, quantize (got "
                             f"{', '.join(given) or 'none'}); write one list item per step")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("prune", "low_rank", "quantize") if getattr(self, k) is not None)

    @property
    def settings(self):
        return getattr(self, self.kind)


class ExportConfig(Strict):
    """Export of the final model (the last compress stage's, else the student) for its runtime."""

    format: Literal["onnx"] = "onnx"
    int8: list[Literal["dynamic", "static"]] = Field(default_factory=list,
                                                    description="onnxruntime int8 variants also written")
    calibration_batches: int = Field(16, ge=1, description="training batches that calibrate static int8")
    parity_batches: int = Field(8, ge=1, description="held-out batches comparing the ONNX model with PyTorch")


def stage_names(steps: list[CompressStep]) -> list[str]:
    """Stage names of the compress steps: their kind, numbered from the second of a kind (prune, prune-2)."""
    names, seen = [], {}
    for step in steps:
        seen[step.kind] = seen.get(step.kind, 0) + 1
        names.append(step.kind if seen[step.kind] == 1 else f"{step.kind}-{seen[step.kind]}")
    return names


def check_steps(steps: Iterable[CompressStep]) -> list[CompressStep]:
    """A quantize step makes an int8 model for onnxruntime: nothing can follow it (a config error otherwise)."""
    steps = list(steps)
    for i, step in enumerate(steps[:-1]):
        if step.kind == "quantize":
            raise ValueError(f"step {i + 1} (quantize) must be the last step: it ends in an int8 ONNX "
                             f"model that later steps cannot train; move it to the end")
    return steps
