"""The train report: ``RUN/report.html`` of a train run folder (curves, epochs, preview,
config), written at the end of every run; built from the run folder only, on the eval/cv
report's page parts (:mod:`brainseg.evaluation.report`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from brainseg.evaluation.report import (
    REPORT_NAME,
    curves_png,
    esc,
    fmt,
    img_tag,
    kv_table,
    page,
    section,
    sortable_table,
)
from brainseg.fsutil import atomic_write_text
from brainseg.train.runfiles import read_metrics
from brainseg.yamlio import parse_yaml


def _train_measured(config: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[Any]:
    info = config.get("run_info") or {}
    size = config.get("image_size")
    scored = [r for r in rows if r.get("val_dice_patient") is not None]
    best = max(scored, key=lambda r: r["val_dice_patient"]) if scored else None
    no_val = "none (--fold all: every patient trains)" if str(config.get("fold")) == "all" else None
    return [
        ("epochs done", f"{rows[-1]['epoch'] if rows else 0} of {config.get('epochs', '?')}"),
        (
            "best val per-patient Dice",
            f"{fmt(best['val_dice_patient'])} at epoch {best['epoch']}" if best else no_val,
        ),
        ("last val per-patient Dice", scored[-1]["val_dice_patient"] if scored else no_val),
        (
            "validation",
            no_val
            or f"{info.get('val_patients', '?')} patients / {info.get('val_slices', '?')}"
            f" slices of {config.get('split')}"
            + ("" if config.get("fold") is None else f", fold {config.get('fold')}"),
        ),
        (
            "measured at",
            f"the training image size {size} (probability > 0.5, no "
            "post-processing); per-patient Dice = one 3D Dice per patient",
        ),
        (
            "training",
            f"{info.get('train_patients', '?')} patients / {info.get('train_slices', '?')} slices",
        ),
        (
            "device",
            f"{info.get('device', '?')}, precision {info.get('amp', '?')}, "
            f"{info.get('world_size', 1)} process(es)",
        ),
        ("brainseg", info.get("brainseg")),
        ("started", info.get("started")),
    ]


def train_html(run_dir: Path) -> str:
    """The train report page of a run folder (see :func:`write_train_report`)."""
    cfg_path = run_dir / "config.yaml"
    cfg_text = cfg_path.read_text(encoding="utf-8") if cfg_path.is_file() else ""
    config = (
        parse_yaml(cfg_text, f"config file {cfg_path}", "the run folder's config.yaml is damaged")
        if cfg_text
        else {}
    )
    config = config if isinstance(config, dict) else {}
    rows = read_metrics(run_dir / "metrics.csv")
    preview = run_dir / "preview.png"
    sections = [
        section("Summary", kv_table(_train_measured(config, rows))),
        section(
            "Curves",
            img_tag(curves_png(rows), "loss and Dice per epoch")
            if rows
            else "<p>no epoch finished yet</p>",
        ),
        section(
            "Epochs",
            sortable_table(list(rows[0]) if rows else ["epoch"], rows, "epochs"),
            note="metrics.csv; click a column header to sort.",
        ),
        section(
            "Preview",
            img_tag(preview.read_bytes(), "validation preview")
            if preview.is_file()
            else "<p>no preview.png</p>",
            note="Validation slices with the most tumour; green: ground truth, red: prediction.",
        ),
        section("Configuration", f"<pre>{esc(cfg_text)}</pre>", note="config.yaml"),
    ]
    return page(f"brainseg train: {run_dir.name}", str(run_dir), sections)


def write_train_report(run_dir: str | Path) -> Path:
    """``run_dir/report.html`` of a train run folder: curves, epochs, preview, config."""
    run_dir = Path(run_dir)
    return atomic_write_text(run_dir / REPORT_NAME, train_html(run_dir))
