"""Accuracy lever: flip TTA on the fold models of a finished ``brainseg cv``, out of fold.

    python benchmarks/cv_tta.py runs/cv/exp [--device cpu] [--json OUT]

Every fold's model predicts its own validation patients (exactly the out-of-fold patients
of the cv), once without and once with test-time augmentation (the mean probability over the
image and its horizontal and vertical flips, ``brainseg eval --tta``), at threshold 0.5
without post-processing: cv's "before" row. The per-patient Dice of all folds is pooled and
summarised as cv does (mean, 95% percentile bootstrap CI over patients, median), with the
paired per-patient difference, so the lever is judged on the same patients and models.

Equivalent shell commands, one per fold k: ``brainseg eval CV/fold_k/last.safetensors DATA
--split CV/split.yaml --fold k [--tta]``. Writes JSON (default benchmarks/results/cv_tta.json).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from _common import RESULTS, mean_ci, provenance, say, show, write_result


def fold_dice(cv_dir: Path, data: str, k: int, select: str, tta: bool, device: str) -> dict:
    """Per-patient Dice of fold k's model on its validation patients."""
    from brainseg.evaluation.dataset import EvalOptions, run_eval

    model = cv_dir / f"fold_{k}" / f"{select}.safetensors"
    opts = EvalOptions(threshold=0.5, min_size=0, largest=False, tta=tta, device=device)
    res = run_eval([model], data, cv_dir / "split.yaml", "val", k, opts)
    return {r["patient_id"]: float(r["dice"]) for r in res.report.per_patient}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cv_dir", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=RESULTS / "cv_tta.json")
    a = ap.parse_args()
    doc = yaml.safe_load((a.cv_dir / "cv.yaml").read_text())
    result: dict[str, Any] = provenance()
    per: dict[str, dict[str, float]] = {"plain": {}, "tta": {}}
    for k in range(int(doc["folds"])):
        for key, tta in (("plain", False), ("tta", True)):
            per[key].update(fold_dice(a.cv_dir, doc["data"], k, doc["select"], tta, a.device))
        say(f"fold {k} done")
    patients = sorted(per["plain"])
    diff = [per["tta"][p] - per["plain"][p] for p in patients]
    result.update(
        cv_dir=str(a.cv_dir),
        select=doc["select"],
        per_patient=per,
        without_tta=mean_ci([per["plain"][p] for p in patients]),
        with_tta=mean_ci([per["tta"][p] for p in patients]),
        paired_difference=mean_ci(diff),
    )
    rows = [
        [name, s["mean"], f"{s['ci95'][0]:.4f}-{s['ci95'][1]:.4f}", s["median"], s["n"]]
        for name, s in (
            ("without TTA", result["without_tta"]),
            ("flip TTA", result["with_tta"]),
            ("TTA - without (paired)", result["paired_difference"]),
        )
    ]
    show(f"out-of-fold per-patient Dice, {a.cv_dir}", ["", "mean", "95% CI", "median", "n"], rows)
    write_result(a.json, result)


if __name__ == "__main__":
    main()
