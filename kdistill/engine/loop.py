"""The training engine on Hugging Face Accelerate.

One step: a batch (fancy-indexed from memory, or from a DataLoader), the teacher's forward (or its cache) under
inference mode, one forward of the (DDP-wrapped) student side, a dict of named loss terms, one backward per
micro-batch, clipping, optimizer and LR-schedule step. The step's loss terms stay on the device: the host syncs
only every `log_every` steps (metrics and the non-finite check), at checkpoints and at the end; `nonfinite: skip`
needs one sync per step to decide.

The engine runs unchanged in one process or under `accelerate launch` / `torchrun` (DDP): only the student
side is wrapped; the frozen teacher is never wrapped. It checkpoints atomically (see `checkpoint.py`), resumes
mid-epoch from the newest good checkpoint of its stage, and on SIGINT/SIGTERM writes a checkpoint and stops.

What it trains is an objective: the engine reaches it only through the contract of `kdistill.objective`
(`Objective`); `kdistill.wiring.dry_run` builds it on the first batch.

`Engine.fit` runs the steps in order: `_prepare` (run folder, data order, devices, dry run, optimizer and
schedule, `accelerator.prepare`), `_resume` (the newest good checkpoint, if any), then per step `_step` (the
micro-batches, the non-finite check, the optimizer step) and `_after_step` (log, evaluation, checkpoint, signal),
and `_finish` (last checkpoint and evaluation). What the steps share is one `_Run`.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from kdistill.engine.batches import step_batches
from kdistill.engine.checkpoint import CheckpointWriter, load_latest, set_rng_state
from kdistill.engine.fsdp import FSDPRun, fsdp_settings
from kdistill.engine.metrics import MetricsLog, StepWindow
from kdistill.engine.runtime import (build_optimizer, deterministic_mode, get_accelerator, lr_lambda,
                                     stop_on_signals)
from kdistill.engine.sampler import StepSampler, sample_lengths
from kdistill.engine.threads import ThreadControl
from kdistill.engine.tracking import Tracking, tracking_dir
from kdistill.errors import KDError
from kdistill.progress import Progress
from kdistill.train_config import TrainConfig
from kdistill.wiring import check_models_materialized, dry_run

__all__ = ["Engine", "Interrupted"]


class Interrupted(KDError):
    """Training was stopped by a signal after writing a checkpoint; `signal` is the signal's name."""

    signal: str = "SIGINT"


@dataclass
class _Run:
    """The state of one `Engine.fit`, shared by its steps."""

    objective: Any
    data: Any
    sampler: StepSampler
    metrics: MetricsLog
    writer: Optional[CheckpointWriter]
    eval_fn: Optional[Callable[[nn.Module], dict]]
    collate_fn: Optional[Callable]
    prefetch: Optional[Callable]  # a cached teacher reads its rows on the host
    model: Optional[nn.Module] = None  # the side as prepared by Accelerate (DDP-wrapped in multi-process runs)
    optimizer: Any = None  # Accelerate's wrapper (steps through the grad scaler with fp16)
    scheduler: Optional[torch.optim.lr_scheduler.LambdaLR] = None
    params: list = field(default_factory=list)  # the trainable parameters (clipping, the non-finite check)
    start: int = 0
    resumed_from: Optional[int] = None
    window: StepWindow = None  # the loss terms since the last log line
    last_terms: dict = field(default_factory=dict)  # the means of the last log line
    evals: list = field(default_factory=list)
    written: list = field(default_factory=list)  # the steps checkpointed by this run
    signal: dict = field(default_factory=dict)  # set by SIGINT/SIGTERM: {"signal": name}
    threads: Optional[ThreadControl] = None  # the CPU thread count of the steps (calibrated with threads: auto)
    saved_threads: dict = field(default_factory=dict)  # what the resumed checkpoint recorded of it

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)


