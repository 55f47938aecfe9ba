"""``task: sentence_embedding``: sentence-embedding distillation (``examples/minilm.yaml``) on the shared job skeleton.

Stages of a run (`kdistill.tasks.job`: the run directory holds ``config.yaml``, the stages' checkpoints and
weights, ``summary.json`` and the exported student):

1. corpus: training sentences (unlabeled Wikipedia + tweets), held-out sentences, held-out labelled tweets;
   with ``data.augment``, word-replaced copies of the training sentences are added (TinyBERT's augmentation);
2. teacher: its embeddings of all of them, computed once into the shared teacher-output cache
   (``RUN_DIR/teacher-cache/{train,heldout,probe}``, keyed by the teacher's weights and the sentences; see
   `kdistill.encoders.embedding_cache`): the training loop reads the cache (no teacher forward per step) and a
   re-run in the folder reads them back;
3. ``student``: the student (`build_student` from the teacher's config) learns the cached embeddings with the
   configured terms (default: per-sentence cosine + batch similarity matrix);
4. ``scratch``: the same architecture, random init, trained on the same sentences for the same steps without a
   teacher (SimCSE), unless ``scratch.objective: none``;
5. evaluation: Spearman of pairwise cosine similarities (student vs teacher) on held-out sentences; linear-probe
   sentiment accuracy on held-out tweets for teacher, student, scratch and the untrained student; parameters;
   CPU latency (interleaved, one thread count for all);
6. export: ``RUN_DIR/student`` loads with ``SentenceTransformer(path)`` and ``AutoModel.from_pretrained(path)``.

A finished stage (``RUN_DIR/<stage>.safetensors``) is loaded on a re-run, not trained again; an interrupted one
resumes from its newest checkpoint. A folder holding another config is refused.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from kdistill.encoders.config import EncoderRunConfig
from kdistill.tasks import Task, dump_config, load_resolved

__all__ = ["TASK", "build_embedding_student", "summary_table", "terms_from_specs"]


def terms_from_specs(specs) -> list:
    """The `kdistill.objective.Term`s of the config's ``distill.terms``."""
    from kdistill.objective import Term

    return [Term(s.name or s.loss, s.loss, s.weight, params=dict(s.params), warmup_steps=s.warmup_steps,
                 layers=s.layers) for s in specs]


def build_embedding_student(cfg: EncoderRunConfig, teacher, *, from_teacher: bool = True,
                            seed: Optional[int] = None, dropout: Optional[float] = None):
    """The configured student. ``from_teacher=False`` gives the no-teacher baseline's start: the same
    architecture with nothing taken from the teacher's weights (random embeddings). `dropout` overrides the
    configured dropout (SimCSE needs it as its noise)."""
    from kdistill.encoders.student import build_student

    spec = cfg.student
    overrides = {}
    dropout = spec.dropout if dropout is None else dropout
    if dropout is not None:
        overrides = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    return build_student(teacher, num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                         num_heads=spec.num_heads, intermediate_size=spec.intermediate_size,
                         embeddings=spec.embeddings if from_teacher else "random",
                         project_to_teacher=spec.project_to_teacher, seed=cfg.seed + 202 if seed is None else seed,
                         config_overrides=overrides or None)


@contextlib.contextmanager
def _timed(seconds: dict, key: str, log: Callable[[str], None], what: str):
    t0 = time.perf_counter()
    yield
    seconds[key] = time.perf_counter() - t0
    log(f"[encoders] {what}: {seconds[key]:.1f} s")


def _corpus_and_texts(cfg: EncoderRunConfig, tokenizer, teacher, seconds: dict, log) -> tuple[Any, list[str]]:
    """The corpus and the training sentences (with the word-replaced copies of ``data.augment``)."""
    from kdistill.encoders.augment import augment_sentences
    from kdistill.encoders.data import load_sentence_corpus

    d = cfg.data
    with _timed(seconds, "corpus", log, "corpus"):
        corpus = load_sentence_corpus(seed=d.seed, heldout_articles=d.heldout_articles,
                                      heldout_tweets=d.heldout_tweets, max_train=d.max_train,
                                      max_heldout=d.max_heldout, max_probe=d.max_probe)
    log(f"[encoders] corpus: {corpus.info}")
    train_texts = list(corpus.train)
    if d.augment is not None and d.augment.copies:
        aug = d.augment
        with _timed(seconds, "augmentation", log, "augmentation"):
            extra = augment_sentences(corpus.train, tokenizer, teacher.encoder.get_input_embeddings().weight,
                                      copies=aug.copies, p_replace=aug.p_replace, neighbours=aug.neighbours,
                                      seed=aug.seed)
        train_texts += extra
        corpus.info["train_augmented"] = len(extra)
        log(f"[encoders] augmentation: {len(extra)} word-replaced sentences added to {len(corpus.train)}")
    return corpus, train_texts


