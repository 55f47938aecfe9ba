"""Models for the reliability tests, built by import path from a config ('tests.reliability_models:...').

`mlp` is the built-in MLP plus fault injection driven by environment variables of the (sub)process:
``KDISTILL_TEST_KILL`` = ``"<role>:<n>[:<SIGNAL>]"`` sends SIGNAL (default SIGKILL) to the process itself
at the n-th training-mode forward of the models of that role (eval-mode forwards such as dry runs, teacher
calls and evaluation are not counted; with grad_accum 1 the n-th forward is the n-th optimizer step of that
role, counted across stages in the process). ``KDISTILL_TEST_NAN_AT`` = ``"<role>:<n>"`` makes the n-th
training forward return NaN logits, ``KDISTILL_TEST_NANGRAD_AT`` (same form) gives finite logits with a NaN
gradient. Without these variables it is exactly `kdistill.models.MLP`.
"""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import torch
from torch import nn

from kdistill.models import MLP

_COUNTS: dict[str, int] = {}


def _fault(env: str, role: str) -> int | None:
    spec = os.environ.get(env, "")
    parts = spec.split(":")
    if len(parts) >= 2 and parts[0] == role:
        return int(parts[1])
    return None


class FaultyMLP(MLP):
    def __init__(self, input_shape, num_classes, hidden=(16,), role="student"):
        super().__init__(input_shape, num_classes, hidden)
        self.role = role

    def forward(self, x):
        if self.training:
            _COUNTS[self.role] = n = _COUNTS.get(self.role, 0) + 1
            if _fault("KDISTILL_TEST_KILL", self.role) == n:
                name = (os.environ["KDISTILL_TEST_KILL"].split(":") + ["SIGKILL"])[2]
                os.kill(os.getpid(), getattr(signal, name))
            if _fault("KDISTILL_TEST_NAN_AT", self.role) == n:
                return super().forward(x) * float("nan")
            if _fault("KDISTILL_TEST_NANGRAD_AT", self.role) == n:
                # value 0, gradient 0 * d sqrt(u)/du at u = 0 = 0 * inf = NaN: a finite loss, a NaN gradient
                w = self[1].weight
                return super().forward(x) + 0 * torch.sqrt(w - w.detach()).sum()
        return super().forward(x)


def mlp(input_shape, num_classes, hidden=(16,), role="student") -> nn.Module:
    return FaultyMLP(input_shape, num_classes, hidden, role)


def reset_counts() -> None:
    _COUNTS.clear()


# -- models with wiring faults ------------------------------------------------------------------------------
def wrong_classes(input_shape, num_classes, hidden=(16,)) -> nn.Module:
    """An MLP with one output fewer than the data has classes."""
    return MLP(input_shape, num_classes - 1, hidden)


def double_mlp(input_shape, num_classes, hidden=(16,)) -> nn.Module:
    """An MLP in float64 (the data is float32)."""
    return MLP(input_shape, num_classes, hidden).double()


def meta_mlp(input_shape, num_classes, hidden=(16,)) -> nn.Module:
    """An MLP whose parameters were never materialized."""
    with torch.device("meta"):
        return MLP(input_shape, num_classes, hidden)


class _Sequence(nn.Module):
    """Expects (B, L, C) sequences: fails on the (B, 1, 8, 8) digits images with a shape error."""

    def __init__(self, num_classes):
        super().__init__()
        self.rnn = nn.GRU(3, 8, batch_first=True)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def sequence_model(input_shape, num_classes) -> nn.Module:
    return _Sequence(num_classes)


class _Vocab(nn.Module):
    def __init__(self, input_shape, num_classes, vocab_size):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.body = MLP(input_shape, num_classes, (8,))

    def forward(self, x):
        return self.body(x)


def vocab_model(input_shape, num_classes, vocab_size=100) -> nn.Module:
    """A model that declares a vocabulary size (as Hugging Face models do in config.vocab_size)."""
    return _Vocab(input_shape, num_classes, vocab_size)
