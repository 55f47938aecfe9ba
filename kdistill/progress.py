"""Progress for long loops: a rich bar on a terminal, plain lines (about every 10%) otherwise."""

from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, start: int = 0, stream=None):
        self.total = max(1, total)
        self.desc = desc
        self.enabled = enabled
        self.n = start
        self.stream = stream or sys.stderr
        self._bar = None
        self._t0 = time.perf_counter()
        self._next_line = start + max(1, self.total // 10)
        self.postfix = ""
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeElapsedColumn, TimeRemainingColumn

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[post]}"),
                                     transient=False)
            self._bar.start()
            self._task = self._bar.add_task(desc, total=self.total, completed=start, post="")

    def update(self, n: int = 1, postfix: Optional[str] = None) -> None:
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.n, post=self.postfix)
        elif self.n >= self._next_line or self.n >= self.total:
            self._next_line = self.n + max(1, self.total // 10)
            elapsed = time.perf_counter() - self._t0
            print(f"{self.desc}: {self.n}/{self.total} ({elapsed:.1f}s) {self.postfix}".rstrip(),
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
