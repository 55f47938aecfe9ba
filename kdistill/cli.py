"""Command line: `kdistill demo | run | eval | export | report | audit | search | cache`. Parses, calls the API, maps every
KDError to one line + exit 2."""

from __future__ import annotations

import copy
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

from kdistill.errors import KDError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kdistill: knowledge distillation with a measured account of what compression cost.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"kdistill {version('kdistill')}")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
            print("kdistill (not installed)")
        raise typer.Exit()


@app.callback()
def _main_options(show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                                     help="print the version and exit")) -> None:
    """kdistill: knowledge distillation with a measured account of what compression cost."""


def _err(msg: str) -> None:
    print(f"kdistill: error: {msg}", file=sys.stderr, flush=True)


class _Terminated(BaseException):
    """SIGTERM outside a training loop (inside one, the engine checkpoints first and raises `Interrupted`)."""


def _raise_terminated(signum, frame):
    raise _Terminated()


TRUST_HELP = ("allow full unpickling of a .pt/.pth teacher.weights file; it can run arbitrary code, so use it only "
              "for files you trust (the default loads tensors only, weights_only=True)")


def _run_task(task, cfg, out: Path, progress: bool, **options) -> dict:
    """Run a task's job; an interruption becomes a one-line message with the resume command."""
    from kdistill.engine import Interrupted

    resume = f"resume with: kdistill run {shlex.quote(str(out))}"
    try:
        summary = task.run(cfg, out, progress=progress, **options)
    except Interrupted as err:
        stopped = Interrupted(err.what, fix=resume)
        stopped.signal = err.signal
        raise stopped from None
    except (KeyboardInterrupt, _Terminated) as err:
        stopped = Interrupted("stopped outside a training loop; finished stages and checkpoints are kept",
                              fix=resume)
        stopped.signal = "SIGTERM" if isinstance(err, _Terminated) else "SIGINT"
        raise stopped from None
    print(task.table(summary))
    print(f"run directory: {out}")
    return summary


FRESH_HELP = "start the run over in an existing run directory (its weights, checkpoints and metrics are deleted)"
RESTART_HELP = ("retrain STAGE (e.g. student) and every stage trained after it under this config, keeping the earlier "
                "stages' weights; use it after changing training settings such as train.steps")
WEAK_HELP = ("what to do when the teacher scores at chance level on the test set: 'warn' (default) or 'refuse' "
             "(exit 2 before any student stage)")
SET_HELP = ("override a config field: --set train.steps=200 --set distill.temperature=4 (dotted path, value "
            "parsed as YAML; repeatable); the run directory's config.yaml records the result")


def _config_path(config: Path, out: Optional[Path]) -> tuple[Path, Path]:
    """(config file, run directory): a run directory given as CONFIG resumes that run."""
    if config.is_dir():
        return config / "config.yaml", out or config
    return config, out or Path("runs") / config.stem


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), "--out", help="run directory"),
         progress: bool = typer.Option(True, "--progress/--no-progress")) -> None:
    """Distil a 1-D CNN teacher into a 13x smaller CNN on mnist1d (embedded real data) and print the comparison."""
    from kdistill.config import parse_config
    from kdistill.demo import DEMO_CONFIG

    from kdistill.tasks import get_task

    cfg = parse_config(copy.deepcopy(DEMO_CONFIG), "demo config")
    _run_task(get_task("classification"), cfg, out, progress)


@app.command("run")
def run_cmd(config: Path = typer.Argument(..., help="a YAML config, or a run directory to resume"),
            out: Optional[Path] = typer.Option(None, "--out", help="run directory (default: runs/<config name>)"),
            overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
            progress: bool = typer.Option(True, "--progress/--no-progress"),
            trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help=TRUST_HELP),
            fresh: bool = typer.Option(False, "--fresh", help=FRESH_HELP),
            restart_stage: Optional[str] = typer.Option(None, "--restart-stage", metavar="STAGE",
                                                        help=RESTART_HELP),
            weak_teacher: str = typer.Option("warn", "--weak-teacher", metavar="warn|refuse", help=WEAK_HELP)
            ) -> None:
    """Run the job of a config file (any task); re-running on an existing run directory resumes it."""
    from kdistill.tasks import load_any

    path, run_dir = _config_path(config, out)
    task, cfg = load_any(path, overrides or [])
    options = {"trust_checkpoint": trust_checkpoint} if trust_checkpoint else {}
    if weak_teacher != "warn":
        if weak_teacher != "refuse" or task.name != "classification":
            raise KDError(f"--weak-teacher {weak_teacher}: use 'warn' or 'refuse' (classification runs only)",
                          where="--weak-teacher", fix="remove the option or give 'refuse'")
        options["weak_teacher"] = "refuse"
    if fresh or restart_stage:
        from kdistill.tasks.job import RunDir

        if fresh and restart_stage:
            raise KDError("--fresh and --restart-stage exclude each other", fix="give one of them")
        RunDir(run_dir).reset(fresh=fresh, restart_stage=restart_stage)
    _run_task(task, cfg, run_dir, progress, **options)


