"""`brainseg score`: score a folder of predicted masks against the true masks (no model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from brainseg import console
from brainseg.cli.options import FOLD, SUBSET, json_option, options_from

_HELP = (
    "Score predicted masks in --pred against the true masks in --gt, without a model (as "
    "nnU-Net's evaluate_folder): NIfTI volumes matched by case name, or TIF/PNG slices matched "
    "by name and stacked into patients (the true mask's folder). Writes eval's summary.json, "
    "per_patient.csv, per_slice.csv and Dice plot, plus surface.csv (HD95 and surface Dice, "
    "in mm for volumes, in pixels for slices).\n\n"
    "Example: brainseg score --pred masks/ --gt data/kaggle_3m"
)


def register(app: typer.Typer) -> None:
    """Add the subcommand to the app."""

    @app.command("score", help=_HELP, no_args_is_help=True)
    def _cmd(
        ctx: typer.Context,
        pred: Path = typer.Option(
            ...,
            "--pred",
            show_default=False,
            help="Folder of predicted masks (searched recursively).",
        ),
        gt: Path = typer.Option(
            ..., "--gt", show_default=False, help="Folder of true masks (e.g. a kaggle_3m folder)."
        ),
        tolerance: float = typer.Option(
            2.0,
            "--tolerance",
            min=0.0,
            help="Surface Dice tolerance: mm for volumes, pixels for slices.",
        ),
        allow_missing: bool = typer.Option(
            False,
            "--allow-missing",
            help="Score a true mask without a prediction as an empty prediction.",
        ),
        split: Path | None = typer.Option(
            None,
            "--split",
            help="Split YAML from `brainseg split`: score only its --subset (of --fold), as "
            "eval picks patients.",
        ),
        subset: str | None = SUBSET,
        fold: int | None = FOLD,
        only_predicted: bool = typer.Option(
            False,
            "--only-predicted",
            help="Score only the patients (cases) with at least one prediction in --pred; "
            "their missing slices still need --allow-missing.",
        ),
        project: Path = typer.Option(
            Path("runs/score"), "--project", help="Parent folder of the run folders."
        ),
        name: str = typer.Option("exp", "--name", help="Run folder name (exp, exp2, ...)."),
        exist_ok: bool = typer.Option(
            False, "--exist-ok", help="Reuse project/name instead of numbering a new folder."
        ),
        json_out: bool = json_option("Print summary.json on stdout."),
    ) -> None:
        from brainseg.optional import require

        require("matplotlib", "brainseg score (its Dice plot)")  # before any work
        from brainseg.evaluation.score import ScoreOptions, score_folders, write_score
        from brainseg.fsutil import check_run_name, next_run_dir

        check_run_name(name)  # before any work: the run folder stays inside --project
        result = score_folders(options_from(ScoreOptions, ctx.params))
        run_dir = next_run_dir(project, name, exist_ok=exist_ok)
        write_score(result, run_dir)
        render_summary(result.summary)
        console.info(f"results saved to {run_dir}")
        if json_out:
            console.emit_json(result.summary)


def render_summary(s: dict[str, Any]) -> None:
    """The per-patient table and the global line (score, and eval on volumes)."""
    surf = s["surface"]
    unit = surf["unit"]
    stats = [
        (metric, s["per_patient"][metric]) for metric in ("dice", "iou", "precision", "recall")
    ]
    # per_patient.csv's hd95 counts the slice axis as one pixel / voxel: on slices that is the
    # surface hd95 itself (one row); on volumes a voxel figure next to the one in mm
    if unit == "mm":
        stats.append(("hd95 (voxels)", s["per_patient"]["hd95"]))
    stats += [
        (f"hd95 ({unit})", surf["hd95"]),
        (f"nsd @ {surf['nsd_tolerance']:g} {unit}", surf["nsd"]),
    ]
    rows = [[label, st["mean"], st["median"], st["std"], st["min"], st["n"]] for label, st in stats]
    c = s["counts"]
    title = (
        f"{c['patients']} patients, {c['slices']} slices ({c['tumor_slices']} with tumor), "
        f"{s['mode']}: per patient"
    )
    console.result(console.table(title, ["metric", "mean", "median", "std", "min", "n"], rows))
    g = s["global"]
    console.result(
        "global (all pixels pooled): "
        + "  ".join(f"{k} {console.fmt(g[k])}" for k in ("dice", "iou", "precision", "recall"))
    )
