"""The options several subcommands share, declared once, and the helpers that read them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import typer

from brainseg import console as con
from brainseg.errors import BrainsegError

T = TypeVar("T")


def options_from(cls: type[T], params: Mapping[str, Any], **extra: Any) -> T:
    """The dataclass ``cls`` built from the parameters named like its fields, ``extra`` taking
    precedence: each command option maps to the library option of the same name, so none is
    copied by hand."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{**{k: v for k, v in params.items() if k in names}, **extra})


def given_options(ctx: Any) -> dict[str, Any]:
    """The options typed on the command line (not defaults), by parameter name: a path that
    does not use an option refuses it instead of ignoring it."""
    return {
        name: value
        for name, value in ctx.params.items()
        # by name: typer >= 0.22 vendors click, so its ParameterSource is not importable
        if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"
    }


def refuse_unused(ctx: Any, names: tuple[str, ...], why: str, hint: str) -> None:
    """BrainsegError (exit 2) naming the options ``names`` (parameter names) given on the
    command line: this run does not use them, and an ignored option would be a surprise."""
    given = given_options(ctx)
    params = {p.name: p for p in ctx.command.params}
    flags = ["/".join([*params[n].opts, *params[n].secondary_opts]) for n in names if n in given]
    if flags:
        raise BrainsegError(f"{', '.join(flags)}: {why}", hint=hint)


def _json_mode(value: bool) -> bool:
    if value:
        con.configure(json_mode=True)
    return value


def json_option(help: str) -> Any:
    """``--json``: stdout holds only JSON, so from parsing on the tables go to stderr."""
    return typer.Option(False, "--json", help=help, callback=_json_mode)


# The options that several commands (eval and score; predict and eval) take, among them the
# inference settings: one declaration each, so the commands cannot drift apart.
SUBSET = typer.Option(
    None,
    "--subset",
    help="Which patients of the split: val, test, train or all \\[default: val].",
)

FOLD = typer.Option(None, "--fold", help="Cross-validation fold K of the split (0-based).")

SEG_SERIES = typer.Option(
    "flair",
    "--seg-series",
    metavar="pre|flair|post",
    help="Volumes, --format dicom-seg: the contrast whose DICOM series the SEG refers to "
    "(its instances, frame of reference and geometry).",
)

RUNTIME = typer.Option(
    None,
    "--runtime",
    show_default=False,
    metavar="auto|onnxruntime|openvino|torch",
    help="What runs the model: auto picks for this CPU and model file (docs/export.md) "
    "\\[default: $BRAINSEG_RUNTIME, else auto].",
)

PRECISION = typer.Option(
    None,
    "--precision",
    show_default=False,
    metavar="auto|fp32|bf16",
    help="OpenVINO's inference precision for an fp32 .onnx file: bf16 needs a CPU "
    "with native bf16 (avx512_bf16 / amx_bf16); fp32 is exact \\[default: auto].",
)

THREADS = typer.Option(
    0, "--threads", min=0, help="Inference threads (0: the runtime's default, every core)."
)

THRESHOLD = typer.Option(
    None,
    "--threshold",
    min=0.0,
    max=1.0,
    show_default=False,
    help="Probability threshold \\[default: the model's stored threshold, else 0.5].",
)

MIN_SIZE = typer.Option(
    None,
    "--min-size",
    min=0,
    show_default=False,
    help="Remove tumor components smaller than this many pixels (at each image's own "
    "size; per slice for volumes) \\[default: the model's stored value].",
)

LARGEST = typer.Option(
    None,
    "--largest/--no-largest",
    show_default=False,
    help="Keep only the largest 3D tumor component of each patient or volume case (not "
    "for independent image files) \\[default: the model's stored value].",
)

MIN_VOLUME = typer.Option(
    None,
    "--min-volume",
    show_default=False,
    metavar="N|Nmm3",
    help="Volumes only: remove 3D components under N voxels ('200') or a volume ('150mm3').",
)

TTA = typer.Option(
    False,
    "--tta",
    help="Test-time augmentation: mean probability over the image and its flips.",
)

DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N (mps for checkpoints).")

BATCH_SIZE = typer.Option(8, "--batch-size", "-b", min=1, help="Slices per inference batch.")
