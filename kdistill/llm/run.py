"""A causal-LM distillation run (``task: causal_lm`` config): teacher, corpus, cache, KD vs CE arms, perplexities.

Stages of `run_lm_distillation(cfg, run_dir)`:

1. teacher and tokenizer: the packaged SmolLM2-135M-Instruct (``path: smollm2``) or a local folder;
2. corpus: the Wikipedia articles of gensim's test data, split by whole article into train / held-out, cut into
   blocks of ``block_size`` tokens (`kdistill.data.text`);
3. student: the teacher's class with every ``every``-th decoder layer, weights copied (`student_from_teacher`);
4. teacher outputs: with ``teacher.cache`` the top-k cache over the training blocks is built (or reused); else
   the teacher runs live every step;
5. ``student``: the student trained with ``kd_weight * D + ce_weight * CE`` on the one Engine;
6. ``baseline``: a fresh copy of the same initial student trained with next-token CE only: same blocks, same
   order (same Engine seed), same steps, learning rate and schedule;
7. held-out perplexity ``exp(mean next-token NLL)`` of teacher, initial student, CE student and KD student.

The summary (``RUN_DIR/summary.json``) holds ``teacher_ppl``, ``student_init_ppl``, ``student_ce_ppl``,
``student_kd_ppl``, ``params_teacher``, ``params_student``, ``tokens_per_s`` (student training tokens per
second of the KD arm) and ``steps``; the KD student is exported to ``RUN_DIR/student`` (``save_pretrained``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from kdistill.engine import Engine
from kdistill.errors import ConfigError
from kdistill.llm.config import LMRunConfig, dump_lm_config, load_lm_config
from kdistill.llm.data import block_dataset
from kdistill.llm.distiller import LMDistiller, final_hidden_states
from kdistill.llm.head_loss import head_parts, next_token_ce, shift_labels
from kdistill.llm.onpolicy import OnPolicy
from kdistill.llm.student import student_from_teacher

__all__ = ["build_lm_cache_from_config", "lm_summary_table", "load_lm_config", "load_lm_corpus", "load_lm_teacher",
           "perplexity", "run_lm_distillation"]

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
    from kdistill.data.text import lm_blocks, split_by_article, wiki_articles

    articles = list(articles) if articles is not None else wiki_articles()
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


def _param_count(model: nn.Module) -> int:
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


def _build_cache(cfg: LMRunConfig, teacher: nn.Module, train_blocks: torch.Tensor, run_dir: Optional[Path], *,
                 rebuild: bool, progress: bool, log: Callable[[str], None]):
    from kdistill.llm.cache import build_lm_cache

    c = cfg.teacher.cache
    assert c is not None
    return build_lm_cache(teacher, block_dataset(train_blocks, "train-blocks"), _cache_dir(cfg, run_dir),
                          kind=c.kind, k=c.k, temperature=cfg.distill.temperature, dtype=c.dtype,
                          batch_size=c.batch_size, rebuild=rebuild, progress=progress, log=log)


def build_lm_cache_from_config(cfg: LMRunConfig, run_dir: Path, *, rebuild: bool = False, progress: bool = True,
                               log: Callable[[str], None] = print):
    """`kdistill cache build` for an LM config: the teacher's top-k cache over the configured training blocks."""
    if cfg.teacher.cache is None:
        raise ConfigError("the config has no teacher.cache", where="teacher.cache",
                          fix="add e.g. 'cache: {kind: topk, k: 64}' under teacher")
    teacher, tokenizer = load_lm_teacher(cfg)
    corpus = load_lm_corpus(cfg, tokenizer)
    return _build_cache(cfg, teacher, corpus["train"], Path(run_dir), rebuild=rebuild, progress=progress, log=log)


def _distiller(cfg: LMRunConfig, student: nn.Module, teacher: Any, tokenizer: Any) -> LMDistiller:
    d = cfg.distill
    on_policy = None
    if d.on_policy is not None:
        on_policy = OnPolicy(lambda_=d.on_policy.lambda_, max_new_tokens=d.on_policy.max_new_tokens,
                             temperature=d.on_policy.temperature, top_p=d.on_policy.top_p,
                             prompt_tokens=d.on_policy.prompt_tokens, seed=cfg.seed)
    return LMDistiller(student, teacher, kd_weight=d.kd_weight, ce_weight=d.ce_weight, divergence=d.divergence,
                       temperature=d.temperature, beta=d.beta, alpha=d.alpha, chunk_size=d.chunk_size,
                       tokenizer=tokenizer, on_policy=on_policy)


def _tokens_per_s(result: Optional[dict], steps: int, tokens_per_step: int) -> Optional[float]:
    """Training tokens per second over the steps this call trained (None when a resumed stage had none left)."""
    if not result:
        return None
    trained = steps - (result.get("resumed_from") or 0)
    return trained * tokens_per_step / result["seconds"] if trained > 0 and result["seconds"] > 0 else None


