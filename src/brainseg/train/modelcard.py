"""The metadata a run's checkpoints carry: settings, epoch, metrics and the model card."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from brainseg.model import card as model_card
from brainseg.train.runfiles import METRICS_COLUMNS

if TYPE_CHECKING:
    from brainseg.train.setup import Run


def split_card(run: Run) -> dict[str, Any]:
    """The card's ``training.split`` of this run."""
    split, cfg = run.data.split, run.cfg
    if not cfg.all_patients:
        assert not isinstance(cfg.fold, str)
        return model_card.split_summary(split, cfg.fold)
    return {
        "kind": "every patient (--fold all): a final model, no validation patients",
        "fold": cfg.fold,
        "train_patients": len(split.all_patients),
        "val_patients": 0,
        "test_patients": 0,
        "val_patient_ids": [],
        "train_patient_ids": sorted(split.all_patients),
        "dataset_hash": str(split.dataset_hash),
    }


def cv_of(manifest: str) -> dict[str, Any] | None:
    """The cross-validation figure of ``--postprocess-from``'s ensemble.json (None if absent)."""
    import json
    from pathlib import Path

    try:
        doc = json.loads(Path(manifest).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return model_card.cv_figures(doc) if isinstance(doc, dict) else None


def checkpoint_meta(run: Run, row: dict[str, Any], selection: str) -> dict[str, Any]:
    """The metadata of a checkpoint saved after ``row``'s epoch, its card included."""
    meta = {
        **run.meta,
        "epoch": row["epoch"],
        "metrics": {k: row[k] for k in METRICS_COLUMNS if k != "epoch" and row[k] is not None},
    }
    if not run.cfg.all_patients:
        return model_card.with_card(meta, selection=selection, split=split_card(run))
    cv = cv_of(str(run.meta["postprocess_from"])) if "postprocess_from" in run.meta else None
    if cv:
        meta["postprocess_cv"] = cv
    meta = model_card.with_card(meta, selection="last", split=split_card(run))
    card = meta[model_card.CARD_KEY]
    card["training"]["checkpoint"] = "final"  # best and last alike
    card["eval_protocol"] = {
        **card["eval_protocol"],
        "protocol": "none: trained on every patient (--fold all), nothing held out"
        + ("; figures: the cross-validation of --postprocess-from (see evaluation)" if cv else ""),
        "checkpoint": f"final: the weights after the last epoch ({row['epoch']})",
        "patients": "none (no validation patients)",
        "val_patient_ids": [],
        "figures_measured_with": "the cv's: before tuning threshold 0.5 and no "
        "post-processing, after tuning this file's settings"
        if cv
        else "-",
    }
    if cv:
        # the cv that chose the settings measured this recipe out of fold: its figure is the
        # honest estimate for this model (which was not itself measured: nothing held out)
        card["eval_metrics"] = {
            "cv_out_of_fold_dice_patient_before_tuning": cv.get("dice_patient_before_tuning"),
            "cv_out_of_fold_dice_patient_after_tuning": cv.get("dice_patient_after_tuning"),
        }
        card["evaluation"] = {
            **cv,
            "about": "the cross-validation the threshold and post-processing came from: fold "
            "models of this recipe, each measured on patients it did not train on; this final "
            "model itself was not measured (no held-out patients)",
        }
    return meta
