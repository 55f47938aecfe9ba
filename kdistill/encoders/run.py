"""Sentence-embedding distillation as a job: teacher embeddings cached once, student and no-teacher baseline
trained on the one Engine, then evaluated and exported.

Stages of `run_embedding_distillation(cfg, run_dir)`:

1. corpus: training sentences (unlabeled Wikipedia + tweets), held-out sentences, held-out labelled tweets;
   with ``data.augment``, word-replaced copies of the training sentences are added (TinyBERT's augmentation);
2. teacher: its embeddings of all of them, computed once (the training loop reads the cache: no teacher forward
   per step); with a run directory they are also kept in ``RUN_DIR/teacher_embeddings.safetensors``, keyed by a
   fingerprint of the teacher's weights, the tokenizer length and every sentence, so that running the job again
   (resumed, or with the scratch baseline added) reuses them;
3. ``student``: the student (`build_student` from the teacher's config) learns the cached embeddings with the
   configured terms (default: per-sentence cosine + batch similarity matrix);
4. ``scratch``: the same architecture, random init, trained on the same sentences for the same steps without a
   teacher (SimCSE), unless ``scratch.objective: none``;
5. evaluation: Spearman of pairwise cosine similarities (student vs teacher) on held-out sentences; linear-probe
   sentiment accuracy on held-out tweets for teacher, student, scratch and the untrained student; parameters;
   CPU latency (interleaved, one thread count for all);
6. export: ``RUN_DIR/student`` loads with ``SentenceTransformer(path)`` and ``AutoModel.from_pretrained(path)``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open

from kdistill.encoders.augment import augment_sentences
from kdistill.encoders.config import EncoderRunConfig
from kdistill.encoders.data import load_sentence_corpus, sentence_dataset
from kdistill.encoders.distiller import CachedEmbeddings, EncoderDistiller, EncoderTerm
from kdistill.encoders.evaluate import encode, encode_latency_ms, linear_probe, similarity_spearman
from kdistill.encoders.models import SentenceEncoder, load_sentence_encoder, load_tokenizer
from kdistill.encoders.student import build_student
from kdistill.engine import Engine
from kdistill.engine.checkpoint import save_weights
from kdistill.evaluate.cost import param_count
from kdistill.teachers.cache import weights_fingerprint

__all__ = ["build_embedding_student", "run_embedding_distillation", "terms_from_specs"]


def terms_from_specs(specs) -> list[EncoderTerm]:
    return [EncoderTerm(s.name or s.loss, s.loss, s.weight, s.layers, dict(s.params), s.warmup_steps) for s in specs]


def build_embedding_student(cfg: EncoderRunConfig, teacher: SentenceEncoder, *, from_teacher: bool = True,
                            seed: Optional[int] = None, dropout: Optional[float] = None) -> SentenceEncoder:
    """The configured student. ``from_teacher=False`` gives the no-teacher baseline's start: the same
    architecture with nothing taken from the teacher's weights (random embeddings). `dropout` overrides the
    configured dropout (SimCSE needs it as its noise)."""
    spec = cfg.student
    overrides = {}
    dropout = spec.dropout if dropout is None else dropout
    if dropout is not None:
        overrides = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    embeddings = spec.embeddings
    if not from_teacher:
        embeddings = "random"
    return build_student(teacher, num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                         num_heads=spec.num_heads, intermediate_size=spec.intermediate_size, embeddings=embeddings,
                         project_to_teacher=spec.project_to_teacher, seed=cfg.seed + 202 if seed is None else seed,
                         config_overrides=overrides or None)


EMBEDDINGS_FILE = "teacher_embeddings.safetensors"


def _embeddings_fingerprint(teacher: SentenceEncoder, max_length: int, texts: dict[str, list[str]]) -> str:
    """sha256 of what the teacher's embeddings depend on: its weights (names, shapes, bytes), pooling and
    normalization, the tokenizer's max length and every text of every set, in order."""
    h = hashlib.sha256(f"teacher={weights_fingerprint(teacher)}\npooling={getattr(teacher, 'pooling', None)}\n"
                       f"normalize={getattr(teacher, 'normalize', None)}\nmax_length={max_length}\n".encode())
    for key, values in texts.items():
        h.update(f"[{key}]{len(values)}\n".encode())
        for text in values:
            h.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def _teacher_embeddings(teacher: SentenceEncoder, texts: dict[str, list[str]], embed, max_length: int,
                        run_dir: Optional[Path], log: Callable[[str], None]) -> tuple[dict[str, torch.Tensor], bool]:
    """The teacher's embeddings of each set of `texts`: read from ``RUN_DIR/teacher_embeddings.safetensors``
    when its fingerprint matches, else computed (and written there). Returns (embeddings, read_from_cache)."""
    if run_dir is None:
        return {key: embed(teacher, values) for key, values in texts.items()}, False
    path = run_dir / EMBEDDINGS_FILE
    fingerprint = _embeddings_fingerprint(teacher, max_length, texts)
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as fh:
                if (fh.metadata() or {}).get("fingerprint") == fingerprint:
                    log(f"[encoders] teacher embeddings read from {path}")
                    return {key: fh.get_tensor(key) for key in texts}, True
            log(f"[encoders] {path} is for other sentences or another teacher: computing them again")
        except Exception as err:  # noqa: BLE001 -- a damaged or foreign file (safetensors has its own errors)
            log(f"warning: [encoders] cannot read {path} ({str(err).splitlines()[0]}): computing them again")
    out = {key: embed(teacher, values) for key, values in texts.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(path, out, metadata={"fingerprint": fingerprint})
    return out, False


def _timed(log: Callable[[str], None], what: str):
    class _T:
        def __enter__(self):
            self.t0 = time.perf_counter()
            return self

        def __exit__(self, *exc):
            self.seconds = time.perf_counter() - self.t0
            log(f"[encoders] {what}: {self.seconds:.1f} s")

    return _T()


def run_embedding_distillation(cfg: EncoderRunConfig, run_dir: Optional[Path] = None, *, progress: bool = False,
                               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the job of `cfg`; returns the summary (also written to ``RUN_DIR/summary.json``)."""
    run_dir = Path(run_dir) if run_dir is not None else None
    seconds: dict[str, float] = {}
    with _timed(log, "corpus") as t:
        corpus = load_sentence_corpus(seed=cfg.data.seed, heldout_articles=cfg.data.heldout_articles,
                                      heldout_tweets=cfg.data.heldout_tweets, max_train=cfg.data.max_train,
                                      max_heldout=cfg.data.max_heldout, max_probe=cfg.data.max_probe)
    seconds["corpus"] = t.seconds
    log(f"[encoders] corpus: {corpus.info}")
    tokenizer = load_tokenizer(cfg.teacher.path)
    teacher = load_sentence_encoder(cfg.teacher.path)
    max_length, bs = cfg.data.max_length, cfg.eval.batch_size
    train_texts = list(corpus.train)
    if cfg.data.augment is not None and cfg.data.augment.copies:
        aug = cfg.data.augment
        with _timed(log, "augmentation") as t:
            extra = augment_sentences(corpus.train, tokenizer, teacher.encoder.get_input_embeddings().weight,
                                      copies=aug.copies, p_replace=aug.p_replace, neighbours=aug.neighbours,
                                      seed=aug.seed)
        seconds["augmentation"] = t.seconds
        train_texts += extra
        corpus.info["train_augmented"] = len(extra)
        log(f"[encoders] augmentation: {len(extra)} word-replaced sentences added to {len(corpus.train)}")

    def embed(model, texts):
        return encode(model, texts, tokenizer, max_length=max_length, batch_size=bs)

    with _timed(log, f"teacher embeddings of {len(train_texts) + len(corpus.heldout) + len(corpus.probe_texts)} "
                     "sentences") as t:
        cached, from_cache = _teacher_embeddings(
            teacher, {"train": train_texts, "heldout": list(corpus.heldout), "probe": list(corpus.probe_texts)},
            embed, max_length, run_dir, log)
        teacher_train, teacher_heldout, teacher_probe = cached["train"], cached["heldout"], cached["probe"]
    seconds["teacher_embeddings"] = t.seconds
    data = sentence_dataset(train_texts, tokenizer, max_length, name="train-sentences")

    student = build_embedding_student(cfg, teacher)
    untrained = build_embedding_student(cfg, teacher, from_teacher=False).eval()
    distiller = EncoderDistiller(student, CachedEmbeddings(teacher_train), terms_from_specs(cfg.distill.terms))
    with _timed(log, "student (distilled)") as t:
        result = Engine(cfg.train, run_dir, stage="student", seed=cfg.seed + 3, progress=progress,
                        log=log).fit(distiller, data)
    seconds["student_train"] = t.seconds
    student = distiller.export_student().eval()

    scratch = None
    resumed = {"student": result["resumed_from"]}
    if cfg.scratch.objective == "simcse":
        scratch_model = build_embedding_student(cfg, teacher, from_teacher=False, dropout=cfg.scratch.dropout)
        scratch_distiller = EncoderDistiller(scratch_model, None, [EncoderTerm(
            "simcse", "simcse", params={"temperature": cfg.scratch.temperature})])
        with _timed(log, "scratch (SimCSE, no teacher)") as t:
            scratch_result = Engine(cfg.train, run_dir, stage="scratch", seed=cfg.seed + 3, progress=progress,
                                    log=log).fit(scratch_distiller, data)
        resumed["scratch"] = scratch_result["resumed_from"]
        seconds["scratch_train"] = t.seconds
        scratch = scratch_distiller.export_student().eval()

    with _timed(log, "evaluation") as t:
        models = {"teacher": teacher, "student": student, "untrained": untrained}
        if scratch is not None:
            models["scratch"] = scratch
        n_fit = max(2, int(round(cfg.eval.probe_train_fraction * len(corpus.probe_texts))))
        labels = corpus.probe_labels
        report: dict[str, Any] = {}
        for name, model in models.items():
            heldout = teacher_heldout if name == "teacher" else embed(model, corpus.heldout)
            probe = teacher_probe if name == "teacher" else embed(model, corpus.probe_texts)
            entry = {"params": param_count(model),
                     "probe": linear_probe(probe[:n_fit], labels[:n_fit], probe[n_fit:], labels[n_fit:],
                                           seed=cfg.seed)}
            if name != "teacher":
                entry["spearman"] = similarity_spearman(heldout, teacher_heldout)
            report[name] = entry
    seconds["evaluation"] = t.seconds

    with _timed(log, "latency") as t:
        timed = {"teacher": teacher, "student": student}
        latency = {}
        for batch in cfg.eval.latency_batch_sizes:
            ms = encode_latency_ms(timed, corpus.heldout, tokenizer, max_length=max_length, batch_size=batch,
                                   repeats=cfg.eval.latency_repeats)
            latency[str(batch)] = {"teacher_ms": ms["teacher"], "student_ms": ms["student"],
                                   "ratio": ms["student"] / ms["teacher"]}
    seconds["latency"] = t.seconds

    summary = {
        "params_teacher": report["teacher"]["params"],
        "params_student": report["student"]["params"],
        "compression": report["teacher"]["params"] / report["student"]["params"],
        "spearman": report["student"]["spearman"],
        "spearman_scratch": report["scratch"]["spearman"] if scratch is not None else None,
        "spearman_untrained": report["untrained"]["spearman"],
        "probe_acc_teacher": report["teacher"]["probe"]["accuracy"],
        "probe_acc_student": report["student"]["probe"]["accuracy"],
        "probe_acc_scratch": report["scratch"]["probe"]["accuracy"] if scratch is not None else None,
        "probe_acc_untrained": report["untrained"]["probe"]["accuracy"],
        "probe_retention": report["student"]["probe"]["accuracy"] / report["teacher"]["probe"]["accuracy"],
        "latency_ratio": latency[str(cfg.eval.latency_batch_sizes[0])]["ratio"],
        "latency": latency,
        "torch_threads": torch.get_num_threads(),
        "teacher_embeddings_cached": from_cache,
        "resumed_from": resumed,                 # stage -> the checkpoint step it resumed from (None: from 0)
        "corpus": corpus.info,
        "train_terms": result["terms"],
        "models": report,
        "seconds": seconds,
    }
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        student.save(run_dir / "student", tokenizer, max_seq_length=max_length)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        summary["student_path"] = str(run_dir / "student")
    return summary
