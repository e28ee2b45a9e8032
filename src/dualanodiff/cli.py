"""The `dualanodiff` command line: one subcommand per stage, thin wrappers over the library.

Bad input raises `UserError`; `main` prints it as one line and exits with code 2 (`--debug` shows the
traceback instead).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from dualanodiff.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Few-shot anomaly image-mask pair generation (DualAnoDiff).",
)
console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


# --- data: synth, info ---------------------------------------------------------------------------

# --- model: train ---------------------------------------------------------------------------------

# --- generation: generate -------------------------------------------------------------------------

# --- baselines and evaluation: baseline, evaluate -------------------------------------------------

# --- base model and demo: pretrain-base, demo ------------------------------------------------------

# --- whole-dataset runs: run-all ------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: run the app, turning `UserError` into one line on stderr and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        app(args=args, standalone_mode=False)
    except UserError as exc:
        if debug:
            raise
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; finished work is kept and a re-run resumes from it")
        sys.exit(130)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise


def resolve_path(path: Path, what: str) -> Path:
    """An existing path or a `UserError` naming the option."""
    if not path.exists():
        raise UserError(f"{path}: {what} does not exist; check the path")
    return path
