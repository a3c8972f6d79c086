"""An evaluation's run folder: the result objects and the files eval and score write (the
same files whether a model was evaluated or masks were scored without one)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainseg.evaluation import metrics
from brainseg.evaluation.metrics import PATIENT_COLUMNS
from brainseg.evaluation.report import REPORT_NAME, dice_plot_png, write_eval_report
from brainseg.fsutil import atomic_write_bytes, atomic_write_text, json_safe
from brainseg.settings import PostSettings

#: The columns of per_slice.csv.
SLICE_COLUMNS = [
    "patient_id",
    "slice_number",
    "gt_pixels",
    "pred_pixels",
    "tp",
    "fp",
    "fn",
    *metrics.METRICS,
]


@dataclass
class TuneResult:
    """The best post-processing on the evaluated data, and what it gains over the baseline."""

    baseline: PostSettings
    baseline_dice: float
    best: PostSettings
    best_dice: float
    thresholds: list[float]
    min_sizes: list[int]
    tried: int

    @property
    def gain(self) -> float:
        return self.best_dice - self.baseline_dice

    def as_dict(self) -> dict[str, Any]:
        return {
            "objective": "mean per-patient Dice",
            "baseline": {**self.baseline.as_dict(), "dice": self.baseline_dice},
            "best": {**self.best.as_dict(), "dice": self.best_dice},
            "gain": self.gain,
            "grid": {
                "thresholds": self.thresholds,
                "min_sizes": self.min_sizes,
                "largest": [False, True],
                "tried": self.tried,
            },
            "note": "chosen on the evaluated patients: confirm on held-out patients",
        }


@dataclass
class EvalResult:
    """Everything ``brainseg eval`` reports and writes."""

    report: metrics.Report
    summary: dict[str, Any]
    settings: PostSettings
    tune: TuneResult | None = None
    run_dir: Path | None = None
    files: list[Path] = field(default_factory=list)
    #: The worst and median patients' slices for report.html (see brainseg.evaluation.report).
    cases: list[Any] = field(default_factory=list)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ""
    return str(v)


def rows_to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """CSV text; floats with full precision, NaN as an empty cell."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows([_cell(r[c]) for c in columns] for r in rows)
    return buf.getvalue()


def write_run(result: EvalResult, run_dir: Path) -> list[Path]:
    """Write summary.json, per_patient.csv, per_slice.csv, dice_per_patient.png, report.html."""
    run_dir.mkdir(parents=True, exist_ok=True)
    result.run_dir = run_dir
    result.summary["run_dir"] = str(run_dir)
    files = [
        atomic_write_text(
            run_dir / "per_patient.csv", rows_to_csv(result.report.per_patient, PATIENT_COLUMNS)
        ),
        atomic_write_text(
            run_dir / "per_slice.csv", rows_to_csv(result.report.per_slice, SLICE_COLUMNS)
        ),
        atomic_write_bytes(
            run_dir / "dice_per_patient.png",
            dice_plot_png(result.report.column("per_patient", "dice")),
        ),
    ]
    with_report = result.settings is not None  # a model's eval (brainseg score has no model)
    report = [run_dir / REPORT_NAME] if with_report else []
    result.summary["files"] = [p.name for p in [*files, *report, run_dir / "summary.json"]]
    if with_report:
        files.append(write_eval_report(result, run_dir))
    files.append(atomic_write_text(run_dir / "summary.json", summary_json(result.summary)))
    result.files = files
    return files


def summary_json(summary: dict[str, Any]) -> str:
    """summary.json text: strict JSON (NaN written as null)."""
    return json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n"
