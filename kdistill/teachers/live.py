"""A live teacher: a frozen model run in eval mode under `torch.inference_mode()` every step.

`FrozenTeacher` is the base every live teacher shares (the classification `LiveTeacher` with taps, the encoder
and causal-LM teachers): the model frozen and kept in eval mode, ``.to(device)``, and the outputs cloned out of
inference mode so that losses can save them for backward.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from kdistill.outputs import LOGITS, call_model, logits_of
from kdistill.taps import Taps


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: a teacher."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class FrozenTeacher:
    """Base of live teachers: subclasses give ``outputs(batch) -> {name: value}`` (run under inference mode)."""

    grad_free = torch.inference_mode

    def __init__(self, model: nn.Module):
        self.model = freeze(model)

    def to(self, device) -> "FrozenTeacher":
        self.model.to(device)
        return self

    def outputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if self.model.training:
            self.model.eval()
        with self.grad_free():
            values = self.outputs(batch)
        # inference tensors cannot be saved for backward: clone into normal tensors (cheap: outputs only)
        return {k: v.clone() if torch.is_tensor(v) and v.is_inference() else v for k, v in values.items()}


class LiveTeacher(FrozenTeacher):
    """A frozen classification teacher with optional taps: ``{"logits": ..., tap: ...}`` per batch."""

    def __init__(self, model: nn.Module, taps: Optional[Mapping[str, str]] = None):
        super().__init__(model)
        self.taps = Taps(self.model, taps or {}) if taps else None

    def outputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        inputs = batch.get("teacher_x", batch["x"])
        if self.taps is None:
            return {LOGITS: logits_of(call_model(self.model, inputs))}
        with self.taps:
            out = call_model(self.model, inputs)
            values = self.taps.pop()
        values[LOGITS] = logits_of(out)
        return values
