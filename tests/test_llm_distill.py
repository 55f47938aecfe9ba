"""Causal-LM distillation on the Engine: the LM distiller, label shift, prompt masking, the top-k cache path,
sequence-level KD (JSONL generation with resume), on-policy GKD, vocabulary safety, the LM config and CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdistill.errors import ConfigError, DataError, WiringError

transformers = pytest.importorskip("transformers")

from kdistill.config import TrainConfig  # noqa: E402
from kdistill.engine import Engine  # noqa: E402
from kdistill.llm import (  # noqa: E402
    HFGenerator,
    LMDistiller,
    OnPolicy,
    Sampling,
    block_dataset,
    build_lm_cache,
    generate_dataset,
    prompt_response_dataset,
    read_jsonl,
    response_dataset,
    shift_labels,
    student_from_teacher,
)
from kdistill.losses.lm import DIVERGENCES  # noqa: E402

VOCAB = 40


def tiny_llama(layers: int = 4, vocab: int = VOCAB, seed: int = 0, hidden: int = 16):
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=32,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                      tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
        for p in model.parameters():  # larger weights: teacher distributions far from uniform
            p.data.mul_(4.0) if p.ndim == 2 else None
    return model.eval()


class CharTokenizer:
    """A tiny stand-in for a Hugging Face tokenizer: one id per lowercase letter / space / dot."""

    alphabet = "abcdefghijklmnopqrstuvwxyz .,"
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        return {"input_ids": [[3 + self.alphabet.index(c) for c in t.lower() if c in self.alphabet] for t in texts]}

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(self.alphabet[i - 3] for i in row.tolist() if 3 <= i < 3 + len(self.alphabet))
                for row in rows]

    def get_vocab(self):
        return {**{c: 3 + i for i, c in enumerate(self.alphabet)}, "<pad>": 0, "<s>": 1, "</s>": 2}

    def __len__(self):
        return 3 + len(self.alphabet)


def blocks(n: int = 16, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def full_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        mask = batch.get("attention_mask")
        kwargs = {"input_ids": batch["x"]}
        if mask is not None:
            kwargs.update(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
        return model(**kwargs).logits.double()


def manual_kd(student, teacher, batch, temperature=1.0, rows=None) -> torch.Tensor:
    """KL(P_t || Q_s) per position t with y[t + 1] != -100, averaged; from the models' full logits in float64
    (only the first `rows` vocabulary entries when the heads are padded beyond the tokenizer)."""
    s = full_logits(student, batch)[..., :rows] / temperature
    t = full_logits(teacher, batch)[..., :rows] / temperature
    y = batch["y"]
    total, count = 0.0, 0
    for b in range(y.shape[0]):
        for pos in range(y.shape[1] - 1):
            if y[b, pos + 1] == -100:
                continue
            p = torch.softmax(t[b, pos], -1)
            total += float((p * (p.log() - torch.log_softmax(s[b, pos], -1))).sum())
            count += 1
    return torch.tensor(total / count, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# the distiller
# ---------------------------------------------------------------------------------------------------------------


def test_lm_distiller_trains_through_the_engine_and_kd_decreases(tmp_path):
    teacher = tiny_llama(layers=4)
    student = student_from_teacher(teacher, every=2)
    data = block_dataset(blocks(32, 12))
    probe = data.batch(torch.arange(8))
    distiller = LMDistiller(student, teacher, kd_weight=1.0, ce_weight=0.1)
    with torch.no_grad():
        before = distiller(probe).terms
    result = Engine(TrainConfig(steps=40, batch_size=8, lr=1e-2, schedule="constant", log_every=10), tmp_path,
                    progress=False).fit(distiller, data)
    with torch.no_grad():
        after = distiller(probe).terms
    assert set(result["terms"]) == {"kd", "ce"}
    assert float(after["kd"]) < 0.5 * float(before["kd"])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r["terms"]["kd"] for r in lines if "terms" in r]
    assert logged[-1] < logged[0]
    assert distiller.export_student() is student and type(student) is type(teacher)


def test_label_shift_matches_hugging_face_and_a_manual_computation():
    teacher, student = tiny_llama(layers=2, seed=1), tiny_llama(layers=1, seed=2)
    ids = blocks(3, 10, seed=3)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[2, 7:] = -100  # padding at the end
    batch = {"x": ids, "y": labels}
    assert torch.equal(shift_labels(labels)[:, :-1], labels[:, 1:]) and (shift_labels(labels)[:, -1] == -100).all()
    ce = LMDistiller(student, None, kd_weight=0.0, ce_weight=1.0)
    with torch.no_grad():
        value = ce(batch).terms["ce"]
        reference = student(input_ids=ids, labels=labels).loss  # HF shifts internally
    torch.testing.assert_close(value.double(), reference.double(), rtol=1e-5, atol=1e-6)
    logits = full_logits(student, batch)
    nll = [-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]] for b in range(3) for t in range(9)
           if labels[b, t + 1] != -100]
    torch.testing.assert_close(value.double(), torch.stack(nll).mean(), rtol=1e-5, atol=1e-6)
    kd = LMDistiller(student, teacher, kd_weight=1.0)
    with torch.no_grad():
        torch.testing.assert_close(kd(batch).terms["kd"].double(), manual_kd(student, teacher, batch),
                                   rtol=1e-4, atol=1e-6)


def test_prompt_and_padding_tokens_are_ignored():
    tok = CharTokenizer()
    data = prompt_response_dataset(["the cat", "a longer prompt here"], ["sat.", "ok"], tok,
                                   max_prompt_tokens=8, max_response_tokens=6)
    x, y, mask = data.tensors["x"], data.tensors["y"], data.tensors["attention_mask"]
    assert x.shape == (2, 14) and data.tensors["prompt_len"].tolist() == [8, 8]
    assert (y[:, :8] == -100).all()  # prompt columns never count
    assert y[0, 8:13].tolist() == [3 + tok.alphabet.index(c) for c in "sat."] + [2]  # response + eos
    assert (y[0, 13:] == -100).all() and mask[0].tolist() == [0] + [1] * 12 + [0]  # left pad 'the cat', right pad
    teacher, student = tiny_llama(layers=2, seed=1), tiny_llama(layers=1, seed=2)
    batch = data.batch(torch.arange(2))
    distiller = LMDistiller(student, teacher, kd_weight=1.0, ce_weight=1.0)
    with torch.no_grad():
        terms = distiller(batch).terms
        # the reference averages over response positions only; so must the distiller
        torch.testing.assert_close(terms["kd"].double(), manual_kd(student, teacher, batch), rtol=1e-4, atol=1e-6)
        count = int((shift_labels(batch["y"]) != -100).sum())
        all_positions = dict(batch, y=batch["x"].clone())  # every token a target: a different mean
        assert abs(float(distiller(all_positions).terms["kd"]) - float(terms["kd"])) > 1e-4
    assert count == 5 + 3  # 'sat.' + eos, 'ok' + eos
    # labels -100 on every position: the loss is an attached zero, not NaN
    empty = dict(batch, y=torch.full_like(batch["y"], -100))
    terms = distiller(empty).terms
    assert float(terms["kd"].detach()) == 0.0 and float(terms["ce"].detach()) == 0.0
    sum(terms.values()).backward()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_cache_with_k_equal_to_vocabulary_equals_the_live_teacher(tmp_path, divergence):
    teacher = tiny_llama(layers=2, seed=1)
    data = block_dataset(blocks(6, 10, seed=4))
    cached = build_lm_cache(teacher, data, tmp_path / divergence, k=VOCAB, dtype="float32", temperature=2.0,
                            batch_size=4, progress=False, log=lambda *_: None)
    values = {}
    for name, source in (("live", teacher), ("cache", cached)):
        student = tiny_llama(layers=1, seed=2)
        d = LMDistiller(student, source, divergence=divergence, temperature=2.0, beta=0.3, alpha=0.2)
        batch = data.batch(torch.tensor([4, 1, 3]))
        batch["y"] = batch["y"].clone()
        batch["y"][0, :5] = -100
        d.build(batch)
        loss = d(batch).terms["kd"]
        loss.backward()
        values[name] = (loss.detach(), student.lm_head.weight.grad.clone(),
                        student.model.embed_tokens.weight.grad.clone())
    for live, cache in zip(values["live"], values["cache"]):
        torch.testing.assert_close(cache, live, rtol=2e-4, atol=1e-6)


def test_topk_cache_trains_through_the_engine_and_is_reused(tmp_path):
    teacher = tiny_llama(layers=2, seed=1)
    data = block_dataset(blocks(16, 10, seed=5))
    logs = []
    cached = build_lm_cache(teacher, data, tmp_path / "cache", k=8, progress=False, log=logs.append)
    again = build_lm_cache(teacher, data, tmp_path / "cache", k=8, progress=False, log=logs.append)
    assert again.key == cached.key
    with pytest.raises(Exception, match="stale"):
        build_lm_cache(teacher, data, tmp_path / "cache", k=4, progress=False, log=logs.append)
    student = student_from_teacher(teacher, every=2)
    live = LMDistiller(student_from_teacher(teacher, every=2), teacher)
    distiller = LMDistiller(student, cached, divergence="forward_kl")
    probe = data.batch(torch.arange(8))
    with torch.no_grad():
        before, dense = float(distiller(probe).terms["kd"]), float(live(probe).terms["kd"])
    assert 0 < before <= dense + 1e-6  # k + 1 buckets: coarse-graining never increases the KL
    Engine(TrainConfig(steps=20, batch_size=8, lr=1e-2, schedule="constant", log_every=10), None,
           progress=False).fit(distiller, data)
    with torch.no_grad():
        assert float(distiller(probe).terms["kd"]) < before


# ---------------------------------------------------------------------------------------------------------------
# vocabulary safety
# ---------------------------------------------------------------------------------------------------------------


def test_vocabulary_mismatch_is_refused_before_training(tmp_path):
    teacher = tiny_llama(layers=2, vocab=48)
    student = tiny_llama(layers=1, vocab=VOCAB)
    with pytest.raises(WiringError, match="student vocabulary size 40 != teacher vocabulary size 48") as err:
        LMDistiller(student, teacher)
    assert "\n" not in str(err.value) and "sequence-level KD" in str(err.value)
    # a cached teacher is checked in the engine's dry run: nothing is trained, no checkpoint written
    cached = build_lm_cache(teacher, block_dataset(blocks(8, 10)), tmp_path / "cache", k=4, progress=False,
                            log=lambda *_: None)
    distiller = LMDistiller(student, cached)
    before = [p.clone() for p in student.parameters()]
    with pytest.raises(WiringError, match="student vocabulary size 40 != cached teacher vocabulary size 48"):
        Engine(TrainConfig(steps=5, batch_size=4), tmp_path / "run", progress=False).fit(
            distiller, block_dataset(blocks(8, 10)))
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").rglob("*"))


def test_distiller_refuses_bad_wiring():
    teacher = tiny_llama(layers=2)
    with pytest.raises(WiringError, match="unknown divergence"):
        LMDistiller(tiny_llama(1), teacher, divergence="kl")
    with pytest.raises(WiringError, match="nothing to train on"):
        LMDistiller(tiny_llama(1), None)
    with pytest.raises(WiringError, match="needs a live teacher"):
        LMDistiller(tiny_llama(1), lambda batch: {}, on_policy=OnPolicy(lambda_=1.0))
    d = LMDistiller(tiny_llama(1), teacher)
    with pytest.raises(WiringError, match="labels 'y' shaped like its input ids"):
        d.build({"x": blocks(2, 8), "y": blocks(2, 7)})


# ---------------------------------------------------------------------------------------------------------------
# on-policy (GKD)
# ---------------------------------------------------------------------------------------------------------------


def test_on_policy_decision_is_a_seeded_function_of_the_step():
    a, b = OnPolicy(lambda_=0.5, seed=3), OnPolicy(lambda_=0.5, seed=3)
    path = [a.use_at(s) for s in range(400)]
    assert path == [b.use_at(s) for s in range(400)]  # resumable: no hidden state
    assert 0.4 < sum(path) / 400 < 0.6
    assert path != [OnPolicy(lambda_=0.5, seed=4).use_at(s) for s in range(400)]
    assert not any(OnPolicy(lambda_=0.0).use_at(s) for s in range(50))
    assert all(OnPolicy(lambda_=1.0).use_at(s) for s in range(50))


def test_gkd_lambda_zero_never_samples_and_lambda_one_trains_on_student_samples_only(monkeypatch):
    tok = CharTokenizer()
    data = prompt_response_dataset(["the cat sat", "dogs run", "a b c", "zebra"], ["on the mat.", "fast.", "d e.",
                                                                                   "stripes."], tok,
                                   max_prompt_tokens=6, max_response_tokens=5)
    teacher = tiny_llama(layers=2, seed=1)
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, log_every=1)

    off = LMDistiller(tiny_llama(layers=1, seed=2), teacher, ce_weight=1.0, tokenizer=tok,
                      on_policy=OnPolicy(lambda_=0.0, max_new_tokens=4))
    monkeypatch.setattr(off.student, "generate", lambda *a, **k: pytest.fail("lambda=0 must not sample"))
    result = Engine(cfg, None, progress=False).fit(off, data)
    assert result["terms"]["ce"] > 0 and not off.last_on_policy

    student = tiny_llama(layers=1, seed=2)
    on = LMDistiller(student, teacher, ce_weight=1.0, tokenizer=tok,
                     on_policy=OnPolicy(lambda_=1.0, max_new_tokens=4, seed=7))
    calls = []
    real_generate = student.generate
    monkeypatch.setattr(student, "generate", lambda *a, **k: calls.append(k) or real_generate(*a, **k))
    result = Engine(cfg, None, progress=False).fit(on, data)
    assert len(calls) == 3 and on.last_on_policy  # one batched generate per step
    assert calls[0]["max_new_tokens"] == 4 and calls[0]["input_ids"].shape == (4, 6)
    assert result["terms"]["ce"] == 0.0 and result["terms"]["kd"] > 0

    # the on-policy batch: prompt masked, sampled tokens (up to the first eos) are the targets; the divergence is
    # the teacher-vs-student KL on exactly those tokens (over the tokenizer's 32 ids: the heads' other 8 rows are
    # padding, which check_vocab tells apart with the tokenizer)
    batch = data.batch(torch.arange(4))
    on.set_step(5)
    sampled = on.sample(batch)
    assert torch.equal(sampled["x"], on.sample(batch)["x"])  # seeded by (seed, step)
    assert sampled["x"].shape == (4, 10) and (sampled["y"][:, :6] == -100).all()
    generated = sampled["y"][:, 6:]
    assert ((generated == -100) | (generated == sampled["x"][:, 6:])).all()
    with torch.no_grad():
        terms = on(batch).terms
    torch.testing.assert_close(terms["kd"].double(), manual_kd(student, teacher, sampled, rows=len(tok)),
                               rtol=1e-4, atol=1e-6)


def test_gkd_on_text_blocks_takes_the_first_prompt_tokens_as_the_prompt():
    teacher = tiny_llama(layers=2, seed=1)
    batch = block_dataset(blocks(4, 12, seed=6)).batch(torch.arange(4))
    d = LMDistiller(tiny_llama(layers=1, seed=2), teacher,
                    on_policy=OnPolicy(lambda_=1.0, max_new_tokens=3, prompt_tokens=5))
    d.build(batch)
    sampled = d.sample(batch)
    assert sampled["x"].shape == (4, 8) and torch.equal(sampled["x"][:, :5], batch["x"][:, :5])
    assert (sampled["y"][:, :5] == -100).all() and (sampled["y"][:, 5] != -100).all()
    assert float(d(batch).terms["kd"].detach()) > 0
    no_prompt = LMDistiller(tiny_llama(layers=1, seed=2), teacher, on_policy=OnPolicy(lambda_=1.0))
    with pytest.raises(WiringError, match="where the prompt ends"):
        no_prompt.build(batch)


# ---------------------------------------------------------------------------------------------------------------
# sequence-level (black-box) KD
# ---------------------------------------------------------------------------------------------------------------


class EchoTeacher:
    """A black-box teacher stand-in (no network): answers 'ok <prompt reversed>' and counts the prompts asked."""

    name = "echo"

    def __init__(self):
        self.asked: list[str] = []

    def __call__(self, prompts):
        self.asked.extend(prompts)
        return [f"ok {p[::-1]}." for p in prompts]


def test_generate_dataset_records_settings_and_resumes_after_a_kill(tmp_path):
    prompts = ["the cat", "a dog", "fish swim", "birds fly", "cows moo"]
    out = tmp_path / "teacher.jsonl"
    sampling = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 16}
    with pytest.raises(WiringError, match="sampling settings are not stated"):
        generate_dataset(EchoTeacher(), prompts, out)
    first = EchoTeacher()
    rows = generate_dataset(first, prompts, out, sampling=sampling, batch_size=2)
    assert [r["id"] for r in rows] == list(range(5)) and rows[1]["response"] == "ok god a."
    assert all(r["sampling"] == sampling and r["teacher"] == "echo" for r in rows)
    # a kill during the 4th row: two complete rows and a torn third line are left
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:15])
    assert len(read_jsonl(out)) == 2
    second = EchoTeacher()
    resumed = generate_dataset(second, prompts, out, sampling=sampling, batch_size=2)
    assert second.asked == prompts[2:]  # only the missing prompts are asked
    assert resumed == rows and read_jsonl(out) == rows
    third = EchoTeacher()
    assert generate_dataset(third, prompts, out, sampling=sampling) == rows and third.asked == []
    with pytest.raises(DataError, match="other settings"):
        generate_dataset(EchoTeacher(), prompts, out, sampling={**sampling, "temperature": 1.0})
    with pytest.raises(WiringError, match="one string per prompt"):
        generate_dataset(lambda ps: ["x"], prompts, tmp_path / "bad.jsonl", sampling=sampling, batch_size=2)


def test_sequence_level_kd_with_an_hf_teacher_and_student_fine_tuning(tmp_path):
    tok = CharTokenizer()
    teacher = tiny_llama(layers=2, seed=1)
    gen = HFGenerator(teacher, tok, Sampling(max_new_tokens=6, temperature=0.8, top_p=1.0, seed=0), name="tiny")
    prompts = ["the cat", "a dog runs", "fish", "birds fly high", "cows", "hello there"]
    rows = generate_dataset(gen, prompts, tmp_path / "t.jsonl", batch_size=4)
    assert all(r["sampling"]["max_new_tokens"] == 6 and r["teacher"] == "tiny" for r in rows)
    data = response_dataset(tmp_path / "t.jsonl", tok, max_prompt_tokens=12, max_response_tokens=8)
    assert len(data) == 6 and (data.tensors["y"][:, :12] == -100).all()
    student = tiny_llama(layers=1, seed=3)
    distiller = LMDistiller(student, None, kd_weight=0.0, ce_weight=1.0)
    probe = data.batch(torch.arange(6))
    with torch.no_grad():
        before = float(distiller(probe).terms["ce"])
    Engine(TrainConfig(steps=30, batch_size=6, lr=1e-2, schedule="constant", log_every=10), None,
           progress=False).fit(distiller, data)
    with torch.no_grad():
        assert float(distiller(probe).terms["ce"]) < 0.7 * before


# ---------------------------------------------------------------------------------------------------------------
# config, CLI and the quick benchmark
# ---------------------------------------------------------------------------------------------------------------


def test_lm_config_parses_the_example_and_reports_one_line_errors(tmp_path):
    from kdistill.tasks import get_task, load_any

    task, cfg = load_any("examples/smollm2.yaml")
    assert task.name == "causal_lm" and load_any("examples/mnist1d_kd.yaml")[0].name == "classification"
    parse_lm_config = get_task("causal_lm").parse
    assert cfg.student.every == 3 and cfg.teacher.cache.k == 64 and cfg.distill.divergence == "forward_kl"
    with pytest.raises(ConfigError, match=r"distill\.divergence: got 'kl'; allowed") as err:
        parse_lm_config({"task": "causal_lm", "distill": {"divergence": "kl"}})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="exclude each other"):
        parse_lm_config({"task": "causal_lm", "teacher": {"cache": {}}, "distill": {"on_policy": {"lambda": 1}}})
    assert parse_lm_config({"task": "causal_lm", "teacher": {"path": "x"},
                            "distill": {"on_policy": {"lambda": 0.25}}}).distill.on_policy.lambda_ == 0.25


def test_cli_errors_on_an_lm_config_are_one_line_with_exit_2(tmp_path, capsys):
    from kdistill.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("task: causal_lm\nstudent: {every: 3, layers: [0, 1]}\n")
    assert main(["cache", "build", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdistill: error:") and "exactly one of 'every' and 'layers'" in err[0]
    missing = tmp_path / "folder.yaml"
    missing.write_text(f"task: causal_lm\nteacher: {{path: {tmp_path / 'nope'}, cache: {{k: 4}}}}\n")
    assert main(["cache", "build", str(missing), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not an existing local folder" in err[0]


def test_quick_benchmark_runs_the_whole_pipeline(tmp_path):
    pytest.importorskip("gensim")
    pytest.importorskip("tokenizers")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "llm_distill.py"
    spec = importlib.util.spec_from_file_location("llm_distill_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "quick.json"
    assert bench.main(["--quick", "--json", str(out), "--out", str(tmp_path / "run")]) == 0
    result = json.loads(out.read_text())
    for key in ("teacher_ppl", "student_init_ppl", "student_ce_ppl", "student_kd_ppl", "params_teacher",
                "params_student", "tokens_per_s", "steps"):
        assert key in result and math.isfinite(result[key]) and result[key] > 0, key
    assert result["steps"] == 40 and result["params_student"] < result["params_teacher"]
    assert result["kd_over_ce_ppl"] == pytest.approx(result["student_kd_ppl"] / result["student_ce_ppl"])
    assert result["objective"]["teacher"] == "cache" and result["cache"]["k"] == 32
    # both arms trained, for the same steps, from the same start
    assert result["student_kd_ppl"] != result["student_init_ppl"] != result["student_ce_ppl"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = {r["stage"]: r["step"] for r in records if "terms" in r}
    assert last == {"student": 40, "baseline": 40}
    assert set(records[-1]["terms"]) == {"ce"} and any(set(r["terms"]) == {"kd"} for r in records if "terms" in r)
    assert (tmp_path / "run" / "student" / "config.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert reloaded.config.num_hidden_layers == 2
    # the exported student (a local folder with its tokenizer) as the teacher of `kdistill cache build`
    from kdistill.cli import main

    config = tmp_path / "lm.yaml"
    config.write_text(f"task: causal_lm\nteacher: {{path: {tmp_path / 'run' / 'student'}, cache: {{k: 4}}}}\n"
                      "data: {block_size: 16, max_train_blocks: 6}\n")
    assert main(["cache", "build", str(config), "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "cli" / "teacher-cache" / "manifest.json").read_text())
    assert manifest["num_samples"] == 6 and manifest["fields"][0]["k"] == 4
