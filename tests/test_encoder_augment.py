"""TinyBERT-style word-replacement augmentation with neighbours from the teacher's word embeddings."""

from __future__ import annotations

import pytest
import torch

from kdistill.encoders.augment import WordNeighbours, augment_sentences
from kdistill.tasks import get_task
from kdistill.errors import ConfigError

pytest.importorskip("transformers")

# three clusters of whole words, plus entries that are never candidates
WORDS = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "good", "great", "fine", "bad", "awful", "poor",
         "movie", "film", "show", "the", "was", "##s", "a", "1990", "."]
CLUSTER = {"good": 0, "great": 0, "fine": 0, "bad": 1, "awful": 1, "poor": 1, "movie": 2, "film": 2, "show": 2}


def tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}, do_lower_case=True)
    assert tok.get_vocab()["good"] == WORDS.index("good")
    return tok


def embeddings():
    """Cluster words share a direction (closer inside a cluster: 'great' nearest to 'good'); others orthogonal."""
    g = torch.Generator().manual_seed(0)
    e = torch.zeros(len(WORDS), 32)
    for i, w in enumerate(WORDS):
        e[i, 8 + i] = 1.0
        if w in CLUSTER:
            e[i, CLUSTER[w]] = 4.0
    e[WORDS.index("great"), 8 + WORDS.index("good")] = 0.5  # 'great' leans toward 'good'
    return e + 1e-3 * torch.randn(e.shape, generator=g)


def test_neighbours_are_the_nearest_whole_words(tmp_path):
    tok = tokenizer(tmp_path)
    table = WordNeighbours(tok.get_vocab(), embeddings(), k=2)
    assert table("good")[0] == "great" and set(table("good")) == {"great", "fine"}
    assert set(table("awful")) == {"bad", "poor"}
    assert "##s" not in table.words and "1990" not in table.words and "[MASK]" not in table.words
    assert table("unknownword") == []


def test_every_candidate_word_is_replaced_keeping_case_and_punctuation(tmp_path):
    tok = tokenizer(tmp_path)
    out = augment_sentences(["Good movie, was it?", "the 1990 show."], tok, embeddings(), p_replace=1.0,
                            neighbours=1, copies=1)
    first, second = out[0].split(), out[1].split()
    assert first[0] == "Great"                         # capitalised like the word it replaces
    assert first[1] in {"film,", "show,"}              # punctuation kept
    assert first[3] == "it?"                           # not a vocabulary entry: kept
    assert second[1] == "1990" and second[2] in {"movie.", "film."}  # numbers are never candidates
    assert len(out) == 2


def test_augmentation_is_seeded_drops_duplicates_and_rates_follow_p(tmp_path):
    tok = tokenizer(tmp_path)
    texts = [f"the good movie was {w}" for w in ("bad", "awful", "poor", "fine", "great")] * 4
    a = augment_sentences(texts, tok, embeddings(), copies=3, p_replace=0.4, neighbours=3, seed=1)
    assert a == augment_sentences(texts, tok, embeddings(), copies=3, p_replace=0.4, neighbours=3, seed=1)
    assert a != augment_sentences(texts, tok, embeddings(), copies=3, p_replace=0.4, neighbours=3, seed=2)
    assert len(set(a)) == len(a) and not set(a) & set(texts)
    assert augment_sentences(texts, tok, embeddings(), copies=0, neighbours=3) == []
    many = augment_sentences([" ".join(["good"] * 200)], tok, embeddings(), copies=1, p_replace=0.4, neighbours=3, seed=0)
    replaced = sum(w != "good" for w in many[0].split()) / 200
    assert 0.3 < replaced < 0.5


@pytest.mark.parametrize("kwargs, where", [({"copies": -1}, "data.augment.copies"),
                                           ({"p_replace": 0.0}, "data.augment.p_replace")])
def test_bad_settings_name_the_field(tmp_path, kwargs, where):
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        augment_sentences(["good movie"], tokenizer(tmp_path), embeddings(), neighbours=3, **kwargs)


def parse_encoder_config(data):
    return get_task("sentence_embedding").parse({"task": "sentence_embedding", **data})


def test_config_block_validates():
    cfg = parse_encoder_config({"data": {"augment": {"copies": 2}}})
    assert cfg.data.augment.copies == 2 and cfg.data.augment.p_replace == 0.4 and cfg.data.augment.neighbours == 15
    with pytest.raises(ConfigError, match=r"data\.augment\.p_replace"):
        parse_encoder_config({"data": {"augment": {"p_replace": 1.5}}})
