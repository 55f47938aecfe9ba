"""Compress and deploy for ``task: causal_lm``: the ``compress:`` stages and ``export:`` of the distilled LM
(`kdistill.compress.stages`) and the summary's ``deployed`` rows.

A model's input is a block of token ids ``(B, T)``; its output the logits ``(B, T, V)``. Quality columns:
held-out perplexity and next-token top-1 agreement with the teacher, each computed from the artifact's own logits
on its own runtime. Recovery after a compress step is the run's token-level KD (``kd``) or next-token CE (``ce``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from kdistill.outputs import logits_of

__all__ = ["compress_and_export", "deployed_rows", "logits_perplexity"]


def compress_and_export(cfg, folder, student: nn.Module, kd_objective: Callable[[nn.Module], Any],
                        ce_objective: Callable[[nn.Module], Any], train_data, train_blocks: torch.Tensor,
                        heldout: torch.Tensor, *, progress: bool, log) -> list:
    """The run's compress steps and export on `student` (recovery: `kd_objective(model)` / `ce_objective(model)`
    on `train_data`); calibration from training blocks, parity on held-out blocks."""
    if not cfg.compress and cfg.export is None:
        return []
    from kdistill.compress.stages import CompressContext
    from kdistill.compress.stages import compress_and_export as run_all

    def objective(model: nn.Module, kind: str):
        return (ce_objective(model) if kind == "ce" else kd_objective(model)), train_data

    def batches(blocks: torch.Tensor, n: int, size: int = 4) -> list:
        return [blocks[i * size:(i + 1) * size] for i in range(min(n, max(1, len(blocks) // size)))]

    ctx = CompressContext(folder, student, heldout[:2], objective, cfg.train, cfg.seed + 5,
                          lambda n: batches(train_blocks, n), lambda n: batches(heldout, n),
                          progress=progress, log=log)
    return run_all(cfg.compress, cfg.export, ctx)


@torch.no_grad()
def _logits(model, blocks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    was = getattr(model, "training", False)
    model.eval()
    try:
        return [logits_of(model(blocks[i:i + batch_size])).float() for i in range(0, len(blocks), batch_size)]
    finally:
        model.train(was)


def logits_perplexity(logits: list[torch.Tensor], blocks: torch.Tensor) -> float:
    """``exp`` of the mean next-token negative log-likelihood of `blocks` under `logits` (batches in order)."""
    total, count, start = 0.0, 0, 0
    for chunk in logits:
        ids = blocks[start:start + len(chunk)]
        start += len(chunk)
        nll = torch.nn.functional.cross_entropy(chunk[:, :-1].reshape(-1, chunk.shape[-1]).double(),
                                                ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / max(count, 1))


def deployed_rows(cfg, folder, teacher: nn.Module, student: nn.Module, artifacts: list,
                  heldout: torch.Tensor) -> list:
    """One row per artifact: perplexity, token agreement with the teacher, bytes, latency at batch 1 and 32."""
    from kdistill.evaluate.cost import weight_bytes
    from kdistill.evaluate.deploy import deployed_row, deployed_timing

    bs = cfg.eval.batch_size
    models = {"teacher": teacher, "student": student, **{a.name: a.model for a in artifacts}}
    runtimes = {"teacher": "torch", "student": "torch", **{a.name: a.runtime for a in artifacts}}
    files = {a.name: a.file for a in artifacts}
    timing = deployed_timing(models, heldout[:1], heldout[:min(32, len(heldout))], threads="auto", repeats=10)
    teacher_logits = _logits(teacher, heldout, bs)
    teacher_top1 = torch.cat([t[:, :-1].argmax(-1).reshape(-1) for t in teacher_logits])
    rows = []
    for name, model in models.items():
        logits = teacher_logits if name == "teacher" else _logits(model, heldout, bs)
        top1 = torch.cat([t[:, :-1].argmax(-1).reshape(-1) for t in logits])
        file = files.get(name)
        row = deployed_row(name, runtime=runtimes[name], file=file if file is not None and file.is_file() else None,
                           metric={"perplexity": logits_perplexity(logits, heldout)},
                           agreement=None if name == "teacher" else float((top1 == teacher_top1).float().mean()),
                           timing=timing)
        if row.get("bytes") is None and runtimes[name] == "torch":
            row["bytes"] = weight_bytes(model)
        rows.append(row)
    return rows