def _evaluate(cfg: EncoderRunConfig, corpus, models: dict, teacher_heldout, teacher_probe, embed,
              similarities: Optional[Path] = None) -> dict:
    """Per model: parameters, linear-probe accuracy, and (not the teacher) the similarity Spearman. With
    `similarities` (a file path) the teacher's and the student's cosine similarities of the held-out pairs the
    student's Spearman was computed over are saved there (the report's scatter)."""
    from kdistill.encoders.evaluate import linear_probe, similarity_spearman
    from kdistill.evaluate.cost import param_count

    n_fit = max(2, int(round(cfg.eval.probe_train_fraction * len(corpus.probe_texts))))
    labels = corpus.probe_labels
    report: dict[str, Any] = {}
    for name, model in models.items():
        heldout = teacher_heldout if name == "teacher" else embed(model, corpus.heldout)
        probe = teacher_probe if name == "teacher" else embed(model, corpus.probe_texts)
        entry = {"params": param_count(model),
                 "probe": linear_probe(probe[:n_fit], labels[:n_fit], probe[n_fit:], labels[n_fit:], seed=cfg.seed)}
        if name != "teacher":
            entry["spearman"] = similarity_spearman(heldout, teacher_heldout)
        if name == "student" and similarities is not None:
            import torch

            from kdistill.encoders.evaluate import pair_cosines
            from kdistill.evaluate.predictions import save_similarities

            save_similarities(similarities, torch.from_numpy(pair_cosines(teacher_heldout)),
                              torch.from_numpy(pair_cosines(heldout)), seed=cfg.seed)
        report[name] = entry
    return report


def _latency(cfg: EncoderRunConfig, corpus, models: dict, tokenizer) -> dict:
    from kdistill.encoders.evaluate import encode_latency_ms

    latency = {}
    for batch in cfg.eval.latency_batch_sizes:
        ms = encode_latency_ms(models, corpus.heldout, tokenizer, max_length=cfg.data.max_length, batch_size=batch,
                               repeats=cfg.eval.latency_repeats)
        latency[str(batch)] = {"teacher_ms": ms["teacher"], "student_ms": ms["student"],
                               "ratio": ms["student"] / ms["teacher"]}
    return latency


def _previous_terms(run) -> Optional[dict]:
    """The student stage's last logged terms from the folder's earlier summary (same config), if any."""
    path = run.file("summary.json")
    try:
        return json.loads(path.read_text()).get("train_terms") if path is not None and path.is_file() else None
    except (OSError, ValueError):
        return None


