"""`brainseg export`: a checkpoint or a cv ensemble to ONNX (fp32, fp16 or int8), verified."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from brainseg import console as con
from brainseg.cli.options import json_option, options_from
from brainseg.errors import BrainsegError

if TYPE_CHECKING:
    from brainseg.export import ExportReport

_HELP = (
    "Export CHECKPOINT (.safetensors) to an ONNX file for onnxruntime (CPU or GPU, no torch); "
    "an ensemble.json from `brainseg cv` becomes ONE file that averages its folds' "
    "probabilities (fp32 or --fp16).\n\n"
    "Dynamic batch, height and width; the image size, threshold, post-processing, "
    "normalisation, architecture and training metrics are stored in the file's metadata. "
    "The result is checked with onnx.checker and compared with PyTorch on slices of "
    "--verify-data / --calib (generated phantoms without data): a table of the max logit "
    "difference and the Dice agreement of the masks.\n\n"
    "Example: brainseg export runs/train/exp/best.safetensors -o model.onnx --int8 "
    "--calib data/kaggle_3m --split splits.yaml"
)


def register(app: typer.Typer) -> None:
    """Add the subcommand to the app."""

    @app.command("export", help=_HELP, no_args_is_help=True)
    def _cmd(
        ctx: typer.Context,
        checkpoint: Path = typer.Argument(
            ...,
            show_default=False,
            help="A .safetensors checkpoint written by brainseg (also "
            "hf://OWNER/NAME\\[@REVISION]\\[/FILE] on the Hugging Face Hub), or an ensemble.json "
            "written by `brainseg cv` (runs/cv/expN/ensemble.json).",
        ),
        output: Path | None = typer.Option(
            None,
            "--output",
            "-o",
            show_default=False,
            help="The .onnx file to write (required unless --hub-folder is given).",
        ),
        opset: int = typer.Option(17, "--opset", help="ONNX opset version (13 or higher)."),
        fp16: bool = typer.Option(
            False,
            "--fp16",
            help="fp16 weights and compute (input and output stay float32): half the file; "
            "faster on GPUs, not on CPUs.",
        ),
        int8: bool = typer.Option(
            False,
            "--int8",
            help="Static int8 quantisation (QDQ, per-channel weights) calibrated on --calib; "
            "2-3x faster on CPU. Reports the per-patient Dice cost.",
        ),
        calib: Path | None = typer.Option(
            None,
            "--calib",
            show_default=False,
            help="Calibration data for --int8: a kaggle_3m dataset folder.",
        ),
        split: Path | None = typer.Option(
            None,
            "--split",
            show_default=False,
            help="Split YAML: calibrate on its train patients, compare Dice on its val "
            "patients (default: every fifth patient is held out for the comparison).",
        ),
        calib_slices: int = typer.Option(
            64, "--calib-slices", min=1, help="Number of calibration slices for --int8."
        ),
        verify_data: Path | None = typer.Option(
            None,
            "--verify-data",
            show_default=False,
            help="A kaggle_3m folder whose slices are used for the check against PyTorch "
            "(default: --calib, else generated phantoms).",
        ),
        force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
        strict: bool = typer.Option(
            False,
            "--strict",
            help="Fail (exit 1, nothing written) when the verification finds a problem: masks "
            "agreeing with PyTorch's below the floor (Dice 0.9), or int8 moving the "
            "per-patient Dice by more than 0.01. For CI.",
        ),
        card: Path | None = typer.Option(
            None,
            "--card",
            help="Also write the model card (brainseg info) as Markdown to this file.",
        ),
        hub_folder: Path | None = typer.Option(
            None,
            "--hub-folder",
            show_default=False,
            help="Write a folder for `huggingface-cli upload` instead of -o: model.onnx, "
            "model.safetensors, README.md (the model card with the Hub's metadata), "
            "config.json.",
        ),
        json_out: bool = json_option("Print the report as JSON on stdout."),
    ) -> None:
        from brainseg.export import ExportCheckFailed, ExportOptions, export_onnx
        from brainseg.export.run import check_export_args

        if output is None:
            if hub_folder is None:
                raise BrainsegError(
                    "missing option '--output' (the .onnx file to write) or --hub-folder",
                    hint="e.g. -o model.onnx, or --hub-folder DIR for a Hugging Face Hub folder",
                )
            output = hub_folder / "model.onnx"
        opts = options_from(ExportOptions, {**ctx.params, "output": output})
        check_export_args(opts)
        try:
            report = export_onnx(opts)
        except ExportCheckFailed as exc:
            _render(exc.report, json_out)
            raise
        _render(report, json_out)
        con.info(
            f"wrote {report.path} ({report.variant}, opset {report.opset}, "
            f"{report.size_mb:.1f} MB, {report.exporter} exporter, "
            f"{report.seconds:.0f} s)"
        )


def _render(report: ExportReport, json_out: bool) -> None:
    """The report: JSON on stdout with --json; the tables and notes (stderr with --json)."""
    from rich.text import Text

    from brainseg.export import report as tables

    if json_out:
        con.emit_json(report.as_dict())
    con.result(con.table(tables.report_title(report), *tables.report_rows(report)))
    q = tables.int8_rows(report)
    if q is not None:
        con.result(con.table(tables.int8_title(report), *q))
    own = tables.precision_rows(report)
    if own is not None:
        con.result(con.table(tables.precision_title(report), *own))
    for note in report.notes:
        con.result(Text(f"note: {note}"))
