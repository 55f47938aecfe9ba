"""Sequence-level (black-box) distillation: the teacher writes responses, the student is fine-tuned on them.

Kim & Rush (2016): instead of matching the teacher's per-token distributions, train the student with plain
next-token cross-entropy on sequences the teacher generated; they take the teacher's beam-search output (an
approximation of its mode, ``Sampling(do_sample=False, num_beams=5)``), sampling is the other option. The
teacher is only a function ``prompts -> texts``: an API, a program, or a local model (`HFGenerator`); tokenizers
may differ.

    teacher = HFGenerator(model, tokenizer, Sampling(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0))
    rows = generate_dataset(teacher, prompts, "runs/x/teacher.jsonl")     # resumable
    data = response_dataset(rows, student_tokenizer, max_prompt_tokens=64, max_response_tokens=64)
    Engine(train_cfg, run_dir).fit(LMDistiller(student, None, ce_weight=1.0), data)

The JSONL holds one row per prompt: ``{"id", "prompt", "response", "teacher", "sampling"}``; the sampling
settings (stated by the caller for an opaque callable, read from `HFGenerator`) are written into every row, so
a file says how it was made. Generation appends and flushes one batch at a time; run it again after a kill and it
skips the prompts already answered (a torn last line is dropped). A file generated with other sampling settings
or another teacher is refused, never mixed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from kdistill.errors import DataError, WiringError

__all__ = ["HFGenerator", "Sampling", "generate_dataset", "read_jsonl", "response_dataset"]

_WHERE = "kdistill.llm.sequence"


@dataclass(frozen=True)
class Sampling:
    """Generation settings, recorded with every generated row.

    ``do_sample=False`` is greedy decoding (temperature / top_p / top_k unused), or with ``num_beams > 1`` beam
    search (Kim & Rush 2016: the teacher's beam output approximates its most likely sequence); ``top_k=0`` and
    ``top_p=1`` disable those filters. ``seed`` seeds the sampling of each batch (``seed + batch number``).
    ``num_beams`` is recorded only when above 1 (files made before it existed stay valid).
    """

    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    num_beams: int = 1

    def __post_init__(self):
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise WiringError(f"num_beams must be a positive integer, got {self.num_beams!r}", where=_WHERE,
                              fix="1 (no beam search) or e.g. 5")

    def as_dict(self) -> dict[str, Any]:
        settings = asdict(self)
        if settings["num_beams"] == 1:
            del settings["num_beams"]
        return settings


class HFGenerator:
    """A Hugging Face causal LM as a teacher callable ``prompts -> texts`` (batched, left-padded prompts).

    Args:
        model: the causal LM (a white-box teacher used as a black box).
        tokenizer: its tokenizer; prompts are encoded without special tokens unless ``chat=True``, in which case
            each prompt becomes one user turn of the tokenizer's chat template (with the generation prompt).
        sampling: the `Sampling` settings.
        max_prompt_tokens: prompts are cut to their last N tokens.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, sampling: Sampling = Sampling(), *, chat: bool = False,
                 max_prompt_tokens: int = 512, name: Optional[str] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.chat = chat
        self.max_prompt_tokens = max_prompt_tokens
        self.name = name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        self._calls = 0

    def _encode(self, prompts: Sequence[str]) -> list[list[int]]:
        if self.chat:
            ids = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                      tokenize=True) for p in prompts]
            ids = [list(x["input_ids"]) if isinstance(x, Mapping) else list(x) for x in ids]
        else:
            ids = [list(x) for x in self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
        return [x[-self.max_prompt_tokens:] for x in ids]

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        from kdistill.llm.data import token_id

        if not prompts:
            return []
        ids = self._encode(prompts)
        pad = token_id(self.tokenizer, "pad", "eos")
        pad = 0 if pad is None else pad
        width = max(len(x) for x in ids)
        device = next(self.model.parameters()).device
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            if x:
                input_ids[i, width - len(x):] = torch.tensor(x)
                mask[i, width - len(x):] = 1
        s = self.sampling
        options: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "do_sample": s.do_sample,
                                   "pad_token_id": pad, "eos_token_id": token_id(self.tokenizer, "eos")}
        if s.do_sample:
            options.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        if s.num_beams > 1:
            options.update(num_beams=s.num_beams, num_return_sequences=1)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(s.seed + self._calls)
            out = self.model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **options)
        self._calls += 1
        return self.tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)


