"""Text-level alignment of two tokenizations of one text, for cross-tokenizer distillation (the losses are in
`kdistill.llm.cross_tokenizer`).

A tokenization is given by each token's character offsets ``(start, end)`` into the text, as Hugging Face fast
tokenizers return them (``return_offsets_mapping=True``); `offsets_from_pieces` computes them when a tokenizer has
no offsets, by matching each token's text (`token_bytes`, `pieces_from_tokenizer`) against the text.

`align_offsets` returns the *minimal common segmentation*: the text is cut only at character positions that are
token boundaries in both tokenizations, and each piece between two such cuts is an `AlignedSpan` holding the
consecutive teacher tokens and the consecutive student tokens that cover it. Three rules make real offsets fit:

* **Empty offsets** (``start == end``, e.g. ``(0, 0)`` of BOS / EOS / ``[CLS]`` / ``[SEP]``) belong to no
  character: such tokens are left out of the alignment and listed in ``Alignment.teacher_excluded`` /
  ``student_excluded``.
* **Overlapping offsets** (byte-fallback tokens that each carry part of one multi-byte UTF-8 character, such as
  ``<0xC3> <0xA9>`` for 'é' or the three byte-level pieces of an emoji, which all report that character) are merged
  with the token before them into one unit: no cut is made inside a character.
* **Whitespace** (``strip_whitespace=True``): a token's span is stripped of the whitespace at its ends before the
  boundaries are compared, so GPT-2's ``'Ġword'`` (offsets include the space), SentencePiece's ``'▁word'`` and
  WordPiece's ``'word'`` (offsets without the space) all start at the ``w``. A token that is only whitespace joins
  the next token's unit (the last unit's, at the end of the text). A span's ``(start, end)`` therefore runs from
  its first to its last non-whitespace character.

Both tokenizations must cover the same text: the first and last non-whitespace character they cover must agree,
else an `AlignmentError` (a ``ValueError`` and a `kdistill.errors.WiringError`) says where they differ. A
non-whitespace character that one tokenization skips (a normalizer dropped it) is absorbed by the span before it.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from kdistill.errors import WiringError

__all__ = ["SCHEMES", "AlignedSpan", "Alignment", "AlignmentError", "VocabMap", "align_offsets", "align_texts",
           "build_vocab_map", "detect_scheme", "offsets_from_pieces", "pieces_from_tokenizer", "token_bytes"]

_WHERE = "kdistill.llm.cross_tokenizer"
SCHEMES = ("byte_level", "sentencepiece", "wordpiece", "plain")
_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_WS_BYTES = b" \t\n\r\x0b\x0c"
Offsets = Sequence[Sequence[int]]


class AlignmentError(WiringError, ValueError):
    """Two tokenizations cannot be aligned (different texts, bad offsets, nothing to align)."""


@dataclass(frozen=True)
class AlignedSpan:
    """Characters ``[start, end)`` of the text, covered exactly by teacher tokens ``teacher[0]..teacher[1]-1`` and by
    student tokens ``student[0]..student[1]-1`` (half-open token index ranges into each full token sequence)."""

    start: int
    end: int
    teacher: tuple[int, int]
    student: tuple[int, int]


@dataclass(frozen=True)
class Alignment:
    """The aligned spans in text order, and the token indices left out (empty offsets: special tokens)."""

    spans: tuple[AlignedSpan, ...]
    teacher_excluded: tuple[int, ...] = ()
    student_excluded: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.spans)

    def within(self, start: int, end: Optional[int] = None) -> tuple[AlignedSpan, ...]:
        """The spans lying inside characters ``[start, end)`` (e.g. the answer part of a prompt + answer text)."""
        return tuple(s for s in self.spans if s.start >= start and (end is None or s.end <= end))


# ------------------------------------------------------------------------------------------------ token text


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes for chr(256+n)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


def detect_scheme(vocab: Mapping[str, int]) -> str:
    """Guess a vocabulary's token spelling: ``byte_level`` (GPT-2 'Ġ' = a leading space, bytes as characters),
    ``sentencepiece`` ('▁' = a space, ``<0xAB>`` byte-fallback tokens), ``wordpiece`` ('##' = continuation) or
    ``plain`` (tokens are their text), by which marker starts the most tokens (at least 1% of them)."""
    counts = {"byte_level": 0, "sentencepiece": 0, "wordpiece": 0}
    for token in vocab:
        if token.startswith("Ġ"):
            counts["byte_level"] += 1
        elif token.startswith("▁"):
            counts["sentencepiece"] += 1
        elif token.startswith("##"):
            counts["wordpiece"] += 1
    best = max(counts, key=counts.__getitem__)
    return best if counts[best] >= max(1, len(vocab) // 100) else "plain"


def token_bytes(token: str, scheme: str) -> bytes:
    """The text a vocabulary token stands for, as UTF-8 bytes, with its leading-space marker as ``b" "``.

    ``byte_level``: each character is one byte (GPT-2 alphabet; ``'ĠcafÃ©' -> b' caf\\xc3\\xa9'``), so a token may
    be part of a UTF-8 character. ``sentencepiece``: ``'▁' -> ' '``, ``'<0xC3>' -> b'\\xc3'``. ``wordpiece``:
    ``'##ing' -> b'ing'``, a word-initial ``'the' -> b' the'`` (taken as space-prefixed, its usual position).
    ``plain``: the token's own UTF-8 bytes.
    """
    if scheme == "byte_level":
        if all(c in _BYTE_OF_CHAR for c in token):
            return bytes(_BYTE_OF_CHAR[c] for c in token)
        return token.encode("utf-8")
    if scheme == "sentencepiece":
        match = _SP_BYTE.fullmatch(token)
        return bytes([int(match.group(1), 16)]) if match else token.replace("▁", " ").encode("utf-8")
    if scheme == "wordpiece":
        return token[2:].encode("utf-8") if token.startswith("##") else b" " + token.encode("utf-8")
    if scheme == "plain":
        return token.encode("utf-8")
    raise AlignmentError(f"unknown token scheme {scheme!r}", where=f"{_WHERE}(scheme)",
                         fix=f"use one of {list(SCHEMES)} or 'auto'")


def _vocab_of(tokenizer_or_vocab: Any) -> Mapping[str, int]:
    if isinstance(tokenizer_or_vocab, Mapping):
        return tokenizer_or_vocab
    if callable(getattr(tokenizer_or_vocab, "get_vocab", None)):
        return tokenizer_or_vocab.get_vocab()
    raise AlignmentError(f"expected a tokenizer or a token -> id mapping, got {type(tokenizer_or_vocab).__name__}",
                         where=_WHERE, fix="pass a Hugging Face tokenizer or tokenizer.get_vocab()")


def pieces_from_tokenizer(tokenizer: Any, token_ids: Sequence[int], *, scheme: str = "auto") -> list[Optional[bytes]]:
    """Each token's text (`token_bytes`) for `offsets_from_pieces`; ``None`` for the tokenizer's special tokens."""
    if scheme == "auto":
        scheme = detect_scheme(tokenizer.get_vocab())
    ids = [int(i) for i in token_ids]
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    tokens = tokenizer.convert_ids_to_tokens(ids)
    return [None if i in special else token_bytes(t, scheme) for i, t in zip(ids, tokens)]


def offsets_from_pieces(text: str, pieces: Sequence[Optional[Union[bytes, str]]], *,
                        ignore_case: bool = False) -> list[tuple[int, int]]:
    """Character offsets of tokens found by matching their text against `text`, left to right (the fallback for
    tokenizers without offsets).

    A piece is the token's text (``str`` or UTF-8 ``bytes``; a part of a multi-byte character is allowed) or
    ``None`` for a special token (offsets ``(0, 0)``). Whitespace in the text before a piece is skipped; a piece's
    leading whitespace is optional in the text (SentencePiece's dummy prefix, WordPiece's implied space) and counts
    in its offsets when present. A piece holding part of a character gets that whole character, like HF offsets.
    A whitespace-only piece takes the whitespace at the cursor (empty offsets if there is none). `ignore_case`
    matches ASCII letters case-insensitively (uncased WordPiece); accent stripping or other normalizers cannot be
    undone: use the tokenizer's own offsets then.
    """
    raw = text.encode("utf-8")
    char_starts = [0]
    for ch in text:
        char_starts.append(char_starts[-1] + len(ch.encode("utf-8")))

    def char_at(byte: int) -> int:  # index of the character holding `byte`
        return bisect.bisect_right(char_starts, byte) - 1

    out: list[tuple[int, int]] = []
    cursor = 0
    for i, piece in enumerate(pieces):
        if piece is None:
            out.append((0, 0))
            continue
        data = piece.encode("utf-8") if isinstance(piece, str) else bytes(piece)
        body = data.strip(_WS_BYTES)
        lead = len(data) - len(data.lstrip(_WS_BYTES))
        trail = len(data) - lead - len(body) if body else 0
        pos = cursor
        while pos < len(raw) and raw[pos] in _WS_BYTES and (body or pos - cursor < len(data)):
            pos += 1
        if not body:
            out.append((char_at(cursor), char_at(pos - 1) + 1) if pos > cursor else (char_at(cursor),) * 2)
            cursor = pos
            continue
        found = raw[pos:pos + len(body)]
        if found != body and not (ignore_case and found.lower() == body.lower()):
            near = text[char_at(min(pos, len(raw))):][:20]
            raise AlignmentError(f"token {i} ({data!r}) does not match the text at character "
                                 f"{char_at(min(pos, len(raw)))} ({near!r})", where=f"{_WHERE}.offsets_from_pieces",
                                 fix="pass the tokenizer's own offsets (fast tokenizer, return_offsets_mapping=True), "
                                     "or ignore_case=True for an uncased tokenizer")
        start, end = (cursor if lead and pos > cursor else pos), pos + len(body)
        while trail and end < len(raw) and raw[end] in _WS_BYTES:
            end, trail = end + 1, trail - 1
        out.append((char_at(start), char_at(end - 1) + 1))
        cursor = end
    return out


# ------------------------------------------------------------------------------------------------ alignment


def _units(text: str, offsets: Offsets, role: str, strip: bool) -> tuple[list[list[int]], list[int]]:
    """``([first token, last token, start, end] per unit, excluded token indices)`` of one tokenization."""
    n = len(text)
    units: list[list[int]] = []
    excluded: list[int] = []
    for i, pair in enumerate(offsets):
        try:
            s, e = (int(v) for v in pair)
        except (TypeError, ValueError) as err:
            raise AlignmentError(f"{role} offsets[{i}] is {pair!r}, not a (start, end) pair", where=_WHERE,
                                 fix="pass one (start, end) pair per token") from err
        if not 0 <= s <= e <= n:
            raise AlignmentError(f"{role} token {i} has offsets ({s}, {e}) outside a text of {n} characters",
                                 where=_WHERE, fix="pass the text the offsets were computed on")
        if s == e:
            excluded.append(i)
        elif units and s < units[-1][2]:
            raise AlignmentError(f"{role} offsets go backwards at token {i}: ({s}, {e}) after a token starting at "
                                 f"{units[-1][2]}", where=_WHERE, fix="pass offsets in token order")
        elif units and s < units[-1][3]:  # byte pieces of one character: one unit
            units[-1][1], units[-1][3] = i, max(units[-1][3], e)
        else:
            units.append([i, i, s, e])
    if not strip:
        return units, excluded
    out: list[list[int]] = []
    pending: Optional[int] = None
    for first, last, s, e in units:
        seg = text[s:e]
        core_s, core_e = s + len(seg) - len(seg.lstrip()), e - (len(seg) - len(seg.rstrip()))
        if core_s >= core_e:  # whitespace only: joins the next unit
            pending = first if pending is None else pending
            continue
        out.append([first if pending is None else pending, last, core_s, core_e])
        pending = None
    if pending is not None and out:
        out[-1][1] = units[-1][1]
    return out, excluded


def align_offsets(text: str, teacher_offsets: Offsets, student_offsets: Offsets, *,
                  strip_whitespace: bool = True) -> Alignment:
    """The minimal common segmentation of two tokenizations of `text` (module docstring).

    Args:
        text: the text both tokenizations encode.
        teacher_offsets, student_offsets: one ``(start, end)`` character pair per token, in token order (an HF
            ``offset_mapping`` row, a tensor ``(N, 2)``, or `offsets_from_pieces`).
        strip_whitespace: compare token spans without the whitespace at their ends (default); False compares the
            raw offsets (for tokenizers that both attach whitespace the same way).

    Returns:
        an `Alignment`: spans in text order that tile the covered text, each with its teacher and student token
        ranges; the tokens with empty offsets are excluded and listed.
    """
    if isinstance(teacher_offsets, Tensor):
        teacher_offsets = teacher_offsets.tolist()
    if isinstance(student_offsets, Tensor):
        student_offsets = student_offsets.tolist()
    t_units, t_excluded = _units(text, teacher_offsets, "teacher", strip_whitespace)
    s_units, s_excluded = _units(text, student_offsets, "student", strip_whitespace)
    for role, units in (("teacher", t_units), ("student", s_units)):
        if not units:
            raise AlignmentError(f"empty alignment: no {role} token covers any text", where=_WHERE,
                                 fix="pass offsets of a tokenization of a non-empty text (HF offset_mapping)")
    t_extent, s_extent = (t_units[0][2], t_units[-1][3]), (s_units[0][2], s_units[-1][3])
    if t_extent != s_extent:
        raise AlignmentError(f"the tokenizations do not cover the same text: teacher characters "
                             f"{t_extent[0]}..{t_extent[1]}, student {s_extent[0]}..{s_extent[1]}", where=_WHERE,
                             fix="tokenize the same text (no truncation) with both tokenizers")
    t_at = {u[2]: k for k, u in enumerate(t_units)}
    s_at = {u[2]: k for k, u in enumerate(s_units)}
    cuts = sorted(set(t_at) & set(s_at))
    spans = []
    for j, cut in enumerate(cuts):
        t0, s0 = t_at[cut], s_at[cut]
        t1, s1 = (t_at[cuts[j + 1]], s_at[cuts[j + 1]]) if j + 1 < len(cuts) else (len(t_units), len(s_units))
        spans.append(AlignedSpan(cut, max(t_units[t1 - 1][3], s_units[s1 - 1][3]),
                                 (t_units[t0][0], t_units[t1 - 1][1] + 1), (s_units[s0][0], s_units[s1 - 1][1] + 1)))
    return Alignment(tuple(spans), tuple(t_excluded), tuple(s_excluded))


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[list[int], Offsets]:
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return list(enc["input_ids"]), list(enc["offset_mapping"])
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    lower = bool(getattr(tokenizer, "do_lower_case", False))
    return ids, offsets_from_pieces(text, pieces_from_tokenizer(tokenizer, ids), ignore_case=lower)


def align_texts(text: str, teacher_tokenizer: Any, student_tokenizer: Any, *, add_special_tokens: bool = True,
                strip_whitespace: bool = True) -> tuple[Alignment, list[int], list[int]]:
    """Tokenize `text` with both tokenizers and align them: ``(alignment, teacher_ids, student_ids)``.

    Offsets come from each tokenizer (fast tokenizers) or from `offsets_from_pieces` (slow ones).
    """
    t_ids, t_off = _encode(teacher_tokenizer, text, add_special_tokens)
    s_ids, s_off = _encode(student_tokenizer, text, add_special_tokens)
    return align_offsets(text, t_off, s_off, strip_whitespace=strip_whitespace), t_ids, s_ids


# ------------------------------------------------------------------------------------------------ vocabulary map


@dataclass(frozen=True)
class VocabMap:
    """Pairs of token ids with the same text in both vocabularies: ``teacher_ids[k] <-> student_ids[k]`` (int64
    tensors of equal length, sorted by teacher id)."""

    teacher_ids: Tensor
    student_ids: Tensor

    def __len__(self) -> int:
        return int(self.teacher_ids.numel())


def build_vocab_map(teacher_vocab: Any, student_vocab: Any, *, teacher_scheme: str = "auto",
                    student_scheme: str = "auto") -> VocabMap:
    """The exact-match map between two vocabularies (tokenizers, or ``token -> id`` mappings).

    Two tokens match when their texts agree after leading-space markers are normalized (`token_bytes`: 'Ġ' and '▁'
    become a space, '##x' is 'x', a word-initial WordPiece 'x' is ' x', byte-level and ``<0xAB>`` tokens are the
    bytes they stand for). When several ids of one vocabulary have the same text, the lowest id is used.
    """
    keyed = []
    for vocab, scheme in ((_vocab_of(teacher_vocab), teacher_scheme), (_vocab_of(student_vocab), student_scheme)):
        scheme = detect_scheme(vocab) if scheme == "auto" else scheme
        by_key: dict[bytes, int] = {}
        for token, idx in vocab.items():
            key = token_bytes(token, scheme)
            by_key[key] = min(int(idx), by_key.get(key, int(idx)))
        keyed.append(by_key)
    pairs = sorted((keyed[0][k], keyed[1][k]) for k in keyed[0].keys() & keyed[1].keys())
    if not pairs:
        return VocabMap(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    t_ids, s_ids = zip(*pairs)
    return VocabMap(torch.tensor(t_ids, dtype=torch.long), torch.tensor(s_ids, dtype=torch.long))
