"""The ``brainseg`` command: a Typer app whose subcommands live in ``brainseg.commands``.

Only typer, rich and the standard library are imported here: ``brainseg --help`` and
``--version`` must not pay for torch. Every subcommand imports what it needs when it runs.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

import typer

from brainseg import __version__
from brainseg import console as con
from brainseg.commands import (
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
from brainseg.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_USAGE, BrainsegError, first_line


def _plain_usage_arguments() -> None:
    """Usage lines in the POSIX / docopt style of our docs (``MODEL INPUT...``, optional ones
    in brackets): Typer >= 0.2x writes required arguments in braces (``{MODEL} {INPUT}...``,
    ``{MODEL... DATA}...``), which reads like a set of choices. Only that private method is
    replaced, and only when this Typer has it."""
    from typer import core

    cls: Any = getattr(core, "TyperArgument", None)
    if cls is None or not hasattr(cls, "_usage_display_name"):
        return

    def usage_name(self: Any) -> str:
        name = str(self.metavar or self.name.upper())
        if self.nargs != 1 and "..." not in name:
            name += "..."
        return name if self.required else f"[{name}]"

    cls._usage_display_name = usage_name


_plain_usage_arguments()

app = typer.Typer(
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


QUIET_HELP = (
    "No progress bars or status lines; results (tables, JSON), warnings and errors are "
    "still shown. Also accepted after the subcommand."
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
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
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
cache.register(app)


def _with_quiet(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a ``--quiet / -q`` option of its own (the global one, after the command)."""

    @functools.wraps(fn)
    def command(*args: Any, quiet: bool = False, **kwargs: Any) -> Any:
        if quiet:
            con.configure(quiet=True)
        return fn(*args, **kwargs)

    sig = inspect.signature(fn, eval_str=True)
    extra = inspect.Parameter(
        "quiet",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
        annotation=bool,
    )
    command.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[*sig.parameters.values(), extra]
    )
    command.__annotations__ = {**fn.__annotations__, "quiet": bool}
    return command


def _quiet_everywhere(group: typer.Typer) -> None:
    """Give every subcommand ``-q``, so ``brainseg CMD -q`` works like ``brainseg -q CMD``."""
    for command_info in group.registered_commands:
        callback = command_info.callback
        if callback is not None and "quiet" not in inspect.signature(callback).parameters:
            command_info.callback = _with_quiet(callback)
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _quiet_everywhere(sub.typer_instance)


def _interrupt_line(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` printing ``error: interrupted`` on Ctrl-C: Typer turns a KeyboardInterrupt
    raised inside a command into a silent exit 130 before :func:`main` could report it."""

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            con.error("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return command


def _report_interrupts(group: typer.Typer) -> None:
    for command_info in group.registered_commands:
        if command_info.callback is not None:
            command_info.callback = _interrupt_line(command_info.callback)
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _report_interrupts(sub.typer_instance)


def _flags_without_placeholder() -> None:
    """Help shows ``--force``, not ``--force <bool>``: a flag takes no value (``--force true``
    is refused), so the type column stays empty for every flag of every command."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag and not self.count else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_quiet_everywhere(app)
_report_interrupts(app)
_flags_without_placeholder()


def _usage_error(exc: Exception) -> None:
    """Click's usage errors (unknown option, missing argument, bad value) in the house style:
    one ``error:`` line and a ``hint:``, exit 2. "No arguments" still prints the help."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "NoArgsIsHelpError" in names:
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

    SIGTERM (``kill``, a scheduler's time limit) is Ctrl-C for every command: a
    KeyboardInterrupt in the main thread, so each command stops the way it does on Ctrl-C
    (train saves its position, predict writes its summary, temporaries are removed), prints
    ``error: interrupted`` and exits 130.
    """
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
    try:
        _main(argv)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _main(argv: list[str] | None) -> None:
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
        if any(c.__name__ == "UsageError" for c in type(exc).__mro__):
            _usage_error(exc)
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # other click errors
            exc.show()
            sys.exit(exc.exit_code)
        from brainseg.optional import missing_package_error

        missing = missing_package_error(exc)  # an optional package this venv lacks: exit 2
        if missing is not None:
            if con.state.debug:
                traceback.print_exc()
            con.error(missing.message, missing.hint)
            sys.exit(missing.exit_code)
        # A bug, not the user's fault: one line unless --debug.
        if con.state.debug:
            traceback.print_exc()
        con.error(
            f"internal error: {type(exc).__name__}: {first_line(exc)}",
            "run again with --debug for the traceback and report it",
        )
        sys.exit(EXIT_RUNTIME)
    if isinstance(rv, int) and rv:
        sys.exit(rv)
