"""`brainseg eval`: metrics of one model or an ensemble on a dataset or a split's subset.

Only typer, the standard library and light brainseg modules at import time: numpy, scipy,
torch and onnxruntime are imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from brainseg import console

_HELP = (
    "Evaluate MODEL(s) on DATA: Dice, IoU, precision, recall, specificity, HD95.\n\n"
    "The last path is DATA (a kaggle_3m folder); every path before it is a MODEL (a "
    ".safetensors checkpoint or an .onnx file). Several models are ensembled (mean "
    "probability), e.g. the K models of a cross-validation. Metrics are reported per patient "
    "(the comparable number under a patient-level split), per slice and globally; results go "
    "to runs/eval/exp/.\n\n"
    "Example: brainseg eval runs/train/exp/best.safetensors data/kaggle_3m --split splits.yaml"
)


def register(app: typer.Typer) -> None:
    """Add the subcommand to the app."""

    @app.command("eval", help=_HELP, no_args_is_help=True)
    def _cmd(
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
        subset: str | None = typer.Option(
            None,
            "--subset",
            help="Which patients of the split: val, test, train or all \\[default: val].",
        ),
        fold: int | None = typer.Option(
            None, "--fold", help="Cross-validation fold K of the split (0-based)."
        ),
        tta: bool = typer.Option(
            False, "--tta", help="Test-time augmentation: mean probability over flips."
        ),
        threshold: float | None = typer.Option(
            None,
            "--threshold",
            min=0.0,
            max=1.0,
            help="Probability threshold \\[default: the model's stored threshold, else 0.5].",
        ),
        min_size: int | None = typer.Option(
            None,
            "--min-size",
            min=0,
            help="Remove 2D components smaller than this many pixels \\[default: model's].",
        ),
        largest: bool | None = typer.Option(
            None,
            "--largest/--no-largest",
            help="Keep only the largest 3D component per patient \\[default: model's].",
        ),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N, mps."),
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="Slices per batch."),
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
        json_out: bool = typer.Option(
            False, "--json", help="Print summary.json on stdout and nothing else there."
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
    ) -> None:
        if json_out:
            console.configure(json_mode=True)
        from brainseg import evaluation as ev

        job = ev.EvalJob(
            paths=paths,
            split=split,
            subset=subset,
            fold=fold,
            opts=ev.EvalOptions(
                threshold=threshold,
                min_size=min_size,
                largest=largest,
                tta=tta,
                device=device,
                batch_size=batch_size,
                skip_bad=skip_bad,
                tune=tune,
            ),
            project=project,
            name=name,
            exist_ok=exist_ok,
            tune_output=tune_output,
            force=force,
        )
        result = ev.run_eval_job(job)
        ev.render_report(result.summary)
        if result.tune is not None:
            ev.render_tune(result.tune, tune_output)
        console.info(f"results saved to {result.run_dir}")
        if json_out:
            console.emit_json(ev.json_safe(result.summary))
