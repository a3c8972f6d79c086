"""`brainseg export`: a checkpoint to ONNX (fp32, fp16 or static int8), verified against torch.

Only typer, the standard library and light brainseg modules at import time: torch, onnx and
onnxruntime are imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from brainseg import console as con

_HELP = (
    "Export CHECKPOINT (.safetensors) to an ONNX file for onnxruntime (CPU or GPU, no torch).\n\n"
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
        checkpoint: Path = typer.Argument(
            ..., show_default=False, help="A .safetensors checkpoint written by brainseg."
        ),
        output: Path = typer.Option(
            ..., "--output", "-o", show_default=False, help="The .onnx file to write."
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
        json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    ) -> None:
        if json_out:
            con.configure(json_mode=True)
        from brainseg.export import check_export_args, export_onnx, int8_rows, report_rows

        check_export_args(output, fp16=fp16, int8=int8, calib=calib, opset=opset, force=force)
        report = export_onnx(
            checkpoint,
            output,
            opset=opset,
            fp16=fp16,
            int8=int8,
            calib=calib,
            split=split,
            verify_data=verify_data,
            calib_slices=calib_slices,
            force=force,
        )
        if json_out:
            con.emit_json(report.as_dict())
        cols, rows = report_rows(report)
        con.result(con.table(f"ONNX vs PyTorch ({report.data_source})", cols, rows))
        q = int8_rows(report)
        if q is not None:
            con.result(
                con.table("int8 vs fp32: mean per-patient Dice on the validation patients", *q)
            )
        con.info(
            f"wrote {report.path} ({report.variant}, opset {report.opset}, "
            f"{report.size_mb:.1f} MB, {report.exporter} exporter, "
            f"{report.seconds:.0f} s)"
        )
