"""The causal-LM pieces of a ``task: causal_lm`` job (the job itself is `kdistill.tasks.causal_lm`).

* `load_lm_teacher`: the packaged SmolLM2-135M-Instruct (``path: smollm2``) or a local folder, never downloaded;
* `load_lm_corpus`: the Wikipedia articles of gensim's test data, split by whole article into train / held-out,
  cut into blocks of ``block_size`` tokens (`kdistill.data.text`);
* `build_student`: the teacher's class with every ``every``-th decoder layer, weights copied;
* `lm_cache`: the teacher's top-k cache over the training blocks (built once, reused);
* `lm_distiller`: the `LMDistiller` of ``cfg.distill``;
* `perplexity`: held-out ``exp(mean next-token NLL)``, chunked from hidden states.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from kdistill.errors import ConfigError
from kdistill.llm.config import LMRunConfig
from kdistill.llm.data import block_dataset
from kdistill.llm.distiller import LMDistiller
from kdistill.llm.heads import final_hidden_states, head_parts
from kdistill.llm.onpolicy import OnPolicy
from kdistill.llm.student import student_from_teacher
from kdistill.losses.lm import next_token_ce, shift_labels

__all__ = ["build_student", "lm_cache", "lm_distiller", "load_lm_corpus", "load_lm_teacher", "param_count",
           "perplexity"]

CACHE_DIR = "teacher-cache"


def load_lm_teacher(cfg: LMRunConfig) -> tuple[nn.Module, Any]:
    """(teacher model, tokenizer) of ``cfg.teacher``: the packaged SmolLM2 or a local folder; never downloads."""
    from kdistill.llm.hf import load_causal_lm, load_smollm2, load_tokenizer

    if cfg.teacher.path == "smollm2":
        return load_smollm2()
    return (load_causal_lm(cfg.teacher.path, gguf_file=cfg.teacher.gguf_file),
            load_tokenizer(cfg.teacher.path, gguf_file=cfg.teacher.gguf_file))


def load_lm_corpus(cfg: LMRunConfig, tokenizer: Any,
                   articles: Optional[Sequence[tuple[str, str]]] = None) -> dict[str, Any]:
    """``{"train": (N, T) blocks, "heldout": (M, T) blocks, "info": {...}}`` from whole-article splits.

    Training blocks are shuffled with ``data.seed`` before ``max_train_blocks`` keeps the first ones, so a short
    run still sees many articles; held-out blocks likewise before ``max_heldout_blocks``.
    """
    from kdistill.data.text import lm_blocks, split_by_article
    from kdistill.data.user import corpus_documents

    articles = list(articles) if articles is not None else corpus_documents(cfg.data.corpus)
    train_articles, heldout_articles = split_by_article(articles, cfg.data.heldout_fraction, cfg.data.seed)
    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(cfg.data.seed)
    for name, part, cap in (("train", train_articles, cfg.data.max_train_blocks),
                            ("heldout", heldout_articles, cfg.data.max_heldout_blocks)):
        blocks = lm_blocks(part, tokenizer, cfg.data.block_size)
        total = len(blocks)
        blocks = blocks[torch.randperm(total, generator=gen)]
        out[name] = blocks[:cap] if cap else blocks
        out[f"{name}_blocks_available"] = total
    out["info"] = {"articles": len(articles), "train_articles": len(train_articles),
                   "heldout_articles": len(heldout_articles), "block_size": cfg.data.block_size,
                   "train_blocks": len(out["train"]), "heldout_blocks": len(out["heldout"]),
                   "train_blocks_available": out.pop("train_blocks_available"),
                   "heldout_blocks_available": out.pop("heldout_blocks_available")}
    return out


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, *, batch_size: int = 8, chunk_size: int = 256) -> float:
    """``exp`` of the mean next-token negative log-likelihood over the blocks (every token after the first)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    head = head_parts(model)
    try:
        for start in range(0, len(blocks), batch_size):
            ids = blocks[start:start + batch_size].to(head["weight"].device)
            hidden = final_hidden_states(model, {"input_ids": ids})
            shifted = shift_labels(ids)
            n = int((shifted != -100).sum())
            mean = next_token_ce(hidden, head["weight"], head["bias"], shifted, chunk_size=chunk_size,
                                 logit_scale=head["scale"], softcap=head["softcap"])
            total += float(mean) * n
            count += n
    finally:
        model.train(was)
    return math.exp(total / max(count, 1))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once by parameters()


def build_student(cfg: LMRunConfig, teacher: nn.Module) -> nn.Module:
    student = student_from_teacher(teacher, every=cfg.student.every, layers=cfg.student.layers)
    if cfg.student.freeze_embeddings:
        for module in (student.get_input_embeddings(), student.get_output_embeddings()):
            if module is not None:
                for p in module.parameters():
                    p.requires_grad_(False)
    return student.train()


def _cache_dir(cfg: LMRunConfig, run_dir: Optional[Path]) -> Path:
    if cfg.teacher.cache is not None and cfg.teacher.cache.dir:
        return Path(cfg.teacher.cache.dir)
    if run_dir is None:
        raise ConfigError("teacher.cache has no dir and the run has no run directory", where="teacher.cache.dir",
                          fix="set teacher.cache.dir or give the run an --out directory")
    return Path(run_dir) / CACHE_DIR


def lm_cache(cfg: LMRunConfig, teacher: nn.Module, train_blocks: torch.Tensor, run_dir: Optional[Path], *,
             rebuild: bool = False, progress: bool = True, log: Callable[[str], None] = print):
    """The teacher's ``teacher.cache`` over the training blocks (a stale one is refused unless `rebuild`)."""
    from kdistill.llm.cache import build_lm_cache

    c = cfg.teacher.cache
    assert c is not None
    return build_lm_cache(teacher, block_dataset(train_blocks, "train-blocks"), _cache_dir(cfg, run_dir),
                          kind=c.kind, k=c.k, temperature=cfg.distill.temperature, dtype=c.dtype,
                          batch_size=c.batch_size, rebuild=rebuild, progress=progress, log=log)


def lm_distiller(cfg: LMRunConfig, student: nn.Module, teacher: Any, tokenizer: Any) -> LMDistiller:
    """The `LMDistiller` of ``cfg.distill`` (teacher: a model, a cache, or None for CE only)."""
    d = cfg.distill
    on_policy = None
    if d.on_policy is not None:
        on_policy = OnPolicy(lambda_=d.on_policy.lambda_, max_new_tokens=d.on_policy.max_new_tokens,
                             temperature=d.on_policy.temperature, top_p=d.on_policy.top_p,
                             prompt_tokens=d.on_policy.prompt_tokens, seed=cfg.seed)
    divergence, kd_weight, ce_weight = d.token_objective()
    return LMDistiller(student, teacher, kd_weight=kd_weight, ce_weight=ce_weight, divergence=divergence,
                       temperature=d.temperature, beta=d.beta, alpha=d.alpha, chunk_size=d.chunk_size,
                       tokenizer=tokenizer, on_policy=on_policy)
