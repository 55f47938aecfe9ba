"""``task: causal_lm`` with two tokenizers: the student has a tokenizer of its own (``student.tokenizer``) and/or
the objective has cross-tokenizer terms (``uld``, ``gold`` in ``distill.terms``). `kdistill.tasks.causal_lm.run`
hands such configs here; the job skeleton is the same (run directory, stages, resume, atomic summary):

1. teacher and its tokenizer; the student tokenizer (``minilm`` or a folder; unset: the teacher's);
2. corpus: whole-article split, each article cut into windows of ``data.block_size`` student tokens, each window
   a text view (both tokenizations with offsets, aligned: `kdistill.llm.cross_data`);
3. student: a new Llama-style model of ``student.size`` (own tokenizer) or the teacher's layers (same tokenizer);
4. teacher: live, or with ``teacher.cache`` its top-k values per aligned span computed once and stored;
5. stage ``student`` (`CrossTokenizerDistiller` with the configured terms) and stage ``baseline`` (the same
   initial student, next-token CE only, same windows and order);
6. held-out bits per character (the text's NLL in bits / its characters) of teacher, initial, CE and KD students.

Summary: ``teacher_bpc``, ``student_init_bpc``, ``student_ce_bpc``, ``student_kd_bpc``, ``kd_over_ce_bpc``,
``params_*``, ``steps``, ``terms``, ``cross_tokenizer`` (vocabulary sizes, shared tokens), ``corpus``, ``cache``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

from kdistill.llm.config import LMRunConfig
from kdistill.tasks import dump_config, load_resolved
from kdistill.tasks.job import RunDir, run_stage

__all__ = ["run_cross", "table_cross"]


def run_cross(cfg: LMRunConfig, run_dir: Any = None, *, progress: bool = True, log: Callable[[str], None] = print,
              teacher: Any = None, tokenizer: Any = None, articles: Optional[Sequence[tuple[str, str]]] = None,
              student_tokenizer: Any = None, **_options: Any) -> dict[str, Any]:
    """Run a cross-tokenizer config (module docstring); `student_tokenizer` replaces loading ``student.tokenizer``
    (tests), like `teacher`/`tokenizer`/`articles` in `kdistill.tasks.causal_lm.run`."""
    import torch

    from kdistill.llm.cross_distiller import CrossTokenizerDistiller, bits_per_char
    from kdistill.llm.cross_job import (cross_corpus, cross_teacher_source, cross_terms, load_student_tokenizer,
                                        needs_vocab_map, scratch_student)
    from kdistill.llm.cross_tokenizer_align import build_vocab_map
    from kdistill.llm.job import build_student, load_lm_teacher, param_count
    from kdistill.objective import Term

    folder = RunDir(run_dir, cfg, dump=dump_config, load=load_resolved)
    folder.claim()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if teacher is None or tokenizer is None:
        teacher, tokenizer = load_lm_teacher(cfg)
    teacher = teacher.eval()
    if student_tokenizer is None:
        student_tokenizer = load_student_tokenizer(cfg, tokenizer)
    seconds["load"] = time.perf_counter() - t0

    def new_student():
        return scratch_student(cfg, student_tokenizer) if cfg.student.tokenizer is not None else \
            build_student(cfg, teacher)

    init_student = new_student()
    terms = cross_terms(cfg, init_student, student_tokenizer, teacher, tokenizer)
    t0 = time.perf_counter()
    corpus = cross_corpus(cfg, tokenizer, student_tokenizer, articles)
    vocab_map = build_vocab_map(tokenizer, student_tokenizer) if needs_vocab_map(cfg) else None
    seconds["corpus"] = time.perf_counter() - t0
    log(f"[llm] cross-tokenizer corpus: {corpus['info']}")
    heldout, bs = corpus["heldout"], cfg.eval.batch_size

    t0 = time.perf_counter()
    teacher_bpc = bits_per_char(teacher, heldout, side="teacher", batch_size=bs)
    student_init_bpc = bits_per_char(init_student, heldout, batch_size=bs)
    seconds["eval_initial"] = time.perf_counter() - t0
    log(f"[llm] held-out bits per character: teacher {teacher_bpc:.3f}, initial student {student_init_bpc:.3f}")

    t0 = time.perf_counter()
    source, train_data, cache_info = cross_teacher_source(cfg, teacher, corpus["train"], vocab_map, folder.path,
                                                          log=log)
    seconds["teacher_cache"] = time.perf_counter() - t0
    teacher_vocab = int(teacher.config.vocab_size)
    stage = dict(seed=cfg.seed + 3, run_dir=folder, progress=progress, log=log)
    distiller = CrossTokenizerDistiller(init_student, source, terms, teacher_vocab=teacher_vocab,
                                        vocab_map=vocab_map, temperature=cfg.distill.temperature,
                                        teacher_k=cfg.distill.teacher_k)
    student, result = run_stage("student", distiller, train_data, cfg.train, **stage)
    student = student.eval()
    baseline, baseline_result = None, None
    if cfg.baseline:
        ce_only = CrossTokenizerDistiller(new_student(), None, [Term("ce", "ce", 1.0)], teacher_vocab=teacher_vocab)
        baseline, baseline_result = run_stage("baseline", ce_only, train_data, cfg.train, **stage)
        baseline = baseline.eval()

    t0 = time.perf_counter()
    student_kd_bpc = bits_per_char(student, heldout, batch_size=bs)
    student_ce_bpc = bits_per_char(baseline, heldout, batch_size=bs) if baseline is not None else None
    seconds["eval_final"] = time.perf_counter() - t0
    for name, res in (("student", result), ("baseline", baseline_result)):
        if res is not None:
            seconds[f"{name}_train"] = res["seconds"]
    summary: dict[str, Any] = {
        "teacher_bpc": teacher_bpc, "student_init_bpc": student_init_bpc, "student_ce_bpc": student_ce_bpc,
        "student_kd_bpc": student_kd_bpc,
        "kd_over_ce_bpc": student_kd_bpc / student_ce_bpc if student_ce_bpc else None,
        "params_teacher": param_count(teacher), "params_student": param_count(student), "steps": cfg.train.steps,
        "terms": [{"name": t.name, "loss": t.loss, "weight": t.weight, **t.params} for t in terms],
        "cross_tokenizer": {"teacher_vocab": teacher_vocab, "student_vocab": len(student_tokenizer),
                            "shared_tokens": len(vocab_map) if vocab_map is not None else None,
                            "teacher": "cache" if cache_info else "live", "teacher_k": cfg.distill.teacher_k},
        "cache": cache_info or None,
        "corpus": corpus["info"],
        "train_terms": {"student": result["terms"] if result else None,
                        "baseline": baseline_result["terms"] if baseline_result else None},
        "torch_threads": torch.get_num_threads(),
        "seconds": seconds,
    }
    from kdistill.tasks.causal_lm import save_student

    return save_student(folder, student, student_tokenizer, summary)


def table_cross(summary: dict[str, Any]) -> str:
    """The run's held-out bits per character as a small text table."""
    rows = [("teacher (own tokenizer)", summary["params_teacher"], summary["teacher_bpc"]),
            ("student, initial", summary["params_student"], summary["student_init_bpc"]),
            ("student, next-token CE", summary["params_student"], summary["student_ce_bpc"]),
            ("student, cross-tokenizer KD", summary["params_student"], summary["student_kd_bpc"])]
    from kdistill.tasks.causal_lm import model_rows

    lines = model_rows(rows, "held-out bits/char", name_width=30, value_width=19, digits=3)
    if summary.get("kd_over_ce_bpc") is not None:
        lines.append(f"KD / CE bits-per-character ratio: {summary['kd_over_ce_bpc']:.3f} after {summary['steps']} "
                     "steps")
    return "\n".join(lines)
