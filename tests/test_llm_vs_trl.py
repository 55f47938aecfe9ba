"""The pieces of benchmarks/llm_vs_trl.py on tiny models: kdistill's token-level KD and TRL's GKDTrainer (lmbda=0,
beta=0) set up as the benchmark does compute the same loss on the same batches, step after step, and it is the
forward KL of the paper's definition computed independently in float64; the docs quote the committed result."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
needs_trl = pytest.mark.skipif(
    importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None,
    reason="TRL (and its datasets dependency) is not installed (pip install trl): the benchmark's TRL side needs it")
ROOT = Path(__file__).resolve().parents[1]

_PATH = ROOT / "benchmarks" / "llm_vs_trl.py"
_spec = importlib.util.spec_from_file_location("llm_vs_trl_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # its dataclass looks its module up
_spec.loader.exec_module(bench)

VOCAB = 96


def _models(seed: int = 0) -> dict:
    from kdistill.llm import student_from_teacher

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    teacher = transformers.LlamaForCausalLM(config).eval()
    student = student_from_teacher(teacher, layers=[1])
    with torch.no_grad():  # a student that differs from the teacher's layer, so the KL is not tiny
        for p in student.model.layers.parameters():
            p.add_(0.2 * torch.randn_like(p))
    blocks = torch.randint(0, VOCAB, (12, 16), generator=torch.Generator().manual_seed(seed))
    return {"teacher": teacher, "student": student, "tokenizer": bench.tiny_tokenizer(), "blocks": blocks}


def _forward_kl64(teacher, student, ids: torch.Tensor) -> float:
    """mean over positions t < T-1 of KL(softmax(z_t^teacher) || softmax(z_t^student)), float64."""
    with torch.no_grad():
        zt = teacher(input_ids=ids).logits[:, :-1].double()
        zs = student(input_ids=ids).logits[:, :-1].double()
    p, log_p, log_q = zt.softmax(-1), zt.log_softmax(-1), zs.log_softmax(-1)
    return float((p * (log_p - log_q)).sum(-1).mean())


@needs_trl
def test_kdistill_and_trl_losses_agree_step_by_step():
    settings = bench.Settings(steps=3, batch=4, seq_len=16, lr=1e-3, threads=1)
    models = _models()
    initial = {k: v.clone() for k, v in models["student"].state_dict().items()}
    first_batch = models["blocks"][bench.data_order(len(models["blocks"]), settings)[:settings.batch]]
    expected_step0 = _forward_kl64(models["teacher"], models["student"], first_batch)

    losses, starts = {}, {}
    for framework in ("kdistill", "trl"):
        models["student"].load_state_dict(initial)
        record = bench.Record()
        bench.job(framework, models, settings, record, settings.steps)()
        losses[framework], starts[framework] = record.loss_values(), record.starts
    assert len(losses["kdistill"]) == len(losses["trl"]) == settings.steps
    assert len(starts["kdistill"]) == len(starts["trl"]) == settings.steps  # one mark per step
    assert losses["kdistill"][0] == pytest.approx(expected_step0, rel=1e-5)
    assert losses["trl"][0] == pytest.approx(expected_step0, rel=1e-5)
    # same batches, optimizer, lr and clipping: the later steps agree too (they differ if any of these differ)
    for a, b in zip(losses["kdistill"], losses["trl"], strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    assert losses["kdistill"][-1] != pytest.approx(losses["kdistill"][0], rel=1e-3)  # training moved the loss


def test_data_order_is_kdistills_step_sampler():
    from kdistill.engine.sampler import StepSampler

    settings = bench.Settings(steps=4, batch=3)
    order = bench.data_order(12, settings)
    sampler = StepSampler(12, 3, seed=bench.SEED)
    assert order.tolist() == torch.cat([sampler.indices(s) for s in range(4)]).tolist()
    assert sorted(order.tolist()) == list(range(12))  # one epoch: every row once


def test_windows_after_warmup():
    settings = bench.Settings(warmup=2, window=2)
    starts = [0.0, 5.0, 6.0, 7.5, 9.0, 10.0, 11.0, 12.5]
    assert bench.windows(starts, settings) == [3.0, 2.0]  # steps 2-3 and 4-5; 6-7 has no end mark


def test_docs_quote_the_committed_result():
    result = json.loads((ROOT / "benchmarks" / "results" / "llm_vs_trl.json").read_text())
    text = " ".join((ROOT / "docs" / "llm.md").read_text().split())
    assert not result["quick"] and result["vocab"] == 49152
    mib = {f: f"{v / 2**20:,.0f} MiB" for f, v in result["peak_mem_bytes"].items()}
    rss = {f: f"{v / 2**20:,.0f} MiB" for f, v in result["peak_rss_bytes"].items()}
    tps = {f: f"{v:.1f}" for f, v in result["tokens_per_s"].items()}
    assert (f"| training tokens/s (median of 8 windows) | {tps['kdistill']} | {tps['trl']} | - |") in text
    assert f"| peak training memory | {mib['kdistill']} | {mib['trl']} | {mib['trl_gc']} |" in text
    assert f"| peak RSS of the process | {rss['kdistill']} | {rss['trl']} | {rss['trl_gc']} |" in text
    loss0, loss_end = result["step0_loss"], result["final_loss"]
    assert f"| loss at step 0 (the same first batch) | {loss0['kdistill']:.6f} | {loss0['trl']:.6f} | - |" in text
    assert f"| loss at the 6th (last) step | {loss_end['kdistill']:.6f} | {loss_end['trl']:.6f} | - |" in text
    assert f"kdistill {result['tokens_per_s_ratio']:.2f}x TRL's tokens/s" in text
    rounds = result["tokens_per_s_ratio_per_round"]
    assert f"the two rounds gave {rounds[0]:.2f}x and {rounds[1]:.2f}x" in text
    assert f"Memory: {result['peak_mem_ratio']:.3f}x" in text
    no_gc = result["peak_mem_bytes"]["kdistill"] / result["peak_mem_bytes"]["trl"]
    assert f"{no_gc:.3f}x against TRL without it" in text
    assert f"is {result['peak_rss_ratio']:.2f}x (`peak_rss_ratio`)" in text
    assert f"(`step0_loss_abs_diff` {result['step0_loss_abs_diff']}" in text
    assert f"within {result['max_step_loss_abs_diff']:.2g} (`max_step_loss_abs_diff`)" in text
    assert result["settings"]["steps"] == 6 and result["settings"]["threads"] == 1
    # the memory-only runs at other sizes
    big = json.loads((ROOT / "benchmarks" / "results" / "llm_vs_trl_mem_2048.json").read_text())
    small_chunk = json.loads((ROOT / "benchmarks" / "results" / "llm_vs_trl_mem_chunk128.json").read_text())
    assert big["settings"]["batch"] * big["settings"]["seq_len"] == 2048
    assert small_chunk["settings"]["chunk_size"] == 128
    m = {name: {f: f"{v / 2**20:,.0f} MiB" for f, v in r["peak_mem_bytes"].items()}
         for name, r in (("big", big), ("chunk", small_chunk))}
    assert (f"kdistill needs {m['big']['kdistill']} and TRL {m['big']['trl_gc']}: **{big['peak_mem_ratio']:.3f}x** "
            f"(whole process {big['peak_rss_ratio']:.3f}x)") in text
    assert (f"measured {m['chunk']['kdistill']} against TRL's {m['chunk']['trl_gc']} "
            f"({small_chunk['peak_mem_ratio']:.3f}x), more than the {mib['kdistill']}") in text
    moved = abs(small_chunk["peak_mem_bytes"]["trl_gc"] - result["peak_mem_bytes"]["trl_gc"]) / 2**20
    assert f"TRL's figure moved by {moved:.0f} MiB between the two runs" in text
