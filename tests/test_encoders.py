"""Encoder distillation (kdistill.encoders) on tiny BERT configs built in code: no downloads."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel  # noqa: E402

from kdistill.config import TrainConfig  # noqa: E402
from kdistill.data.arrays import ArrayDataset  # noqa: E402
from kdistill.encoders import (  # noqa: E402
    EncoderDistiller,
    MaskedLM,
    SentenceEncoder,
    build_student,
    distilbert_terms,
    embedding_terms,
    encoder_features,
    layer_map,
    load_sentence_encoder,
    minilm_terms,
    teacher_layers_of,
    tinybert_terms,
)
from kdistill.encoders.data import wiki_sentences  # noqa: E402
from kdistill.encoders.features import encoder_inputs  # noqa: E402
from kdistill.encoders.distiller import EncoderTeacher  # noqa: E402
from kdistill.engine import Engine  # noqa: E402
from kdistill.errors import WiringError  # noqa: E402
from kdistill.objective import DistillOutput, Objective, Term  # noqa: E402
from kdistill.teachers import CacheSpec, CachedTeacher, build_cache  # noqa: E402

VOCAB = 64


def tiny_config(layers=4, hidden=32, heads=4, **kw):
    return BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=2 * hidden, max_position_embeddings=32, **kw)


def seeded(cls, config, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config).eval()


def token_batch(n=48, length=10, seed=0):
    """ids with [CLS]=1 first, lengths 3..length, [PAD]=0 after; special ids 0..3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, length), generator=g)
    ids[:, 0] = 1
    mask = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        mask[i, :3 + i % (length - 2)] = 1
    return ids * mask, mask


def dataset(n=48, seed=0, **extra):
    ids, mask = token_batch(n, seed=seed)
    return ArrayDataset({"x": ids, "attention_mask": mask, **extra})


def fit(distiller, data, steps=12, lr=3e-3, batch=16):
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=lr, schedule="constant", log_every=steps)
    return Engine(cfg, None, progress=False, log=lambda s: None).fit(distiller, data)


# -- layer maps --------------------------------------------------------------------------------------------------

def test_layer_map_named_strategies():
    assert layer_map("uniform", 4, 12) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert layer_map("uniform", 4, 6) == [(1, 1), (2, 3), (3, 4), (4, 6)]
    assert layer_map("last", 3, 6) == [(1, 4), (2, 5), (3, 6)]
    assert layer_map("last-1", 3, 6) == [(3, 6)]
    assert layer_map("last-2", 3, 6, include_embeddings=True) == [(0, 0), (2, 5), (3, 6)]
    assert layer_map([[2, 6], [1, 3]], 2, 6) == [(2, 6), (1, 3)]


@pytest.mark.parametrize("spec, m, n, message", [
    ([[5, 2]], 4, 6, r"student has layers 0\.\.4 and the teacher 0\.\.6"),
    ([[1, 7]], 4, 6, r"student has layers 0\.\.4 and the teacher 0\.\.6"),
    ("uniform", 8, 6, "more layers"),
    ("last-5", 4, 6, "outside 1..4"),
    ("every", 4, 6, "unknown layer map"),
    ([[1, 2, 3]], 4, 6, "not a pair"),
])
def test_layer_map_errors_name_both_depths(spec, m, n, message):
    with pytest.raises(WiringError, match=message):
        layer_map(spec, m, n, where="distill.terms[0].layers")


def test_attention_terms_refuse_the_embedding_layer():
    with pytest.raises(WiringError, match="no attention"):
        layer_map([[0, 0]], 2, 4, min_layer=1)


# -- builders ----------------------------------------------------------------------------------------------------

