"""``task: causal_lm`` on the shared job skeleton: the run directory contract, finished stages skipped on a re-run,
another config refused, and the YAML dispatch (`kdistill.tasks.load_any`) with ``--set`` overrides."""

from __future__ import annotations

import json
import random

import pytest
import torch

from kdistill.errors import ConfigError
from kdistill.report.html import write_report

transformers = pytest.importorskip("transformers")

from kdistill.tasks import get_task, load_any  # noqa: E402

VOCAB = 40
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dogs", "run", "fast", "birds", "fly", "high", "fish", "swim"]


class CharTokenizer:
    """One id per lowercase letter / space / dot (ids 3..31; 0 pad, 1 bos, 2 eos)."""

    alphabet = "abcdefghijklmnopqrstuvwxyz .,"
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        return {"input_ids": [[3 + self.alphabet.index(c) for c in t.lower() if c in self.alphabet] for t in texts]}

    def get_vocab(self):
        return {**{c: 3 + i for i, c in enumerate(self.alphabet)}, "<pad>": 0, "<s>": 1, "</s>": 2}

    def __len__(self):
        return 3 + len(self.alphabet)


def tiny_teacher():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()


def articles(n: int = 8) -> list[tuple[str, str]]:
    rng = random.Random(0)
    return [(f"article {i}", " ".join(rng.choice(WORDS) for _ in range(60)) + ".") for i in range(n)]


CONFIG = """task: causal_lm
teacher: {path: in-code tiny llama}
student: {every: 2}
data: {block_size: 16, heldout_fraction: 0.25, max_train_blocks: 16, max_heldout_blocks: 4}
distill: {divergence: reverse_kl, ce_weight: 0.5}
train: {steps: 30, batch_size: 4, lr: 1.0e-2, warmup_steps: 0, log_every: 2}
eval: {batch_size: 4}
"""


def _run(cfg, run_dir, logs):
    return get_task("causal_lm").run(cfg, run_dir, progress=False, log=logs.append, teacher=tiny_teacher(),
                                     tokenizer=CharTokenizer(), articles=articles())


def test_causal_lm_task_writes_the_run_directory_and_skips_finished_stages(tmp_path):
    path = tmp_path / "lm.yaml"
    path.write_text(CONFIG)
    task, cfg = load_any(path, ["train.steps=3", "data.max_train_blocks=8"])
    assert task.name == "causal_lm" and cfg.train.steps == 3 and cfg.data.max_train_blocks == 8
    assert cfg.distill.divergence == "reverse_kl"
    run_dir = tmp_path / "run"
    logs: list[str] = []
    first = _run(cfg, run_dir, logs)
    for name in ("config.yaml", "summary.json", "student.safetensors", "baseline.safetensors",
                 "student/config.json"):
        assert (run_dir / name).is_file(), name
    assert load_any(run_dir / "config.yaml")[1] == cfg  # the resolved config, overrides included
    saved = json.loads((run_dir / "summary.json").read_text())
    for key in ("teacher_ppl", "student_init_ppl", "student_ce_ppl", "student_kd_ppl", "params_teacher",
                "params_student", "tokens_per_s", "steps"):
        assert saved[key] is not None and saved[key] > 0, key
    assert saved["steps"] == 3 and saved["stages_loaded"] == []
    assert set(saved["train_terms"]["student"]) == {"kd", "ce"} and set(saved["train_terms"]["baseline"]) == {"ce"}
    assert first["student_kd_ppl"] != first["student_init_ppl"]
    metrics = (run_dir / "metrics.jsonl").read_text()
    write_report(run_dir)  # the automatic one is off in the tests (tests/conftest.py): the same function, later
    report = (run_dir / "report.html").read_text()
    assert '<section id="language-model" data-has-data="true">' in report
    assert f'data-src="student_kd_ppl" data-value="{saved["student_kd_ppl"]}"' in report

    # the same command again: both stages are loaded, not retrained; the summary is rewritten with the same numbers
    logs.clear()
    again = _run(cfg, run_dir, logs)
    assert any(line.startswith("[student] done earlier") for line in logs)
    assert any(line.startswith("[baseline] done earlier") for line in logs)
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # no training step ran
    assert again["stages_loaded"] == ["student", "baseline"]
    for key in ("student_kd_ppl", "student_ce_ppl", "tokens_per_s", "train_terms"):
        assert again[key] == pytest.approx(first[key]) if isinstance(first[key], float) else again[key] == first[key]
    assert json.loads((run_dir / "summary.json").read_text())["stages_loaded"] == ["student", "baseline"]
    assert not list(run_dir.glob(".*.tmp"))  # written atomically: no temporary file left

    # another config in the same folder is refused before anything is loaded or trained
    other = load_any(path, ["train.steps=4", "data.max_train_blocks=8"])[1]
    with pytest.raises(ConfigError, match="different config.yaml"):
        _run(other, run_dir, logs)
    assert load_any(run_dir / "config.yaml")[1] == cfg


def test_run_stage_result_is_none_for_a_finished_stage(tmp_path):
    from kdistill.llm import LMDistiller, block_dataset, student_from_teacher
    from kdistill.tasks.job import run_stage
    from kdistill.train_config import TrainConfig

    teacher = tiny_teacher()
    data = block_dataset(torch.randint(3, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0)))
    train = TrainConfig(steps=2, batch_size=4, log_every=1)
    trained, result = run_stage("student", LMDistiller(student_from_teacher(teacher, every=2), teacher), data,
                                train, seed=0, run_dir=tmp_path, progress=False, log=lambda *_: None)
    assert result is not None and result["steps"] == 2
    fresh = student_from_teacher(teacher, every=2)
    loaded, again = run_stage("student", LMDistiller(fresh, teacher), data, train, seed=0, run_dir=tmp_path,
                              progress=False, log=lambda *_: None)
    assert again is None and loaded is fresh
    for a, b in zip(trained.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_example_config_dispatches_to_causal_lm_and_refuses_typos(tmp_path):
    task, cfg = load_any("examples/smollm2.yaml")
    assert task is get_task("causal_lm") and cfg.task == "causal_lm"
    first = open("examples/smollm2.yaml").readline()
    assert first.startswith("# quick: kdistill run examples/smollm2.yaml --set ")
    with pytest.raises(ConfigError, match="train.stepz"):
        load_any("examples/smollm2.yaml", ["train.stepz=3"])
