"""What the engine logs: ``metrics.jsonl`` (one JSON object per line, rank 0) and the window of loss terms
between two log lines, kept on the device and checked for non-finite values at log points and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from kdistill.errors import KDError, NonFiniteError
from kdistill.files import atomic_write_bytes


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (rank 0 only); `forward` (the experiment trackers, see
    `kdistill.engine.tracking`) gets every record written."""

    def __init__(self, path: Optional[Path], enabled: bool = True, forward: Optional[Callable[[dict], None]] = None):
        self.path = Path(path) if path else None
        self.enabled = enabled and self.path is not None
        self.forward = forward

    def write(self, record: dict) -> None:
        if self.enabled:
            try:
                with open(self.path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            except OSError as err:
                raise KDError(f"cannot append to {self.path}: {err.strerror or err}",
                              fix="free disk space or make the run directory writable, then run the same command "
                                  "again (earlier checkpoints are intact)") from None
            if self.forward is not None:
                self.forward(record)

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


class StepWindow:
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
