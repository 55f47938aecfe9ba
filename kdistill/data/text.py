"""Offline text for language-model distillation: Wikipedia articles shipped with gensim's test data.

gensim's test data holds a shortened English Wikipedia dump (about a hundred articles, ~3.1M characters of
text). `wiki_articles` parses it into ``(title, text)`` pairs, `split_by_article` holds out whole articles (so
no block of a held-out article is ever trained on), and `lm_blocks` turns texts into fixed-length blocks of
token ids for causal-LM training.
"""

from __future__ import annotations

import bz2
import random
import re
from collections.abc import Sequence
from typing import Any

import torch

from kdistill.errors import DataError

__all__ = ["WIKI_DUMP", "lm_blocks", "split_by_article", "wiki_articles"]

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

_QUOTE_MARKUP = re.compile(r"'{2,}")  # wiki ''italic'' / '''bold''' left over by filter_wiki
_BLANK_LINES = re.compile(r"\n\s*\n\s*(\n\s*)+")


def _wiki_dump_path() -> str:
    try:
        from gensim.test.utils import datapath
    except ImportError as err:
        raise DataError(
            "gensim is not installed; the offline Wikipedia articles ship with its test data",
            where="kdistill.data.text.wiki_articles",
            fix="pip install gensim (or pip install 'kdistill[text]')",
        ) from err
    return datapath(WIKI_DUMP)


def _clean(text: str) -> str:
    text = _QUOTE_MARKUP.sub("", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def wiki_articles(min_chars: int = 1) -> list[tuple[str, str]]:
    """The articles of gensim's test Wikipedia dump as ``[(title, text), ...]``, in dump order.

    Pages outside the article namespace and redirects are skipped; the wiki markup is removed with
    ``gensim.corpora.wikicorpus.filter_wiki`` plus leftover ``''``/``'''`` quote markup and runs of blank
    lines; articles shorter than `min_chars` characters after cleaning are skipped. Takes ~3 s.
    """
    path = _wiki_dump_path()
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    try:
        with bz2.open(path, "rb") as f:
            for title, raw, _page_id in extract_pages(f, filter_namespaces=("0",)):
                if not raw or raw.lstrip()[:9].lower() == "#redirect":
                    continue
                text = _clean(filter_wiki(raw))
                if len(text) >= max(min_chars, 1):
                    articles.append((title, text))
    except (OSError, EOFError) as err:
        raise DataError(
            f"cannot read the Wikipedia test dump {path!r}: {err}",
            where="kdistill.data.text.wiki_articles",
            fix="reinstall gensim (pip install --force-reinstall gensim)",
        ) from err
    if not articles:
        raise DataError(
            f"no article found in {path!r}", where="kdistill.data.text.wiki_articles", fix="reinstall gensim"
        )
    return articles


def split_by_article(articles: Sequence[Any], heldout_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Split whole articles into ``(train, heldout)``, with ``round(fraction * n)`` held out (at least one each).

    The split is a seeded shuffle (``random.Random(seed)``, no global RNG touched); each part keeps the input
    order. Splitting by article, not by block, keeps text of a held-out article out of training.
    """
    fraction = float(heldout_fraction)
    if not 0.0 < fraction < 1.0:
        raise DataError(
            f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}",
            where="kdistill.data.text.split_by_article",
            fix="use e.g. heldout_fraction=0.1",
        )
    n = len(articles)
    if n < 2:
        raise DataError(
            f"need at least 2 articles to split, got {n}",
            where="kdistill.data.text.split_by_article",
            fix="pass more articles",
        )
    n_heldout = min(max(round(fraction * n), 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    heldout = set(order[:n_heldout])
    train = [a for i, a in enumerate(articles) if i not in heldout]
    held = [a for i, a in enumerate(articles) if i in heldout]
    return train, held


def lm_blocks(texts: Sequence[Any], tokenizer: Any, block_size: int, *, add_eos: bool = True) -> torch.Tensor:
    """Tokenize texts into one stream and cut it into fixed-length blocks of token ids.

    Args:
        texts: strings, or ``(title, text)`` pairs as returned by `wiki_articles` (the text is used).
        tokenizer: a Hugging Face tokenizer (called with ``add_special_tokens=False``).
        block_size: tokens per block.
        add_eos: append ``tokenizer.eos_token_id`` after each text (when the tokenizer has one), so a block
            that spans two articles marks the boundary.

    Returns:
        LongTensor ``(N, block_size)``, ``N = floor(total_tokens / block_size)``: the stream
        ``ids(text_1) + [eos] + ids(text_2) + [eos] + ...`` cut into consecutive blocks; the tail shorter than a
        block is dropped. Use a block as both ``input_ids`` and ``labels`` (the model shifts internally).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise DataError(
            f"block_size must be an integer >= 2, got {block_size!r}",
            where="kdistill.data.text.lm_blocks",
            fix="use e.g. block_size=256",
        )
    strings = [t[1] if isinstance(t, (tuple, list)) else t for t in texts]
    if not all(isinstance(s, str) for s in strings):
        raise DataError(
            "lm_blocks needs strings or (title, text) pairs",
            where="kdistill.data.text.lm_blocks",
            fix="pass wiki_articles() or a list of str",
        )
    eos = getattr(tokenizer, "eos_token_id", None) if add_eos else None
    stream: list[int] = []
    if strings:
        encoded = tokenizer(strings, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            stream.extend(ids)
            if eos is not None:
                stream.append(int(eos))
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise DataError(
            f"{len(stream)} tokens from {len(strings)} texts do not fill one block of {block_size}",
            where="kdistill.data.text.lm_blocks",
            fix="pass more text or a smaller block_size",
        )
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