def run_lm_distillation(cfg: LMRunConfig, run_dir: Optional[os.PathLike] = None, *, teacher: Optional[nn.Module] = None,
                        tokenizer: Any = None, articles: Optional[Sequence[tuple[str, str]]] = None,
                        progress: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the job of `cfg` (see the module docstring); returns the summary (also ``RUN_DIR/summary.json``).

    `teacher`/`tokenizer` replace loading ``cfg.teacher`` and `articles` replaces the Wikipedia corpus (tests and
    the quick benchmark build tiny ones in code).
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_lm_config(cfg))
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if teacher is None or tokenizer is None:
        teacher, tokenizer = load_lm_teacher(cfg)
    teacher = teacher.eval()
    seconds["load_teacher"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    corpus = load_lm_corpus(cfg, tokenizer, articles)
    seconds["corpus"] = time.perf_counter() - t0
    log(f"[llm] corpus: {corpus['info']}")
    train_data = block_dataset(corpus["train"], "train-blocks")
    heldout = corpus["heldout"]
    bs = cfg.eval.batch_size

    t0 = time.perf_counter()
    teacher_ppl = perplexity(teacher, heldout, batch_size=bs)
    init_student = build_student(cfg, teacher)
    student_init_ppl = perplexity(init_student, heldout, batch_size=bs)
    seconds["eval_initial"] = time.perf_counter() - t0
    log(f"[llm] held-out perplexity: teacher {teacher_ppl:.2f}, initial student {student_init_ppl:.2f}")

    source: Any = teacher
    cache_info = None
    if cfg.teacher.cache is not None:
        t0 = time.perf_counter()
        source = _build_cache(cfg, teacher, corpus["train"], run_dir, rebuild=False, progress=progress, log=log)
        seconds["teacher_cache"] = time.perf_counter() - t0
        cache_info = {"dir": str(source.directory), "key": source.key, "kind": cfg.teacher.cache.kind,
                      "k": cfg.teacher.cache.k, "row_bytes": source.reader.manifest["row_bytes"]}

    tokens_per_step = cfg.train.batch_size * cfg.data.block_size
    kd_distiller = _distiller(cfg, init_student, source, tokenizer)
    result = Engine(cfg.train, run_dir, stage="student", seed=cfg.seed + 3, progress=progress,
                    log=log).fit(kd_distiller, train_data)
    seconds["student_train"] = result["seconds"]
    student = kd_distiller.export_student().eval()

    baseline = None
    baseline_result = None
    if cfg.baseline:
        ce_distiller = LMDistiller(build_student(cfg, teacher), None, kd_weight=0.0, ce_weight=1.0,
                                   chunk_size=cfg.distill.chunk_size, tokenizer=tokenizer)
        baseline_result = Engine(cfg.train, run_dir, stage="baseline", seed=cfg.seed + 3, progress=progress,
                                 log=log).fit(ce_distiller, train_data)
        seconds["baseline_train"] = baseline_result["seconds"]
        baseline = ce_distiller.export_student().eval()

    t0 = time.perf_counter()
    student_kd_ppl = perplexity(student, heldout, batch_size=bs)
    student_ce_ppl = perplexity(baseline, heldout, batch_size=bs) if baseline is not None else None
    seconds["eval_final"] = time.perf_counter() - t0

    summary: dict[str, Any] = {
        "teacher_ppl": teacher_ppl,
        "student_init_ppl": student_init_ppl,
        "student_ce_ppl": student_ce_ppl,
        "student_kd_ppl": student_kd_ppl,
        "kd_over_ce_ppl": student_kd_ppl / student_ce_ppl if student_ce_ppl else None,
        "params_teacher": _param_count(teacher),
        "params_student": _param_count(student),
        "tokens_per_s": _tokens_per_s(result, cfg.train.steps, tokens_per_step),
        "tokens_per_s_baseline": _tokens_per_s(baseline_result, cfg.train.steps, tokens_per_step),
        "steps": cfg.train.steps,
        "train_tokens": cfg.train.steps * tokens_per_step,
        "heldout_tokens": int(heldout.numel() - len(heldout)),
        "objective": {"divergence": cfg.distill.divergence, "temperature": cfg.distill.temperature,
                      "kd_weight": cfg.distill.kd_weight, "ce_weight": cfg.distill.ce_weight,
                      "teacher": "cache" if cache_info else "live",
                      "on_policy": cfg.distill.on_policy.model_dump(by_alias=True) if cfg.distill.on_policy else None},
        "cache": cache_info,
        "corpus": corpus["info"],
        "train_terms": {"student": result["terms"], "baseline": baseline_result["terms"] if baseline_result else None},
        "torch_threads": torch.get_num_threads(),
        "seconds": seconds,
    }
    if run_dir is not None:
        student.save_pretrained(run_dir / "student")
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(run_dir / "student")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        summary["student_path"] = str(run_dir / "student")
    return summary


def lm_summary_table(summary: dict[str, Any]) -> str:
    """The run's held-out perplexities and sizes as a small text table."""
    rows = [("teacher", summary["params_teacher"], summary["teacher_ppl"]),
            ("student, initial (teacher layers)", summary["params_student"], summary["student_init_ppl"]),
            ("student, next-token CE", summary["params_student"], summary["student_ce_ppl"]),
            ("student, KD", summary["params_student"], summary["student_kd_ppl"])]
    lines = [f"{'model':<36} {'params':>12} {'held-out ppl':>13}"]
    for name, params, ppl in rows:
        lines.append(f"{name:<36} {params:>12,} {ppl:>13.2f}" if ppl is not None else
                     f"{name:<36} {params:>12,} {'-':>13}")
    if summary.get("kd_over_ce_ppl") is not None:
        lines.append(f"KD / CE perplexity ratio: {summary['kd_over_ce_ppl']:.3f} after {summary['steps']} steps "
                     f"({summary['train_tokens']:,} training tokens)")
    if summary.get("tokens_per_s") is not None:
        lines.append(f"KD arm: {summary['tokens_per_s']:.0f} training tokens/s")
    return "\n".join(lines)
