"""preview.png: validation slices with the ground truth (green) and prediction (red) outlined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from brainseg.data.imageio import mask_outline
from brainseg.evaluation.metrics import dice
from brainseg.fsutil import atomic_path
from brainseg.train.data import ValData, fetch
from brainseg.train.runtime import autocast
from brainseg.train.validation import predict_masks


@torch.no_grad()
def write_preview(
    path: Path,
    model: nn.Module,
    val: ValData,
    rows: list[int],
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> None:
    """FLAIR with ground truth (green) and prediction (red) outlines, as in Buda et al."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    was_training = model.training
    model.eval()
    idx = torch.tensor(rows)
    x, y = fetch(val.images, val.masks, idx, device)
    with autocast(device, amp_dtype):
        pred = predict_masks(model(x))[:, 0].cpu().numpy()
    if was_training:
        model.train()
    flair = val.images.index_select(0, idx.to(val.images.device))[:, 1].cpu().numpy()
    gt = y[:, 0].cpu().numpy() > 0.5
    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 2.9), squeeze=False)
    for j, r in enumerate(rows):
        rgb = np.repeat(flair[j][..., None], 3, axis=2).copy()
        rgb[mask_outline(gt[j])] = (0, 255, 0)
        rgb[mask_outline(pred[j])] = (255, 0, 0)
        ax = axes[0, j]
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(
            f"{val.patient_ids[int(val.patient[r])][:12]}\nslice "
            f"{int(val.slice_number[r])}  Dice {dice(pred[j], gt[j]):.2f}",
            fontsize=7,
        )
        ax.axis("off")
    fig.suptitle("FLAIR; green: ground truth, red: prediction", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
