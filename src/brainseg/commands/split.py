"""`brainseg split` (not implemented yet)."""

from __future__ import annotations

import typer

from brainseg.errors import BrainsegRuntimeError


def register(app: typer.Typer) -> None:
    """Add the subcommand to the app."""

    @app.command("split", help="(not implemented yet)")
    def _cmd() -> None:
        raise BrainsegRuntimeError("brainseg split is not implemented yet")
