"""`brainseg eval`: metrics of one model or an ensemble on a dataset or a split's subset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from brainseg import console
from brainseg.cli import options

_HELP = (
    "Evaluate MODEL(s) on DATA: Dice, IoU, precision, recall, specificity, HD95.\n\n"
    "The last path is DATA (a kaggle_3m folder); every path before it is a MODEL (a "
    ".safetensors checkpoint or an .onnx file). Several models are ensembled (mean "
    "probability), e.g. the K models of a cross-validation. Metrics are reported per patient "
    "(the comparable number under a patient-level split), per slice and globally; results go "
    "to runs/eval/exp/.\n\n"
    "Volumes: when DATA holds NIfTI / DICOM cases (or --channels is given), every case is "
    "predicted as `brainseg predict` does (masks in the run's masks/ folder) and scored "
    "against its label volume (<case>_seg.nii.gz or _mask/_gt/_label, beside the case or in "
    "--gt DIR), with HD95 and surface Dice in mm (docs/volumes.md).\n\n"
    "Example: brainseg eval runs/train/exp/best.safetensors data/kaggle_3m --split splits.yaml"
)
#: Options of ``brainseg eval`` that only the slice (kaggle_3m) path uses.
SLICE_ONLY = ("split", "subset", "fold", "skip_bad", "tune", "tune_output", "force")
#: Options that only volume cases use.
VOLUME_ONLY = ("gt", "min_volume", "tolerance", "fmt", "seg_series")


def register(app: typer.Typer) -> None:
    """Add the subcommand to the app."""

    @app.command("eval", help=_HELP, no_args_is_help=True)
    def _cmd(
        ctx: typer.Context,
        paths: list[Path] = typer.Argument(
            ...,
            metavar="MODEL... DATA",
            show_default=False,
            help="Model file(s) (.safetensors / .onnx), then the dataset folder.",
        ),
        split: Path | None = typer.Option(
            None,
            "--split",
            help="Split YAML from `brainseg split`; without it every patient of DATA is evaluated.",
        ),
        subset: str | None = options.SUBSET,
        fold: int | None = options.FOLD,
        tta: bool = options.TTA,
        threshold: float | None = options.THRESHOLD,
        min_size: int | None = options.MIN_SIZE,
        largest: bool | None = options.LARGEST,
        device: str = options.DEVICE,
        batch_size: int = options.BATCH_SIZE,
        runtime: str | None = options.RUNTIME,
        precision: str | None = options.PRECISION,
        threads: int = options.THREADS,
        skip_bad: bool = typer.Option(
            False, "--skip-bad", help="Skip unreadable / mismatched slices with a warning."
        ),
        project: Path = typer.Option(
            Path("runs/eval"), "--project", help="Parent folder of the run folders."
        ),
        name: str = typer.Option("exp", "--name", help="Run folder name (exp, exp2, ...)."),
        exist_ok: bool = typer.Option(
            False, "--exist-ok", help="Reuse project/name instead of numbering a new folder."
        ),
        json_out: bool = options.json_option(
            "Print summary.json on stdout and nothing else there."
        ),
        tune: bool = typer.Option(
            False,
            "--tune",
            help="Search threshold, --min-size and --largest for the best "
            "mean per-patient Dice on these patients; print them and the gain.",
        ),
        tune_output: Path | None = typer.Option(
            None,
            "--tune-output",
            help="Write a copy of the model holding the tuned "
            "settings (implies --tune; one MODEL only).",
        ),
        force: bool = typer.Option(False, "--force", help="Overwrite --tune-output."),
        gt: Path | None = typer.Option(
            None,
            "--gt",
            show_default=False,
            help="Volumes: folder of true label volumes matched by case "
            "\\[default: the _seg/_mask/_gt/_label files beside the cases].",
        ),
        channels: str | None = typer.Option(
            None,
            "--channels",
            help="Volumes: 'pre=GLOB,flair=GLOB,post=GLOB' naming each case's contrasts "
            "(as for predict) \\[default: BraTS names *_t1, *_flair, *_t1ce].",
        ),
        min_volume: str | None = options.MIN_VOLUME,
        tolerance: float = typer.Option(
            2.0, "--tolerance", min=0.0, help="Volumes: surface Dice tolerance in mm."
        ),
        fmt: str = typer.Option(
            "nifti",
            "--format",
            help="Volumes: the masks in the run's masks/ folder: nifti, or dicom-seg (also a "
            "DICOM Segmentation per DICOM case, as predict writes).",
        ),
        seg_series: str = options.SEG_SERIES,
    ) -> None:
        from brainseg.optional import require

        require("matplotlib", "brainseg eval (its Dice plot)")  # before predicting anything
        if _is_volume_eval(paths, channels):
            why = "for kaggle_3m slices only; DATA holds volume cases"
            options.refuse_unused(ctx, SLICE_ONLY, why, hint="see brainseg eval --help")
            _eval_volumes(options.given_options(ctx), paths, json_out)
            return
        why = "for volume cases only (NIfTI / DICOM); DATA holds slices"
        options.refuse_unused(ctx, VOLUME_ONLY, why, hint="see brainseg eval --help")
        from brainseg.evaluation import dataset as ev

        opts = options.options_from(ev.EvalOptions, ctx.params)
        result = ev.run_eval_job(options.options_from(ev.EvalJob, ctx.params, opts=opts))
        from brainseg.cli.eval_report import render_report, render_tune

        render_report(result.summary)
        if result.tune is not None:
            render_tune(result.tune, tune_output)
        console.info(f"results saved to {result.run_dir} (masks in {result.summary['masks']})")
        if json_out:
            console.emit_json(result.summary)


def _is_volume_eval(paths: list[Path], channels: str | None) -> bool:
    if channels is not None:
        return True
    if len(paths) < 2:
        return False
    from brainseg.data.volumes import looks_like_volume_input

    return looks_like_volume_input(str(paths[-1]))


def _eval_volumes(given: dict[str, Any], paths: list[Path], json_out: bool) -> None:
    from brainseg.cli.score import render_summary
    from brainseg.errors import BrainsegError
    from brainseg.evaluation.volume_eval import VolumeEvalJob, run_volume_eval

    if len(paths) < 2:
        raise BrainsegError(
            "brainseg eval needs at least one MODEL and the folder of cases",
            hint="usage: brainseg eval MODEL [MODEL...] CASES [--gt LABELS]",
        )
    # only the options typed: the job's defaults are the volume path's (--format: None, nifti)
    job = options.options_from(VolumeEvalJob, given, models=list(paths[:-1]), data=paths[-1])
    result = run_volume_eval(job)
    render_summary(result.summary)
    console.info(f"results saved to {result.run_dir} (masks in {result.run_dir / 'masks'})")
    if json_out:
        console.emit_json(result.summary)