@app.command("eval")
def eval_cmd(run_dir: Path = typer.Argument(..., help="a finished run directory"),
             trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help=TRUST_HELP)) -> None:
    """Re-evaluate a run directory (quality and cost) and print the comparison table."""
    from kdistill.tasks import load_any

    if not (run_dir / "config.yaml").is_file():
        raise KDError(f"{run_dir} is not a run directory (no config.yaml)", fix="give the --out of a finished run")
    task, cfg = load_any(run_dir / "config.yaml")
    scheme = getattr(getattr(cfg, "scheme", None), "name", "offline")
    if task.evaluate is None or scheme != "offline":
        what = f"a '{scheme}' run" if scheme != "offline" else f"a '{task.name}' run"
        raise KDError(f"{run_dir} is {what}; 'kdistill eval' re-evaluates offline classification runs only",
                      fix=f"read {run_dir / 'summary.json'}, or run 'kdistill run {run_dir}' (finished stages are "
                          "loaded, not retrained) to evaluate it again")
    print(task.table(task.evaluate(run_dir, trust_checkpoint=trust_checkpoint)))


@app.command("export")
def export_cmd(run_dir: Path = typer.Argument(..., help="a finished run directory"),
               format: str = typer.Option("onnx", "--format", help="export format (onnx)"),
               int8: Optional[list[str]] = typer.Option(None, "--int8", help="also write an onnxruntime int8 model: "
                                                                          "dynamic or static (repeatable)")) -> None:
    """Export a finished run's final model (ONNX fp32, int8 variants), check it against PyTorch, and measure
    every artifact on its runtime (the summary's ``deployed`` rows)."""
    from kdistill.compress.config import ExportConfig
    from kdistill.configbase import validate
    from kdistill.tasks import load_any

    if not (run_dir / "config.yaml").is_file():
        raise KDError(f"{run_dir} is not a run directory (no config.yaml)", fix="give the --out of a finished run")
    export_cfg = validate(ExportConfig, {"format": format, "int8": list(int8 or [])}, "kdistill export")
    task, cfg = load_any(run_dir / "config.yaml")
    scheme = getattr(getattr(cfg, "scheme", None), "name", "offline")
    if task.export is None or scheme != "offline":
        raise KDError(f"{run_dir} is a '{task.name if task.export is None else scheme}' run; 'kdistill export' "
                      "exports runs of task classification (scheme offline) and sentence_embedding",
                      fix="add an export: section to the config and run it (finished stages are loaded, not "
                          "retrained)")
    summary = task.export(run_dir, export_cfg)
    from kdistill.report import with_deployed

    print(with_deployed(summary).strip())


@app.command("report")
def report_cmd(run_dir: Path = typer.Argument(..., help="a finished run directory"),
               out: Optional[Path] = typer.Option(None, "--out", help="the HTML file (default: RUN_DIR/report.html)")
               ) -> None:
    """Write the run's self-contained HTML report (comparison, training curves, quality against cost, calibration,
    per-class accuracy, disagreements): one file, no external requests, readable offline on any screen."""
    from kdistill.report.html import write_report

    path, notes = write_report(run_dir, out)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"report: {path}")


AUDIT_OUT_HELP = ("run directory (default: runs/<config name>): a finished teacher stage there is audited, otherwise "
                  "the teacher is loaded from teacher.weights or trained there as the run's teacher stage; "
                  "audit.json is written there")


@app.command("audit")
def audit_cmd(config: Path = typer.Argument(..., help="a YAML config (task classification), or a run directory"),
              out: Optional[Path] = typer.Option(None, "--out", help=AUDIT_OUT_HELP),
              overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
              progress: bool = typer.Option(True, "--progress/--no-progress"),
              trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help=TRUST_HELP)) -> None:
    """Audit a config's teacher before distilling from it: held-out and per-class accuracy, calibration,
    label-noise suspects, STRIP and a Neural-Cleanse-style trigger reconstruction (docs/audit.md). Writes
    audit.json; exit 2 when a threshold of the config's audit: section is violated."""
    from kdistill.tasks import load_any

    path, run_dir = _config_path(config, out)
    task, cfg = load_any(path, overrides or [])
    if task.name != "classification":
        raise KDError(f"{path} is a '{task.name}' config; 'kdistill audit' audits classification teachers "
                      "(labels are needed for accuracy, calibration and label noise)", where="task",
                      fix="give a config of task classification")
    from kdistill.audit.stage import AUDIT_FILE, audit_command, refusal
    from kdistill.audit.teacher import audit_table

    record = audit_command(cfg, run_dir, progress=progress, trust_checkpoint=trust_checkpoint)
    print(audit_table(record))
    print(f"audit: {run_dir / AUDIT_FILE}")
    if not record["passed"]:
        from kdistill.schemes.offline import teacher_path

        weights = str(teacher_path(cfg, run_dir)) if cfg.scheme.name == "offline" else None
        raise refusal(record, run_dir, weights)