class Engine:
    """Trains the student side of an objective (`kdistill.objective.Objective`) under a `TrainConfig`.

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
        trackers = cfg.log_with if self.run_dir is not None else []
        dist = fsdp_settings(cfg)  # None unless train.distributed.kind is fsdp2 (then a launch is checked)
        self.accelerator = get_accelerator(cfg.mixed_precision, trackers,
                                           tracking_dir(self.run_dir) if trackers else None, fsdp=dist)
        self.fsdp = FSDPRun(dist, self.accelerator) if dist is not None else None  # sharded copies, fsdp.py
        self.tracking: Optional[Tracking] = None

    def fit(self, distiller, data, *, eval_fn: Optional[Callable[[nn.Module], dict]] = None,
            collate_fn: Optional[Callable] = None) -> dict:
        """Train; returns {"steps", "resumed_from", "terms" (last logged means), "evals", "seconds", "threads"
        (`ThreadControl.result`: the CPU thread count of the steps and how it was chosen)}."""
        from kdistill.seeding import preserved_global_rng

        # the caller's RNG states (torch, numpy, python) are left as they were, even after a resume set them
        with torch.random.fork_rng(devices=[]), preserved_global_rng(), deterministic_mode(self.cfg.deterministic):
            return self._fit(distiller, data, eval_fn, collate_fn)

    def _fit(self, objective, data, eval_fn, collate_fn) -> dict:
        run = self._prepare(objective, data, eval_fn, collate_fn)
        self._resume(run)
        t0 = time.perf_counter()
        run.model.train()
        enabled = self.progress and self.accelerator.is_main_process
        threads = run.threads = self._threads(run)
        try:
            with stop_on_signals(run.signal), Progress(self.cfg.steps, f"[{self.stage}] train", enabled,
                                                        start=run.start) as bar:
                for step, micro_batches in self._batches(run, run.start):
                    threads.before_step(step)
                    t_step = time.perf_counter()
                    self._step(run, step, micro_batches)
                    threads.after_step(step, time.perf_counter() - t_step)
                    self._after_step(run, step + 1, bar)
            return self._finish(run, t0)
        finally:
            threads.close()
            if self.tracking is not None:
                self.tracking.close()
            if self.fsdp is not None:  # also after an error or a signal: the caller's teacher and side, plain
                self.fsdp.release(run.objective)

    def _threads(self, run: _Run) -> ThreadControl:
        """The thread count of this run's steps (`kdistill.engine.threads`), begun at its first step."""
        cfg, acc = self.cfg, self.accelerator
        main = acc.is_main_process
        control = ThreadControl(cfg.threads, stage=self.stage, device_type=acc.device.type,
                                world_size=acc.num_processes,
                                num_workers=0 if hasattr(run.data, "batch") else cfg.num_workers,
                                deterministic=cfg.deterministic, record=run.metrics.write,
                                log=self.log if main else (lambda line: None))
        control.begin(run.start, cfg.steps - run.start, run.saved_threads)
        return control

    def _batches(self, run: _Run, start: int):
        return step_batches(self.cfg, self.accelerator.device, run.data, run.sampler, start, run.collate_fn,
                            run.prefetch)

    # -- the steps of `fit` ------------------------------------------------------------------------------------
    def _prepare(self, objective, data, eval_fn, collate_fn) -> _Run:
        """The run folder, the data order, the models on the device, the dry run on the first batch, the optimizer
        and LR schedule, and the side prepared by Accelerate (put in ``objective.module``)."""
        cfg, acc = self.cfg, self.accelerator
        rank, world, device = acc.process_index, acc.num_processes, acc.device
        ckpt_dir = self.run_dir / "checkpoints" / self.stage if self.run_dir else None
        if self.run_dir is not None and acc.is_main_process:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise KDError(f"cannot create the run directory {self.run_dir}: {err.strerror}",
                              fix="choose a writable --out directory") from None
        if self.run_dir is not None and cfg.log_with:  # the trackers get what metrics.jsonl gets
            self.tracking = Tracking(acc, self.stage)
        metrics = MetricsLog(self.run_dir / "metrics.jsonl" if self.run_dir else None, acc.is_main_process,
                             forward=self.tracking.log if self.tracking is not None else None)

        torch.manual_seed(self.seed * 7919 + rank)
        sampler = StepSampler(len(data), cfg.batch_size, seed=self.seed, rank=rank, world_size=world,
                              name=getattr(data, "name", "data"),
                              lengths=sample_lengths(data) if cfg.group_by_length else None)

        check_models_materialized(objective)  # a 'meta' model cannot even be moved: say so in one line
        side = objective.side.to(device) if self.fsdp is None else objective.side  # FSDP2: sharded copies
        teacher = objective.teacher
        if teacher is not None and hasattr(teacher, "to") and self.fsdp is None:
            teacher.to(device)
        if cfg.channels_last:
            side.to(memory_format=torch.channels_last)
            if isinstance(getattr(teacher, "model", None), nn.Module):
                teacher.model.to(memory_format=torch.channels_last)
        writer = CheckpointWriter(ckpt_dir, cfg.keep_checkpoints, rank, acc.wait_for_everyone) \
            if ckpt_dir is not None else None
        run = _Run(objective, data, sampler, metrics, writer, eval_fn, collate_fn,
                   prefetch=getattr(teacher, "prefetch", None))
        # dry run on the first batch: taps, adapters, shapes, dtypes (every rank builds the same modules)
        first = next(self._batches(run, 0))[1][0]
        dry_run(objective, first if self.fsdp is None else self.fsdp.plain_batch(first, side))
        if cfg.compile:
            side.student.compile()

        if self.fsdp is not None:
            run.model, run.optimizer = self.fsdp.prepare(objective, lambda params: build_optimizer(cfg, params))
        else:
            run.model, run.optimizer = acc.prepare(side, build_optimizer(cfg, side.parameters()))
        run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.inner_optimizer, lr_lambda(cfg))
        objective.module = run.model
        run.params = [p for p in run.model.parameters() if p.requires_grad]
        return run

    def _resume(self, run: _Run) -> None:
        """Load the newest good checkpoint of this stage (weights, optimizer, schedule, grad scaler, RNG, the
        partial log window); forget the metrics a killed run logged past it."""
        cfg, acc = self.cfg, self.accelerator
        world = acc.num_processes
        window = {}
        ck = load_latest(run.writer.folder, rank=acc.process_index, log=self.log,
                         sharded=self.fsdp is not None) if run.writer else None
        if ck is not None and self.fsdp is not None:
            self.fsdp.load(ck["sharded"], run.model, run.inner_optimizer)
        elif ck is not None:
            missing, unexpected = run.objective.side.load_state_dict(ck["weights"], strict=False)
            if unexpected or missing:
                raise KDError(f"checkpoint {ck['path']} does not match the model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
                              fix="use a new run directory for a different model")
            run.optimizer.load_state_dict(ck["state"]["optimizer"])
        if ck is not None:
            run.scheduler.load_state_dict(ck["state"]["scheduler"])
            if acc.scaler is not None and ck["state"].get("scaler"):
                acc.scaler.load_state_dict(ck["state"]["scaler"])
            if ck["rng"] is not None:
                set_rng_state(ck["rng"])
            run.start = run.resumed_from = ck["step"]
            window = ck["state"].get("metrics_window") or {}
            run.saved_threads = ck["state"].get("threads") or {}
            saved_world = ck["state"].get("world_size", world)
            if saved_world != world and acc.is_main_process:
                self.log(f"warning: [{self.stage}] checkpoint written by {saved_world} processes, resumed by "
                         f"{world}: training continues, but not bit-identically to an uninterrupted run")
            if acc.is_main_process:
                self.log(f"[{self.stage}] resumed from {ck['path']} (step {run.start})")
        run.metrics.drop_after(self.stage, run.start, evals_at_step=run.start == cfg.steps)
        device = acc.device
        carried = [(int(at), {k: v.to(device) for k, v in terms.items()}) for at, terms in window.get("entries", [])]
        run.window = StepWindow(self.stage, carried)

    def _step(self, run: _Run, step: int, micro_batches: list) -> None:
        """One optimizer step: forward and backward of each micro-batch, clipping, then the optimizer and LR
        schedule step, or (``nonfinite: skip``) no update when the loss or the gradient is not finite."""
        cfg, acc = self.cfg, self.accelerator
        run.objective.set_step(step)
        step_terms = self._forward_backward(run, micro_batches)
        grad_norm = acc.clip_grad_norm_(run.params, cfg.clip_grad_norm) if cfg.clip_grad_norm else None
        skip = False
        if cfg.nonfinite == "skip":
            grad_norm, skip = self._nonfinite(run, step_terms, grad_norm)
        # 'stop': the step's terms stay on the device; `StepWindow.check` finds the first non-finite step (and
        # non-finite weights from a bad gradient) at the next log / checkpoint / end
        inner = run.inner_optimizer
        if skip:
            names = [k for k, v in step_terms.items() if not torch.isfinite(v)] or ["(gradient)"]
            what = f"loss term(s) {', '.join(names)}" if names != ["(gradient)"] else "gradient"
            self.log(f"warning: skipped step {step + 1} of stage '{self.stage}': non-finite {what}")
            run.metrics.write({"stage": self.stage, "step": step + 1, "event": "nonfinite_skip", "terms": names})
            inner.zero_grad(set_to_none=True)
            run.scheduler.step()
        else:
            # Accelerate's optimizer wrapper matters only with a grad scaler (fp16); otherwise step the torch
            # optimizer itself (the wrapper's step re-checks installed packages on every call, ~0.5 ms on a CPU)
            (run.optimizer if acc.scaler is not None else inner).step()
            run.scheduler.step()
            inner.zero_grad(set_to_none=True)
            run.window.add(step + 1, step_terms, grad_norm if acc.scaler is None else None)

    def _forward_backward(self, run: _Run, micro_batches: list) -> dict[str, torch.Tensor]:
        """The objective and one backward per micro-batch (DDP syncs gradients on the last one only); the step's
        loss terms, detached, averaged over the micro-batches."""
        acc = self.accelerator
        autocast = acc.autocast if acc.mixed_precision != "no" else nullcontext
        if len(micro_batches) == 1:
            with autocast():
                out = run.objective(micro_batches[0])
                loss = sum(out.terms.values())
            acc.backward(loss)
            return {k: v.detach() for k, v in out.terms.items()}
        step_terms = {}
        for i, mb in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1
            ctx = nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(run.model)
            with ctx, autocast():
                out = run.objective(mb)
                loss = sum(out.terms.values()) / len(micro_batches)
            acc.backward(loss)
            for k, v in out.terms.items():
                v = v.detach() / len(micro_batches)
                step_terms[k] = step_terms[k] + v if k in step_terms else v
        return step_terms

    def _nonfinite(self, run: _Run, step_terms: dict, grad_norm) -> tuple[Optional[torch.Tensor], bool]:
        """(the gradient norm, whether this step must be skipped): the decision is needed now, one host sync."""
        acc = self.accelerator
        if grad_norm is None and acc.scaler is None:
            # a finite loss can still give a NaN/Inf gradient (e.g. sqrt at 0)
            grads = [p.grad for p in run.params if p.grad is not None]
            grads = grads if self.fsdp is None else self.fsdp.local(grads)  # each process checks its shards
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        bad = ~torch.isfinite(sum(step_terms.values()))
        if grad_norm is not None and acc.scaler is None:  # with fp16 the grad-scaler skips inf steps
            bad = bad | ~torch.isfinite(grad_norm)
        if acc.num_processes > 1:
            bad = acc.reduce(bad.float().reshape(1), reduction="sum") > 0
        return grad_norm, bool(bad)

    def _after_step(self, run: _Run, done: int, bar: Progress) -> None:
        """After `done` steps: the log line (with the non-finite check), the progress bar, the periodic
        evaluation and checkpoint, and a checkpoint then `Interrupted` after a signal."""
        cfg = self.cfg
        if done % cfg.log_every == 0 or done == cfg.steps:
            self._check(run)
            means = run.window.flush()
            if means:
                run.last_terms = means
            run.metrics.write({"stage": self.stage, "step": done, "lr": run.scheduler.get_last_lr()[0],
                               "loss": sum(run.last_terms.values()), "terms": run.last_terms})
            bar.update(0, " ".join(f"{k}={v:.4f}" for k, v in run.last_terms.items()))
        bar.update(1)
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            self._evaluate(run, done)
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != cfg.steps:
            self._checkpoint(run, done)
        if run.signal.get("signal"):
            self._checkpoint(run, done)
            err = Interrupted(f"stopped by {run.signal['signal']} at step {done} of stage '{self.stage}'; "
                              f"a checkpoint was written", fix="run the same command again to resume")
            err.signal = run.signal["signal"]
            raise err

    def _check(self, run: _Run) -> None:
        params = run.params if self.fsdp is None else self.fsdp.local(run.params)
        run.window.check(self.accelerator, self.accelerator.num_processes, params)

    def _checkpoint(self, run: _Run, step: int) -> None:
        """A checkpoint at `step` (once per step), after checking that no weight was updated from a non-finite
        loss."""
        acc = self.accelerator
        self._check(run)
        if run.writer is None or step in run.written:
            return
        run.written.append(step)
        state = {"optimizer": run.optimizer.state_dict() if self.fsdp is None else {}, "scheduler": run.scheduler.state_dict(),
                 "scaler": acc.scaler.state_dict() if acc.scaler is not None else {},
                 "step": step, "position": run.sampler.position(step), "world_size": acc.num_processes,
                 # the partial sums of the current log window: a resumed run logs the same means
                 "metrics_window": run.window.state(), "threads": run.threads.state() if run.threads else {}}
        if self.fsdp is None:
            run.writer.write(step, acc.unwrap_model(run.model).state_dict(), state)
        else:  # each process writes its shards of the weights and optimizer state
            run.writer.write(step, None, state, lambda d: self.fsdp.save(d, run.model, run.inner_optimizer))

    def _evaluate(self, run: _Run, step: int) -> None:
        """`eval_fn(student)` in eval mode without gradients, on the main process; logged and kept."""
        acc = self.accelerator
        if run.eval_fn is None:
            return
        if self.fsdp is not None:  # every process gathers the weights into the plain side
            self.fsdp.sync(run.objective, run.model)
        if acc.is_main_process:
            student = (acc.unwrap_model(run.model) if self.fsdp is None else run.objective.side).student
            was = student.training
            student.eval()
            with torch.no_grad():
                result = run.eval_fn(student)
            student.train(was)
            record = {"stage": self.stage, "step": step, "eval": result}
            run.evals.append(record)
            run.metrics.write(record)
        acc.wait_for_everyone()

    def _finish(self, run: _Run, t0: float) -> dict:
        """The last checkpoint (unless this run only resumed a finished stage) and evaluation; the unwrapped side
        back in ``objective.module``."""
        final_step = self.cfg.steps
        if run.start < final_step or run.resumed_from is None:
            self._checkpoint(run, final_step)
        self._evaluate(run, final_step)
        run.objective.module = self.accelerator.unwrap_model(run.model) if self.fsdp is None else \
            self.fsdp.finish(run.objective, run.model)
        return {"steps": final_step, "resumed_from": run.resumed_from, "terms": run.last_terms, "evals": run.evals,
                "seconds": time.perf_counter() - t0, "threads": run.threads.result()}
