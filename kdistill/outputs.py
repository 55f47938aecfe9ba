"""Model outputs on the ground floor: calling a model on a batch's inputs and finding its logits."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from kdistill.errors import WiringError

LOGITS = "logits"


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, `.logits` of a Hugging Face output, or the first tuple item."""
    if torch.is_tensor(output):
        return output
    if hasattr(output, "logits") and output.logits is not None:
        return output.logits
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    raise WiringError(f"cannot find logits in a model output of type {type(output).__name__}",
                      fix="return a tensor, a tuple whose first item is the logits, or an object with .logits")


def call_model(model: nn.Module, inputs: Any) -> Any:
    """`model(**inputs)` for a mapping of tensors (Hugging Face style), else `model(inputs)`."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)
