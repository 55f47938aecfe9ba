"""The ``search:`` section of a config (`kdistill search`) and the constraint syntax.

```yaml
search:
  space:                                   # dotted config paths (as for --set) -> a range or a list of choices
    distill.temperature: {low: 1, high: 8, log: true}
    distill.alpha: {low: 0.1, high: 0.95}
    student.kwargs.hidden: {choices: [[16], [32], [64, 32]]}
    compress.prune.target: {low: 0.2, high: 0.8}   # a list section by kind (the first prune step) or by index
    train.steps: {low: 100, high: 400, step: 100, int: true}
  objectives: [top1, latency_ms]           # top1 up; latency_ms / bytes / params down
  constraints: ["latency_ms<=2"]           # hard limits, measured on the deployment runtime
```
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from kdistill.configbase import Strict

__all__ = ["DIRECTIONS", "Constraint", "ParamSpec", "SearchConfig", "parse_constraint"]

# the metrics a trial reports and the direction each objective takes
DIRECTIONS = {"top1": "maximize", "latency_ms": "minimize", "bytes": "minimize", "params": "minimize"}
DEPLOY_METRICS = ("latency_ms", "bytes")  # measured on the exported model (ONNX on onnxruntime)
_CONSTRAINT = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


class ParamSpec(Strict):
    """One searched value: a range (``low``, ``high``, optional ``log``, ``step``, ``int``) or ``choices``."""

    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = Field(False, description="sample on a log scale (low > 0)")
    step: Optional[float] = Field(None, gt=0, description="sample on a grid low, low + step, ... (not with log)")
    int: bool = Field(False, description="integer values")
    choices: Optional[list[Any]] = Field(None, min_length=1, description="the values to choose from (any YAML "
                                                                         "value: numbers, strings, lists, mappings)")

    @model_validator(mode="after")
    def _one_kind(self) -> "ParamSpec":
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high (a range) or choices (a list)")
        if self.low > self.high:
            raise ValueError(f"low {self.low:g} > high {self.high:g}; swap them")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("log and step exclude each other; remove one")
        if self.int and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("int: true needs whole-number low and high")
        return self

    def sample_value(self) -> Any:
        """A value of the space (its low end / first choice): used to check the path before any trial runs."""
        if self.choices is not None:
            return self.choices[0]
        return int(self.low) if self.int else self.low


class Constraint(Strict):
    """``metric <= bound`` (or ``>=``): a trial that breaks it is infeasible and never chosen as best."""

    metric: str
    op: Literal["<=", ">="]
    bound: float

    def violation(self, value: float) -> float:
        """Optuna's constraint value: <= 0 when satisfied."""
        return value - self.bound if self.op == "<=" else self.bound - value

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.bound:g}"


def parse_constraint(text: str, where: str = "--constraint") -> Constraint:
    """``latency_ms<=2`` -> Constraint; a ValueError (one line) for anything else."""
    match = _CONSTRAINT.match(str(text))
    if not match:
        raise ValueError(f"{where} {text!r}: expected METRIC<=NUMBER or METRIC>=NUMBER, e.g. latency_ms<=2")
    metric, op, number = match.groups()
    if metric not in DIRECTIONS:
        raise ValueError(f"{where} {text!r}: unknown metric {metric!r}; allowed: {', '.join(DIRECTIONS)}")
    try:
        bound = float(number)
    except ValueError:
        raise ValueError(f"{where} {text!r}: {number!r} is not a number") from None
    return Constraint(metric=metric, op=op, bound=bound)


class SearchConfig(Strict):
    """What `kdistill search` varies, what it optimizes and what it must respect."""

    space: dict[str, ParamSpec] = Field(..., min_length=1, description="dotted config path -> range or choices")
    objectives: list[str] = Field(["top1"], min_length=1, description="top1 (maximized; the deployed model's "
                                  "accuracy), and optionally latency_ms / bytes / params (minimized)")
    constraints: list[str] = Field(default_factory=list, description="hard limits, e.g. latency_ms<=2, bytes<=200000")
    study_name: str = Field("kdistill", description="the study's name in the storage")
    seed: int = Field(0, description="the sampler's seed (worker k uses seed + k + the trials already held)")
    threads: int = Field(1, ge=1, description="CPU threads of the trials' latency measurement (eval.threads)")
    share_teacher: bool = Field(True, description="train the teacher once (DIR/teacher) and give every trial its "
                                "weights (not possible when the space changes the teacher, the data or the seed)")
    max_failures: Optional[int] = Field(None, ge=1, description="stop after this many failed trials (default: the "
                                        "number of trials)")

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in DIRECTIONS:
                raise ValueError(f"unknown objective {name!r}; allowed: {', '.join(DIRECTIONS)}")
        if len(set(value)) != len(value):
            raise ValueError("an objective is listed twice")
        return value

    @field_validator("constraints")
    @classmethod
    def _constraints(cls, value: list[str]) -> list[str]:
        for text in value:
            parse_constraint(text, "constraint")
        return value

    @field_validator("space")
    @classmethod
    def _paths(cls, value: dict) -> dict:
        for path in value:
            if not path or any(not part for part in path.split(".")):
                raise ValueError(f"{path!r} is not a dotted config path (e.g. distill.temperature)")
            if path.split(".")[0] == "search":
                raise ValueError(f"{path!r}: the search section itself cannot be searched")
        return value

    def directions(self) -> list[str]:
        return [DIRECTIONS[name] for name in self.objectives]
