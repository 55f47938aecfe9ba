"""`kdistill search`: an Optuna study over a config's ``search:`` space, stored in SQLite, resumable, with
parallel worker processes on the one storage.

Resumption: the study lives in its storage. A second ``kdistill search`` on the same storage (the first having
been killed, or asking for more trials) keeps every finished trial, marks the trials a kill left RUNNING as FAIL
and re-queues their values (the re-run resumes from the killed trial's checkpoints in its run directory), then
runs until the study holds ``--trials`` finished trials. A lock file next to the storage refuses a second search
running on the same storage at the same time; its workers share it by design.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Callable, Optional, Sequence

from kdistill.errors import ConfigError, KDError
from kdistill.search.plan import Plan, make_plan, storage_file, train_shared_teacher
from kdistill.search.trials import file_lock, make_sampler, open_study, run_worker, worker_process

__all__ = ["requeue_stale", "search"]

FINGERPRINT_ATTR = "kdistill_config"


def search(config, *, trials: int, out=None, storage: Optional[str] = None, jobs: int = 1,
           constraints: Sequence[str] = (), overrides: Sequence[str] = (), progress: bool = False,
           log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the search of `config` (a YAML file with a ``search:`` section) until its study holds
    `trials` finished trials; write ``OUT/best.yaml``, ``OUT/search.json`` and ``OUT/report.html``; return the
    search record (`kdistill.search.results.collect`)."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise KDError("kdistill search needs optuna", fix="pip install 'kdistill[search]'") from None
    if trials < 1:
        raise ConfigError(f"--trials {trials}: give at least 1 trial", fix="e.g. --trials 20")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: give at least 1 worker process", fix="e.g. --jobs 2")
    config = Path(config)
    out = Path(out) if out is not None else Path("runs") / f"{config.stem}-search"
    plan, task = make_plan(config, out, storage=storage, constraints=constraints, overrides=overrides)
    db = storage_file(plan.storage)
    db.parent.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    lock = db.with_name(db.name + ".lock")
    try:
        with file_lock(lock, wait=False):
            return _search(plan, task, trials, jobs, lock, progress, log)
    except BlockingIOError:
        raise KDError(f"another kdistill search is running on {plan.storage}", where=str(lock),
                      fix="wait for it, or give this search its own --storage / --out") from None


def _search(plan: Plan, task, trials: int, jobs: int, lock: Path, progress: bool, log) -> dict:
    from optuna.trial import TrialState

    from kdistill.search.results import collect, write_results

    for note in plan.notes:
        log(f"note: {note}")
    train_shared_teacher(plan, task, progress=progress, log=log)
    study = open_study(plan.storage, plan.search, make_sampler(plan.search), create=True)
    fingerprint = study.user_attrs.get(FINGERPRINT_ATTR)
    if fingerprint is None:
        study.set_user_attr(FINGERPRINT_ATTR, plan.fingerprint)
        study.set_user_attr("constraints", [str(c) for c in plan.constraints])
    elif fingerprint != plan.fingerprint:
        raise ConfigError(f"{plan.storage} holds study '{plan.search.study_name}' of another config or search space",
                          fix="resume with the same config, or give a new --out / --storage (or "
                              "--set search.study_name=NAME)")
    requeued = requeue_stale(study, log)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    finished = states.count(TrialState.COMPLETE)
    failed_before = states.count(TrialState.FAIL)
    if finished:
        log(f"search: resuming {plan.storage}: {finished} finished trial(s) kept"
            + (f", {requeued} interrupted trial(s) re-queued" if requeued else ""))
    spec = {"out": str(plan.out), "storage": plan.storage, "search": plan.search.model_dump(mode="json"),
            "constraints": [c.model_dump() for c in plan.constraints], "base": plan.base, "trials": trials,
            "lock": str(lock), "failed_before": failed_before, "worker": 0}
    if finished < trials:
        log(f"search: {trials - finished} trial(s) to run with {jobs} worker process(es); trials in "
            f"{plan.out / 'trials'}")
        _run_workers(spec, jobs, log)
    record = collect(open_study(plan.storage, plan.search, None), plan)
    write_results(record, plan, task)
    return record


def requeue_stale(study, log=print) -> int:
    """Trials left RUNNING by a killed search (no search runs on this storage now: the lock says so) are marked
    FAIL and their values queued again, with their run directory (the re-run resumes from its checkpoints)."""
    from optuna.trial import TrialState

    count = 0
    for t in study.get_trials(deepcopy=True, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        attrs = {"requeued_from": t.number}
        if t.user_attrs.get("run_dir"):
            attrs["run_dir"] = t.user_attrs["run_dir"]
        study.enqueue_trial(t.params, user_attrs=attrs)
        log(f"search: trial {t.number} was interrupted: re-queued")
        count += 1
    return count


def _run_workers(spec: dict, jobs: int, log) -> None:
    if jobs == 1:
        run_worker(spec, log=log)
        return
    # forked from a fresh server process that imported the heavy modules once (no torch thread pool, no Accelerate
    # state is inherited, unlike a fork of this process; cheaper than K interpreters importing torch each)
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch._dynamo", "optuna", "kdistill.search.trials", "kdistill.tasks",
                                    "kdistill.tasks.classification", "kdistill.schemes.offline"])
    else:  # fresh interpreters
        ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker_process, args=({**spec, "worker": k},), name=f"kdistill-search-{k}")
             for k in range(jobs)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=60)
        from kdistill.engine import Interrupted

        err = Interrupted("search interrupted; finished trials are kept in the storage",
                          fix="run the same command again to resume")
        err.signal = "SIGINT"
        raise err from None
    bad = [(p.name, p.exitcode) for p in procs if p.exitcode]
    if bad and all(code in (130, 143, -2, -15) for _, code in bad):  # SIGINT / SIGTERM: the workers checkpointed
        from kdistill.engine import Interrupted

        err = Interrupted("search interrupted; finished trials are kept in the storage and interrupted ones resume "
                          "from their checkpoints", fix="run the same command again to resume")
        err.signal = "SIGTERM" if any(code in (143, -15) for _, code in bad) else "SIGINT"
        raise err
    if bad:
        raise KDError(f"search worker(s) stopped: {', '.join(f'{n} (exit {c})' for n, c in bad)}",
                      fix="see the messages above; run the same command again to resume (finished trials are "
                          "kept)")