def run(cfg: EncoderRunConfig, run_dir=None, *, progress: bool = False, log: Callable[[str], None] = print,
        **options) -> dict[str, Any]:
    """Run the job of `cfg` (module docstring); returns the summary (also written to ``RUN_DIR/summary.json``)."""
    import torch

    from kdistill.encoders.distiller import EncoderDistiller
    from kdistill.encoders.embedding_cache import teacher_embeddings
    from kdistill.encoders.evaluate import encode
    from kdistill.encoders.models import load_sentence_encoder, load_tokenizer
    from kdistill.encoders.data import sentence_dataset
    from kdistill.objective import Term
    from kdistill.tasks.job import RunDir, run_stage

    run = RunDir(run_dir, cfg, dump=dump_config, load=load_resolved)
    run.claim()
    seconds: dict[str, float] = {}
    tokenizer = load_tokenizer(cfg.teacher.path)
    teacher = load_sentence_encoder(cfg.teacher.path)
    max_length, bs = cfg.data.max_length, cfg.eval.batch_size
    corpus, train_texts = _corpus_and_texts(cfg, tokenizer, teacher, seconds, log)

    def embed(model, texts):
        return encode(model, texts, tokenizer, max_length=max_length, batch_size=bs)

    with contextlib.ExitStack() as stack:
        cache_dir = run.file("teacher-cache") or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        n_texts = len(train_texts) + len(corpus.heldout) + len(corpus.probe_texts)
        with _timed(seconds, "teacher_embeddings", log, f"teacher embeddings of {n_texts} sentences"):
            cached, from_cache = teacher_embeddings(
                teacher, {"train": train_texts, "heldout": corpus.heldout, "probe": corpus.probe_texts}, tokenizer,
                cache_dir, max_length=max_length, batch_size=bs, progress=progress, log=log)
            teacher_heldout, teacher_probe = cached["heldout"].table(), cached["probe"].table()
        data = sentence_dataset(train_texts, tokenizer, max_length, name="train-sentences")

        untrained = build_embedding_student(cfg, teacher, from_teacher=False).eval()
        distiller = EncoderDistiller(build_embedding_student(cfg, teacher), cached["train"],
                                     terms_from_specs(cfg.distill.terms))
        previous_terms = _previous_terms(run)
        with _timed(seconds, "student_train", log, "student (distilled)"):
            student, result = run_stage("student", distiller, data, cfg.train, seed=cfg.seed + 3, run_dir=run,
                                        progress=progress, log=log)
        student.eval()
        results = {"student": result}
        models = {"teacher": teacher, "student": student, "untrained": untrained}
        if cfg.scratch.objective == "simcse":
            scratch_model = build_embedding_student(cfg, teacher, from_teacher=False, dropout=cfg.scratch.dropout)
            scratch_distiller = EncoderDistiller(scratch_model, None, [
                Term("simcse", "simcse", params={"temperature": cfg.scratch.temperature})])
            with _timed(seconds, "scratch_train", log, "scratch (SimCSE, no teacher)"):
                scratch, results["scratch"] = run_stage("scratch", scratch_distiller, data, cfg.train,
                                                        seed=cfg.seed + 3, run_dir=run, progress=progress, log=log)
            models["scratch"] = scratch.eval()
        from kdistill.tasks.embedding_deploy import compress_and_export

        artifacts = compress_and_export(
            cfg, run, student, lambda m: EncoderDistiller(m, cached["train"], terms_from_specs(cfg.distill.terms)),
            data, train_texts, corpus.heldout, tokenizer, progress=progress, log=log)

    with _timed(seconds, "evaluation", log, "evaluation"):
        from kdistill.evaluate.predictions import SIMILARITIES_FILE

        report = _evaluate(cfg, corpus, models, teacher_heldout, teacher_probe, embed, run.file(SIMILARITIES_FILE))
    with _timed(seconds, "latency", log, "latency"):
        latency = _latency(cfg, corpus, {"teacher": teacher, "student": student}, tokenizer)

    scratch_report = report.get("scratch")
    summary = {
        "params_teacher": report["teacher"]["params"],
        "params_student": report["student"]["params"],
        "compression": report["teacher"]["params"] / report["student"]["params"],
        "spearman": report["student"]["spearman"],
        "spearman_scratch": scratch_report["spearman"] if scratch_report else None,
        "spearman_untrained": report["untrained"]["spearman"],
        "probe_acc_teacher": report["teacher"]["probe"]["accuracy"],
        "probe_acc_student": report["student"]["probe"]["accuracy"],
        "probe_acc_scratch": scratch_report["probe"]["accuracy"] if scratch_report else None,
        "probe_acc_untrained": report["untrained"]["probe"]["accuracy"],
        "probe_retention": report["student"]["probe"]["accuracy"] / report["teacher"]["probe"]["accuracy"],
        "latency_ratio": latency[str(cfg.eval.latency_batch_sizes[0])]["ratio"],
        "latency": latency,
        "torch_threads": torch.get_num_threads(),
        "teacher_embeddings_cached": from_cache,
        # stage -> the checkpoint step it resumed from (None: from 0; the stage's steps: finished earlier, loaded)
        "resumed_from": {k: r["resumed_from"] if r else cfg.train.steps for k, r in results.items()},
        "stages_loaded": [k for k, r in results.items() if r is None],
        "corpus": corpus.info,
        "train_terms": result["terms"] if result else previous_terms,
        "models": report,
        "seconds": seconds,
    }
    if artifacts:
        from kdistill.tasks.embedding_deploy import deployed_rows

        with _timed(seconds, "deployed", log, "deployed artifacts"):
            summary["deployed"] = deployed_rows(cfg, run, teacher, student, artifacts, corpus.heldout, tokenizer,
                                                teacher_heldout, embed)
    if run:
        student.save(run.file("student"), tokenizer, max_seq_length=max_length)
        run.write_summary(summary)
        summary["student_path"] = str(run.file("student"))
    return summary


def summary_table(summary: dict) -> str:
    """The evaluation table of a summary: parameters, Spearman vs the teacher, probe accuracy, latency."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    def num(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    m, lat = summary["models"], summary["latency"]
    ms = {who: num(lat["1"][f"{who}_ms"], "{:.1f}") if "1" in lat else "-" for who in ("teacher", "student")}
    rows = [("model", "params", "spearman vs teacher", "probe acc", "latency b=1 (ms)"),
            ("teacher", f"{m['teacher']['params'] / 1e6:.2f}M", "1 (itself)", pct(summary["probe_acc_teacher"]),
             ms["teacher"]),
            ("student (distilled)", f"{m['student']['params'] / 1e6:.2f}M", num(summary["spearman"]),
             pct(summary["probe_acc_student"]), ms["student"])]
    if summary.get("probe_acc_scratch") is not None:
        rows.append(("scratch (SimCSE, no teacher)", f"{m['scratch']['params'] / 1e6:.2f}M",
                     num(summary["spearman_scratch"]), pct(summary["probe_acc_scratch"]), "same as student"))
    rows.append(("untrained student", f"{m['untrained']['params'] / 1e6:.2f}M", num(summary["spearman_untrained"]),
                 pct(summary["probe_acc_untrained"]), "same as student"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"compression {summary['compression']:.2f}x fewer parameters; probe retention "
                 f"{pct(summary['probe_retention'])}; latency ratio (student/teacher, batch 1) "
                 f"{summary['latency_ratio']:.3f}")
    from kdistill.report import with_deployed

    return "\n".join(lines) + with_deployed(summary)


TASK = Task("sentence_embedding", EncoderRunConfig, run, summary_table)
