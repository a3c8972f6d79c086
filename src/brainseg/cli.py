"""The ``brainseg`` command: a Typer app whose subcommands live in ``brainseg.commands``.

Only typer, rich and the standard library are imported here: ``brainseg --help`` and
``--version`` must not pay for torch. Every subcommand imports what it needs when it runs.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

from brainseg import __version__
from brainseg import console as con
from brainseg.commands import (
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
from brainseg.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, BrainsegError

app = typer.Typer(
    name="brainseg",
    help="Brain tumor segmentation in MRI: download, split, train, eval, predict, export. "
    "New here? `brainseg demo` runs the whole pipeline offline in about a minute.",
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
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress bars or status lines (errors still shown)."
    ),
) -> None:
    """Brain tumor segmentation in MRI (UNet with a VGG16 encoder), from data to ONNX."""
    con.configure(quiet=quiet, debug=debug or bool(os.environ.get("BRAINSEG_DEBUG")))


download.register(app)
split.register(app)
train.register(app)
cv.register(app)
evaluate.register(app)
predict.register(app)
export.register(app)
info.register(app)
demo.register(app)
score.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turn errors into one line and a documented exit code."""
    try:
        rv = app(args=argv, prog_name="brainseg", standalone_mode=False)
    except BrainsegError as exc:
        if con.state.debug:
            traceback.print_exc()
        con.error(exc.message, exc.hint)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        con.error("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # click usage errors: exit 2
            exc.show()
            sys.exit(exc.exit_code)
        # A bug, not the user's fault: one line unless --debug.
        if con.state.debug:
            traceback.print_exc()
        con.error(
            f"internal error: {type(exc).__name__}: {exc}",
            "run again with --debug for the traceback and report it",
        )
        sys.exit(EXIT_RUNTIME)
    if isinstance(rv, int) and rv:
        sys.exit(rv)