def read_jsonl(path: Union[str, os.PathLike]) -> list[dict]:
    """The complete rows of a JSONL file (a torn last line, from a killed writer, is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number == len(lines):  # the torn tail of an interrupted append
                continue
            raise DataError(f"{path}: line {number} is not JSON", where=_WHERE,
                            fix="delete the file (or the broken line) and generate again") from None
    return rows


def _drop_torn_tail(path: Path) -> None:
    """Cut an unfinished last line (a killed append) so that new rows start on a line of their own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data[:data.rfind(b"\n") + 1])
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def generate_dataset(teacher_fn: Callable[[list[str]], list[str]], prompts: Sequence[str],
                     out_jsonl: Union[str, os.PathLike], *, sampling: Union[Sampling, Mapping[str, Any], None] = None,
                     teacher_name: Optional[str] = None, batch_size: int = 8, progress: bool = False) -> list[dict]:
    """Ask the teacher for a response to every prompt and save ``{"id", "prompt", "response", ...}`` rows.

    Args:
        teacher_fn: ``prompts -> texts`` (same length and order); e.g. an API client or `HFGenerator`.
        prompts: the prompts; row ``id`` is the prompt's position in this list.
        out_jsonl: the output file; rows already in it (same id and prompt) are kept and not asked again.
        sampling: the sampling settings the teacher uses (required unless ``teacher_fn.sampling`` states them).
        teacher_name: recorded in every row (default: ``teacher_fn.name`` or its type's name).
        batch_size: prompts per teacher call.

    Returns:
        all rows, in prompt order.
    """
    stated = sampling if sampling is not None else getattr(teacher_fn, "sampling", None)
    if stated is None:
        raise WiringError("the teacher's sampling settings are not stated", where=f"{_WHERE}.generate_dataset",
                          fix="pass sampling={'temperature': ..., 'top_p': ..., 'max_new_tokens': ...} (recorded in "
                              "every row), or use HFGenerator")
    settings = stated.as_dict() if isinstance(stated, Sampling) else dict(stated)
    try:
        settings = json.loads(json.dumps(settings))  # as it reads back from the file
    except (TypeError, ValueError) as err:
        raise WiringError(f"the sampling settings cannot be written as JSON: {err}", where=_WHERE,
                          fix="state them as plain numbers and strings") from None
    name = teacher_name or getattr(teacher_fn, "name", None) or type(teacher_fn).__name__
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise WiringError(f"batch_size must be a positive integer, got {batch_size!r}", where=_WHERE, fix="e.g. 8")
    path = Path(out_jsonl)
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_torn_tail(path)  # new rows must start on a line of their own
    existing = read_jsonl(path)
    done: dict[int, dict] = {}
    for row in existing:
        if row.get("sampling") != settings or row.get("teacher") != name:
            raise DataError(f"{path} was generated with other settings (teacher {row.get('teacher')!r}, sampling "
                            f"{row.get('sampling')}; now {name!r}, {settings})", where=_WHERE,
                            fix="write to another file, or delete this one to generate it anew")
        i = row.get("id")
        if not isinstance(i, int) or not 0 <= i < len(prompts) or prompts[i] != row.get("prompt"):
            raise DataError(f"{path}: row id {i!r} does not match prompt {i!r} of this call", where=_WHERE,
                            fix="use the same prompt list to resume, or another output file")
        done[i] = row
    todo = [i for i in range(len(prompts)) if i not in done]
    from kdistill.progress import Progress

    with open(path, "a", encoding="utf-8") as fh, Progress(len(todo), "teacher responses", progress) as bar:
        for start in range(0, len(todo), batch_size):
            ids = todo[start:start + batch_size]
            texts = teacher_fn([prompts[i] for i in ids])
            if not isinstance(texts, (list, tuple)) or len(texts) != len(ids) or \
                    not all(isinstance(t, str) for t in texts):
                raise WiringError(f"the teacher returned {type(texts).__name__} of "
                                  f"{len(texts) if hasattr(texts, '__len__') else '?'} items for {len(ids)} prompts",
                                  where=f"{_WHERE}.generate_dataset",
                                  fix="teacher_fn must return one string per prompt, in order")
            for i, text in zip(ids, texts):
                row = {"id": i, "prompt": prompts[i], "response": text, "teacher": name, "sampling": settings}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[i] = row
            fh.flush()
            os.fsync(fh.fileno())
            bar.update(len(ids))
    return [done[i] for i in range(len(prompts))]


def response_dataset(rows: Union[Sequence[Mapping[str, Any]], str, os.PathLike], tokenizer: Any, *,
                     max_prompt_tokens: int, max_response_tokens: int, add_eos: bool = True, name: str = "responses"):
    """Prompt + teacher response rows (or their JSONL file) as a fine-tuning `ArrayDataset` for the student:
    labels on the response tokens only (``-100`` on the prompt and padding); see `prompt_response_dataset`."""
    from kdistill.llm.data import prompt_response_dataset

    if isinstance(rows, (str, os.PathLike)):
        rows = read_jsonl(rows)
    if not rows:
        raise DataError("no generated rows to train on", where=_WHERE, fix="run generate_dataset first")
    return prompt_response_dataset([r["prompt"] for r in rows], [r["response"] for r in rows], tokenizer,
                                   max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens,
                                   add_eos=add_eos, name=name)
