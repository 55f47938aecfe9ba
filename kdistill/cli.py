"""Command line: `kdistill demo | run | eval`. Parses, calls the API, maps every KDError to one line + exit 2."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Optional

import typer

from kdistill.errors import KDError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kdistill: knowledge distillation with a measured account of what compression cost.")


def _err(msg: str) -> None:
    print(f"kdistill: error: {msg}", file=sys.stderr, flush=True)


def _run_config(cfg, out: Path, progress: bool) -> dict:
    from kdistill.report import comparison_table
    from kdistill.schemes.offline import run

    summary = run(cfg, out, progress=progress)
    print(comparison_table(summary))
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
            progress: bool = typer.Option(True, "--progress/--no-progress")) -> None:
    """Run the job of a config file; re-running on an existing run directory resumes it."""
    from kdistill.config import load_config

    if config.is_dir():
        out = out or config
        config = config / "config.yaml"
    cfg = load_config(config)
    _run_config(cfg, out or Path("runs") / config.stem, progress)


@app.command("eval")
def eval_cmd(run_dir: Path = typer.Argument(..., help="a finished run directory")) -> None:
    """Re-evaluate a run directory (quality and cost) and print the comparison table."""
    from kdistill.report import comparison_table
    from kdistill.schemes.offline import evaluate_run_dir

    if not (run_dir / "config.yaml").is_file():
        raise KDError(f"{run_dir} is not a run directory (no config.yaml)", fix="give the --out of a finished run")
    print(comparison_table(evaluate_run_dir(run_dir)))


def main(argv: Optional[list[str]] = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except KDError as err:
        _err(str(err))
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
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
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
