"""What `brainseg eval` (and `brainseg demo`) show of an evaluation; imported when they run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from brainseg import console
from brainseg.evaluation import metrics
from brainseg.evaluation.dataset import TuneResult, overlap_warning


def render_report(summary: dict[str, Any]) -> None:
    """The per-patient and per-slice statistics table, then global and detection lines (all
    results, never status lines)."""
    levels = [
        ("per patient", "per_patient"),
        ("per slice (tumor)", "per_slice_tumor"),
        ("per slice (all)", "per_slice_all"),
    ]
    rows: list[list[Any]] = []
    for metric in metrics.METRICS:
        for label, key in levels:
            st = summary[key][metric]
            figures = [_f(st[k]) for k in ("mean", "median", "std", "min")]
            rows.append([metric if label == "per patient" else "", label, *figures, st["n"]])
    c = summary["counts"]
    fold = "" if summary["fold"] is None else f", fold {summary['fold']}"
    at = summary["measured_at"]
    model_in = at["model_input"]
    title = (
        f"{c['patients']} patients, {c['slices']} slices ({c['tumor_slices']} with tumor)"
        f" - subset {summary['subset']}{fold} - measured at the images' own size "
        f"{at['size'][0]}x{at['size'][1]}"
        + (f" (model input {model_in[0]}x{model_in[1]})" if model_in else "")
        + (" - NOT HELD OUT (see below)" if summary.get("trained_on_scored_patients") else "")
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
    if summary.get("trained_on_scored_patients"):
        console.result(
            f"NOT HELD OUT: {overlap_warning(summary['training_overlap'], c['patients'])}"
        )


def render_tune(tuned: TuneResult, output: Path | None) -> None:
    """The --tune line: the best settings and the gain over the model's own."""
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
