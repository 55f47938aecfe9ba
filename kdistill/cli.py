"""Command line: `kdistill demo | run | eval`. Parses, calls the API, maps every KDError to one line + exit 2."""

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


def _err(msg: str) -> None:
    print(f"kdistill: error: {msg}", file=sys.stderr, flush=True)


class _Terminated(BaseException):
    """SIGTERM outside a training loop (inside one, the engine checkpoints first and raises `Interrupted`)."""


def _raise_terminated(signum, frame):
    raise _Terminated()


TRUST_HELP = ("allow full unpickling of a .pt/.pth teacher.weights file; it can run arbitrary code, so use it only "
              "for files you trust (the default loads tensors only, weights_only=True)")


def _run_config(cfg, out: Path, progress: bool, trust_checkpoint: bool = False) -> dict:
    from kdistill.engine import Interrupted
    from kdistill.schemes import run, summary_table

    resume = f"resume with: kdistill run {shlex.quote(str(out))}"
    try:
        summary = run(cfg, out, progress=progress, trust_checkpoint=trust_checkpoint)
    except Interrupted as err:
        stopped = Interrupted(err.what, fix=resume)
        stopped.signal = err.signal
        raise stopped from None
    except (KeyboardInterrupt, _Terminated) as err:
        stopped = Interrupted("stopped outside a training loop; finished stages and checkpoints are kept",
                              fix=resume)
        stopped.signal = "SIGTERM" if isinstance(err, _Terminated) else "SIGINT"
        raise stopped from None
    print(summary_table(cfg, summary))
    print(f"run directory: {out}")
    return summary


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), "--out", help="run directory"),
         progress: bool = typer.Option(True, "--progress/--no-progress")) -> None:
    """Distil a 1-D CNN teacher into an MLP on mnist1d (embedded real data) and print the comparison."""
    from kdistill.config import parse_config
    from kdistill.demo import DEMO_CONFIG

    cfg = parse_config(copy.deepcopy(DEMO_CONFIG), "demo config")
    _run_config(cfg, out, progress)


@app.command("run")
def run_cmd(config: Path = typer.Argument(..., help="a YAML config, or a run directory to resume"),
            out: Optional[Path] = typer.Option(None, "--out", help="run directory (default: runs/<config name>)"),
            progress: bool = typer.Option(True, "--progress/--no-progress"),
            trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help=TRUST_HELP)) -> None:
    """Run the job of a config file; re-running on an existing run directory resumes it."""
    from kdistill.config import load_config

    if config.is_dir():
        out = out or config
        config = config / "config.yaml"
    from kdistill.llm.config import is_lm_config

    if is_lm_config(config):  # task: causal_lm (kdistill.llm.run)
        from kdistill.llm.run import lm_summary_table, load_lm_config, run_lm_distillation

        run_dir = out or Path("runs") / config.stem
        print(lm_summary_table(run_lm_distillation(load_lm_config(config), run_dir, progress=progress)))
        print(f"run directory: {run_dir}")
        return
    cfg = load_config(config)
    _run_config(cfg, out or Path("runs") / config.stem, progress, trust_checkpoint)


@app.command("eval")
def eval_cmd(run_dir: Path = typer.Argument(..., help="a finished run directory"),
             trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help=TRUST_HELP)) -> None:
    """Re-evaluate a run directory (quality and cost) and print the comparison table."""
    from kdistill.report import comparison_table
    from kdistill.schemes.offline import evaluate_run_dir

    if not (run_dir / "config.yaml").is_file():
        raise KDError(f"{run_dir} is not a run directory (no config.yaml)", fix="give the --out of a finished run")
    _only_offline(run_dir)
    print(comparison_table(evaluate_run_dir(run_dir, trust_checkpoint=trust_checkpoint)))


def _only_offline(run_dir: Path) -> None:
    from kdistill.config import load_config

    name = load_config(run_dir / "config.yaml").scheme.name
    if name != "offline":
        raise KDError(f"{run_dir} is a '{name}' run; 'kdistill eval' re-evaluates offline runs only",
                      fix=f"read {run_dir / 'summary.json'}, or run 'kdistill run {run_dir}' (finished rounds are "
                          "loaded, not retrained) to evaluate it again")


cache_app = typer.Typer(no_args_is_help=True, help="Teacher-output cache: build it once, train from it.")
app.add_typer(cache_app, name="cache")


@cache_app.command("build")
def cache_build_cmd(config: Path = typer.Argument(..., help="a YAML config with teacher.cache"),
                    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default: runs/<config "
                                                                          "name>); the cache goes to teacher.cache.dir "
                                                                          "or RUN_DIR/teacher-cache"),
                    rebuild: bool = typer.Option(False, "--rebuild", help="delete a stale cache and build it anew"),
                    progress: bool = typer.Option(True, "--progress/--no-progress"),
                    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help=TRUST_HELP)) -> None:
    """Store the teacher outputs the loss terms read (resumable: run it again after a kill and it continues)."""
    from kdistill.config import load_config
    from kdistill.llm.config import is_lm_config
    from kdistill.schemes.offline import build_teacher_cache

    if is_lm_config(config):  # task: causal_lm: the teacher's top-k cache over the corpus's training blocks
        from kdistill.llm.run import build_lm_cache_from_config, load_lm_config

        cached = build_lm_cache_from_config(load_lm_config(config), out or Path("runs") / config.stem,
                                            rebuild=rebuild, progress=progress)
        print(f"teacher cache: {cached.directory} (key {cached.key})")
        return
    cfg = load_config(config)
    cached = build_teacher_cache(cfg, out or Path("runs") / config.stem, rebuild=rebuild, progress=progress,
                                 trust_checkpoint=trust_checkpoint)
    if cached is not None:
        print(f"teacher cache: {cached.directory} (key {cached.key})")


def main(argv: Optional[list[str]] = None) -> int:
    """The `kdistill` command: exit 0, 2 with one `kdistill: error:` line for every mistake of input or
    environment, or 128 + signal number (130 SIGINT, 143 SIGTERM) after an interruption, with the resume command."""
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main else None
    try:
        app(args=argv, standalone_mode=False)
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
    except Exception as err:  # click usage errors arrive as ClickException in standalone_mode=False
        import click

        if isinstance(err, click.exceptions.ClickException):
            _err(err.format_message())
            return 2
        if isinstance(err, click.exceptions.Abort):
            return 130
        raise
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
