"""One module per subcommand; each has ``register(app)`` and imports heavy things lazily."""

from __future__ import annotations

from typing import Any


def given_options(ctx: Any) -> dict[str, Any]:
    """The options typed on the command line (not defaults), by parameter name: a path that
    does not use an option refuses it instead of ignoring it."""
    return {
        name: value
        for name, value in ctx.params.items()
        # by name: typer >= 0.22 vendors click, so its ParameterSource is not importable
        if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"
    }