def test_fewer_layers_copy_the_chosen_teacher_layers_and_heads():
    teacher = seeded(BertForSequenceClassification, tiny_config(num_labels=3))
    student = build_student(teacher, layers=[2, 4])
    assert type(student) is BertForSequenceClassification and student.config.num_hidden_layers == 2
    assert teacher_layers_of(student) == [2, 4]
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key, value in s_state.items():
        if ".encoder.layer.0." in key:
            assert torch.equal(value, t_state[key.replace("layer.0.", "layer.1.")]), key
        elif ".encoder.layer.1." in key:
            assert torch.equal(value, t_state[key.replace("layer.1.", "layer.3.")]), key
        else:
            assert torch.equal(value, t_state[key]), key  # embeddings, pooler, classifier
    # default with num_layers: the teacher side of the uniform map
    assert teacher_layers_of(build_student(teacher, num_layers=2)) == [2, 4]


def test_copied_student_with_all_layers_reproduces_the_teacher():
    teacher = seeded(BertForMaskedLM, tiny_config())
    student = build_student(teacher, layers=[1, 2, 3, 4]).eval()
    ids, mask = token_batch(4)
    assert torch.allclose(student(input_ids=ids, attention_mask=mask).logits,
                          teacher(input_ids=ids, attention_mask=mask).logits, atol=1e-6)
    # the masked-LM decoder stays tied to the word embeddings
    assert student.cls.predictions.decoder.weight.data_ptr() == \
        student.bert.embeddings.word_embeddings.weight.data_ptr()


def test_narrower_student_pca_embeddings_are_the_projected_teacher_embeddings():
    teacher = seeded(BertModel, tiny_config())
    student = build_student(teacher, num_layers=2, hidden_size=16, embeddings="pca")
    assert student.config.num_attention_heads == 2  # the teacher's head width (8) is kept
    assert student.config.intermediate_size == 32  # the teacher's FFN ratio (2x) is kept
    w_t = teacher.embeddings.word_embeddings.weight.detach().double()
    w_s = student.embeddings.word_embeddings.weight.detach().double()
    # reference: top-16 principal directions by eigen-decomposition of the covariance
    centered = w_t - w_t.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(centered.T @ centered)
    basis = eigenvectors[:, eigenvalues.argsort(descending=True)[:16]]
    # principal directions are defined up to sign: compare |<projection, reference>|
    cos = torch.nn.functional.cosine_similarity(w_s, w_t @ basis, dim=0).abs()
    assert torch.allclose(cos, torch.ones(16, dtype=torch.float64), atol=1e-4)
    pos_t = teacher.embeddings.position_embeddings.weight.detach().double()
    pos_s = student.embeddings.position_embeddings.weight.detach().double()
    assert torch.allclose(pos_s.abs().sum(), (pos_t @ basis).abs().sum(), rtol=1e-4)


def test_builder_is_seeded_and_leaves_global_rng_alone():
    teacher = seeded(BertModel, tiny_config())
    state = torch.random.get_rng_state()
    a = build_student(teacher, num_layers=2, hidden_size=16, seed=5)
    b = build_student(teacher, num_layers=2, hidden_size=16, seed=5)
    c = build_student(teacher, num_layers=2, hidden_size=16, seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": [1, 2], "hidden_size": 16}, "cannot copy teacher layers"),
    ({"layers": [3, 2]}, "strictly increasing"),
    ({"layers": [1, 5]}, r"teacher 0\.\.4"),
    ({"hidden_size": 20}, "head width"),
    ({"hidden_size": 16, "embeddings": "copy"}, "needs the teacher's width"),
])
def test_builder_errors(kwargs, message):
    with pytest.raises(WiringError, match=message):
        build_student(seeded(BertModel, tiny_config()), **kwargs)


# -- features ----------------------------------------------------------------------------------------------------

def test_recomputed_attention_equals_the_models_own_attention():
    model = seeded(BertModel, tiny_config(attn_implementation="eager"))
    ids, mask = token_batch(6)
    own = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    _, feats = encoder_features(model, {"input_ids": ids, "attention_mask": mask},
                                {"attention.1", "attention.4", "hidden.0", "value.2"})
    assert torch.allclose(feats["attention.1"], own[0], atol=1e-6)
    assert torch.allclose(feats["attention.4"], own[3], atol=1e-6)
    assert feats["value.2"].shape == (6, 10, 32) and feats["hidden.0"].shape == (6, 10, 32)


