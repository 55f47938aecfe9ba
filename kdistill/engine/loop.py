"""The training engine on Hugging Face Accelerate.

One step: a batch (fancy-indexed from memory, or from a DataLoader), the teacher's forward (or its cache) under
inference mode, one forward of the (DDP-wrapped) student side, a dict of named loss terms, one backward per
micro-batch, clipping, optimizer and LR-schedule step. The step's loss terms stay on the device: the host syncs
only every `log_every` steps (metrics and the non-finite check), at checkpoints and at the end; `nonfinite: skip`
needs one sync per step to decide.

The engine runs unchanged in one process or under `accelerate launch` / `torchrun` (DDP): only the student
side is wrapped; the frozen teacher is never wrapped. It checkpoints atomically (see `checkpoint.py`), resumes
mid-epoch from the newest good checkpoint of its stage, and on SIGINT/SIGTERM writes a checkpoint and stops.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from kdistill.train_config import TrainConfig
from kdistill.engine.checkpoint import CheckpointWriter, atomic_write_bytes, load_latest, set_rng_state
from kdistill.engine.sampler import StepSampler, sample_lengths
from kdistill.errors import KDError, NonFiniteError
from kdistill.progress import Progress
from kdistill.wiring import check_models_materialized, dry_run


class Interrupted(KDError):
    """Training was stopped by a signal after writing a checkpoint; `signal` is the signal's name."""

    signal: str = "SIGINT"


_ACCELERATOR = None


def get_accelerator(mixed_precision: str = "no"):
    """One Accelerator per process (Accelerate keeps process-wide state); recreated if precision changes."""
    global _ACCELERATOR
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if _ACCELERATOR is not None and _ACCELERATOR.mixed_precision == mixed_precision:
        return _ACCELERATOR
    if _ACCELERATOR is not None:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    # without a GPU, cpu=True lets `torchrun`/`accelerate launch` runs use DDP over gloo on the CPU
    _ACCELERATOR = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    return _ACCELERATOR


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """The LR multiplier at each step: linear warm-up, then constant / cosine / linear decay / one-cycle."""
    total = cfg.steps
    warm = cfg.warmup_steps
    if cfg.schedule == "onecycle" and not warm:
        warm = max(1, int(0.3 * total))

    def fn(step: int) -> float:
        if warm and step < warm:
            start = 1 / 25 if cfg.schedule == "onecycle" else 0.0
            return start + (1 - start) * (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        progress = min(1.0, max(0.0, progress))
        if cfg.schedule == "linear":
            return 1.0 - progress
        floor = 1e-4 if cfg.schedule == "onecycle" else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@contextmanager
def deterministic_mode(enabled: bool):
    if not enabled:
        yield
        return
    prev = torch.are_deterministic_algorithms_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)
        torch.backends.cudnn.benchmark = prev_bench


@contextmanager
def stop_on_signals(flag: dict):
    """SIGINT/SIGTERM set flag['signal'] (the loop checkpoints and stops at the step boundary)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        flag["signal"] = signal.Signals(signum).name

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    if device.type == "cpu" and isinstance(batch, dict) and all(
            torch.is_tensor(v) and v.device.type == "cpu" for v in batch.values()):
        return batch
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Optional[Path], enabled: bool = True):
        self.path = Path(path) if path else None
        self.enabled = enabled and self.path is not None

    def write(self, record: dict) -> None:
        if self.enabled:
            try:
                with open(self.path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            except OSError as err:
                raise KDError(f"cannot append to {self.path}: {err.strerror or err}",
                              fix="free disk space or make the run directory writable, then run the same command "
                                  "again (earlier checkpoints are intact)") from None

    def drop_after(self, stage: str, step: int, evals_at_step: bool = False) -> None:
        """At the start of a stage (step 0 or a resumed step): forget records of `stage` past `step` (a killed
        run's, logged again now; with `evals_at_step` also the evaluation at `step`, which a run resumed at its
        last step repeats) and any torn line a kill left; the file is replaced atomically."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line from a kill
            if rec.get("stage") == stage and (rec.get("step", 0) > step
                                              or (evals_at_step and rec.get("step") == step and "eval" in rec)):
                continue
            keep.append(json.dumps(rec))
        atomic_write_bytes(self.path, "".join(k + "\n" for k in keep).encode())


