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


def runtime_option() -> Any:
    """``--runtime`` as predict and eval declare it (what runs the model)."""
    import typer

    return typer.Option(
        None,
        "--runtime",
        show_default=False,
        metavar="auto|onnxruntime|openvino|torch",
        help="What runs the model: auto picks for this CPU and model file (docs/export.md) "
        "\\[default: $BRAINSEG_RUNTIME, else auto].",
    )


def precision_option() -> Any:
    """``--precision`` as predict and eval declare it (OpenVINO's inference precision)."""
    import typer

    return typer.Option(
        None,
        "--precision",
        show_default=False,
        metavar="auto|fp32|bf16",
        help="OpenVINO's inference precision for an fp32 .onnx file: bf16 needs a CPU "
        "with native bf16 (avx512_bf16 / amx_bf16); fp32 is exact \\[default: auto].",
    )


def threads_option() -> Any:
    """``--threads`` as predict and eval declare it."""
    import typer

    return typer.Option(
        0, "--threads", min=0, help="Inference threads (0: the runtime's default, every core)."
    )
