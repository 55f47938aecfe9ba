"""Cross-tokenizer distillation wired into ``task: causal_lm``: text views, the batched objective against the
per-sequence reference losses, top-k teacher values, the config, and the one-line errors (vocabulary, text view)."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from kdistill.data.arrays import ArrayDataset  # noqa: E402
from kdistill.errors import ConfigError, KDError, WiringError  # noqa: E402
from kdistill.llm.cross_data import text_view_dataset, text_windows, texts_of  # noqa: E402
from kdistill.llm.cross_distiller import (ColumnTeacher, CrossTokenizerDistiller, bits_per_char,  # noqa: E402
                                          precompute_teacher)
from kdistill.llm.cross_tokenizer import AlignedSpan, build_vocab_map, gold_loss, span_uld_loss  # noqa: E402
from kdistill.llm.data import block_dataset  # noqa: E402
from kdistill.losses import get_loss  # noqa: E402
from kdistill.losses.cross_vocab import sorted_l1, sorted_l1_topk  # noqa: E402
from kdistill.objective import Term  # noqa: E402
from kdistill.tasks import get_task, load_any  # noqa: E402

TEXT = ["The quick brown fox jumps over the lazy dog. Dogs and foxes are friends!",
        "Unbelievably, the café serves crème brûlée daily.  Numbers like 12345 are split.",
        "Tokenizers disagree about where words end;\n\nalignment finds the common boundaries."]


def byte_bpe(vocab_size: int = 300):
    """A tiny byte-level BPE tokenizer (GPT-2 style: 'Ġ' spaces, bytes as pieces), no special tokens added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT * 3, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")