class Engine:
    """Trains the student side of a `Distiller` under a `TrainConfig`.

    Args:
        cfg: the training settings.
        run_dir: where checkpoints (``checkpoints/<stage>/``) and ``metrics.jsonl`` go; None = keep nothing.
        stage: the name of this training stage (``teacher``, ``baseline``, ``student``, ``gen2``...).
        seed: the data-order and RNG seed of this stage.
        progress: show a progress bar / lines.
    """

    def __init__(self, cfg: TrainConfig, run_dir: Optional[os.PathLike] = None, *, stage: str = "student",
                 seed: int = 0, progress: bool = True, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir else None
        self.stage = stage
        self.seed = seed
        self.progress = progress
        self.log = log
        self.accelerator = get_accelerator(cfg.mixed_precision)

    # -- data -------------------------------------------------------------------------------------------------
    def _batches(self, data, sampler: StepSampler, start: int, collate_fn, prefetch: Optional[Callable] = None):
        """Yield (step, micro-batches) from `start` to the end. `prefetch(host_batch) -> dict` (a cached teacher's)
        adds entries to each batch on the host, before the copy to the device (in the loader's workers if any)."""
        cfg = self.cfg
        micro = cfg.batch_size // cfg.grad_accum
        device = self.accelerator.device
        pin = cfg.pin_memory and device.type == "cuda"
        layout = _channels_last if cfg.channels_last else (lambda b: b)
        if hasattr(data, "batch"):
            for step in range(start, cfg.steps):
                idx = sampler.indices(step)
                batch = data.batch(idx)
                if prefetch is not None:
                    batch.update(prefetch(batch))
                if pin:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                if cfg.grad_accum == 1:
                    yield step, [layout(to_device(batch, device, pin))]
                    continue
                yield step, [layout(to_device({k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}, device,
                                              pin)) for i in range(cfg.grad_accum)]
            return
        if prefetch is not None:
            collate_fn = _PrefetchCollate(collate_fn or torch.utils.data.default_collate, prefetch)
        loader = torch.utils.data.DataLoader(
            data, batch_sampler=_MicroBatchPlan(sampler, start, cfg.steps, cfg.grad_accum),
            num_workers=cfg.num_workers, pin_memory=pin, collate_fn=collate_fn,
            persistent_workers=cfg.num_workers > 0)
        it = iter(loader)
        for step in range(start, cfg.steps):
            yield step, [layout(to_device(next(it), device, pin)) for _ in range(cfg.grad_accum)]

    # -- the loop ---------------------------------------------------------------------------------------------
    def fit(self, distiller, data, *, eval_fn: Optional[Callable[[nn.Module], dict]] = None,
            collate_fn: Optional[Callable] = None) -> dict:
        """Train; returns {"steps", "resumed_from", "terms" (last logged means), "evals", "seconds"}."""
        from kdistill.seeding import preserved_global_rng

        # the caller's RNG states (torch, numpy, python) are left as they were, even after a resume set them
        with torch.random.fork_rng(devices=[]), preserved_global_rng(), deterministic_mode(self.cfg.deterministic):
            return self._fit(distiller, data, eval_fn, collate_fn)

    def _fit(self, distiller, data, eval_fn, collate_fn) -> dict:
        cfg, acc = self.cfg, self.accelerator
        rank, world = acc.process_index, acc.num_processes
        device = acc.device
        ckpt_dir = self.run_dir / "checkpoints" / self.stage if self.run_dir else None
        if self.run_dir is not None and acc.is_main_process:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise KDError(f"cannot create the run directory {self.run_dir}: {err.strerror}",
                              fix="choose a writable --out directory") from None
        metrics = MetricsLog(self.run_dir / "metrics.jsonl" if self.run_dir else None, acc.is_main_process)

        torch.manual_seed(self.seed * 7919 + rank)
        sampler = StepSampler(len(data), cfg.batch_size, seed=self.seed, rank=rank, world_size=world,
                              name=getattr(data, "name", "data"),
                              lengths=sample_lengths(data) if cfg.group_by_length else None)

        check_models_materialized(distiller)  # a 'meta' model cannot even be moved: say so in one line
        side = distiller.side.to(device)
        if distiller.teacher is not None and hasattr(distiller.teacher, "to"):
            distiller.teacher.to(device)
        if cfg.channels_last:
            side.to(memory_format=torch.channels_last)
            if isinstance(getattr(distiller.teacher, "model", None), nn.Module):
                distiller.teacher.model.to(memory_format=torch.channels_last)
        prefetch = getattr(distiller.teacher, "prefetch", None)  # a cached teacher reads its rows on the host
        # dry run on the first batch: taps, adapters, shapes, dtypes (every rank builds the same modules)
        first = next(self._batches(data, sampler, 0, collate_fn, prefetch))[1][0]
        dry_run(distiller, first)
        if cfg.compile:
            side.student.compile()

        optimizer = build_optimizer(cfg, side.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        model, optimizer = acc.prepare(side, optimizer)
        distiller.module = model
        start, resumed_from, window = 0, None, {}
        if ckpt_dir is not None:
            ck = load_latest(ckpt_dir, rank=rank, log=self.log)
            if ck is not None:
                missing, unexpected = side.load_state_dict(ck["weights"], strict=False)
                if unexpected or missing:
                    raise KDError(f"checkpoint {ck['path']} does not match the model "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
                                  fix="use a new run directory for a different model")
                optimizer.load_state_dict(ck["state"]["optimizer"])
                scheduler.load_state_dict(ck["state"]["scheduler"])
                if acc.scaler is not None and ck["state"].get("scaler"):
                    acc.scaler.load_state_dict(ck["state"]["scaler"])
                if ck["rng"] is not None:
                    set_rng_state(ck["rng"])
                start = resumed_from = ck["step"]
                window = ck["state"].get("metrics_window") or {}
                saved_world = ck["state"].get("world_size", world)
                if saved_world != world and acc.is_main_process:
                    self.log(f"warning: [{self.stage}] checkpoint written by {saved_world} processes, resumed by "
                             f"{world}: training continues, but not bit-identically to an uninterrupted run")
                if acc.is_main_process:
                    self.log(f"[{self.stage}] resumed from {ck['path']} (step {start})")
        metrics.drop_after(self.stage, start, evals_at_step=start == cfg.steps)
        writer = CheckpointWriter(ckpt_dir, cfg.keep_checkpoints, rank, acc.wait_for_everyone) \
            if ckpt_dir is not None else None

        carried = [(int(at), {k: v.to(device) for k, v in terms.items()}) for at, terms in window.get("entries", [])]
        guard = _StepWindow(self.stage, carried)
        written: list[int] = []

        def checkpoint(step: int) -> None:
            guard.check(acc, world, params)  # never checkpoint weights updated from a non-finite loss
            if writer is None or step in written:
                return
            written.append(step)
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else {},
                     "step": step, "position": sampler.position(step), "world_size": world,
                     # the partial sums of the current log window: a resumed run logs the same means
                     "metrics_window": guard.state()}
            writer.write(step, acc.unwrap_model(model).state_dict(), state)

        evals: list[dict] = []

        def evaluate(step: int) -> None:
            if eval_fn is None:
                return
            if acc.is_main_process:
                student = acc.unwrap_model(model).student
                was = student.training
                student.eval()
                with torch.no_grad():
                    result = eval_fn(student)
                student.train(was)
                record = {"stage": self.stage, "step": step, "eval": result}
                evals.append(record)
                metrics.write(record)
            acc.wait_for_everyone()

        params = [p for p in model.parameters() if p.requires_grad]
        # Accelerate's optimizer wrapper matters only with a grad scaler (fp16); otherwise step the torch optimizer
        # itself (the wrapper's step re-checks installed packages on every call, ~0.5 ms on a CPU step)
        inner_optimizer = getattr(optimizer, "optimizer", optimizer)
        step_optimizer = optimizer.step if acc.scaler is not None else inner_optimizer.step
        autocast = acc.autocast if acc.mixed_precision != "no" else nullcontext
        last_terms: dict[str, float] = {}
        flag: dict[str, str] = {}
        t0 = time.perf_counter()
        model.train()
        step = start
        with stop_on_signals(flag), Progress(cfg.steps, f"[{self.stage}] train", self.progress and
                                              acc.is_main_process, start=start) as bar:
            for step, micro_batches in self._batches(data, sampler, start, collate_fn, prefetch):
                distiller.set_step(step)
                if len(micro_batches) == 1:
                    with autocast():
                        out = distiller(micro_batches[0])
                        loss = sum(out.terms.values())
                    acc.backward(loss)
                    step_terms = {k: v.detach() for k, v in out.terms.items()}
                else:
                    step_terms = {}
                    for i, mb in enumerate(micro_batches):
                        sync = i == len(micro_batches) - 1
                        ctx = nullcontext() if sync or world == 1 else acc.no_sync(model)
                        with ctx, autocast():
                            out = distiller(mb)
                            loss = sum(out.terms.values()) / len(micro_batches)
                        acc.backward(loss)
                        for k, v in out.terms.items():
                            v = v.detach() / len(micro_batches)
                            step_terms[k] = step_terms[k] + v if k in step_terms else v
                grad_norm = acc.clip_grad_norm_(params, cfg.clip_grad_norm) if cfg.clip_grad_norm else None
                skip = False
                if cfg.nonfinite == "skip":
                    # the decision is needed now: one host sync per step
                    if grad_norm is None and acc.scaler is None:
                        # a finite loss can still give a NaN/Inf gradient (e.g. sqrt at 0)
                        grads = [p.grad for p in params if p.grad is not None]
                        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
                    bad = ~torch.isfinite(sum(step_terms.values()))
                    if grad_norm is not None and acc.scaler is None:  # with fp16 the grad-scaler skips inf steps
                        bad = bad | ~torch.isfinite(grad_norm)
                    if world > 1:
                        bad = acc.reduce(bad.float().reshape(1), reduction="sum") > 0
                    skip = bool(bad)
                # 'stop': the step's terms stay on the device; `guard.check` finds the first non-finite step
                # (and non-finite weights from a bad gradient) at the next log / checkpoint / end
                if skip:
                    names = [k for k, v in step_terms.items() if not torch.isfinite(v)] or ["(gradient)"]
                    what = f"loss term(s) {', '.join(names)}" if names != ["(gradient)"] else "gradient"
                    self.log(f"warning: skipped step {step + 1} of stage '{self.stage}': non-finite {what}")
                    metrics.write({"stage": self.stage, "step": step + 1, "event": "nonfinite_skip",
                                   "terms": names})
                    inner_optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                else:
                    step_optimizer()
                    scheduler.step()
                    inner_optimizer.zero_grad(set_to_none=True)
                    guard.add(step + 1, step_terms, grad_norm if acc.scaler is None else None)
                done = step + 1
                if done % cfg.log_every == 0 or done == cfg.steps:
                    guard.check(acc, world, params)
                    means = guard.flush()
                    if means:
                        last_terms = means
                    record = {"stage": self.stage, "step": done, "lr": scheduler.get_last_lr()[0],
                              "loss": sum(last_terms.values()), "terms": last_terms}
                    metrics.write(record)
                    bar.update(0, " ".join(f"{k}={v:.4f}" for k, v in last_terms.items()))
                bar.update(1)
                if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                    evaluate(done)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != cfg.steps:
                    checkpoint(done)
                if flag.get("signal"):
                    checkpoint(done)
                    err = Interrupted(f"stopped by {flag['signal']} at step {done} of stage '{self.stage}'; "
                                      f"a checkpoint was written", fix="run the same command again to resume")
                    err.signal = flag["signal"]
                    raise err
        final_step = cfg.steps
        if start < cfg.steps or resumed_from is None:
            checkpoint(final_step)
        evaluate(final_step)
        distiller.module = acc.unwrap_model(model)
        return {"steps": final_step, "resumed_from": resumed_from, "terms": last_terms, "evals": evals,
                "seconds": time.perf_counter() - t0}


class _StepWindow:
    """The loss terms of the steps since the last log line, kept on the device (no per-step host sync, no extra
    tensor op). `check` finds the first non-finite step and its terms, or non-finite weights left by a
    non-finite gradient; `flush` gives the window's means for the log and starts a new window."""

    def __init__(self, stage: str, carried: Optional[list] = None):
        self.stage = stage
        # entries of a checkpoint taken mid-window (verified before it was written): the resumed run's means are
        # computed from the same values in the same order as the uninterrupted run's
        self.entries: list[tuple[int, dict[str, torch.Tensor]]] = list(carried or [])
        self.checked = len(self.entries)  # entries already verified finite
        self.grad_norms: list[tuple[int, torch.Tensor]] = []  # when computed anyway (clipping): exact blame

    def add(self, step: int, terms: dict[str, torch.Tensor], grad_norm: Optional[torch.Tensor] = None) -> None:
        self.entries.append((step, terms))
        if grad_norm is not None:
            self.grad_norms.append((step, grad_norm))

    def _stacked(self, entries) -> tuple[list[str], torch.Tensor]:
        names = list(entries[0][1])
        return names, torch.stack([torch.stack([terms[k].float() for k in names]) for _, terms in entries])

    def check(self, acc, world: int, params) -> None:
        fresh = self.entries[self.checked:]
        bad_step, names = -1, []
        if fresh:
            keys, values = self._stacked(fresh)
            finite = torch.isfinite(values)
            if not bool(finite.all()):
                row = int((~finite.all(dim=1)).nonzero()[0, 0])
                bad_step = fresh[row][0]
                names = [k for k, ok in zip(keys, finite[row].tolist()) if not ok]
        if self.grad_norms:
            finite = torch.isfinite(torch.stack([n.float() for _, n in self.grad_norms]))
            if not bool(finite.all()):
                grad_step = self.grad_norms[int((~finite).nonzero()[0, 0])][0]
                if bad_step < 0 or grad_step < bad_step:
                    bad_step, names = grad_step, []
            self.grad_norms = []
        if bad_step < 0 and params:
            norms = torch._foreach_norm([p.detach() for p in params])
            if not bool(torch.isfinite(torch.stack(norms)).all()):
                bad_step = self.entries[-1][0] if self.entries else 0
        if world > 1:
            bad_step = int(acc.reduce(torch.tensor([float(bad_step)], device=acc.device), reduction="max"))
        if bad_step >= 0:
            what = f"loss term(s) {', '.join(names)}" if names else "gradient (the loss terms were finite)"
            raise NonFiniteError(f"non-finite {what} at step {bad_step} of stage '{self.stage}'",
                                 fix="lower the learning rate, enable clip_grad_norm, check the inputs, or set "
                                     "train.nonfinite: skip")
        self.checked = len(self.entries)

    def _sums(self) -> tuple[dict[str, torch.Tensor], int]:
        sums: dict[str, torch.Tensor] = {}
        if self.entries:
            keys, values = self._stacked(self.entries)
            sums = dict(zip(keys, values.sum(dim=0)))
        return sums, len(self.entries)

    def state(self) -> dict:
        """The window's entries for a checkpoint (plain tensors, loadable with weights_only=True)."""
        return {"entries": [[at, {k: v.detach().cpu() for k, v in terms.items()}] for at, terms in self.entries]}

    def flush(self) -> dict[str, float]:
        sums, count = self._sums()
        self.entries, self.checked = [], 0
        return {k: float(v) / count for k, v in sums.items()} if count else {}


def _channels_last(batch: dict) -> dict:
    """4-D image inputs in channels-last memory layout (the layout the channels_last model's convolutions use)."""
    for key in ("x", "teacher_x", "student_x"):
        value = batch.get(key)
        if torch.is_tensor(value) and value.dim() == 4 and value.is_floating_point():
            batch[key] = value.contiguous(memory_format=torch.channels_last)
    return batch


class _PrefetchCollate:
    """collate, then add the prefetched entries (runs in the DataLoader's workers; picklable)."""

    def __init__(self, collate: Callable, prefetch: Callable):
        self.collate, self.prefetch = collate, prefetch

    def __call__(self, items):
        batch = self.collate(items)
        batch.update(self.prefetch(batch))
        return batch


class _MicroBatchPlan:
    """A batch sampler for DataLoader: the micro-batches of steps [start, steps) in the StepSampler's order."""

    def __init__(self, sampler: StepSampler, start: int, steps: int, accum: int):
        self.sampler, self.start, self.steps, self.accum = sampler, start, steps, accum

    def __iter__(self):
        micro = self.sampler.batch_size // self.accum
        for step in range(self.start, self.steps):
            idx = self.sampler.indices(step).tolist()
            for i in range(self.accum):
                yield idx[i * micro:(i + 1) * micro]

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accum
