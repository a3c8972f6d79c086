"""The only place that writes to the terminal below the CLI.

Messages, warnings and progress go to stderr; results (tables, JSON) go to stdout, so
``--json`` output can be piped. A rich progress bar is drawn when stdout is a terminal,
plain lines otherwise (logs, CI, SLURM), nothing with ``--quiet``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from brainseg.fsutil import json_safe


@dataclass
class _State:
    quiet: bool = False
    json: bool = False
    debug: bool = False


state = _State()
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def configure(
    *, quiet: bool | None = None, json_mode: bool | None = None, debug: bool | None = None
) -> None:
    """Set the process-wide output mode (called by the CLI callback and subcommands)."""
    if quiet is not None:
        state.quiet = quiet
    if json_mode is not None:
        state.json = json_mode
    if debug is not None:
        state.debug = debug


def interactive() -> bool:
    """True when a live progress bar makes sense (stdout is a terminal, not quiet)."""
    return not state.quiet and sys.stdout.isatty()


def info(message: str) -> None:
    """A status line on stderr (silenced by --quiet)."""
    if not state.quiet:
        # Messages hold user paths and values: "[x]" in them is text, not rich markup
        # (an unescaped "[/x]" crashed the error handler with a traceback).
        err.print(escape(message))


def warn(message: str) -> None:
    """A warning on stderr; shown even with --quiet because it may change results."""
    err.print(f"[yellow]warning:[/yellow] {escape(message)}")


def error(message: str, hint: str | None = None) -> None:
    """One red line (plus the hint) on stderr."""
    err.print(f"[bold red]error:[/bold red] {escape(message)}", markup=True)
    if hint:
        err.print(f"[dim]hint:[/dim] {escape(hint)}")


def result(renderable: Any) -> None:
    """A human-readable result (usually a table): stdout, or stderr in --json mode; shown even
    with --quiet (quiet hides progress and status lines, never the result)."""
    (err if state.json else out).print(renderable)


def emit_text(text: str) -> None:
    """A whole document (e.g. YAML for ``-o -``) on stdout as is, nothing else there."""
    sys.stdout.write(text)
    sys.stdout.flush()


def emit_json(obj: Any) -> None:
    """One JSON document (or JSON line) on stdout, nothing else."""
    sys.stdout.write(json.dumps(json_safe(obj)) + "\n")
    sys.stdout.flush()


#: Cells up to this long (numbers, CIs, sizes, dates) are never wrapped or cut; longer ones
#: (labels, paths, reasons) fold onto more lines, so a narrow terminal (CI logs: 80 columns)
#: shows every character of every cell, never "…".
SHORT_CELL = 16


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> Table:
    """A rich table with right-aligned numbers, formatted to 4 significant digits."""
    t = Table(title=escape(title) if title else title, title_justify="left")
    cells = [[escape(fmt(v)) for v in r] for r in rows]  # cells hold paths: text, not markup
    for i, c in enumerate(columns):
        longest = max((len(r[i]) for r in cells if i < len(r)), default=0)
        short = i > 0 and longest <= SHORT_CELL
        t.add_column(
            escape(c),
            justify="right" if short else "left",
            no_wrap=short,
            overflow="ellipsis" if short else "fold",
            min_width=min(longest, SHORT_CELL) if short else None,
        )
    for r in cells:
        t.add_row(*r)
    return t


def fmt(v: Any) -> str:
    """Format a cell: floats to 4 decimals, NaN and None (no value: an error row) as '-'."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if v != v else f"{v:.4f}"
    return str(v)


class Progress:
    """Advance-only progress: a rich bar on a terminal, a plain line per chunk otherwise."""

    def __init__(
        self, total: int | None, description: str, unit: str = "it", plain_every: int | None = None
    ) -> None:
        self.total = total
        self.description = description
        self.unit = unit
        self.done = 0
        self.fields: dict[str, Any] = {}
        self._start = time.perf_counter()
        self._bar: Any = None
        self._task: Any = None
        self._plain_every = max(1, (total or 100) // 10) if plain_every is None else plain_every
        self._next_plain = self._plain_every
        self._last_plain = 0

    def __enter__(self) -> Progress:
        if interactive():
            from rich import progress as rp

            self._bar = rp.Progress(
                rp.TextColumn("[bold]{task.description}"),
                rp.BarColumn(),
                rp.MofNCompleteColumn(),
                rp.TextColumn("{task.fields[rate]}"),
                rp.TimeElapsedColumn(),
                rp.TextColumn("eta"),
                rp.TimeRemainingColumn(),
                rp.TextColumn("{task.fields[extra]}"),
                console=err,
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, rate="", extra="")
        return self

    def rate(self) -> float:
        dt = time.perf_counter() - self._start
        return self.done / dt if dt > 0 else 0.0

    def _extra(self) -> str:
        return "  ".join(f"{k} {fmt(v)}" for k, v in self.fields.items())

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.update(
                self._task, advance=n, rate=f"{self.rate():.1f} {self.unit}/s", extra=self._extra()
            )
        elif not state.quiet and self.done >= self._next_plain:
            self._next_plain = self.done + self._plain_every
            self._plain_line()

    def _plain_line(self) -> None:
        self._last_plain = self.done
        r = self.rate()
        tot = f"/{self.total}" if self.total else ""
        eta = f" eta {max(0.0, (self.total - self.done) / r):.0f}s" if self.total and r > 0 else ""
        err.print(
            f"{self.description}: {self.done}{tot} {self.unit} ({r:.1f} {self.unit}/s"
            f"{eta}) {self._extra()}".rstrip()
        )

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
        elif not state.quiet and self.done and self.done != self._last_plain:
            self._plain_line()


#: ``with progress(total, description, unit) as bar:`` reads better at the call sites.
progress = Progress
