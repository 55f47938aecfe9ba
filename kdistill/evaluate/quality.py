"""Quality metrics: accuracy, agreement with the teacher, expected calibration error, retention."""

from __future__ import annotations

import torch
from torch import nn

from kdistill.outputs import call_model, logits_of


@torch.no_grad()
def predict_logits(model: nn.Module, data, batch_size: int = 1024, device=None) -> torch.Tensor:
    """Logits of `model` on every row of an ArrayDataset, in order (eval mode, restored afterwards)."""
    was = model.training
    model.eval()
    device = device or next(model.parameters()).device
    outs = []
    n = len(data)
    for start in range(0, n, batch_size):
        batch = data.batch(torch.arange(start, min(n, start + batch_size)))
        x = batch["x"].to(device)
        outs.append(logits_of(call_model(model, x)).float().cpu())
    model.train(was)
    return torch.cat(outs)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Fraction of inputs where student and teacher give the same top-1 class."""
    return float((student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean())


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width confidence bins."""
    probs = logits.float().softmax(-1)
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.float().mean() * (correct[in_bin].mean() - conf[in_bin].mean()).abs()
    return float(ece)


def calibration_bins(logits: torch.Tensor, labels: torch.Tensor, bins: int) -> dict:
    """Per equal-width confidence bin (the bins of `expected_calibration_error`): count, mean confidence,
    accuracy."""
    probs = logits.float().softmax(-1)
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    out = {"count": [], "confidence": [], "accuracy": []}
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        n = int(in_bin.sum())
        out["count"].append(n)
        out["confidence"].append(float(conf[in_bin].mean()) if n else float("nan"))
        out["accuracy"].append(float(correct[in_bin].mean()) if n else float("nan"))
    return out


def retention(student_accuracy: float, teacher_accuracy: float) -> float:
    return student_accuracy / teacher_accuracy if teacher_accuracy else float("nan")
