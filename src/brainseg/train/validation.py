"""Validation at the training size: loss, mean per-slice Dice, mean per-patient (3D) Dice.

The mask is ``probability >= DEFAULT_THRESHOLD``, as predict makes it; Dice is the one of
:func:`brainseg.evaluation.metrics.dice_from_counts` (its empty policy too).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from brainseg.config import TrainConfig
from brainseg.evaluation.metrics import dice_from_counts
from brainseg.inference.postprocess import DEFAULT_THRESHOLD
from brainseg.train.data import ValData, fetch
from brainseg.train.distributed import Distributed
from brainseg.train.epoch import loss_fn
from brainseg.train.runtime import autocast


def predict_masks(logits: torch.Tensor) -> torch.Tensor:
    """The binary masks of ``logits`` (N x 1 x H x W): probability >= the default threshold."""
    return torch.sigmoid(logits.float()) >= DEFAULT_THRESHOLD


@torch.no_grad()
def validate(
    model: nn.Module,
    val: ValData,
    cfg: TrainConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    dist: Distributed | None = None,
    return_per_patient: bool = False,
) -> dict[str, Any]:
    """Loss, mean per-slice Dice and mean per-patient (3D) Dice on the validation set; under
    torchrun each rank evaluates a strided share and the per-slice tallies are all-reduced."""
    dist = dist or Distributed()
    was_training = model.training
    model.eval()
    bs = cfg.val_batch_size or cfg.batch_size
    rows = torch.arange(dist.rank, val.n, dist.world)
    # per validation slice: intersection, prediction sum, ground-truth sum; then the loss sum
    tallies = torch.zeros(3, val.n, dtype=torch.float64)
    loss_sum = 0.0
    for i in range(0, len(rows), bs):
        idx = rows[i : i + bs]
        x, y = fetch(val.images, val.masks, idx, device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        loss_sum += loss_fn(cfg.loss, logits, y).item() * len(idx)
        pred, gt = predict_masks(logits), y > 0.5
        for j, t in enumerate((pred & gt, pred, gt)):
            tallies[j, idx] = t.flatten(1).sum(1).double().cpu()
    packed = dist.all_reduce_sum(torch.cat([tallies.flatten(), torch.tensor([loss_sum])]))
    counts, loss_sum = packed[:-1].view(3, val.n).numpy(), float(packed[-1])
    if was_training:
        model.train()
    n_p = len(val.patient_ids)
    patient = val.patient.numpy()
    per_patient = dice_from_counts(
        *(np.bincount(patient, weights=t, minlength=n_p) for t in counts)
    )
    out: dict[str, Any] = {
        "val_loss": loss_sum / max(val.n, 1),
        "val_dice_slice": float(dice_from_counts(*counts).sum()) / max(val.n, 1),
        "val_dice_patient": float(per_patient.mean()) if n_p else 0.0,
    }
    if return_per_patient:
        out["per_patient"] = dict(zip(val.patient_ids, per_patient.tolist(), strict=True))
    return out
