"""More training inputs for embedding distillation: TinyBERT-style word replacement, offline.

Jiao et al. (2020, TinyBERT, Sec. 3.2 "Data Augmentation") enlarge the distillation set by replacing words: each
word is, with probability ``p_t``, replaced by one of its ``K`` nearest neighbours (by BERT's masked-LM for
single-piece words, by GloVe cosine otherwise); ``N_a`` new sentences per sentence, p_t = 0.4, K = 15. The teacher
labels the new sentences, so the student sees more points of the teacher's function than the corpus holds.

No masked-LM head or GloVe ships with a sentence-embedding teacher, so the neighbours here come from the
teacher's own input word-embedding table: the ``K`` whole-word vocabulary entries of highest cosine similarity.
Only words that are one whole-word vocabulary entry are candidates (``##`` pieces, special tokens, numbers and
punctuation are kept as they are); a capitalised word's replacement is capitalised. The result is a pure
function of (texts, vocabulary, embeddings, seed).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

import torch

from kdistill.errors import ConfigError

__all__ = ["WordNeighbours", "augment_sentences"]

_WORD = re.compile(r"^([^A-Za-z]*)([A-Za-z]+)([^A-Za-z]*)$")


class WordNeighbours:
    """The `k` nearest whole-word vocabulary entries of a word by cosine of the input embeddings.

    Args:
        vocab: token -> id (a WordPiece vocabulary; ``tokenizer.get_vocab()``).
        embeddings: the ``(vocab_size, dim)`` input word-embedding matrix.
        k: neighbours per word.
    """

    def __init__(self, vocab: dict[str, int], embeddings: torch.Tensor, k: int = 15):
        if k < 1:
            raise ConfigError(f"neighbours must be >= 1, got {k}", where="data.augment.neighbours", fix="use 15")
        self.k = k
        self.words = sorted((w for w, i in vocab.items() if w.isalpha() and w.isascii() and w.islower()
                             and len(w) > 1 and i < len(embeddings)), key=vocab.__getitem__)
        if len(self.words) <= k:
            raise ConfigError(f"the vocabulary has {len(self.words)} whole-word entries, need more than k={k}",
                              where="data.augment", fix="use a WordPiece (BERT) tokenizer or a smaller k")
        self.index = {w: n for n, w in enumerate(self.words)}
        ids = torch.tensor([vocab[w] for w in self.words])
        self.unit = torch.nn.functional.normalize(embeddings.detach().float()[ids], dim=1)
        self._cache: dict[str, list[str]] = {}

    def prepare(self, words: Sequence[str], chunk: int = 2048) -> None:
        """Compute the neighbours of `words` (lower-case whole-word entries; others ignored) in batches."""
        todo = sorted({w for w in words if w in self.index and w not in self._cache})
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            q = self.unit[torch.tensor([self.index[w] for w in part])]
            top = (q @ self.unit.T).topk(self.k + 1, dim=1).indices
            for w, row in zip(part, top.tolist()):
                self._cache[w] = [self.words[j] for j in row if self.words[j] != w][:self.k]

    def __call__(self, word: str) -> list[str]:
        """The neighbours of `word` ([] for a word that is not a whole-word entry)."""
        if word in self.index and word not in self._cache:
            self.prepare([word])
        return self._cache.get(word, [])


def augment_sentences(texts: Sequence[str], tokenizer: Any, embeddings: torch.Tensor, *, copies: int = 1,
                      p_replace: float = 0.4, neighbours: int = 15, seed: int = 0) -> list[str]:
    """`copies` new sentences per text by word replacement (module docstring), in text order; a copy equal to
    its text, to another copy or to an input text is dropped, so fewer may come back.

    Args:
        texts: the training sentences.
        tokenizer: a Hugging Face tokenizer with ``get_vocab()`` (WordPiece: whole words are plain entries).
        embeddings: its model's input word embeddings ``(vocab_size, dim)``.
        copies: new sentences per text (TinyBERT's N_a).
        p_replace: probability of replacing each candidate word (TinyBERT's p_t).
        neighbours: replacement candidates per word (TinyBERT's K).
    """
    if copies < 0:
        raise ConfigError(f"copies must be >= 0, got {copies}", where="data.augment.copies", fix="use e.g. 1")
    if not 0 < p_replace <= 1:
        raise ConfigError(f"p_replace must be in (0, 1], got {p_replace}", where="data.augment.p_replace",
                          fix="use 0.4 (TinyBERT)")
    if copies == 0 or not texts:
        return []
    table = WordNeighbours(tokenizer.get_vocab(), embeddings, neighbours)
    split = [text.split() for text in texts]
    parsed = [[_WORD.match(tok) for tok in words] for words in split]
    table.prepare([m.group(2).lower() for words in parsed for m in words if m])
    rng = random.Random(seed)
    seen, out = set(texts), []
    for words, matches in zip(split, parsed):
        for _ in range(copies):
            new = []
            for tok, m in zip(words, matches):
                options = table(m.group(2).lower()) if m else []
                if options and rng.random() < p_replace:
                    word = rng.choice(options)
                    if m.group(2)[0].isupper():
                        word = word[0].upper() + word[1:]
                    tok = m.group(1) + word + m.group(3)
                new.append(tok)
            sentence = " ".join(new)
            if sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
    return out