def test_inputs_trim_padding_without_changing_embeddings():
    model = SentenceEncoder(seeded(BertModel, tiny_config()))
    ids, mask = token_batch(6)
    mask[:, 7:] = 0
    ids = ids * mask
    trimmed = encoder_inputs({"x": ids, "attention_mask": mask})
    assert trimmed["input_ids"].shape[1] == int(mask.sum(1).max())
    assert torch.allclose(model(**trimmed), model(ids, mask), atol=1e-6)


# -- the distiller on the engine -------------------------------------------------------------------------------

def test_tinybert_terms_train_a_narrower_student_and_projections_are_not_exported():
    teacher = seeded(BertForSequenceClassification, tiny_config(num_labels=3))
    student = build_student(teacher, num_layers=2, hidden_size=16, num_heads=4, seed=1)
    distiller = EncoderDistiller(student, teacher, tinybert_terms(prediction=True))
    assert distiller.layer_pairs() == {"embd": [(0, 0)], "hidn": [(1, 2), (2, 4)], "attn": [(1, 2), (2, 4)]}
    data = dataset()
    distiller.build(data.batch(torch.arange(16)))
    with torch.no_grad():
        before = {k: float(v) for k, v in distiller(data.batch(torch.arange(48))).terms.items()}
    fit(distiller, data, steps=30)
    with torch.no_grad():
        after = {k: float(v) for k, v in distiller(data.batch(torch.arange(48))).terms.items()}
    assert after["hidn"] < 0.8 * before["hidn"] and after["embd"] < 0.8 * before["embd"]
    assert set(distiller.side.adapters) == {"embd", "hidn"}  # 16 -> 32 projections
    exported = distiller.export_student()
    assert exported is student and not any("adapters" in k for k in exported.state_dict())


def test_the_encoder_distiller_implements_the_objective_contract():
    teacher = seeded(BertModel, tiny_config())
    student = build_student(teacher, num_layers=2, seed=1)
    for preset in (distilbert_terms(), tinybert_terms(), minilm_terms(), embedding_terms()):
        assert all(type(t) is Term for t in preset)
    distiller = EncoderDistiller(student, teacher, minilm_terms())
    assert isinstance(distiller, Objective) and isinstance(distiller.teacher, EncoderTeacher)
    batch = dataset(n=8).batch(torch.arange(8))
    distiller.build(batch)
    out = distiller(batch)
    assert isinstance(out, DistillOutput) and set(out.terms) == {"at", "vr"}
    assert distiller.export_student() is student


@pytest.mark.parametrize("loss, message", [("crd", "cannot be used by an encoder objective"),
                                           ("hidden_mes", "unknown loss 'hidden_mes'")])
def test_terms_of_losses_an_encoder_cannot_use_are_refused(loss, message):
    teacher = seeded(BertModel, tiny_config())
    with pytest.raises(WiringError, match=message):
        EncoderDistiller(build_student(teacher, num_layers=2), teacher, [Term("x", loss)])


def test_distilbert_triple_loss_preset_with_masking():
    teacher = seeded(BertForMaskedLM, tiny_config())
    student = build_student(teacher, num_layers=2)
    masking = MaskedLM(mask_token_id=3, vocab_size=VOCAB, special_token_ids=(0, 1, 2, 3))
    distiller = EncoderDistiller(student, teacher, distilbert_terms(), mlm=masking)
    assert distiller.layer_pairs() == {"cos": [(2, 4)]}
    assert [(t.name, t.weight) for t in distiller.terms] == [("kd", 5.0), ("mlm", 2.0), ("cos", 1.0)]
    result = fit(distiller, dataset(), steps=6)
    assert set(result["terms"]) == {"kd", "mlm", "cos"} and all(v > 0 for v in result["terms"].values())


