"""Recipe rows side by side: finished ``brainseg cv`` runs compared patient by patient.

    python benchmarks/cv_compare.py runs/cv/plain runs/cv/cosine [...] [--column dice_before]
        [--json OUT]

Each run's per_patient.csv gives its out-of-fold per-patient Dice (``dice_before``: threshold
0.5, no post-processing, cv's "before" row; ``dice``: after the post-processing cv chose on
those same patients). The first run is the reference: every other run is summarised (mean,
95% percentile bootstrap CI over patients, median, per-fold means) with its paired
per-patient difference from the reference and how many patients it does better on. Runs must
cover the same patients with the same folds (a different --split is refused): a difference
is then a difference of recipe (or seed), not of patients. Writes JSON (default
benchmarks/results/cv_compare.json) with every run's per-patient values, so later rows can
be paired with these.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

from _common import RESULTS, mean_ci, provenance, show, write_result


def read_run(cv_dir: Path, column: str) -> dict[str, tuple[int, float]]:
    """``{patient: (fold, Dice)}`` from a finished cv folder's per_patient.csv."""
    path = cv_dir / "per_patient.csv"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist (is {cv_dir} a finished brainseg cv?)")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or column not in rows[0]:
        raise SystemExit(f"error: {path} has no column {column!r}")
    return {r["patient_id"]: (int(r["fold"]), float(r[column])) for r in rows}


def fold_means(run: dict[str, tuple[int, float]]) -> list[float]:
    folds: dict[int, list[float]] = {}
    for fold, dice in run.values():
        folds.setdefault(fold, []).append(dice)
    return [sum(v) / len(v) for _, v in sorted(folds.items())]


def compare(runs: dict[str, dict[str, tuple[int, float]]]) -> dict[str, Any]:
    """Each run's summary and its paired difference from the first run."""
    names = list(runs)
    ref = runs[names[0]]
    for name in names[1:]:
        folds = {p: f for p, (f, _) in runs[name].items()}
        if folds != {p: f for p, (f, _) in ref.items()}:
            raise SystemExit(f"error: {name} and {names[0]} do not have the same patients in folds")
    patients = sorted(ref)
    out: dict[str, Any] = {}
    for name in names:
        values = [runs[name][p][1] for p in patients]
        entry = {**mean_ci(values), "per_fold": fold_means(runs[name])}
        if name != names[0]:
            diff = [runs[name][p][1] - ref[p][1] for p in patients]
            entry["paired_difference"] = mean_ci(diff)
            entry["patients_better"] = sum(d > 0 for d in diff)
        entry["per_patient"] = dict(zip(patients, values, strict=True))
        out[name] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "cv_dirs", type=Path, nargs="+", help="finished cv folders; the first is the reference"
    )
    ap.add_argument("--column", default="dice_before", choices=("dice_before", "dice"))
    ap.add_argument("--json", type=Path, default=RESULTS / "cv_compare.json")
    a = ap.parse_args()
    runs = {str(d): read_run(d, a.column) for d in a.cv_dirs}
    summary = compare(runs)
    rows = []
    for name, s in summary.items():
        diff = s.get("paired_difference")
        rows.append(
            [
                name,
                f"{s['mean']:.3f} ({s['ci95'][0]:.3f}-{s['ci95'][1]:.3f})",
                f"{s['median']:.3f}",
                ", ".join(f"{v:.3f}" for v in s["per_fold"]),
                "reference"
                if diff is None
                else f"{diff['mean']:+.3f} ({diff['ci95'][0]:+.3f} to {diff['ci95'][1]:+.3f}), "
                f"{s['patients_better']}/{s['n']} better",
            ]
        )
    show(
        f"out-of-fold per-patient Dice ({a.column})",
        ["run", "mean (95% CI)", "median", "per fold", "paired vs the first"],
        rows,
    )
    write_result(a.json, {**provenance(), "column": a.column, "runs": summary})


if __name__ == "__main__":
    main()
