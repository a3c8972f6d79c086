"""Volume cases (NIfTI / DICOM) for ``brainseg predict``: :func:`run_volume_predict`.

``brainseg predict`` dispatches here when ``--channels`` is given or its inputs are NIfTI
files or folders of NIfTI files / DICOM series (:func:`wants_volumes`). Until that dispatch
is wired, the same options run as ``brainseg predict-volumes``. Only typer and the standard
library at import time: nibabel / SimpleITK / numpy load when a volume run starts.
"""

from __future__ import annotations

from pathlib import Path

import typer

from brainseg import console as con

_HELP = (
    "Predict a tumour mask for every volume case in INPUT with MODEL (.safetensors or .onnx).\n\n"
    "A case is a 4D NIfTI file (pre, FLAIR, post as the 4th dimension), or a folder whose "
    "files (NIfTI) or sub-folders (DICOM series) match --channels. Folders of cases are "
    "searched. Writes OUT/<case>_mask.nii.gz (uint8 0/1, the input's affine and header), "
    "OUT/<case>.json and OUT/summary.csv (tumour voxels, volume in mL, slices).\n\n"
    "Exit codes: 0 all cases done, 1 some cases failed, 2 bad input (every case bad).\n\n"
    "Example: brainseg predict-volumes model.onnx cases/ -o masks/ "
    "--channels 'pre=*_t1.nii.gz,flair=*_flair.nii.gz,post=*_t1ce.nii.gz'"
)


def wants_volumes(inputs: list[str], channels: str | None) -> bool:
    """True when ``brainseg predict`` should take the volume path for these inputs."""
    if channels is not None:
        return True
    from brainseg.volumes import looks_like_volume_input

    return any(item != "-" and looks_like_volume_input(item) for item in inputs)


def run_volume_predict(
    *,
    model: Path,
    inputs: list[str],
    output: Path,
    ensemble: list[Path] | None = None,
    channels: str | None = None,
    threshold: float | None = None,
    min_size: int | None = None,
    largest: bool | None = None,
    min_volume: str | None = None,
    probabilities: bool = False,
    json_out: bool = False,
    tta: bool = False,
    batch_size: int = 8,
    device: str = "auto",
    skip_existing: bool = False,
    force: bool = False,
    shard: str | None = None,
) -> int:
    """Parse-free body of the volume path: call the library, render; returns the exit code."""
    from brainseg.volume_predict import VolumeOptions, json_row, predict_volumes

    opts = VolumeOptions(
        models=[model, *(ensemble or [])],
        inputs=list(inputs),
        out_dir=output,
        channels=channels,
        threshold=threshold,
        min_size=min_size,
        largest=largest,
        min_volume=min_volume,
        probabilities=probabilities,
        tta=tta,
        device=device,
        batch_size=batch_size,
        skip_existing=skip_existing,
        force=force,
        shard=shard,
    )

    def on_case(res: object) -> None:
        from brainseg.volume_predict import CaseResult

        assert isinstance(res, CaseResult)
        if json_out:
            con.emit_json(json_row(res))
        if res.status == "error":
            con.error(res.error)
        else:
            con.info(
                f"{res.case}: {res.status}, {res.tumor_voxels} tumour voxels "
                f"({con.fmt(res.tumor_volume_ml)} mL) on {res.tumor_slices}/{res.slices} slices"
            )

    result = predict_volumes(opts, on_case)
    n = len(result.cases)
    if n == 0:
        con.info(f"shard {shard}: no case of the input falls in this shard")
        return 0
    rows = [
        [r.case, r.status, r.tumor_voxels, r.tumor_volume_ml, r.tumor_slices, r.slices]
        for r in result.cases
    ]
    con.result(
        con.table(
            f"predict: {n} case(s)",
            ["case", "status", "tumour voxels", "volume mL", "tumour slices", "slices"],
            rows,
        )
    )
    if result.summary_path is not None:
        con.info(f"summary: {result.summary_path}")
    bad = result.count("error")
    if bad:
        con.error(f"{bad} of {n} case(s) failed; nothing was written for them")
    return result.exit_code


def register(app: typer.Typer) -> None:
    """The temporary ``brainseg predict-volumes`` subcommand (to be folded into predict)."""

    @app.command("predict-volumes", help=_HELP, no_args_is_help=True)
    def _cmd(
        model: Path = typer.Argument(..., show_default=False, help="A .safetensors or .onnx."),
        inputs: list[str] = typer.Argument(
            ..., metavar="INPUT...", show_default=False, help="4D NIfTI files or case folders."
        ),
        output: Path = typer.Option(
            ..., "--output", "-o", show_default=False, help="Output folder (created if missing)."
        ),
        ensemble: list[Path] = typer.Option(
            [], "--ensemble", show_default=False, help="Another model to average with; repeatable."
        ),
        channels: str | None = typer.Option(
            None,
            "--channels",
            show_default=False,
            help="pre=GLOB,flair=GLOB,post=GLOB matched against a case's file / DICOM folder "
            "names \\[default: pre=*_t1.nii*,flair=*_flair.nii*,post=*_t1ce.nii*].",
        ),
        threshold: float | None = typer.Option(
            None,
            "--threshold",
            min=0.0,
            max=1.0,
            show_default=False,
            help="Probability threshold \\[default: the model's].",
        ),
        min_size: int | None = typer.Option(
            None,
            "--min-size",
            min=0,
            show_default=False,
            help="Remove 2D components under this many pixels per slice \\[default: the model's].",
        ),
        largest: bool | None = typer.Option(
            None,
            "--largest/--no-largest",
            show_default=False,
            help="Keep only the largest 3D component \\[default: the model's].",
        ),
        min_volume: str | None = typer.Option(
            None,
            "--min-volume",
            show_default=False,
            help="Remove 3D components smaller than N voxels ('200') or a volume ('150mm3').",
        ),
        probabilities: bool = typer.Option(
            False, "--probabilities", help="Also write <case>_prob.nii.gz (float32 0..1)."
        ),
        json_out: bool = typer.Option(False, "--json", help="One JSON line per case on stdout."),
        tta: bool = typer.Option(False, "--tta", help="Mean over horizontal/vertical flips."),
        batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Slices per batch."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N, mps."),
        skip_existing: bool = typer.Option(
            False, "--skip-existing", help="Keep cases already done (resume a run)."
        ),
        force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
        shard: str | None = typer.Option(
            None,
            "--shard",
            metavar="I/N",
            show_default=False,
            help="Only cases number I, I+N, ... of the sorted case list.",
        ),
    ) -> None:
        if json_out:
            con.configure(json_mode=True)
        code = run_volume_predict(
            model=model,
            inputs=inputs,
            output=output,
            ensemble=ensemble,
            channels=channels,
            threshold=threshold,
            min_size=min_size,
            largest=largest,
            min_volume=min_volume,
            probabilities=probabilities,
            json_out=json_out,
            tta=tta,
            batch_size=batch_size,
            device=device,
            skip_existing=skip_existing,
            force=force,
            shard=shard,
        )
        if code:
            raise typer.Exit(code)