def test_masked_lm_corruption_statistics():
    ids = torch.randint(4, VOCAB, (400, 50), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[:, 40:] = 0
    masking = MaskedLM(mask_token_id=3, vocab_size=VOCAB, special_token_ids=(0, 1, 2, 3))
    corrupted, labels = masking(ids, mask, generator=torch.Generator().manual_seed(1))
    selected = labels != -100
    assert not selected[:, 0].any() and not selected[:, 40:].any()  # never special or padding
    assert torch.equal(labels[selected], ids[selected])
    rate = selected.sum().item() / (400 * 39)
    assert rate == pytest.approx(0.15, abs=0.01)
    masked = (corrupted == 3) & selected
    assert masked.sum().item() / selected.sum().item() == pytest.approx(0.8, abs=0.03)
    assert torch.equal(corrupted[~selected], ids[~selected])


def test_minilm_terms_across_widths_with_relation_heads():
    teacher = seeded(BertModel, tiny_config())
    student = build_student(teacher, num_layers=2, hidden_size=16, num_heads=2, seed=2)
    with pytest.raises(WiringError, match="head counts differ"):
        EncoderDistiller(student, teacher, minilm_terms()).build(dataset().batch(torch.arange(8)))
    distiller = EncoderDistiller(student, teacher, minilm_terms(num_heads=4, average_heads=True))
    result = fit(distiller, dataset(), steps=4)
    assert set(result["terms"]) == {"at", "vr"}


def test_layer_terms_are_checked_against_depths_at_construction():
    teacher = seeded(BertModel, tiny_config())
    student = build_student(teacher, num_layers=2)
    with pytest.raises(WiringError, match=r"student has layers 0\.\.2 and the teacher 0\.\.4"):
        EncoderDistiller(student, teacher, [Term("h", "hidden_mse", layers=[[3, 4]])])
    with pytest.raises(WiringError, match="needs the teacher's layers"):
        EncoderDistiller(student, lambda batch: {}, [Term("h", "hidden_mse")])
    with pytest.raises(WiringError, match="need a teacher"):
        EncoderDistiller(student, None, embedding_terms())


def test_a_cached_teacher_declaring_its_depth_can_feed_layer_terms():
    teacher = seeded(BertModel, tiny_config())
    data = dataset(n=16)
    with torch.no_grad():
        _, feats = encoder_features(teacher, {"input_ids": data.tensors["x"],
                                              "attention_mask": data.tensors["attention_mask"]}, {"hidden.4"})

    class CachedLastLayer:  # e.g. token states stored once; rows looked up by index, trimmed like the student's
        num_layers = 4

        def __call__(self, batch):
            mask = batch["attention_mask"]
            length = int(mask.sum(1).max())
            return {"hidden.4": feats["hidden.4"][batch["index"], :length], "mask": mask[:, :length].bool()}

    student = build_student(teacher, num_layers=2)
    live = EncoderDistiller(student, teacher, [Term("h", "hidden_mse", layers="last-1")])
    cached = EncoderDistiller(student, CachedLastLayer(), [Term("h", "hidden_mse", layers="last-1")])
    assert cached.layer_pairs() == live.layer_pairs() == {"h": [(2, 4)]}
    batch = data.batch(torch.arange(8))
    cached.build(batch)
    student.eval()  # no dropout: the two objectives must see the same student outputs
    with torch.no_grad():
        assert torch.allclose(cached(batch).terms["h"], live(batch).terms["h"], atol=1e-6)
    with pytest.raises(WiringError, match="teacher gave no"):
        EncoderDistiller(student, CachedLastLayer(), [Term("h", "hidden_mse", layers=[[1, 2]])]).build(batch)


def test_token_terms_refuse_different_tokenizations():
    teacher = seeded(BertModel, tiny_config())
    distiller = EncoderDistiller(build_student(teacher, num_layers=2), teacher, [Term("h", "hidden_mse")])
    ids, mask = token_batch(8)
    shifted = mask.clone()
    shifted[0, 2] = 0  # the teacher sees a different set of real tokens
    with pytest.raises(WiringError, match="different tokens"):
        distiller.build({"x": ids, "attention_mask": mask, "teacher_x": {"input_ids": ids, "attention_mask": shifted}})


def test_embedding_distillation_from_cached_teacher_embeddings_learns_the_similarity_structure(tmp_path):
    from kdistill.encoders.evaluate import similarity_spearman

    teacher = SentenceEncoder(seeded(BertModel, tiny_config(), seed=3))
    data = dataset(n=64, seed=4)
    with torch.no_grad():
        cached = teacher(data.tensors["x"], data.tensors["attention_mask"])
    # the teacher's embeddings go through the shared teacher-output cache (dense float32 'embedding')
    cache = build_cache(EncoderTeacher(teacher, {"embedding"}), data, tmp_path / "cache",
                        CacheSpec(dtype="float32", batch_size=16), outputs=["embedding"], log=lambda s: None)
    assert isinstance(cache, CachedTeacher)
    assert torch.allclose(cache(data.batch(torch.arange(64)))["embedding"], cached, atol=1e-6)
    student = build_student(teacher, num_layers=1, hidden_size=16, seed=4)
    assert student.dim == 32  # projected to the teacher's embedding width
    distiller = EncoderDistiller(student, cache, embedding_terms())
    student.eval()
    with torch.no_grad():
        start = similarity_spearman(student(data.tensors["x"], data.tensors["attention_mask"]), cached)
    fit(distiller, data, steps=60, lr=3e-3)
    student.eval()
    with torch.no_grad():
        end = similarity_spearman(student(data.tensors["x"], data.tensors["attention_mask"]), cached)
    assert end > start + 0.2, (start, end)


def test_simcse_scratch_objective_needs_no_teacher():
    student = build_student(SentenceEncoder(seeded(BertModel, tiny_config())), num_layers=1, hidden_size=16)
    result = fit(EncoderDistiller(student, None, [Term("simcse", "simcse")]), dataset(), steps=3)
    assert result["terms"]["simcse"] > 0


# -- export ------------------------------------------------------------------------------------------------------

def tiny_tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)


