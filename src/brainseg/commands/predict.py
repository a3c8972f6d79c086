"""`brainseg predict` (not implemented yet)."""

from __future__ import annotations

import typer

from brainseg.errors import BrainsegRuntimeError


def register(app: typer.Typer) -> None:
    """Add the subcommand to the app."""

    @app.command("predict", help="(not implemented yet)")
    def _cmd() -> None:
        raise BrainsegRuntimeError("brainseg predict is not implemented yet")