def wordpiece(vocab_size: int = 200):
    """A tiny uncased WordPiece tokenizer (BERT style: '##' continuations, [CLS] ... [SEP] added)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(TEXT * 3, trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]")


def tiny_llama(vocab: int, seed: int):
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def setup():
    teacher_tok, student_tok = byte_bpe(), wordpiece()
    view = text_view_dataset(text_windows(TEXT, student_tok, 16), teacher_tok, student_tok, block_size=16)
    return {"teacher_tok": teacher_tok, "student_tok": student_tok, "view": view,
            "teacher": tiny_llama(len(teacher_tok), 0).eval(), "vocab_map": build_vocab_map(teacher_tok, student_tok)}


def test_text_view_rows_hold_both_tokenizations_of_one_text(setup):
    view, t_tok, s_tok = setup["view"], setup["teacher_tok"], setup["student_tok"]
    v = view.tensors
    texts = texts_of(view)
    assert "".join("".join(texts).split()) == "".join("".join(TEXT).split())  # cut at token boundaries
    assert v["chars"].tolist() == [len(t) for t in texts]
    assert (v["teacher_x"][:, 0] == t_tok.eos_token_id).all()  # the teacher's context token
    for i, text in enumerate(texts):
        s_ids = s_tok(text)["input_ids"]
        assert v["x"][i, :len(s_ids)].tolist() == s_ids and s_ids[0] == s_tok.cls_token_id
        y = v["y"][i, :len(s_ids)].tolist()
        assert y[0] == y[-1] == -100 and -100 not in y[1:-1]  # [CLS] / [SEP] carry no text: no targets
        s_off, t_off = v["student_offsets"][i].tolist(), v["teacher_offsets"][i].tolist()
        spans = [(s, t) for s, t in zip(v["span_student"][i].tolist(), v["span_teacher"][i].tolist()) if s[0] >= 1]
        assert spans and spans[0][0][0] == 1 and spans[0][1][0] == 1  # the first word is distilled
        for (sa, sb), (ta, tb) in spans:  # both token ranges cover the same text, whitespace aside
            s_text = text[s_off[sa][0]:s_off[sb - 1][1]].strip()
            t_text = text[t_off[ta][0]:t_off[tb - 1][1]].strip()
            assert s_text.lower() == t_text.lower() and s_text
        covered = "".join(text[s_off[sa][0]:s_off[sb - 1][1]] for (sa, sb), _ in spans)
        assert covered.replace(" ", "") == text.replace(" ", "").replace("\n", "")


def _reference(student, teacher, batch, vocab_map):
    """Span-weighted means of the per-sequence reference losses (tested against float64 loops)."""
    zs = student(input_ids=batch["x"], attention_mask=batch["attention_mask"]).logits.double()
    zt = teacher(input_ids=batch["teacher_x"], attention_mask=batch["teacher_attention_mask"]).logits.double()
    total = {"uld": 0.0, "gold": 0.0, "matched": 0.0}
    n = 0
    for b in range(len(batch["x"])):
        spans = [AlignedSpan(0, 0, tuple(t), tuple(s)) for s, t in
                 zip(batch["span_student"][b].tolist(), batch["span_teacher"][b].tolist()) if s[0] >= 1]
        total["uld"] += float(span_uld_loss(zs[b], zt[b], spans)) * len(spans)
        gold = gold_loss(zs[b], batch["x"][b], zt[b], batch["teacher_x"][b], spans, vocab_map=vocab_map)
        total["gold"] += float(gold["uld"]) * len(spans)
        total["matched"] += float(gold["matched"]) * len(spans)
        n += len(spans)
    return {k: v / n for k, v in total.items()}


def test_batched_terms_equal_the_reference_losses_and_topk_values_approach_them(setup):
    view, teacher, vocab_map = setup["view"], setup["teacher"], setup["vocab_map"]
    student = tiny_llama(len(setup["student_tok"]), 1)
    terms = [Term("ce", "ce", 1.0), Term("uld", "uld", 1.0), Term("gold", "gold", 1.0),
             Term("hybrid", "gold", 1.0, params={"matched_weight": 0.5})]
    batch = view.batch(torch.arange(4))
    live = CrossTokenizerDistiller(student, teacher, terms, vocab_map=vocab_map)
    live.build(batch)
    got = {k: float(v) for k, v in live(batch).terms.items()}
    with torch.no_grad():
        ref = _reference(student, teacher, batch, vocab_map)
    assert got["uld"] == pytest.approx(ref["uld"], rel=1e-5)
    assert got["gold"] == pytest.approx(ref["gold"], rel=1e-5)
    assert got["hybrid"] == pytest.approx(ref["gold"] + 0.5 * ref["matched"], rel=1e-5)
    assert ref["matched"] > 0
    with torch.no_grad():
        logits = student(input_ids=batch["x"], attention_mask=batch["attention_mask"]).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               batch["y"][:, 1:].reshape(-1))
    assert got["ce"] == pytest.approx(float(ce), rel=1e-5)
    # precomputed values with k covering the vocabulary are the live ones; a small k stays close
    cached = CrossTokenizerDistiller(student, ColumnTeacher(), terms, vocab_map=vocab_map,
                                     teacher_vocab=len(setup["teacher_tok"]))
    for k, tol in ((len(setup["teacher_tok"]), 1e-5), (24, 0.15)):
        cols = precompute_teacher(teacher, view, k=k, vocab_map=vocab_map, matched_k=k, dtype=torch.float32)
        data = ArrayDataset({**{c: t for c, t in view.tensors.items() if c != "index"}, **cols})
        values = {n: float(v) for n, v in cached(data.batch(torch.arange(4))).terms.items()}
        for name in ("uld", "gold", "hybrid"):
            assert values[name] == pytest.approx(got[name], rel=tol), (k, name)
    # gradients reach the student only
    out = live(batch)
    sum(out.terms.values()).backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())


def test_sorted_l1_against_a_topk_teacher_is_sorted_l1_against_its_dense_reading():
    gen = torch.Generator().manual_seed(0)
    student = torch.softmax(torch.randn(5, 7, generator=gen, dtype=torch.float64), -1)
    teacher = torch.softmax(torch.randn(5, 11, generator=gen, dtype=torch.float64) * 2, -1)
    for k in (1, 3, 7, 11):
        top = teacher.sort(-1, descending=True).values[:, :k]
        tail = 1 - top.sum(-1)
        dense = torch.cat([top, (tail / (11 - k))[:, None].expand(-1, 11 - k)], -1) if k < 11 else top
        assert torch.allclose(sorted_l1_topk(student, top, tail, 11), sorted_l1(student, dense))
        # the student's vocabulary larger than the teacher's
        assert torch.allclose(sorted_l1_topk(teacher, student.sort(-1, descending=True).values[:, :min(k, 7)],
                                             1 - student.sort(-1, descending=True).values[:, :min(k, 7)].sum(-1), 7),
                              sorted_l1(teacher, _dense(student, min(k, 7))))
    assert get_loss("uld").cross_vocab and get_loss("gold").cross_vocab and not get_loss("kl").cross_vocab


def _dense(probs, k):
    top = probs.sort(-1, descending=True).values[:, :k]
    rest = probs.shape[1] - k
    return torch.cat([top, ((1 - top.sum(-1)) / rest)[:, None].expand(-1, rest)], -1) if rest else top


def test_a_cross_tokenizer_loss_without_a_text_view_is_one_line(setup):
    student = tiny_llama(len(setup["student_tok"]), 1)
    blocks = block_dataset(torch.randint(4, 100, (4, 12)))
    distiller = CrossTokenizerDistiller(student, setup["teacher"], [Term("uld", "uld", 1.0)])
    with pytest.raises(WiringError, match="need a text view") as err:
        distiller.build(blocks.batch(torch.arange(2)))
    assert "\n" not in str(err.value) and "text_view_dataset" in str(err.value)
    with pytest.raises(WiringError, match="compares one shared vocabulary"):
        CrossTokenizerDistiller(student, setup["teacher"], [Term("kd", "kl", 1.0)])


CONFIG = """task: causal_lm
teacher: {path: in-code tiny llama, cache: {kind: topk, k: 16, batch_size: 4}}
student: {tokenizer: in-code wordpiece, size: {hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32}}
data: {block_size: 16, heldout_fraction: 0.25, max_train_blocks: 8, max_heldout_blocks: 4}
distill:
  terms: [{loss: ce}, {loss: uld, weight: 0.5}, {loss: gold, matched_weight: 1.0}]
