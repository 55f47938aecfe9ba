"""Check that a student and a teacher share one vocabulary before token-level distillation.

Token-level KD compares, at every position, the teacher's and the student's distributions over the *same*
token ids, so the two must agree on what every id means. The rule:

* The vocabulary is the **tokenizer's** token -> id map (``get_vocab()``, added tokens included); its size is
  ``len(tokenizer)``.
* A **model's** output head may have more rows than its tokenizer has tokens: checkpoints pad the embedding
  matrix to a multiple of 64/128 (or leave spare rows for tokens added later). Those rows are never a target
  and are not a mismatch. A model is compatible with a tokenizer when ``config.vocab_size >= len(tokenizer)``;
  token-level KD then compares the first ``len(tokenizer)`` rows of both heads (slice ``head.weight[:n]``).
* Two tokenizers are compatible when their ``get_vocab()`` maps are equal (same size *and* same ids).
* Without a tokenizer, padding cannot be told apart from real tokens: a model given alone must match the
  other side exactly (``config.vocab_size`` equal to the other model's, or to the other side's
  ``len(tokenizer)``). Pass the model with its tokenizer to allow padding. When the token -> id maps of both
  sides are not known (a model alone on either side), only sizes can be compared.

Each side may be a tokenizer, a model (anything with ``config.vocab_size``), or a ``(model, tokenizer)`` pair;
`tokenizer=` supplies one tokenizer shared by both sides when only models are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdistill.errors import WiringError

__all__ = ["check_vocab"]

_WHERE = "kdistill.llm.check_vocab"
_SEQUENCE_KD = (
    "use sequence-level KD instead (train the student on text the teacher generates), which works across "
    "tokenizers; or pick a student that uses the teacher's tokenizer"
)


@dataclass
class _Side:
    role: str
    rows: int | None  # model head rows (config.vocab_size)
    vocab: dict[str, int] | None  # tokenizer token -> id
    size: int | None  # len(tokenizer)


def _is_tokenizer(obj: Any) -> bool:
    return callable(getattr(obj, "get_vocab", None)) and not hasattr(obj, "config")


def _model_rows(model: Any, role: str) -> int:
    config = getattr(model, "config", None)
    if config is not None and callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()
    rows = getattr(config, "vocab_size", None)
    if rows is None:
        head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
        rows = None if head is None else int(head.weight.shape[0])
    if rows is None:
        raise WiringError(
            f"cannot tell the vocabulary size of the {role} ({type(model).__name__})",
            where=f"{_WHERE}({role})",
            fix="pass a tokenizer, a model with config.vocab_size, or a (model, tokenizer) pair",
        )
    return int(rows)


def _tokenizer_parts(tokenizer: Any) -> tuple[dict[str, int], int]:
    vocab = dict(tokenizer.get_vocab())
    try:
        size = len(tokenizer)
    except TypeError:
        size = max(vocab.values(), default=-1) + 1
    return vocab, size


def _side(obj: Any, role: str, shared_tokenizer: Any) -> _Side:
    model, tokenizer = None, None
    if isinstance(obj, tuple) and len(obj) == 2:
        model, tokenizer = obj if _is_tokenizer(obj[1]) else obj[::-1]
    elif _is_tokenizer(obj):
        tokenizer = obj
    else:
        model = obj
    if model is not None and tokenizer is None:
        tokenizer = shared_tokenizer
    rows = _model_rows(model, role) if model is not None else None
    vocab, size = _tokenizer_parts(tokenizer) if tokenizer is not None else (None, None)
    if rows is not None and size is not None and rows < size:
        raise WiringError(
            f"the {role} model has {rows} vocabulary rows but its tokenizer has {size} tokens",
            where=f"{_WHERE}({role})",
            fix="resize the model's embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer)))",
        )
    return _Side(role, rows, vocab, size)


def _first_id_difference(student: dict[str, int], teacher: dict[str, int]) -> str:
    for token, student_id in sorted(student.items(), key=lambda kv: kv[1]):
        teacher_id = teacher.get(token)
        if teacher_id != student_id:
            where = f"id {teacher_id}" if teacher_id is not None else "absent"
            return f"token {token!r} is id {student_id} in the student, {where} in the teacher"
    for token, teacher_id in sorted(teacher.items(), key=lambda kv: kv[1]):
        if token not in student:
            return f"token {token!r} is id {teacher_id} in the teacher, absent in the student"
    return "the maps differ"


def check_vocab(student: Any, teacher: Any, *, tokenizer: Any = None) -> int:
    """Refuse token-level KD between a student and a teacher whose vocabularies differ.

    Args:
        student, teacher: each a tokenizer (``get_vocab()``), a causal LM (``config.vocab_size``), or a
            ``(model, tokenizer)`` pair.
        tokenizer: a tokenizer shared by both sides, used for a side given as a model alone.

    Returns:
        ``n``, the number of token ids the two share: ``len(tokenizer)`` when a tokenizer is known, else the
        common ``config.vocab_size``. Heads with more rows than ``n`` are padded; compare ``head.weight[:n]``.

    Raises:
        WiringError: different sizes (naming both), same size with different token -> id maps (naming the first
            differing token), or a model with fewer rows than its tokenizer's tokens.
    """
    s = _side(student, "student", tokenizer)
    t = _side(teacher, "teacher", tokenizer)

    if s.vocab is not None and t.vocab is not None:
        if s.size != t.size:
            raise WiringError(
                f"student tokenizer has {s.size} tokens, teacher tokenizer has {t.size}: token-level KD needs "
                "one shared vocabulary",
                where=_WHERE,
                fix=_SEQUENCE_KD,
            )
        if s.vocab != t.vocab:
            raise WiringError(
                f"student and teacher tokenizers both have {s.size} tokens but different ids "
                f"({_first_id_difference(s.vocab, t.vocab)})",
                where=_WHERE,
                fix=_SEQUENCE_KD,
            )
        return int(s.size)  # type: ignore[arg-type]

    if s.size is not None or t.size is not None:  # a model alone vs a tokenizer: only an exact size is safe
        known, other = (s, t) if s.size is not None else (t, s)
        if other.rows != known.size:
            raise WiringError(
                f"{other.role} vocabulary size {other.rows} != {known.role} tokenizer size {known.size}: "
                "token-level KD needs one shared vocabulary",
                where=_WHERE,
                fix=f"{_SEQUENCE_KD}; if the {other.role} head is only padded, pass it with its tokenizer "
                "((model, tokenizer) or tokenizer=) so padding can be told apart",
            )
        return int(known.size)  # type: ignore[arg-type]

    if s.rows != t.rows:
        raise WiringError(
            f"student vocabulary size {s.rows} != teacher vocabulary size {t.rows}: token-level KD needs one "
            "shared vocabulary",
            where=_WHERE,
            fix=f"{_SEQUENCE_KD}; if one head is only padded, pass tokenizer= so padding can be told apart",
        )
    return int(s.rows)  # type: ignore[arg-type]
