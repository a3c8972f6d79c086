"""The run folder's human-readable files: metrics.csv, curves.png, the per-epoch line and bar."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from brainseg import console as con
from brainseg.fsutil import atomic_path, atomic_write_text

METRICS_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_dice_slice",
    "val_dice_patient",
    "lr",
    "seconds",
    "images_per_s",
)
#: The validation columns: empty in metrics.csv (None in a row) for --fold all.
VAL_COLUMNS = ("val_loss", "val_dice_slice", "val_dice_patient")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.csv as dicts (epoch int, the rest float, an empty cell None); [] when missing."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return [
            {k: int(v) if k == "epoch" else None if v == "" else float(v) for k, v in r.items()}
            for r in csv.DictReader(f)
        ]


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    return f"{float(value):.6g}" if key == "lr" else repr(float(value))


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(METRICS_COLUMNS)
    for r in rows:
        w.writerow([r["epoch"], *(_cell(k, r[k]) for k in METRICS_COLUMNS[1:])])
    atomic_write_text(path, buf.getvalue())


def epoch_line(row: dict[str, Any], epochs: int, improved: bool, image_size: int) -> str:
    """The plain per-epoch log line (Dice on validation slices at the training size)."""
    validated = row["val_loss"] is not None
    val = (
        f"val_loss {row['val_loss']:.4f}  dice_slice {row['val_dice_slice']:.4f}  "
        f"dice_patient {row['val_dice_patient']:.4f} (at {image_size}x{image_size})  "
        if validated
        else "no validation (--fold all)  "
    )
    return (
        f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  {val}"
        f"lr {row['lr']:.3g}  {row['seconds']:.1f}s  {row['images_per_s']:.1f} img/s"
        + ("  *best" if improved and validated else "")
    )


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def advance(self, n: int = 1, **fields: Any) -> None:
        return None


def epoch_bar(total: int, description: str) -> Any:
    """A rich bar (loss, img/s, ETA) on a terminal; nothing otherwise (one line per epoch)."""
    if con.interactive():
        return con.progress(total, description, unit="img")
    return _NoBar()


def write_curves(path: Path, rows: list[dict[str, Any]], image_size: int) -> None:
    """curves.png: loss and Dice per epoch."""
    import matplotlib.pyplot as plt

    fig = curves_figure(rows, image_size)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def curves_figure(rows: list[dict[str, Any]], image_size: int) -> Any:
    """The curves figure (matplotlib, Agg); epochs on whole-number ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ep = [r["epoch"] for r in rows]

    def col(key: str) -> list[float]:  # an empty validation cell (--fold all): not drawn
        return [math.nan if r[key] is None else r[key] for r in rows]

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, col("train_loss"), "o-", label="train")
    a.plot(ep, col("val_loss"), "o-", label="val")
    a.set_ylabel("loss")
    b.plot(ep, col("val_dice_slice"), "o-", label="val per-slice")
    b.plot(ep, col("val_dice_patient"), "o-", label="val per-patient")
    b.set_ylabel(f"Dice (at {image_size}x{image_size})")
    b.set_ylim(0, 1)
    for ax in (a, b):
        ax.set_xlabel("epoch")
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no 1.2, 1.4 ticks
    fig.tight_layout()
    return fig
