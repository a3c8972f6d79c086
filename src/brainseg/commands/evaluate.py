"""`brainseg eval`: metrics of one model or an ensemble on a dataset or a split's subset.

Only typer, the standard library and light brainseg modules at import time: numpy, scipy,
torch and onnxruntime are imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from brainseg import console
from brainseg.errors import BrainsegError

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
        if len(paths) < 2:
            raise BrainsegError(
                "brainseg eval needs at least one MODEL and a DATA folder",
                hint="usage: brainseg eval MODEL [MODEL...] DATA [--split splits.yaml]",
            )
        from brainseg import evaluation as ev

        *model_args, data = paths
        models = ev.check_model_paths(model_args)
        if not data.exists():
            raise BrainsegError(
                f"dataset folder {data} does not exist",
                hint="the last path must be the data (a kaggle_3m folder)",
            )
        if tune_output is not None:
            tune = True
            ev.check_tune_output(models, tune_output, force)
        opts = ev.EvalOptions(
            threshold=threshold,
            min_size=min_size,
            largest=largest,
            tta=tta,
            device=device,
            batch_size=batch_size,
            skip_bad=skip_bad,
            tune=tune,
        )
        result = ev.run_eval(models, data, split, subset, fold, opts)

        from brainseg.fsutil import next_run_dir

        if result.tune is not None and tune_output is not None:
            ev.write_tuned_model(models[0], tune_output, result.tune.best, force)
            result.summary["tune"]["output"] = str(tune_output)
        run_dir = next_run_dir(project, name, exist_ok=exist_ok)
        ev.write_run(result, run_dir)

        _render(result.summary)
        if result.tune is not None:
            _render_tune(result.tune, tune_output)
        console.info(f"results saved to {run_dir}")
        if json_out:
            console.emit_json(ev.json_safe(result.summary))


def _render(summary: dict[str, Any]) -> None:
    """The per-patient and per-slice statistics table, then global and detection lines."""
    from brainseg.metrics import METRICS

    levels = [
        ("per patient", "per_patient"),
        ("per slice (tumor)", "per_slice_tumor"),
        ("per slice (all)", "per_slice_all"),
    ]
    rows: list[list[Any]] = []
    for metric in METRICS:
        for label, key in levels:
            st = summary[key][metric]
            rows.append(
                [
                    metric if label == "per patient" else "",
                    label,
                    _f(st["mean"]),
                    _f(st["median"]),
                    _f(st["std"]),
                    _f(st["min"]),
                    st["n"],
                ]
            )
    c = summary["counts"]
    fold = "" if summary["fold"] is None else f", fold {summary['fold']}"
    title = (
        f"{c['patients']} patients, {c['slices']} slices ({c['tumor_slices']} with tumor)"
        f" - subset {summary['subset']}{fold}"
    )
    table = console.table(title, ["metric", "level", "mean", "median", "std", "min", "n"], rows)
    table.columns[1].justify = "left"
    console.result(table)
    g, d, sk = summary["global"], summary["detection"], summary["hd95_skipped"]
    console.result(
        "global (all pixels pooled): "
        + "  ".join(f"{k} {_s(g[k])}" for k in ("dice", "iou", "precision", "recall"))
    )
    console.result(
        f"slice detection: sensitivity {_s(d['sensitivity'])}  specificity "
        f"{_s(d['specificity'])}  (tp {d['tp']}, fp {d['fp']}, fn {d['fn']}, "
        f"tn {d['tn']})"
    )
    console.result(
        f"HD95 (pixels) skipped for an empty mask: {sk['per_patient']} patients, "
        f"{sk['per_slice_tumor']} tumor slices, {sk['per_slice_all']} slices"
    )


def _render_tune(tuned: Any, output: Path | None) -> None:
    b, base = tuned.best, tuned.baseline
    console.result(
        f"tuned on these patients: threshold {b.threshold:g}, min-size {b.min_size}, "
        f"{'--largest' if b.largest else '--no-largest'} -> mean per-patient Dice "
        f"{tuned.best_dice:.4f} (was {tuned.baseline_dice:.4f} with threshold "
        f"{base.threshold:g}, min-size {base.min_size}, "
        f"{'--largest' if base.largest else '--no-largest'}; gain {tuned.gain:+.4f})"
    )
    if output is not None:
        console.info(f"tuned copy written to {output}")


def _f(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def _s(v: float | None) -> str:
    return console.fmt(_f(v))
