"""One trial and one worker: a trial is a real short run of the config with the sampled values, in its own run
directory (``OUT/trials/NNNN``); a worker asks the shared study for trials until the study has enough.

A trial's metrics (`trial_metrics`) come from its ``summary.json``: ``top1`` is the accuracy of the deployed
model (the last ``deployed`` row: the export of the final model, int8 when the config asks for it; the
distilled student when nothing is exported), ``latency_ms`` its batch-1 latency on its runtime (onnxruntime for
an ONNX file) at the search's thread count, ``bytes`` its file size, ``params`` the student's parameters.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import traceback
from pathlib import Path
from typing import Callable, Optional

from kdistill.errors import KDError
from kdistill.search.config import Constraint, SearchConfig
from kdistill.search.space import assign, suggest

__all__ = ["WorkerSpec", "file_lock", "make_sampler", "open_study", "run_worker", "trial_metrics", "worker_offset"]


def trial_metrics(summary: dict) -> dict:
    """The search metrics of a finished classification run's summary."""
    rows = [r for r in summary.get("deployed") or [] if r.get("name") != "teacher"]
    student = summary["student"]
    if rows:
        final = rows[-1]
        return {"top1": float(final["accuracy"]), "latency_ms": float(final["latency_ms_b1"]),
                "bytes": int(final["bytes"]), "params": int(student["params"]), "artifact": final["name"],
                "runtime": final["runtime"], "threads": final.get("threads")}
    return {"top1": float(student["accuracy"]), "latency_ms": float(student["latency_ms"]),
            "bytes": int(student["bytes"]), "params": int(student["params"]), "artifact": "student",
            "runtime": "torch", "threads": student.get("cost_threads")}


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool = True):
    """An exclusive advisory lock on `path` (created); without `wait` a held lock raises BlockingIOError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def worker_offset(worker: int, held: int) -> int:
    """The sampler seed offset of `worker` when the study held `held` trials at its start: distinct for every
    (worker, held) pair with held < 10,000 (``worker + held`` was not: worker 0 starting after worker 1's first
    trial drew the same random trials as worker 1)."""
    return 10_000 * worker + held


def make_sampler(search: SearchConfig, offset: int = 0, n_trials: int = 16):
    """TPE (single- and multi-objective; constrained: it reads the constraint values each trial records with
    ``Trial.set_constraint``, Optuna 5's replacement of the sampler's deprecated ``constraints_func``), seeded by
    `offset` (`worker_offset`: the worker and the trials already held) so that parallel and resumed workers
    start apart."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    startup = max(2, min(10, n_trials // 3))
    return optuna.samplers.TPESampler(seed=search.seed + offset, n_startup_trials=startup)


def open_study(storage: str, search: SearchConfig, sampler, *, create: bool = False):
    import optuna

    engine = optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": {"timeout": 120}})
    if create:
        return optuna.create_study(storage=engine, study_name=search.study_name, sampler=sampler,
                                   directions=search.directions(), load_if_exists=True)
    return optuna.load_study(study_name=search.study_name, storage=engine, sampler=sampler)


class WorkerSpec(dict):
    """What a worker process needs (plain data, picklable): out, storage, search (dict), constraints (dicts),
    base (raw config), trials, worker, quiet."""


def _counts(study) -> dict:
    from optuna.trial import TrialState

    counts = {state: 0 for state in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    return counts


def run_worker(spec: dict, log: Callable[[str], None] = print) -> int:
    """Ask the study for trials and run them until it has `trials` finished (or running) ones; returns the number
    of trials this worker finished. A trial whose config is refused or whose run fails (a `KDError`, e.g. a
    non-finite loss) is told FAIL with its message and the search goes on; an interruption (SIGINT/SIGTERM)
    leaves the trial RUNNING, so the next ``kdistill search`` on the storage re-queues it."""
    from optuna.trial import TrialState

    from kdistill.search.config import SearchConfig
    from kdistill.tasks import get_task

    search = SearchConfig(**spec["search"])
    constraints = [Constraint(**c) for c in spec["constraints"]]
    # seeded by the worker and by how many trials the study holds: a resumed search does not draw its first
    # random trials again (the same seed would repeat the values the first invocation started with)
    held = len(open_study(spec["storage"], search, None).get_trials(deepcopy=False))
    sampler = make_sampler(search, worker_offset(spec["worker"], held), spec["trials"])
    study = open_study(spec["storage"], search, sampler)
    task = get_task("classification")
    out = Path(spec["out"])
    max_failures = search.max_failures or spec["trials"]
    done = 0
    while True:
        with file_lock(Path(spec["lock"]).with_suffix(".ask.lock")):
            counts = _counts(study)
            if counts[TrialState.COMPLETE] + counts[TrialState.RUNNING] >= spec["trials"]:
                return done
            if counts[TrialState.FAIL] - spec.get("failed_before", 0) >= max_failures:
                log(f"search: stopping after {max_failures} failed trials (see OUT/trials/*/error.txt)")
                return done
            trial = study.ask()
        run_dir = Path(trial.user_attrs.get("run_dir") or out / "trials" / f"{trial.number:04d}")
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", spec["worker"])
        try:
            values = suggest(trial, search.space)
            trial.set_user_attr("values", json.loads(json.dumps(values, default=str)))
            cfg = task.parse(assign(spec["base"], values), f"trial {trial.number}")
            summary = task.run(cfg, run_dir, progress=False, log=_trial_log(run_dir))
            metrics = trial_metrics(summary)
        except KDError as err:
            if getattr(err, "signal", None):  # interrupted: the trial stays RUNNING, re-queued on resumption
                raise
            _failed(study, trial, run_dir, str(err), log)
            continue
        except Exception as err:  # a bug in one trial: recorded with its traceback, the search goes on
            _failed(study, trial, run_dir, f"{type(err).__name__}: {err}", log, traceback.format_exc())
            continue
        trial.set_user_attr("metrics", metrics)
        for constraint in constraints:  # measured on the deployment runtime; <= 0 when met
            trial.set_constraint(str(constraint), constraint.violation(float(metrics[constraint.metric])))
        study.tell(trial, [metrics[name] for name in search.objectives])
        done += 1
        shown = " ".join(f"{k}={_fmt(metrics[k])}" for k in ("top1", "latency_ms", "bytes"))
        log(f"trial {trial.number}: {shown} ({', '.join(f'{k}={_fmt(v)}' for k, v in values.items())})")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _trial_log(run_dir: Path) -> Callable[[str], None]:
    """A trial's own messages go to its run directory's log.txt (the search prints one line per trial)."""
    def log(line: str = "") -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "log.txt", "a") as fh:
            fh.write(f"{line}\n")
    return log


def _failed(study, trial, run_dir: Path, message: str, log, details: str = "") -> None:
    from optuna.trial import TrialState

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.txt").write_text(message + "\n" + details)
    trial.set_user_attr("error", message)
    study.tell(trial, state=TrialState.FAIL)
    log(f"trial {trial.number}: failed: {message}")


def worker_process(spec: dict) -> None:
    """Entry point of a worker process (`--jobs K`): one CPU thread per worker unless the config says more."""
    import sys

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    try:
        run_worker(spec, log=lambda line: print(f"[worker {spec['worker']}] {line}", flush=True))
    except KDError as err:
        print(f"kdistill: worker {spec['worker']}: {err}", file=sys.stderr, flush=True)
        sys.exit(130 if getattr(err, "signal", None) else 2)
