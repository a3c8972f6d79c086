"""The house style every subcommand shares, as one Click command class (Typer's public ``cls``).

* POSIX usage lines (``brainseg predict [OPTIONS] MODEL INPUT...``; Typer writes required
  arguments in braces, which reads like a set of choices);
* ``-q`` / ``--quiet`` after the subcommand too;
* flags (``--help`` too) show no ``<bool>`` placeholder (groups get that from ``cls=Group``);
* Ctrl-C inside a command prints ``error: interrupted`` and exits 130, not Click's ``Aborted!``.

Only public APIs of Typer and its Click classes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from brainseg import console as con
from brainseg.errors import EXIT_INTERRUPTED

QUIET_HELP = (
    "No progress bars or status lines; results (tables, JSON), warnings and errors are "
    "still shown. Also accepted after the subcommand."
)


def _set_quiet(ctx: Any, param: Any, value: bool) -> None:
    if value:
        con.configure(quiet=True)


@functools.cache
def _quiet_option() -> Any:
    """``--quiet / -q`` as Typer builds it (its help renders like every other option), handled
    while parsing: the command body never sees it."""
    probe = typer.Typer()

    @probe.command()
    def _probe(quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP)) -> None:
        """Never run: only its option is used."""

    param = typer.main.get_command(probe).params[0]
    param.expose_value = False
    param.callback = _set_quiet
    return param


def _no_placeholder(option: Any) -> Any:
    if option is not None:
        option.metavar = ""  # the help's type column stays empty
    return option


class Group(TyperGroup):
    """``brainseg`` and its command groups (``download``, ``cache``): ``--help`` is a flag."""

    def get_help_option(self, ctx: Any) -> Any:
        return _no_placeholder(super().get_help_option(ctx))


class Command(TyperCommand):
    """A brainseg subcommand (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not any(p.name == "quiet" for p in self.params):
            self.params.append(_quiet_option())
        for p in self.params:
            if isinstance(p, TyperOption) and p.is_flag and not p.count:
                _no_placeholder(p)

    def get_help_option(self, ctx: Any) -> Any:
        return _no_placeholder(super().get_help_option(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = str(param.metavar or param.name.upper())
                if param.nargs != 1 and "..." not in name:
                    name += "..."
                pieces.append(name if param.required else f"[{name}]")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            con.error("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None


def use_house_style(group: typer.Typer) -> None:
    """Make every subcommand of ``group`` (and of its sub-groups) a :class:`Command`."""
    for command_info in group.registered_commands:
        if command_info.cls in (None, TyperCommand):  # Typer's default
            command_info.cls = Command
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            use_house_style(sub.typer_instance)


#: Exit code when stdout is closed under --json (128 + SIGPIPE, as a shell reports it).
EXIT_BROKEN_PIPE = 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null so Python's exit-time flush does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def json_emitter(to_row: Callable[[Any], Any], unit: str) -> Callable[[Any], None]:
    """A callback printing one --json line per result; a closed stdout ends the run (141)."""
    emitted = 0

    def emit(res: Any) -> None:
        nonlocal emitted
        try:
            con.emit_json(to_row(res))
        except BrokenPipeError:
            # `... --json | head`: the reader has gone; stop like other Unix tools.
            _silence_stdout()
            con.info(f"stdout closed: stopped after {emitted + 1} {unit}(s)")
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        emitted += 1

    return emit
