"""The offline teacher of an LM: its next-token distributions over the training blocks, stored once.

A live 135M-parameter teacher costs about as much per step as the student's own forward and backward; its
outputs on fixed training blocks never change, so `build_lm_cache` runs it once and stores, for every block and
position, the top-k token ids, their log-probabilities and the log of the remaining (tail) mass
(`kdistill.teachers` top-k store; about ``k * 4 + 4`` bytes per token with float16 values). Training then reads
the rows of each batch by its ``index`` (`kdistill.teachers.CachedTeacher`) and `LMDistiller` applies the
divergence on the k + 1 buckets (`kdistill.losses.lm.sparse_token_kd_loss`).

The cache is keyed by the teacher's weights, the blocks' content and the storage settings: a cache built for
other blocks, another teacher or another k / temperature is refused (or rebuilt with ``rebuild=True``), and a
killed build continues where it stopped.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from torch import nn

from kdistill.errors import CacheError
from kdistill.llm.distiller import LMTeacher
from kdistill.teachers.cache import CacheSpec, CachedTeacher, build_cache

__all__ = ["build_lm_cache"]


def build_lm_cache(teacher: nn.Module, dataset: Any, directory: os.PathLike, *, kind: str = "topk", k: int = 64,
                   temperature: float = 1.0, dtype: str = "float16", batch_size: int = 8,
                   vocab_rows: Optional[int] = None, rebuild: bool = False, device: Any = "cpu",
                   progress: bool = True, log: Callable[[str], None] = print) -> CachedTeacher:
    """Store the teacher's next-token distributions over `dataset` (an `ArrayDataset` of token blocks).

    Args:
        teacher: the causal-LM teacher (frozen here).
        dataset: the training blocks (`kdistill.llm.block_dataset`); rows are looked up by ``index``.
        directory: the cache folder.
        kind: ``topk`` (top-k + tail mass; the default) or ``dense`` (every logit: ``V * 2`` bytes per token).
        k: tokens kept per position for ``topk``.
        temperature: the softmax temperature of the stored probabilities; the divergence must use the same.
        dtype: storage dtype of the values (``float16``, ``bfloat16``, ``float32``).
        batch_size: blocks per teacher forward while building.
        vocab_rows: keep the first rows of a head padded beyond the tokenizer.
        rebuild: delete a stale cache in `directory` and build anew (default: refuse it, naming what changed).

    Returns:
        the `CachedTeacher` (``batch -> {"logits": SparseDistribution}``) for `LMDistiller`.
    """
    if kind not in ("topk", "dense"):
        raise CacheError(f"unknown cache kind {kind!r}", where="build_lm_cache(kind)", fix="use 'topk' or 'dense'")
    live = LMTeacher(teacher, output="logits", vocab_rows=vocab_rows)
    spec = CacheSpec(kind=kind, k=k, dtype=dtype, temperature=float(temperature), batch_size=batch_size)
    return build_cache(live, dataset, directory, spec, outputs=["logits"], rebuild=rebuild, device=device,
                       progress=progress, log=log)