def test_saved_student_loads_with_sentence_transformers_and_automodel(tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    tokenizer = tiny_tokenizer(tmp_path)
    teacher = SentenceEncoder(seeded(BertModel, tiny_config()))
    student = build_student(teacher, num_layers=1, hidden_size=16, seed=7).eval()
    path = student.save(tmp_path / "student", tokenizer, max_seq_length=16)
    texts = ["w1 w2 w3", "w5 w9", "w10 w11 w12 w13 w14"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = student(enc["input_ids"], enc["attention_mask"])
    st = sentence_transformers.SentenceTransformer(str(path), device="cpu")
    theirs = torch.as_tensor(st.encode(texts))
    assert theirs.shape == (3, 32)
    assert torch.allclose(ours, theirs, atol=1e-5)
    plain = transformers.AutoModel.from_pretrained(str(path)).eval()
    with torch.no_grad():
        hidden = plain(**enc).last_hidden_state
    assert torch.allclose(hidden, student.encoder(**enc).last_hidden_state, atol=1e-6)
    again = load_sentence_encoder(path).eval()
    with torch.no_grad():
        assert torch.allclose(again(enc["input_ids"], enc["attention_mask"]), ours, atol=1e-6)


def test_wiki_sentence_splitter_keeps_prose_only():
    text = ("Paris is the capital of France. It has many museums and old bridges! Is it big? Yes.\n"
            "==History==\n* Apollo 8 Press Kit (PDF), NASA, Release No.\n"
            "The city grew quickly during the nineteenth century under Haussmann.")
    assert wiki_sentences([("Paris", text)]) == [
        "Paris is the capital of France.", "It has many museums and old bridges!",
        "The city grew quickly during the nineteenth century under Haussmann."]
