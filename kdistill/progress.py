"""Progress for long loops: the stage, the step, the rate and the ETA of the stage and of the whole run.

On a terminal a rich bar (its labels are plain text: ``[teacher]`` is not read as markup); otherwise plain lines,
every 5 % of the steps and at least every 30 seconds, e.g.::

    [teacher] train (stage 1/3): step 120/800, 41.3 steps/s, ETA 0:16, run ETA 1:12  ce=0.8123

The run's ETA needs the plan of the run's stages: a job announces it with ``with run_plan({"teacher": 800,
"baseline": 600, "student": 600}):`` (stages already done left out); a bar whose description starts with
``[stage]`` then adds the steps of the later stages at the current rate. Without a plan only the stage's ETA is
shown.
"""

from __future__ import annotations

import re
import sys
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Mapping, Optional

LINE_FRACTION = 20  # plain lines every 1/20 of the steps
LINE_SECONDS = 30.0  # and at least this often


class RunPlan:
    """The stages of one run in order, with their step counts and the steps each has done so far."""

    def __init__(self, stages: Mapping[str, int]):
        self.stages = {name: int(steps) for name, steps in stages.items()}
        self.done = {name: 0 for name in self.stages}

    def position(self, stage: str) -> Optional[str]:
        names = list(self.stages)
        return f"stage {names.index(stage) + 1}/{len(names)}" if stage in self.stages else None

    def steps_after(self, stage: str) -> int:
        """Steps still to run in the stages after `stage`."""
        names = list(self.stages)
        if stage not in names:
            return 0
        return sum(max(0, self.stages[s] - self.done[s]) for s in names[names.index(stage) + 1:])


_PLAN: ContextVar[Optional[RunPlan]] = ContextVar("kdistill_run_plan", default=None)


@contextmanager
def run_plan(stages: Mapping[str, int]) -> Iterator[RunPlan]:
    """Announce the stages a run will train (name -> steps, in order) to the progress bars inside the block."""
    plan = RunPlan(stages)
    token = _PLAN.set(plan)
    try:
        yield plan
    finally:
        _PLAN.reset(token)


def format_seconds(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, start: int = 0, stream=None):
        self.total = max(1, total)
        self.desc = desc
        self.enabled = enabled
        self.n = self.start = start
        self.stream = stream or sys.stderr
        self._bar = None
        self._t0 = self._last_line_time = time.perf_counter()
        self._every = max(1, self.total // LINE_FRACTION)
        self._next_line = start + self._every
        self.postfix = ""
        match = re.match(r"\[([^\]]+)\]", desc)
        self.stage = match.group(1) if match else None
        self.plan = _PLAN.get()
        position = self.plan.position(self.stage) if self.plan is not None and self.stage else None
        self.label = f"{desc} ({position})" if position else desc
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn

            self._bar = RichProgress(TextColumn("{task.description}", markup=False), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("{task.fields[info]}", markup=False),
                                     TextColumn("{task.fields[post]}", markup=False), transient=False,
                                     console=Console(file=self.stream))
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, completed=start, info="", post="")

    def status(self) -> dict:
        """The rate (steps per second since this bar started), the stage's and the run's ETA in seconds."""
        elapsed = time.perf_counter() - self._t0
        rate = (self.n - self.start) / elapsed if elapsed > 0 and self.n > self.start else float("nan")
        left = max(0, self.total - self.n)
        eta = left / rate if rate == rate and rate > 0 else float("nan")
        run_eta = None
        if self.plan is not None and self.stage in self.plan.stages:
            run_eta = (left + self.plan.steps_after(self.stage)) / rate if rate == rate and rate > 0 else float("nan")
        return {"step": self.n, "total": self.total, "rate": rate, "eta": eta, "run_eta": run_eta}

    def info(self) -> str:
        s = self.status()
        rate = f"{s['rate']:.1f} steps/s" if s["rate"] == s["rate"] else "- steps/s"
        text = f"{rate}, ETA {format_seconds(s['eta'])}"
        if s["run_eta"] is not None:
            text += f", run ETA {format_seconds(s['run_eta'])}"
        return text

    def line(self) -> str:
        return f"{self.label}: step {self.n}/{self.total}, {self.info()}  {self.postfix}".rstrip()

    def update(self, n: int = 1, postfix: Optional[str] = None) -> None:
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        if self.plan is not None and self.stage in self.plan.done:
            self.plan.done[self.stage] = self.n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.n, info=self.info(), post=self.postfix)
            return
        now = time.perf_counter()
        if n and (self.n >= self._next_line or self.n >= self.total or now - self._last_line_time >= LINE_SECONDS):
            self._next_line = self.n + self._every
            self._last_line_time = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
