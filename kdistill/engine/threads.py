"""CPU threads of a training stage: the `train.threads` setting, the calibration of ``auto`` and the watch on the
step time.

On a CPU shared with another busy process, torch's default of one intra-op thread per core can be 30x slower
than one thread (OpenMP threads spin at every parallel region waiting for a descheduled sibling); on a quiet
machine all cores can be faster. ``threads: auto`` therefore measures, on the stage's own steps:

* **calibration**: after one warm-up step, the next ``2 * SAMPLES`` steps alternate between 1 thread and all the
  cores left for compute (``len(os.sched_getaffinity(0))`` divided among DDP processes, minus DataLoader workers,
  which run one thread each); the count with the lower median step time is kept. As soon as every step of one
  count is `CLEAR` times slower than every step of the other, the calibration stops (a busy machine's 30x slower
  steps are not repeated). These are ordinary training steps (no extra step, no extra RNG draw); only their
  thread count differs.
* **watch**: every ``WINDOW`` steps the median step time is compared with the stage's reference (the kept count's
  calibration median). Twice as slow (and `MIN_SLOWER_S` slower): one warning line (another process is probably
  competing for the cores) and a new calibration. Every ``PROBE_SECONDS`` the other count gets ``PROBE_STEPS``
  step(s); when it is clearly faster, a new calibration (the load went away, or came).

No calibration (the count is left or set, and the watch only warns) when the user fixed the count
(``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, or ``torch.set_num_threads`` after kdistill was imported), when
``train.threads`` is a number, with ``train.deterministic`` (results depend on the thread count: it never
changes within such a run), on a GPU, or with one core. A resumed stage keeps the count its checkpoint
recorded, so a resume continues with the same numerics. Every decision is a ``"event": "threads"`` line in
``metrics.jsonl``; `ThreadControl.result` goes into the engine's fit result.

Inter-op threads (torch.jit.fork) can only be set before torch starts parallel work: kdistill leaves them alone.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Optional, Union

import torch

__all__ = ["ThreadControl", "available_cores", "stage_threads", "user_threads"]

# torch's intra-op count when kdistill was imported: a different count later is the user's torch.set_num_threads
_PROCESS_DEFAULT = torch.get_num_threads()
_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, as taskset / cgroups cpusets set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def user_threads() -> Optional[str]:
    """How the user fixed the intra-op thread count (an environment variable, or torch.set_num_threads after
    kdistill was imported), or None."""
    for var in _ENV_VARS:
        if os.environ.get(var, "").strip():
            return f"{var}={os.environ[var].strip()}"
    if torch.get_num_threads() != _PROCESS_DEFAULT:
        return f"torch.set_num_threads({torch.get_num_threads()})"
    return None


def stage_threads(metrics_path: Optional[os.PathLike]) -> dict:
    """{stage: the last ``threads`` record of that stage} from a run's ``metrics.jsonl`` ({} without one)."""
    import json

    out = {}
    if metrics_path is None or not os.path.isfile(metrics_path):
        return out
    with open(metrics_path) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "threads":
                out[rec["stage"]] = {k: v for k, v in rec.items() if k not in ("stage", "event")}
    return out


