"""``task: causal_lm``: distil a Hugging Face causal LM (teacher, corpus, cache, KD vs CE arms, perplexities).

The job of a config (`run`), on the shared skeleton (`kdistill.tasks.job`):

1. the run directory is claimed (``config.yaml``; a folder holding another config is refused);
2. teacher and tokenizer: the packaged SmolLM2-135M-Instruct (``path: smollm2``) or a local folder;
3. corpus: whole-article train / held-out split of gensim's Wikipedia articles, cut into token blocks;
4. student: the teacher's class with every ``every``-th decoder layer, weights copied;
5. teacher outputs: with ``teacher.cache`` the top-k cache over the training blocks is built (or reused); else
   the teacher runs live every step;
6. stage ``student``: trained with ``kd_weight * D + ce_weight * CE``; stage ``baseline``: a fresh copy of the same
   initial student trained with next-token CE only (same blocks and order: same engine seed; same steps,
   learning rate and schedule). A finished stage (``<stage>.safetensors``) is loaded, not retrained; an
   interrupted one resumes from its checkpoints;
7. held-out perplexity ``exp(mean next-token NLL)`` of teacher, initial student, CE student and KD student.

The summary (``RUN_DIR/summary.json``, written atomically) holds ``teacher_ppl``, ``student_init_ppl``,
``student_ce_ppl``, ``student_kd_ppl``, ``params_teacher``, ``params_student``, ``tokens_per_s`` (training tokens
per second of the KD arm) and ``steps``; the KD student is exported to ``RUN_DIR/student`` (``save_pretrained``).
A stage loaded from an earlier run keeps that run's training figures (speed, terms, seconds).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from kdistill.errors import ConfigError
from kdistill.llm.config import LMRunConfig
from kdistill.tasks import Task, dump_config, load_resolved
from kdistill.tasks.job import RunDir, run_stage

__all__ = ["TASK", "build_cache", "run", "table"]


def _tokens_per_s(result: Optional[dict], steps: int, tokens_per_step: int) -> Optional[float]:
    """Training tokens per second over the steps this call trained (None when a resumed stage had none left)."""
    if not result:
        return None
    trained = steps - (result.get("resumed_from") or 0)
    return trained * tokens_per_step / result["seconds"] if trained > 0 and result["seconds"] > 0 else None


def _previous_summary(folder: RunDir) -> dict:
    path = folder.file("summary.json")
    try:
        return json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (OSError, ValueError):
        return {}


def run(cfg: LMRunConfig, run_dir: Any = None, *, progress: bool = True, log: Callable[[str], None] = print,
        teacher: Any = None, tokenizer: Any = None, articles: Optional[Sequence[tuple[str, str]]] = None,
        **_options: Any) -> dict[str, Any]:
    """Run the job of `cfg` (see the module docstring); returns the summary (also ``RUN_DIR/summary.json``).

    `teacher`/`tokenizer` replace loading ``cfg.teacher`` and `articles` replaces the Wikipedia corpus (tests and
    the quick benchmark build tiny ones in code). Other options of the CLI (e.g. ``trust_checkpoint``) do not
    apply to this task and are ignored.
    """
    import torch

    if cfg.student.tokenizer is not None or cfg.distill.cross_tokenizer:  # two tokenizers: text views, uld / gold
        from kdistill.tasks.causal_lm_cross import run_cross

        return run_cross(cfg, run_dir, progress=progress, log=log, teacher=teacher, tokenizer=tokenizer,
                         articles=articles, **_options)

    from kdistill.llm.data import block_dataset
    from kdistill.llm.distiller import LMDistiller
    from kdistill.llm.job import (build_student, lm_cache, lm_distiller, load_lm_corpus, load_lm_teacher,
                                  param_count, perplexity)

    folder = RunDir(run_dir, cfg, dump=dump_config, load=load_resolved)
    folder.claim()
    previous = _previous_summary(folder)
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
        source = lm_cache(cfg, teacher, corpus["train"], folder.path, progress=progress, log=log)
        seconds["teacher_cache"] = time.perf_counter() - t0
        cache_info = {"dir": str(source.directory), "key": source.key, "kind": cfg.teacher.cache.kind,
                      "k": cfg.teacher.cache.k, "row_bytes": source.reader.manifest["row_bytes"]}

    stage = dict(seed=cfg.seed + 3, run_dir=folder, progress=progress, log=log)
    student, result = run_stage("student", lm_distiller(cfg, init_student, source, tokenizer), train_data,
                                cfg.train, **stage)
    student = student.eval()
    baseline, baseline_result = None, None
    if cfg.baseline:
        ce_distiller = LMDistiller(build_student(cfg, teacher), None, kd_weight=0.0, ce_weight=1.0,
                                   chunk_size=cfg.distill.chunk_size, tokenizer=tokenizer)
        baseline, baseline_result = run_stage("baseline", ce_distiller, train_data, cfg.train, **stage)
        baseline = baseline.eval()

    from kdistill.tasks.lm_deploy import compress_and_export

    artifacts = compress_and_export(
        cfg, folder, student, lambda m: lm_distiller(cfg, m, source, tokenizer),
        lambda m: LMDistiller(m, None, kd_weight=0.0, ce_weight=1.0, chunk_size=cfg.distill.chunk_size,
                              tokenizer=tokenizer),
        train_data, corpus["train"], heldout, progress=progress, log=log)

    t0 = time.perf_counter()
    student_kd_ppl = perplexity(student, heldout, batch_size=bs)
    student_ce_ppl = perplexity(baseline, heldout, batch_size=bs) if baseline is not None else None
    seconds["eval_final"] = time.perf_counter() - t0

    tokens_per_step = cfg.train.batch_size * cfg.data.block_size
    trained = {"student": result, "baseline": baseline_result}
    old_terms = previous.get("train_terms") or {}
    for name, res in trained.items():  # a stage loaded from an earlier run keeps that run's training figures
        if res is not None:
            seconds[f"{name}_train"] = res["seconds"]
        elif f"{name}_train" in (previous.get("seconds") or {}):
            seconds[f"{name}_train"] = previous["seconds"][f"{name}_train"]
    speed = {name: _tokens_per_s(res, cfg.train.steps, tokens_per_step) if res is not None
             else previous.get("tokens_per_s" if name == "student" else "tokens_per_s_baseline")
             for name, res in trained.items()}
    summary: dict[str, Any] = {
        "teacher_ppl": teacher_ppl,
        "student_init_ppl": student_init_ppl,
        "student_ce_ppl": student_ce_ppl,
        "student_kd_ppl": student_kd_ppl,
        "kd_over_ce_ppl": student_kd_ppl / student_ce_ppl if student_ce_ppl else None,
        "params_teacher": param_count(teacher),
        "params_student": param_count(student),
        "tokens_per_s": speed["student"],
        "tokens_per_s_baseline": speed["baseline"] if cfg.baseline else None,
        "steps": cfg.train.steps,
        "train_tokens": cfg.train.steps * tokens_per_step,
        "heldout_tokens": int(heldout.numel() - len(heldout)),
        "objective": {**dict(zip(("divergence", "kd_weight", "ce_weight"), cfg.distill.token_objective())),
                      "temperature": cfg.distill.temperature,
                      "teacher": "cache" if cache_info else "live",
                      "on_policy": cfg.distill.on_policy.model_dump(by_alias=True) if cfg.distill.on_policy else None},
        "cache": cache_info,
        "corpus": corpus["info"],
        "train_terms": {name: res["terms"] if res is not None else old_terms.get(name)
                        for name, res in trained.items()},
        "stages_loaded": [name for name, res in trained.items() if res is None and (name == "student" or cfg.baseline)],
        "torch_threads": torch.get_num_threads(),
        "seconds": seconds,
    }
    if artifacts:
        from kdistill.tasks.lm_deploy import deployed_rows

        summary["deployed"] = deployed_rows(cfg, folder, teacher, student, artifacts, heldout)
    return save_student(folder, student, tokenizer, summary)


def save_student(folder, student, tokenizer, summary: dict[str, Any]) -> dict[str, Any]:
    """Save the student (and its tokenizer) as a transformers folder ``RUN_DIR/student`` and write the summary;
    returns the summary with ``student_path`` (unchanged without a run directory)."""
    if folder:
        student.save_pretrained(folder.file("student"))
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(folder.file("student"))
        folder.write_summary(summary)
        summary["student_path"] = str(folder.file("student"))
    return summary


def model_rows(rows, metric: str, *, name_width: int, value_width: int, digits: int) -> list[str]:
    """Text table lines: a header, then one ``(name, params, value)`` row each (``-`` for a value not measured)."""
    lines = [f"{'model':<{name_width}} {'params':>12} {metric:>{value_width}}"]
    for name, params, value in rows:
        shown = f"{value:>{value_width}.{digits}f}" if value is not None else f"{'-':>{value_width}}"
        lines.append(f"{name:<{name_width}} {params:>12,} {shown}")
    return lines


def table(summary: dict[str, Any]) -> str:
    """The run's held-out perplexities and sizes as a small text table."""
    if "student_kd_bpc" in summary:  # a cross-tokenizer run
        from kdistill.tasks.causal_lm_cross import table_cross

        return table_cross(summary)
    rows = [("teacher", summary["params_teacher"], summary["teacher_ppl"]),
            ("student, initial (teacher layers)", summary["params_student"], summary["student_init_ppl"]),
            ("student, next-token CE", summary["params_student"], summary["student_ce_ppl"]),
            ("student, KD", summary["params_student"], summary["student_kd_ppl"])]
    lines = model_rows(rows, "held-out ppl", name_width=36, value_width=13, digits=2)
    if summary.get("kd_over_ce_ppl") is not None:
        lines.append(f"KD / CE perplexity ratio: {summary['kd_over_ce_ppl']:.3f} after {summary['steps']} steps "
                     f"({summary['train_tokens']:,} training tokens)")
    if summary.get("tokens_per_s") is not None:
        lines.append(f"KD arm: {summary['tokens_per_s']:.0f} training tokens/s")
    from kdistill.report import with_deployed

    return "\n".join(lines) + with_deployed(summary)


def build_cache(cfg: LMRunConfig, run_dir: Any, *, rebuild: bool = False, progress: bool = True,
                log: Callable[[str], None] = print, **_options: Any):
    """`kdistill cache build` for an LM config: the teacher's top-k cache over the configured training blocks."""
    from kdistill.llm.job import lm_cache, load_lm_corpus, load_lm_teacher

    if cfg.teacher.cache is None:
        raise ConfigError("the config has no teacher.cache", where="teacher.cache",
                          fix="add e.g. 'cache: {kind: topk, k: 64}' under teacher")
    if cfg.student.tokenizer is not None or cfg.distill.cross_tokenizer:
        raise ConfigError("a cross-tokenizer run builds its teacher cache (top-k per aligned span) at its start",
                          where="teacher.cache", fix="run the config: kdistill run CONFIG --out RUN_DIR")
    teacher, tokenizer = load_lm_teacher(cfg)
    corpus = load_lm_corpus(cfg, tokenizer)
    return lm_cache(cfg, teacher, corpus["train"], Path(run_dir), rebuild=rebuild, progress=progress, log=log)


TASK = Task("causal_lm", LMRunConfig, run, table, build_cache)
