"""`brainseg demo` (not implemented yet)."""

from __future__ import annotations

import typer

from brainseg.errors import BrainsegRuntimeError


def register(app: typer.Typer) -> None:
    """Add the subcommand to the app."""

    @app.command("demo", help="(not implemented yet)")
    def _cmd() -> None:
        raise BrainsegRuntimeError("brainseg demo is not implemented yet")