class ThreadControl:
    """The thread count of one stage's steps: `begin` (before the first step), `before_step` / `after_step`
    around each step, `state` (saved in checkpoints), `result`, and `close` (the caller's count restored)."""

    SAMPLES = 4  # timed calibration steps per count
    WINDOW = 16  # steps per watch window
    SLOWER = 2.0  # a window this much slower than the reference: warn and calibrate again
    MIN_SLOWER_S = 0.010  # ... and at least this much slower per step (a tiny model's jitter is no load)
    CLEAR = 3.0  # a count whose steps are all this much slower loses the calibration at once
    PROBE_SECONDS = 60.0
    PROBE_STEPS = 1

    def __init__(self, setting: Union[str, int], *, stage: str, device_type: str = "cpu", world_size: int = 1,
                 num_workers: int = 0, deterministic: bool = False,
                 record: Callable[[dict], None] = lambda rec: None, log: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.perf_counter):
        self.stage, self.record, self.log, self.clock = stage, record, log, clock
        self.previous = torch.get_num_threads()
        self.cores = available_cores()
        top = max(1, self.cores // max(1, world_size) - num_workers)
        self.candidates = sorted({1, top})
        self.mode, self.reason, self.count = "auto", "", self.previous
        user = user_threads()
        if setting != "auto":
            self.mode, self.count, self.reason = "fixed", int(setting), "train.threads"
        elif device_type != "cpu":
            self.mode, self.reason = "left", f"training on {device_type}: CPU threads are not calibrated"
        elif user:
            self.mode, self.reason = "user", f"set by the user ({user})"
        elif world_size > 1:
            self.mode, self.count, self.reason = "fixed", top, f"{world_size} processes share {self.cores} cores"
        elif deterministic:
            self.mode, self.reason = "left", "train.deterministic: the thread count never changes within the run"
        elif len(self.candidates) == 1:
            self.mode, self.count, self.reason = "fixed", 1, "one core available"
        self.watch = device_type == "cpu"  # step times on an accelerator are not synchronized: nothing to watch
        self.plan: list[int] = []  # the counts of the next steps (a calibration or a probe)
        self.samples: dict[int, list[float]] = {}
        self.probing, self.why, self.calibrated = False, "", False
        self.reference: Optional[float] = None  # the step time the watch compares with (seconds)
        self.window: list[float] = []
        self.last_check = clock()
        self.events: list[dict] = []
        self.warned = False

    # -- the stage's start, its steps, its end ---------------------------------------------------------------
    def begin(self, step: int, steps_left: int, saved: Optional[dict] = None) -> None:
        """Before the first step of this run (`step` = 0, or the resumed step with its checkpoint's `saved`
        state). A resumed stage writes no new record (its first run's records up to `step` are kept, so
        metrics.jsonl reads as an uninterrupted run's) and a calibrated auto stage keeps its checkpoint's count;
        a fresh auto stage plans its calibration after one warm-up step."""
        resumed = bool(saved)
        if self.mode == "auto" and resumed and saved.get("calibrated"):
            self.count, self.reason, self.calibrated = int(saved["count"]), "the resumed checkpoint's count", True
        elif self.mode == "auto" and steps_left < 2 * (2 * self.SAMPLES + 1):
            self.mode, self.reason = "left", f"too few steps ({steps_left}) to calibrate"
            self._note(step, self.reason, write=not resumed)
        elif self.mode == "auto":
            self._calibrate("calibrated at the stage start", warm_up=True)
        else:
            self._note(step, self.reason, write=not resumed)
        torch.set_num_threads(self.count)

    def before_step(self, step: int) -> None:
        if self.plan:
            torch.set_num_threads(self.plan[0])

    def after_step(self, step: int, seconds: float) -> None:
        """The step `step` (0-based) took `seconds`: calibration samples, the watch, the periodic probe."""
        if self.plan:
            count = self.plan.pop(0)
            if self.probing or len(self.plan) < 2 * self.SAMPLES:  # the warm-up step is not a sample
                self.samples.setdefault(count, []).append(seconds)
            if not self.probing and self._clear_winner():
                self.plan = []  # no need to spend more steps at a count several times slower
            if not self.plan:
                self._probed() if self.probing else self._choose(step + 1)
            return
        if not self.watch:
            return
        self.window.append(seconds)
        full = len(self.window) >= self.WINDOW
        if not full and (self.reference is None or len(self.window) < 4):
            return
        median = statistics.median(self.window)
        if self.reference is None or (median > self.SLOWER * self.reference
                                      and median - self.reference > self.MIN_SLOWER_S):
            self.window = []
            if self.reference is None:
                self.reference = median
            else:
                self._slower(step + 1, median)
            return
        if not full:
            return
        self.window = []
        if self.mode == "auto" and self.clock() - self.last_check > self.PROBE_SECONDS:
            other = [c for c in self.candidates if c != self.count][0]
            self.plan, self.samples, self.probing = [other] * self.PROBE_STEPS, {}, True

    def state(self) -> dict:
        """What a checkpoint keeps: the current count (a resumed auto stage continues with it)."""
        return {"count": self.count, "mode": self.mode, "calibrated": self.calibrated}

    def result(self) -> dict:
        """The stage's threads for the fit result: mode, count, cores, candidates and every decision."""
        return {"mode": self.mode, "threads": self.count, "reason": self.reason, "cores": self.cores,
                "candidates": self.candidates, "events": self.events}

    def close(self) -> None:
        torch.set_num_threads(self.previous)

    # -- decisions -----------------------------------------------------------------------------------------------
    def _calibrate(self, why: str, warm_up: bool = False) -> None:
        """Plan the next steps: (one untimed warm-up step, then) `SAMPLES` steps per count, alternating."""
        alternating = [self.candidates[i % 2] for i in range(2 * self.SAMPLES)]
        self.plan = ([self.candidates[0]] if warm_up else []) + alternating
        self.samples, self.why = {}, why

    def _clear_winner(self) -> bool:
        """Both counts measured and every step of one `CLEAR` times faster than every step of the other."""
        if len(self.samples) < 2:
            return False
        fast, slow = sorted(self.samples.values(), key=min)
        return max(fast) * self.CLEAR < min(slow)

    def _choose(self, step: int) -> None:
        step_ms = {c: statistics.median(ts) * 1000 for c, ts in self.samples.items()}
        # fewer threads on a near tie: they leave the other cores to whatever else runs
        self.count = min(step_ms, key=lambda c: (step_ms[c] / (1.05 if c == 1 else 1.0), c))
        # the watch's reference: the calibration median, or the next window when one step decided
        self.reason = self.why
        self.reference = step_ms[self.count] / 1000 if len(self.samples[self.count]) >= self.SAMPLES else None
        self.window, self.samples, self.last_check, self.calibrated = [], {}, self.clock(), True
        torch.set_num_threads(self.count)
        self._note(step, self.why, step_ms={str(c): round(v, 3) for c, v in step_ms.items()})

    def _probed(self) -> None:
        probe = min(next(iter(self.samples.values())))
        self.probing, self.last_check = False, self.clock()
        if probe < 0.8 * self.reference:  # the other count is clearly faster now: measure both again
            self._calibrate("calibrated again: the other count was faster in a probe")
        else:
            torch.set_num_threads(self.count)

    def _slower(self, step: int, median: float) -> None:
        ratio = median / self.reference
        cause = ("another process is probably competing for the CPU cores" if self.cores > 1 or self.count > 1
                 else "the machine is busier than at the stage start")
        if self.mode == "auto":
            action = "measuring 1 thread against all cores again"
        else:
            action = f"the thread count stays {self.count} ({self.reason})" + \
                ("; 'train.threads: 1' suits a busy machine" if self.count > 1 else "")
        if not self.warned:
            self.log(f"warning: [{self.stage}] steps are {ratio:.1f}x slower than at the stage start "
                     f"({self.reference * 1000:.1f} -> {median * 1000:.1f} ms at {self.count} thread(s)): {cause}; "
                     f"{action}")
            self.warned = True
        rec = {"stage": self.stage, "step": step, "event": "threads_slower", "threads": self.count,
               "step_ms": round(median * 1000, 3), "reference_ms": round(self.reference * 1000, 3)}
        self.events.append({k: v for k, v in rec.items() if k != "stage"})
        if self.mode == "auto":
            self.record(rec)  # a fixed count's metrics.jsonl holds no timing: it reads the same on every run
            self._calibrate(f"calibrated again: steps became {ratio:.1f}x slower")
        else:
            self.reference = median  # warn again only if it gets twice as slow again

    def _note(self, step: int, why: str, write: bool = True, **extra) -> None:
        rec = {"stage": self.stage, "step": step, "event": "threads", "mode": self.mode, "threads": self.count,
               "cores": self.cores, "candidates": self.candidates, "reason": why, **extra}
        self.events.append({k: v for k, v in rec.items() if k != "stage"})
        if write:
            self.record(rec)
