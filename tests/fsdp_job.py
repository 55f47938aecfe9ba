"""A tiny LM distillation job for tests/test_fsdp.py: run in one process (`run_job(out, world=1)`) or under torchrun
with ``python fsdp_job.py OUT [--kill-at STEP] [--set KEY=VALUE ...] [--bf16-stage]`` (FSDP2 over gloo). The stage's
final student is ``OUT/student.safetensors`` (a plain safetensors file, written by the job skeleton on rank 0).
``--bf16-stage`` then runs a second stage ``bf16`` in the same processes: bf16 compute, the teacher whole on every
process, no activation checkpointing, gathered weights kept between forward and backward; ``--encoder-stage`` a
stage ``encoder``: TinyBERT-style layer terms from a BERT teacher to a narrower student through learned projections
(built on the first batch, so each process starts from process 0's); ``--task`` the whole ``task: causal_lm`` job
of tests/test_task_causal_lm.py in ``OUT/task`` (KD arm from a top-k teacher cache, CE arm, perplexities)."""

from __future__ import annotations

import os
import sys

import torch

GLOBAL_BATCH = 4
VOCAB = 300


def tiny_llama(layers: int, seed: int, head_scale: float = 1.0):
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)  # a teacher with peaked next-token distributions
    return model


def blocks(n: int = 32, length: int = 12) -> torch.Tensor:
    """Token blocks with structure (a noisy +7 progression), so that the teacher's predictions are learnable."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    noise = (torch.rand(n, length, generator=g) < 0.2) * torch.randint(0, VOCAB, (n, length), generator=g)
    return (start + 7 * torch.arange(length) + noise) % VOCAB


class KillAt:
    """Wraps an objective: the process dies (no cleanup, like a kill) when step `step` begins."""

    def __init__(self, objective, step: int):
        self.__dict__["_inner"], self.__dict__["_step"] = objective, step

    def set_step(self, step: int) -> None:
        if step == self._step:
            os._exit(1)
        self._inner.set_step(step)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)

    def __call__(self, batch):
        return self._inner(batch)


def train_config(world: int, overrides: list[str]):
    from kdistill.configbase import apply_overrides
    from kdistill.train_config import TrainConfig

    raw = {"steps": 6, "batch_size": GLOBAL_BATCH // world, "lr": 1e-2, "optimizer": "adamw", "schedule": "cosine",
           "warmup_steps": 0, "clip_grad_norm": 1.0, "log_every": 2, "checkpoint_every": 3, "threads": 1}
    if world > 1:
        raw["distributed"] = {"kind": "fsdp2", "activation_checkpointing": True}
    return TrainConfig(**apply_overrides(raw, list(overrides), TrainConfig))


BF16 = ["distributed.mixed_precision=bf16", "distributed.shard_teacher=false",
        "distributed.reshard_after_forward=false", "distributed.activation_checkpointing=false"]


def run_encoder_job(out: str, world: int) -> dict:
    import transformers

    from kdistill.data.arrays import ArrayDataset
    from kdistill.encoders import EncoderDistiller, tinybert_terms
    from kdistill.encoders.student import build_student
    from kdistill.tasks.job import run_stage

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = transformers.BertForSequenceClassification(config).eval()
    student = build_student(teacher, num_layers=2, hidden_size=16, num_heads=4, seed=1)
    objective = EncoderDistiller(student, teacher, tinybert_terms(prediction=True))
    ids = torch.randint(4, 64, (32, 10), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    cfg = train_config(world, ["distributed.activation_checkpointing=false"] if world > 1 else [])
    student, result = run_stage("encoder", objective, ArrayDataset({"x": ids, "attention_mask": torch.ones_like(ids)}),
                                cfg, seed=0, run_dir=out, progress=False)
    return {"student": student, "result": result, "objective": objective}


def run_task(out: str, world: int) -> dict:
    import json
    from pathlib import Path

    from kdistill.tasks import get_task, load_any
    from tests.test_task_causal_lm import CONFIG, CharTokenizer, articles, tiny_teacher

    path = Path(out).with_name(f"{Path(out).name}-{os.environ.get('RANK', 0)}.yaml")  # one file per process
    path.write_text(CONFIG)
    sets = ["train.steps=4", "data.max_train_blocks=8", f"train.batch_size={GLOBAL_BATCH // world}",
            "train.checkpoint_every=2", "teacher.cache.kind=topk", "teacher.cache.k=8"]
    _, cfg = load_any(path, sets + (["train.distributed.kind=fsdp2"] if world > 1 else []))
    summary = get_task("causal_lm").run(cfg, out, progress=False, log=lambda line: None, teacher=tiny_teacher(),
                                        tokenizer=CharTokenizer(), articles=articles())
    return json.loads((Path(out) / "summary.json").read_text()) if summary else {}


def run_job(out: str, world: int, overrides: list[str] = (), kill_at: int | None = None,
            stage: str = "student") -> dict:
    from kdistill.llm.data import block_dataset
    from kdistill.llm.distiller import LMDistiller
    from kdistill.tasks.job import run_stage

    torch.set_num_threads(1)
    objective = LMDistiller(tiny_llama(2, seed=1), tiny_llama(3, seed=2, head_scale=30.0), kd_weight=1.0, ce_weight=0.5,
                            divergence="forward_kl", chunk_size=16)
    if kill_at is not None:
        objective = KillAt(objective, kill_at)
    student, result = run_stage(stage, objective, block_dataset(blocks()), train_config(world, overrides),
                                seed=0, run_dir=out, progress=False)
    return {"student": student, "result": result, "objective": objective}


def main(argv: list[str]) -> None:
    out, rest = argv[0], argv[1:]
    kill_at = int(rest[rest.index("--kill-at") + 1]) if "--kill-at" in rest else None
    overrides = [rest[i + 1] for i, a in enumerate(rest) if a == "--set"]
    jobs = [run_job(out, int(os.environ["WORLD_SIZE"]), overrides, kill_at)]
    if "--bf16-stage" in rest:
        jobs.append(run_job(out, int(os.environ["WORLD_SIZE"]), BF16, stage="bf16"))
    if "--encoder-stage" in rest:
        jobs.append(run_encoder_job(out, int(os.environ["WORLD_SIZE"])))
    if "--task" in rest:
        run_task(os.path.join(out, "task"), int(os.environ["WORLD_SIZE"]))
    for job in jobs:  # after the fit the caller's models are plain again: whole weights, no FSDP classes
        student, teacher = job["student"], job["objective"].teacher
        assert not type(student).__name__.startswith("FSDP") and not type(teacher.model).__name__.startswith("FSDP")
        assert all(type(p) is torch.nn.Parameter for p in student.parameters())
        assert all(type(p) is torch.nn.Parameter for p in teacher.model.parameters()) and "outputs" not in vars(teacher)
        print("resumed_from", job["result"]["resumed_from"])


if __name__ == "__main__":
    main(sys.argv[1:])
