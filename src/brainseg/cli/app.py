"""The ``brainseg`` command: a Typer app whose subcommands live beside it in ``brainseg.cli``.

Only typer, rich and the standard library are imported here: ``brainseg --help`` and
``--version`` must not pay for torch. Every subcommand imports what it needs when it runs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from typing import Any, NoReturn

import typer

from brainseg import __version__
from brainseg import console as con
from brainseg.cli import (
    cache,
    cv,
    demo,
    download,
    evaluate,
    export,
    info,
    predict,
    score,
    split,
    train,
)
from brainseg.cli.base import QUIET_HELP, Group, use_house_style
from brainseg.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_USAGE, BrainsegError, first_line

app = typer.Typer(
    cls=Group,
    name="brainseg",
    help="Brain tumor segmentation in MRI, from data to a CPU-only deployment: download, "
    "split, train, cv, eval, score, predict, export, info, cache, demo. New here? "
    "`brainseg demo` runs the whole pipeline offline in about a minute.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"brainseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        "-V",
        callback=_version,
        is_eager=True,
        help="Print the version and exit.",
        metavar="",  # a flag: no <bool> placeholder in the help
    ),
    debug: bool = typer.Option(
        False, "--debug", help="Show full tracebacks on errors.", metavar=""
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP, metavar=""),
) -> None:
    """Brain tumor segmentation in MRI (UNet with a VGG16 encoder), from data to ONNX."""
    con.configure(quiet=quiet, debug=debug or bool(os.environ.get("BRAINSEG_DEBUG")))


for command in (download, split, train, cv, evaluate, predict, export, info, demo, score, cache):
    command.register(app)
use_house_style(app)  # POSIX usage lines, -q after any subcommand, flags without <bool>


def _usage_error(exc: Exception) -> None:
    """Click's usage errors (unknown option, missing argument, bad value) in the house style:
    one ``error:`` line and a ``hint:``, exit 2. "No arguments" still prints the help."""
    if any(c.__name__ == "NoArgsIsHelpError" for c in type(exc).__mro__):
        exc.show()  # type: ignore[attr-defined]
        sys.exit(EXIT_USAGE)
    text = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    message = first_line(Exception(text)) if text.strip() else type(exc).__name__
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "brainseg"
    con.error(message, f"`{where} --help` lists the arguments and options")
    sys.exit(getattr(exc, "exit_code", EXIT_USAGE) or EXIT_USAGE)


def _sigterm_as_ctrl_c(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turn errors into one line and a documented exit code.

    SIGTERM (a scheduler's time limit) is Ctrl-C, so each command stops the way it does on
    Ctrl-C (train saves its position, predict writes its summary) and exits 130.
    """
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
    try:
        _main(argv)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _fail(message: str, hint: str | None, code: int) -> NoReturn:
    """The error line (the traceback first with --debug) and the exit code."""
    if con.state.debug:
        traceback.print_exc()
    con.error(message, hint)
    sys.exit(code)


def _main(argv: list[str] | None) -> None:
    try:
        rv = app(args=argv, prog_name="brainseg", standalone_mode=False)
    except BrainsegError as exc:
        _fail(exc.message, exc.hint, exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        con.error("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        if any(c.__name__ == "UsageError" for c in type(exc).__mro__):
            _usage_error(exc)
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # other click errors
            exc.show()
            sys.exit(exc.exit_code)
        from brainseg.optional import missing_package_error

        missing = missing_package_error(exc)  # an optional package this venv lacks: exit 2
        if missing is not None:
            _fail(missing.message, missing.hint, missing.exit_code)
        # A bug, not the user's fault: one line unless --debug.
        _fail(
            f"internal error: {type(exc).__name__}: {first_line(exc)}",
            "run again with --debug for the traceback and report it",
            EXIT_RUNTIME,
        )
    if isinstance(rv, int) and rv:
        sys.exit(rv)
