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


def subset_option() -> Any:
    """``--subset`` as eval and score declare it (the patients of a split to score)."""
    import typer

    return typer.Option(
        None,
        "--subset",
        help="Which patients of the split: val, test, train or all \\[default: val].",
    )


def fold_option() -> Any:
    """``--fold`` as eval and score declare it (a cross-validation fold of the split)."""
    import typer

    return typer.Option(None, "--fold", help="Cross-validation fold K of the split (0-based).")


def seg_series_option() -> Any:
    """``--seg-series`` as predict and eval declare it (the series a DICOM SEG refers to)."""
    import typer

    return typer.Option(
        "flair",
        "--seg-series",
        metavar="pre|flair|post",
        help="Volumes, --format dicom-seg: the contrast whose DICOM series the SEG refers to "
        "(its instances, frame of reference and geometry).",
    )