train: {steps: 3, batch_size: 4, lr: 1.0e-2, warmup_steps: 0, log_every: 1}
eval: {batch_size: 4}
"""


def test_causal_lm_config_runs_cross_tokenizer_terms_with_a_cached_teacher(setup, tmp_path):
    path = tmp_path / "cross.yaml"
    path.write_text(CONFIG)
    task, cfg = load_any(path)
    assert cfg.distill.cross_tokenizer and cfg.student.tokenizer == "in-code wordpiece"
    logs: list[str] = []
    articles = [(f"a{i}", TEXT[i % 3]) for i in range(12)]
    summary = task.run(cfg, tmp_path / "run", progress=False, log=logs.append, teacher=setup["teacher"],
                       tokenizer=setup["teacher_tok"], student_tokenizer=setup["student_tok"], articles=articles)
    for key in ("teacher_bpc", "student_init_bpc", "student_ce_bpc", "student_kd_bpc"):
        assert math.isfinite(summary[key]) and summary[key] > 0, key
    assert summary["cross_tokenizer"]["teacher"] == "cache" and summary["cross_tokenizer"]["shared_tokens"] > 10
    assert [t["name"] for t in summary["terms"]] == ["ce", "uld", "gold"]
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["student_kd_bpc"] == summary["student_kd_bpc"]
    assert (tmp_path / "run" / "student" / "tokenizer.json").is_file()
    assert list((tmp_path / "run" / "teacher-cache").glob("cross-*.safetensors"))
    assert "bits-per-character" in task.table(summary)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("uld" in json.dumps(m) and "gold" in json.dumps(m) for m in metrics)


@pytest.mark.parametrize("override, message", [
    (["distill.kd_weight=0.5"], "either as terms or as kd_weight"),
    (["distill.terms=[{loss: uld, matched_weight: 1.0}]"], "belong to the gold loss"),
    (["student.tokenizer=null"], "student.size builds a new model"),
    (["distill.terms=[{loss: forward_kl}, {loss: jsd}]"], "at most one same-vocabulary divergence"),
    (["export={format: onnx}"], "not wired for cross-tokenizer runs"),
])
def test_bad_cross_tokenizer_configs_are_one_line(tmp_path, override, message):
    path = tmp_path / "cross.yaml"
    path.write_text(CONFIG)
    with pytest.raises(ConfigError, match=message) as err:
        load_any(path, override)
    assert "\n" not in str(err.value)


def test_same_vocabulary_terms_across_two_tokenizers_exit_2_with_one_line(setup, tmp_path, capsys):
    """The CLI on real files: a tiny teacher folder and a student tokenizer folder; ``forward_kl`` is refused."""
    from kdistill.cli import main

    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student-tok"
    setup["teacher"].save_pretrained(teacher_dir)
    setup["teacher_tok"].save_pretrained(teacher_dir)
    setup["student_tok"].save_pretrained(student_dir)
    config = CONFIG.replace("in-code tiny llama", str(teacher_dir)).replace("in-code wordpiece", str(student_dir))
    path = tmp_path / "cross.yaml"
    path.write_text(config.replace("terms: [{loss: ce}, {loss: uld, weight: 0.5}, {loss: gold, matched_weight: "
                                   "1.0}]", "terms: [{loss: ce}, {loss: forward_kl}]"))
    capsys.readouterr()
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]  # (transformers' loading bars aside)
    assert "Traceback" not in err and len(lines) == 1, err
    assert "forward_kl compares one vocabulary" in lines[0] and "gold" in lines[0]


def byte_fallback_sentencepiece():
    """A SentencePiece-style tokenizer ('▁' spaces) with byte fallback: characters it lacks become <0xAB> tokens;
    no merges (letters of the training text only), so the pieces below do not depend on the trainer's ties."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 3, trainers.BpeTrainer(
        vocab_size=1, show_progress=False,
        special_tokens=["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def test_text_view_with_byte_fallback_pieces_whitespace_multi_token_words_and_specials(setup):
    teacher_tok, student_tok = byte_fallback_sentencepiece(), setup["student_tok"]
    text = "The  foxes é 🍰\n\nunbelievably dogfriends"
    view = text_view_dataset([text], teacher_tok, student_tok, block_size=40)
    v = view.tensors
    s_tok = student_tok.convert_ids_to_tokens(v["x"][0].tolist())
    t_tok = teacher_tok.convert_ids_to_tokens(v["teacher_x"][0].tolist())
    got = [(text[v["student_offsets"][0, s[0], 0]:v["student_offsets"][0, s[1] - 1, 1]], s_tok[slice(*s)],
            t_tok[slice(*t)]) for s, t in zip(v["span_student"][0].tolist(), v["span_teacher"][0].tolist())
           if s[0] >= 1]
    assert got[:6] == [
        ("The", ["the"], ["▁", "<0x54>", "h", "e"]),  # a multi-token word; 'T' is a byte-fallback piece
        ("foxes", ["foxes"], ["▁", "▁", "f", "o", "x", "e", "s"]),  # the doubled space joins the word
        ("é", ["e"], ["▁", "<0xC3>", "<0xA9>"]),  # two byte pieces of one character: one span
        ("🍰", ["[UNK]"], ["▁", "<0xF0>", "<0x9F>", "<0x8D>", "<0xB0>"]),
        ("unbelievably", ["unbelievably"], ["<0x0A>", "<0x0A>", *"unbelievably"]),  # newlines as bytes
        ("dog", ["dog"], ["▁", "d", "o", "g"])]
    # 'friends' after 'dog' is split differently on both sides: cut only at common boundaries
    assert "".join(g[0] for g in got[6:]) == "friends" and len(got) > 7
    assert all(t.startswith("##") for g in got[6:] for t in g[1]) and all(g[2] == list(g[0]) for g in got[6:])
    assert s_tok[0] == "[CLS]" and s_tok[len(student_tok(text)["input_ids"]) - 1] == "[SEP]"  # specials:
    assert v["y"][0, 0] == -100 and t_tok[0] == "</s>" and v["teacher_offsets"][0, 0].tolist() == [0, 0]  # no text
    assert int(v["chars"][0]) == len(text) and texts_of(view) == [text]
    assert bits_per_char.__doc__ and isinstance(KDError("x"), Exception)


def test_docs_quote_the_committed_benchmark_numbers():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = json.loads((root / "benchmarks" / "results" / "cross_tokenizer.json").read_text())
    docs = (root / "docs" / "llm.md").read_text()
    for arm in ("ce", "uld", "gold"):
        stats = result["stats"][arm]
        assert f"{stats['mean']:.4f} ± {stats['std']:.4f}" in docs, arm
        assert result[f"bpc_{arm}"] == pytest.approx(stats["mean"])
    assert f"teacher {result['bpc_teacher']:.4f} bits/char" in docs
    assert result["acceptance"]["met"] == ("**met**" in docs) and result["steps"] == result["plan"]["steps"]
