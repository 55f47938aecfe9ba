"""Text views for cross-tokenizer distillation: one text, both tokenizations, aligned.

A token-level LM loss pairs position ``t`` of the student with position ``t`` of the teacher, which only means
something when both read the same token ids. With two tokenizers the data must carry the *text*: each row of a
`text_view_dataset` holds one window of raw text, its student tokenization and its teacher tokenization, each
with its character offsets, and the alignment of the two (`kdistill.llm.cross_tokenizer_align.align_offsets`):

====================  ==========  =========================================================================
key                   shape       what
====================  ==========  =========================================================================
``x``                 (N, S)      student ids (the student tokenizer's special tokens included), padded
``attention_mask``    (N, S)      1 on real tokens
``y``                 (N, S)      ``x``, ``-100`` on tokens without text (special tokens, padding)
``teacher_x``         (N, L)      teacher ids, led by one context token (``teacher_prefix``), padded
``teacher_attention_mask`` (N, L)
``text``              (N, C)      the window's text as Unicode code points, ``-1`` padding (`texts_of`)
``chars``             (N,)        characters per window (the denominator of bits per character)
``student_offsets``   (N, S, 2)   character offsets of each student token into the text (``(0, 0)``: none)
``teacher_offsets``   (N, L, 2)   the same for the teacher tokens
``span_student``      (N, P, 2)   per aligned span, its student token range ``[a, b)``; ``-1`` padding
``span_teacher``      (N, P, 2)   its teacher token range
====================  ==========  =========================================================================

Only spans whose first token has a predicting row on both sides (token index >= 1) are kept: the teacher's
context token and the student's leading special token (``[CLS]``, BOS) make the first word usable.
`text_windows` cuts long texts into windows that fit the student's block size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

from kdistill.data.arrays import ArrayDataset
from kdistill.errors import DataError
from kdistill.llm.cross_tokenizer_align import align_offsets
from kdistill.llm.data import token_id
from kdistill.losses.lm import IGNORE_INDEX

__all__ = ["TEXT_VIEW_KEYS", "text_view_dataset", "text_windows", "texts_of"]

_WHERE = "kdistill.llm.cross_data"
TEXT_VIEW_KEYS = ("teacher_x", "teacher_attention_mask", "text", "student_offsets", "teacher_offsets",
                  "span_student", "span_teacher")


def _offsets(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"the tokenizer {type(tokenizer).__name__} gives no character offsets", where=_WHERE,
                        fix="load a fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))")
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True, verbose=False)
    return list(enc["input_ids"]), [tuple(int(v) for v in o) for o in enc["offset_mapping"]]


def _specials(tokenizer: Any) -> int:
    count = getattr(tokenizer, "num_special_tokens_to_add", None)
    return int(count()) if callable(count) else 0


def text_windows(texts: Sequence[Any], tokenizer: Any, block_size: int) -> list[str]:
    """Consecutive windows of each text, each at most `block_size` tokens of `tokenizer` once its special tokens
    are added; windows are cut at token boundaries, between words when one lies in the last quarter of the
    window, and shortened when the window's own tokenization is longer (the whitespace between windows is
    dropped).

    `texts`: strings or ``(title, text)`` pairs (`kdistill.data.text.wiki_articles`).
    """
    room = int(block_size) - _specials(tokenizer)
    if room < 1:
        raise DataError(f"block_size {block_size} leaves no room for text after the tokenizer's special tokens",
                        where=f"{_WHERE}.text_windows", fix="use a larger data.block_size")
    out = []
    for item in texts:
        text = item[1] if isinstance(item, (tuple, list)) else item
        _, offsets = _offsets(tokenizer, text, False)
        offsets = [o for o in offsets if o[1] > o[0]]
        i = 0
        while i < len(offsets):
            j = min(i + room, len(offsets))
            back = j
            while j < len(offsets) and back - 1 > i + room * 3 // 4 and offsets[back][0] == offsets[back - 1][1]:
                back -= 1  # prefer a cut between words: a window starting mid-word tokenizes differently
            j = back if j == len(offsets) or offsets[back][0] != offsets[back - 1][1] else j
            while True:  # the window's own tokenization must fit too
                n = len(_offsets(tokenizer, text[offsets[i][0]:offsets[j - 1][1]], False)[0])
                if n <= room or j - i == 1:
                    break
                j = max(i + 1, j - (n - room))
            out.append(text[offsets[i][0]:offsets[j - 1][1]])
            i = j
    return [w for w in out if w.strip()]


def _pad(rows: list[list], width: int, fill: Any, dtype: torch.dtype, tail: tuple = ()) -> torch.Tensor:
    out = torch.full((len(rows), width, *tail), fill, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, :len(row)] = torch.tensor(row, dtype=dtype)
    return out


def text_view_dataset(texts: Sequence[str], teacher_tokenizer: Any, student_tokenizer: Any, *, block_size: int,
                      teacher_prefix: Optional[int] = None, name: str = "text-view") -> ArrayDataset:
    """An `ArrayDataset` of text views (module docstring) of `texts` (e.g. `text_windows`).

    Args:
        texts: one window of text per row; its student tokenization must fit `block_size` tokens.
        teacher_tokenizer, student_tokenizer: fast Hugging Face tokenizers (character offsets).
        block_size: student tokens per row (padding included).
        teacher_prefix: the token put before the teacher's tokens as its context start (offsets ``(0, 0)``);
            default: the teacher tokenizer's eos token (a document boundary, as in `lm_blocks`), else its bos;
            ``-1`` for none (then the first word is not distilled). Special tokens the teacher tokenizer adds
            itself are kept.
    """
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError("no text to build a text view from", where=_WHERE, fix="pass non-empty strings")
    if teacher_prefix is None:
        teacher_prefix = token_id(teacher_tokenizer, "eos", "bos")
    s_pad = token_id(student_tokenizer, "pad", "eos") or 0
    t_pad = token_id(teacher_tokenizer, "pad", "eos") or 0
    cols: dict[str, list] = {k: [] for k in ("x", "y", "tx", "toff", "soff", "span_s", "span_t", "text")}
    for i, text in enumerate(texts):
        s_ids, s_off = _offsets(student_tokenizer, text, True)
        if len(s_ids) > block_size:
            raise DataError(f"text {i} is {len(s_ids)} student tokens, more than block_size {block_size}",
                            where=_WHERE, fix="cut texts with text_windows(texts, student_tokenizer, block_size)")
        t_ids, t_off = _offsets(teacher_tokenizer, text, True)
        if teacher_prefix is not None and teacher_prefix >= 0:
            t_ids, t_off = [int(teacher_prefix), *t_ids], [(0, 0), *t_off]
        alignment = align_offsets(text, t_off, s_off)
        usable = [s for s in alignment.spans if s.teacher[0] >= 1 and s.student[0] >= 1]
        cols["x"].append(s_ids)
        cols["y"].append([t if e > s else IGNORE_INDEX for t, (s, e) in zip(s_ids, s_off)])
        cols["tx"].append(t_ids)
        cols["soff"].append(s_off)
        cols["toff"].append(t_off)
        cols["span_s"].append([list(s.student) for s in usable])
        cols["span_t"].append([list(s.teacher) for s in usable])
        cols["text"].append([ord(c) for c in text])
    t_len = max(len(r) for r in cols["tx"])
    n_spans = max(1, max(len(r) for r in cols["span_s"]))
    n_chars = max(len(r) for r in cols["text"])
    x = _pad(cols["x"], block_size, s_pad, torch.long)
    tx = _pad(cols["tx"], t_len, t_pad, torch.long)
    lengths = torch.tensor([len(r) for r in cols["x"]])
    t_lengths = torch.tensor([len(r) for r in cols["tx"]])
    tensors = {
        "x": x, "attention_mask": (torch.arange(block_size)[None] < lengths[:, None]).long(),
        "y": _pad(cols["y"], block_size, IGNORE_INDEX, torch.long),
        "teacher_x": tx, "teacher_attention_mask": (torch.arange(t_len)[None] < t_lengths[:, None]).long(),
        "text": _pad(cols["text"], n_chars, -1, torch.int32),
        "chars": torch.tensor([len(r) for r in cols["text"]], dtype=torch.long),
        "student_offsets": _pad(cols["soff"], block_size, 0, torch.int32, (2,)),
        "teacher_offsets": _pad(cols["toff"], t_len, 0, torch.int32, (2,)),
        "span_student": _pad(cols["span_s"], n_spans, -1, torch.long, (2,)),
        "span_teacher": _pad(cols["span_t"], n_spans, -1, torch.long, (2,)),
    }
    return ArrayDataset(tensors, name)


def texts_of(batch_or_dataset: Any) -> list[str]:
    """The texts of a text-view batch (or `ArrayDataset`), decoded from the ``text`` code points."""
    tensors = getattr(batch_or_dataset, "tensors", batch_or_dataset)
    return ["".join(chr(c) for c in row.tolist() if c >= 0) for row in tensors["text"]]
