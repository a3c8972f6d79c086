"""The training loop, read top to bottom: setup, then per epoch train / validate / save / log.

One process (CPU / CUDA / MPS) or DistributedDataParallel under torchrun.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brainseg import console as con
from brainseg.config import TrainConfig
from brainseg.model.checkpoint import save_checkpoint
from brainseg.train import validation
from brainseg.train.epoch import Stopper, interrupted, run_epoch
from brainseg.train.modelcard import checkpoint_meta
from brainseg.train.preview import write_preview
from brainseg.train.report import write_train_report
from brainseg.train.runfiles import VAL_COLUMNS, epoch_line, write_curves, write_metrics
from brainseg.train.setup import Run, setup


@dataclass
class TrainResult:
    """What a finished run gives back: its folder, every epoch's row and the best one."""

    run_dir: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any]
    epochs: int
    image_size: int
    is_main: bool = True  # False on torchrun's other ranks (they print nothing)


def train(cfg: TrainConfig, *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Train a UNet-VGG16 as ``cfg`` says; returns the run folder (:func:`run_training`'s).
    To continue a run, build ``cfg`` with :func:`brainseg.config.load_resume_config`."""
    return run_training(cfg, cache_dir=cache_dir).run_dir


def run_training(
    cfg: TrainConfig, *, cache_dir: str | os.PathLike[str] | None = None
) -> TrainResult:
    """Validate ``cfg``, build the run, train the remaining epochs; nothing printed at the end
    (``brainseg train`` renders the result). ``cache_dir``: the dataset cache's folder
    (default ``$BRAINSEG_CACHE_DIR`` or ~/.cache/brainseg)."""
    cfg.validate()
    if cfg.quiet:
        con.configure(quiet=True)
    run = setup(cfg, cache_dir=cache_dir)
    stopper = Stopper()
    stopper.install()
    try:
        for epoch in range(run.state.epoch, cfg.epochs):
            t_epoch = time.perf_counter()
            run_epoch(run, epoch, stopper)
            end_of_epoch(run, epoch, t_epoch)
            if run.rt.dist.any_flags(stopper.requested)[0]:  # asked during validation / saving
                raise interrupted(run, f"after epoch {epoch + 1} of {cfg.epochs}")
        run.loggers.final(run.run_dir / "best.safetensors")
    finally:
        run.loggers.close()
        stopper.uninstall()
        run.rt.dist.close()
    if run.rt.dist.is_main:
        write_train_report(run.run_dir)
    best = next((r for r in run.rows if r["epoch"] == run.state.best_epoch), run.rows[-1])
    return TrainResult(
        run.run_dir, run.rows, best, cfg.epochs, cfg.image_size, is_main=run.rt.dist.is_main
    )


def end_of_epoch(run: Run, epoch: int, t_epoch: float) -> None:
    """Validate, keep the best, step the plateau scheduler, write the run files, log a line."""
    cfg, state, rt = run.cfg, run.state, run.rt
    loss_sum, loss_count = rt.dist.sum_floats(state.loss_sum, float(state.loss_count))
    train_seconds = state.train_seconds
    rt.dist.sync_buffers(run.raw)
    state.epoch, state.step_in_epoch = epoch + 1, 0
    if cfg.all_patients:  # no validation: every epoch's weights are "best" (the final ones)
        metrics: dict[str, Any] = dict.fromkeys(VAL_COLUMNS)
        improved, state.best_epoch = True, epoch + 1
    else:
        metrics = validation.validate(
            run.eval_model, run.data.val, cfg, rt.device, rt.amp_dtype, rt.dist
        )
        improved = metrics["val_dice_patient"] > state.best_dice
        if improved:
            state.best_dice, state.best_epoch = metrics["val_dice_patient"], epoch + 1
    if cfg.scheduler == "plateau":
        state.plateau_step(metrics["val_dice_patient"], cfg)
    row = {
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(loss_count, 1.0),
        **metrics,
        "lr": state.lr,
        "seconds": time.perf_counter() - t_epoch + state.carried_seconds,
        "images_per_s": loss_count / train_seconds if train_seconds else 0.0,
    }
    state.carried_seconds = 0.0
    run.rows.append(row)
    if rt.dist.is_main:
        save_epoch_files(run, row, improved)
        run.loggers.epoch(row)
    con.info(epoch_line(row, cfg.epochs, improved, cfg.image_size))


def save_epoch_files(run: Run, row: dict[str, Any], improved: bool) -> None:
    """best (+ preview) when improved, then metrics.csv, curves.png, last.safetensors."""
    d, rt = run.run_dir, run.rt
    if improved:
        best = "final" if run.cfg.all_patients else "best"
        save_checkpoint(d / "best.safetensors", run.eval_model, checkpoint_meta(run, row, best))
        write_preview(
            d / "preview.png",
            run.eval_model,
            run.data.val,
            run.data.preview_rows,
            rt.device,
            rt.amp_dtype,
        )
        run.loggers.image("preview", d / "preview.png", row["epoch"])
    # metrics before last: a kill between the two redoes this epoch on resume (rows after
    # last's epoch are dropped); the other order would lose the row for good
    write_metrics(d / "metrics.csv", run.rows)
    write_curves(d / "curves.png", run.rows, run.cfg.image_size)
    run.save_last(checkpoint_meta(run, row, "last"))