SEARCH_OUT_HELP = ("search directory (default: runs/<config name>-search): trials/NNNN run directories, teacher/, "
                   "search.db, search.json, best.yaml, report.html")
CONSTRAINT_HELP = ("a hard limit measured on the deployment runtime: latency_ms<=2, bytes<=200000, top1>=0.8 "
                   "(repeatable; added to the config's search.constraints)")


@app.command("search")
def search_cmd(config: Path = typer.Argument(..., help="a YAML config with a search: section"),
               trials: int = typer.Option(..., "--trials", help="finished trials the study should hold (a resumed "
                                                                "search runs only the missing ones)"),
               storage: Optional[str] = typer.Option(None, "--storage", help="sqlite:///PATH of the Optuna study "
                                                                            "(default: sqlite:///OUT/search.db)"),
               jobs: int = typer.Option(1, "--jobs", help="worker processes sharing the storage"),
               constraint: Optional[list[str]] = typer.Option(None, "--constraint", help=CONSTRAINT_HELP),
               out: Optional[Path] = typer.Option(None, "--out", help=SEARCH_OUT_HELP),
               overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
               progress: bool = typer.Option(False, "--progress/--no-progress", help="progress bars of the "
                                             "shared teacher's training")) -> None:
    """Search the config's search: space with Optuna (docs/search.md): each trial is a real short run; the best
    configuration meeting the constraints is written as OUT/best.yaml, the trials and Pareto front to
    OUT/report.html. Run it again to resume."""
    from kdistill.search import search
    from kdistill.search.results import results_table

    record = search(config, trials=trials, out=out, storage=storage, jobs=jobs, constraints=constraint or [],
                    overrides=overrides or [], progress=progress)
    print(results_table(record))
    print(f"report: {Path(record['out']) / 'report.html'}")


cache_app = typer.Typer(no_args_is_help=True, help="Teacher-output cache: build it once, train from it.")
app.add_typer(cache_app, name="cache")


@cache_app.command("build")
def cache_build_cmd(config: Path = typer.Argument(..., help="a YAML config with teacher.cache"),
                    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default: runs/<config "
                                                                          "name>); the cache goes to teacher.cache.dir "
                                                                          "or RUN_DIR/teacher-cache"),
                    overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
                    rebuild: bool = typer.Option(False, "--rebuild", help="delete a stale cache and build it anew"),
                    progress: bool = typer.Option(True, "--progress/--no-progress"),
                    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help=TRUST_HELP)) -> None:
    """Store the teacher outputs the loss terms read (resumable: run it again after a kill and it continues)."""
    from kdistill.tasks import load_any

    path, run_dir = _config_path(config, out)
    task, cfg = load_any(path, overrides or [])
    if task.build_cache is None:
        raise KDError(f"task '{task.name}' has no teacher-output cache", where="task",
                      fix="run it with 'kdistill run' (its teacher outputs are kept in the run directory)")
    options = {"trust_checkpoint": trust_checkpoint} if trust_checkpoint else {}
    cached = task.build_cache(cfg, run_dir, rebuild=rebuild, progress=progress, **options)
    if cached is not None:
        print(f"teacher cache: {cached.directory} (key {cached.key})")


def main(argv: Optional[list[str]] = None) -> int:
    """The `kdistill` command: exit 0, 2 with one `kdistill: error:` line for every mistake of input or
    environment, or 128 + signal number (130 SIGINT, 143 SIGTERM) after an interruption, with the resume command."""
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main else None
    try:
        app(args=argv, standalone_mode=False, prog_name="kdistill")
    except KDError as err:
        stopped_by = getattr(err, "signal", None)  # kdistill.engine.Interrupted: not an error
        if stopped_by:
            print(f"kdistill: {err}", file=sys.stderr, flush=True)
            return 128 + int(getattr(signal, stopped_by, signal.SIGINT))
        _err(str(err))
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except _Terminated:
        _err("terminated (SIGTERM)")
        return 143
    except OSError as err:  # the environment (permissions, full disk, missing device), not a bug
        where = f": {err.filename}" if err.filename else ""
        _err(f"{err.strerror or err}{where}: check the path, its permissions and free space")
        return 2
    except SystemExit as err:  # typer/click's own exits (help, usage errors)
        return int(err.code or 0)
    except Exception as err:  # usage errors: click's own, or the copy of click that typer bundles
        names = {c.__name__ for c in type(err).__mro__}
        if "Abort" in names:
            return 130
        if "ClickException" in names:
            ctx = getattr(err, "ctx", None)
            if ctx is not None:
                print(ctx.get_usage(), file=sys.stderr)
            else:  # e.g. an option without its value: no context to take the usage from
                words = [w for w in (sys.argv[1:] if argv is None else argv) if not w.startswith("-")][:1]
                print(f"Usage: kdistill {' '.join(words + ['[OPTIONS] [ARGS]...'])}", file=sys.stderr)
            message = err.format_message() if "NoArgsIsHelpError" not in names else "no command given"
            _err(f"{message} (see 'kdistill --help')")
            return 2
        raise
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
