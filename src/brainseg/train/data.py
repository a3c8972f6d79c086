"""The training and validation slices as uint8 tensors on the device, and how a batch is drawn.

The uint8 cache is read once and resized once; the training slices live in one uint8 tensor
(on the GPU when it fits, else in pinned memory); each step draws a batch of row indices from
a seeded generator, converts to float and augments on the device. No DataLoader, no
per-sample Python work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainseg import console as con
from brainseg.config import ALL_FOLDS, TrainConfig
from brainseg.data.cache import load_dataset
from brainseg.data.split import Split, check_split, dataset_hash, load_split
from brainseg.errors import BrainsegError


def place_arrays(
    images: np.ndarray, masks: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training set as uint8 tensors: on the GPU when it fits in half the free memory,
    else pinned host memory (CUDA) or plain memory (CPU)."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    y = torch.from_numpy(np.ascontiguousarray(masks))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if x.nbytes + y.nbytes < free // 2:
            return x.to(device), y.to(device)
        return x.pin_memory(), y.pin_memory()
    if device.type == "mps":
        return x.to(device), y.to(device)
    return x, y


def fetch(
    images: torch.Tensor, masks: torch.Tensor, idx: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``idx`` as float images N x 3 x H x W in [0, 255] and masks N x 1 x H x W on device."""
    idx = idx.to(images.device)
    x = images.index_select(0, idx)
    y = masks.index_select(0, idx)
    if x.device != device:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return x.float(), y.unsqueeze(1).float()


def sample_weights(has_tumor: np.ndarray, p: float | None) -> torch.Tensor | None:
    """Per-slice sampling weights giving tumor slices total probability ``p`` (None: uniform)."""
    if p is None:
        return None
    n_t = int(has_tumor.sum())
    n_e = len(has_tumor) - n_t
    if (n_t == 0 and p > 0) or (n_e == 0 and p < 1):
        kind = "tumor" if n_t == 0 else "tumor-free"
        raise BrainsegError(
            f"--tumor-oversample {p} needs {kind} training slices, but there are none",
            hint="leave out --tumor-oversample",
        )
    w = np.where(has_tumor, p / max(n_t, 1), (1 - p) / max(n_e, 1))
    return torch.from_numpy(w.astype(np.float64))


@dataclass
class ValData:
    """Validation slices on the device with their patient grouping."""

    images: torch.Tensor  # N x 3 x H x W uint8
    masks: torch.Tensor  # N x H x W uint8
    patient: torch.Tensor  # N int64, 0..P-1 (local to the validation set)
    slice_number: np.ndarray
    patient_ids: list[str]  # the P validation patients

    @property
    def n(self) -> int:
        return int(self.images.shape[0])

    @classmethod
    def build(
        cls,
        images: np.ndarray,
        masks: np.ndarray,
        patient_index: np.ndarray,
        slice_number: np.ndarray,
        all_ids: list[str],
        device: torch.device,
    ) -> ValData:
        uniq, local = np.unique(np.asarray(patient_index), return_inverse=True)
        x, y = place_arrays(images, masks, device)
        return cls(
            x,
            y,
            torch.from_numpy(local.astype(np.int64)),
            np.asarray(slice_number),
            [all_ids[i] for i in uniq],
        )


# ------------------------------------------------------------------------------ the run's data
@dataclass
class TrainData:
    """Everything the loop reads: training rows on the device, validation, sampling weights."""

    images: torch.Tensor  # N x 3 x H x W uint8 (device or pinned host memory)
    masks: torch.Tensor  # N x H x W uint8
    weights: torch.Tensor | None  # per-row sampling weights (None: shuffled passes)
    val: ValData
    preview_rows: list[int]
    train_patients: int
    split_hash: str
    dataset_key: str
    split: Any = None  # the Split trained from (made in memory for --fold all without --split)

    @property
    def n(self) -> int:
        return int(self.images.shape[0])


def load_split_checked(path: Path | None, fold: int | str | None) -> Any:
    """The split file, its fold checked before anything is built; None without a split."""
    if path is None:
        return None
    split = load_split(path)
    if fold != ALL_FOLDS:
        split.check_fold(fold if fold is None else int(fold))
    return split


def whole_dataset_split(patient_ids: list[str], seed: int) -> Any:
    """The split of --fold all without --split: every patient in train, none in val / test."""
    ids = sorted(patient_ids)
    return Split(
        seed=seed,
        dataset_hash=dataset_hash(ids),
        val_fraction=0.0,
        test_fraction=0.0,
        subsets={"train": ids, "val": [], "test": []},
    )


def train_val_ids(cfg: TrainConfig, split: Any, split_path: Path | None) -> tuple[list, list]:
    """(training, validation) patient ids; --fold all: every patient of the split, no val."""
    if cfg.all_patients:
        return list(split.all_patients), []
    assert isinstance(cfg.fold, int) or cfg.fold is None
    train_ids = list(split.patients("train", cfg.fold))
    val_ids = list(split.patients("val", cfg.fold))
    if not train_ids or not val_ids:
        raise BrainsegError(
            f"split {split_path} has no {'train' if not train_ids else 'val'} "
            f"patients{'' if cfg.fold is None else f' in fold {cfg.fold}'}",
            hint="make a split with a validation fraction > 0, or train a final model on "
            "every patient with --fold all",
        )
    return train_ids, val_ids


def load_data(
    cfg: TrainConfig,
    split: Any,
    split_path: Path | None,
    device: torch.device,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TrainData:
    """Read the dataset (cached), check the split against it, resize, place on ``device``."""
    assert cfg.data is not None
    ds = load_dataset(cfg.data, skip_bad=cfg.skip_bad, cache_dir=cache_dir)
    if split is None:
        split = whole_dataset_split(list(ds.patient_ids), cfg.seed)
    check_split(split, ds.patient_ids)
    train_ids, val_ids = train_val_ids(cfg, split, split_path)
    size = cfg.image_size
    resizing = f"; resizing to {size}x{size}" if ds.size != (size, size) else ""
    con.info(f"data: {len(ds)} slices of {len(ds.patient_ids)} patients{resizing}")
    ds = ds.resized(size)
    train_rows, val_rows = ds.indices_of(train_ids), ds.indices_of(val_ids)
    images, masks = place_arrays(ds.images[train_rows], ds.masks[train_rows], device)
    val = ValData.build(
        ds.images[val_rows],
        ds.masks[val_rows],
        ds.patient_index[val_rows],
        ds.slice_number[val_rows],
        ds.patient_ids,
        device,
    )
    has_tumor = ds.tumor_pixels[train_rows] > 0
    return TrainData(
        images=images,
        masks=masks,
        weights=sample_weights(has_tumor, cfg.tumor_oversample),
        val=val,
        preview_rows=choose_preview(val, cfg.preview_slices),
        train_patients=len(train_ids),
        split_hash=str(split.dataset_hash),
        dataset_key=str(ds.key),
        split=split,
    )


def choose_preview(val: ValData, k: int) -> list[int]:
    """Up to ``k`` validation rows: the slice with the most tumour of each patient in turn."""
    if k == 0 or val.n == 0:
        return []
    area = val.masks.flatten(1).sum(1).cpu().numpy()
    patient = val.patient.numpy()
    chosen: list[int] = []
    for p in range(len(val.patient_ids)):
        rows = np.flatnonzero(patient == p)
        chosen.append(int(rows[np.argmax(area[rows])]))
    chosen.sort(key=lambda r: -area[r])
    return sorted(chosen[:k])
