"""`brainseg export` (not implemented yet)."""

from __future__ import annotations

import typer

from brainseg.errors import BrainsegRuntimeError


def register(app: typer.Typer) -> None:
    """Add the subcommand to the app."""

    @app.command("export", help="(not implemented yet)")
    def _cmd() -> None:
        raise BrainsegRuntimeError("brainseg export is not implemented yet")
