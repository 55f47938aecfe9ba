"""Compress and deploy for ``task: sentence_embedding``: the ``compress:`` stages and ``export:`` of the distilled
encoder (`kdistill.compress.stages`) and the summary's ``deployed`` rows.

A model's inputs are tokenized batches ``{"input_ids", "attention_mask"}``; its output is the sentence embedding
(`kdistill.encoders.models.SentenceEncoder`), so the ONNX file maps token ids to embeddings. The quality column
is the Spearman correlation of pairwise cosine similarities with the teacher's on the held-out sentences (as in
the run's own table), computed from each artifact's own embeddings on its own runtime. Recovery after a compress
step trains on the cached teacher embeddings with the run's terms; ``objective: ce`` has no labels to use here and
is refused.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from kdistill.errors import ConfigError

__all__ = ["compress_and_export", "deployed_rows", "ort_encode"]


def _batches(texts, tokenizer, max_length: int, size: int, n: int) -> list:
    from kdistill.encoders.data import tokenize

    return [tokenize(texts[i * size:(i + 1) * size], tokenizer, max_length)
            for i in range(min(n, max(1, len(texts) // size)))]


def compress_and_export(cfg, run, student: nn.Module, distiller_for: Callable[[nn.Module], Any], data,
                        train_texts, heldout_texts, tokenizer, *, progress: bool, log) -> list:
    """The run's compress steps and export on `student`; `distiller_for(model)` is the recovery objective."""
    if not cfg.compress and cfg.export is None:
        return []
    from kdistill.compress.stages import CompressContext
    from kdistill.compress.stages import compress_and_export as run_all

    def objective(model: nn.Module, kind: str):
        if kind == "ce":
            raise ConfigError("compress: recovery.objective 'ce' needs labels; a sentence_embedding run has none",
                              where="compress", fix="use recovery.objective: kd (the default)")
        return distiller_for(model), data

    max_length = cfg.data.max_length
    ctx = CompressContext(run, student, _batches(heldout_texts, tokenizer, max_length, 4, 1)[0], objective,
                          cfg.train, cfg.seed + 5,
                          lambda n: _batches(train_texts, tokenizer, max_length, 32, n),
                          lambda n: _batches(heldout_texts, tokenizer, max_length, 32, n),
                          progress=progress, log=log)
    return run_all(cfg.compress, cfg.export, ctx)


@torch.no_grad()
def ort_encode(model, texts, tokenizer, *, max_length: int, batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings ``(N, D)`` of `texts` from any model mapping a tokenized batch to embeddings (an
    `kdistill.compress.export.OrtModel` of an exported encoder, or the torch encoder itself)."""
    from kdistill.encoders.data import tokenize

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        emb = model(tokenize([texts[i] for i in idx], tokenizer, max_length)).float()
        for row, i in enumerate(idx):
            out[i] = emb[row]
    return torch.stack(out)


def deployed_rows(cfg, run, teacher: nn.Module, student: nn.Module, artifacts: list, heldout_texts, tokenizer,
                  teacher_heldout: torch.Tensor, embed: Callable) -> list:
    """One row per artifact (teacher and student in torch, each compressed / exported model): Spearman against the
    teacher on held-out sentences, bytes on disk, latency at batch 1 and 32 and throughput, timed interleaved."""
    from kdistill.encoders.data import tokenize
    from kdistill.encoders.evaluate import similarity_spearman
    from kdistill.evaluate.cost import weight_bytes
    from kdistill.evaluate.deploy import deployed_row, deployed_timing

    models = {"teacher": teacher, "student": student, **{a.name: a.model for a in artifacts}}
    runtimes = {"teacher": "torch", "student": "torch", **{a.name: a.runtime for a in artifacts}}
    files = {"student": run.file("student.safetensors"), **{a.name: a.file for a in artifacts}}
    max_length = cfg.data.max_length
    b1 = tokenize(heldout_texts[:1], tokenizer, max_length)
    b32 = tokenize(heldout_texts[:32], tokenizer, max_length)
    timing = deployed_timing(models, b1, b32, threads=cfg.eval.threads if hasattr(cfg.eval, "threads") else "auto",
                             repeats=cfg.eval.latency_repeats)
    rows = []
    for name, model in models.items():
        if name == "teacher":
            metric = {"spearman": 1.0}
        elif runtimes[name] == "torch":
            metric = {"spearman": similarity_spearman(embed(model, heldout_texts), teacher_heldout)}
        else:
            emb = ort_encode(model, heldout_texts, tokenizer, max_length=max_length, batch_size=cfg.eval.batch_size)
            metric = {"spearman": similarity_spearman(emb, teacher_heldout)}
        file = files.get(name)
        row = deployed_row(name, runtime=runtimes[name], file=file if file is not None and file.is_file() else None,
                           metric=metric, agreement=None, timing=timing)
        if row.get("bytes") is None and runtimes[name] == "torch":
            row["bytes"] = weight_bytes(model)
        rows.append(row)
    return rows
