"""Verification of an ONNX export against PyTorch, on predict's own backends.

The checkpoint (an ensemble.json: the mean of its folds) and each ONNX file run through
:class:`brainseg.inference.predict.Predictor`, so the masks compared are the masks
``brainseg predict`` makes. Everything is at the model's training size (plus a second size
for the dynamic axes, logits only), except :func:`precision_dice` (the images' own size).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainseg import console as con
from brainseg.data.cache import load_dataset
from brainseg.data.imageio import resize_image
from brainseg.data.split import load_split
from brainseg.data.synthetic import write_synthetic
from brainseg.errors import BrainsegError, BrainsegRuntimeError
from brainseg.evaluation import metrics
from brainseg.export.ensemble import ensemble_logits
from brainseg.inference import postprocess, runtimes
from brainseg.inference.predict import Predictor, TorchBackend, load_predictor
from brainseg.settings import SIZE_MULTIPLE, InferenceSettings, PostSettings, resolve

#: Slices compared between PyTorch and onnxruntime (one batch).
VERIFY_SLICES = 8
#: |Δ mean per-patient Dice| between fp32 and int8 on the validation patients we accept.
INT8_DICE_TOLERANCE = 0.01
#: Mask agreement (Dice of the thresholded masks) below which an export is reported as
#: broken: an ONNX model vs PyTorch on the verification slices, and int8 vs fp32 on the
#: validation patients. ``--strict`` turns the warning into a failure.
MASK_AGREEMENT_FLOOR = 0.9
#: The second verification size (proof that height and width really are dynamic) is the
#: model's size plus this (height, width).
SECOND_SIZE_STEP = (32, 64)


# --------------------------------------------------------------------------- data
@dataclass
class Slices:
    """Verification / calibration arrays at the model's image size."""

    images: np.ndarray  # N x H x W x 3 uint8
    masks: np.ndarray  # N x H x W bool
    patient_index: np.ndarray
    slice_number: np.ndarray
    patient_ids: list[str]
    source: str
    phantoms: bool  # generated, not the user's data
    #: The same slices at the images' own size (N x h x w x 3, N x h x w), for the Dice that
    #: eval and predict would report (:func:`precision_dice`).
    own_images: np.ndarray
    own_masks: np.ndarray

    def rows_of(self, patient_ids: list[str]) -> np.ndarray:
        lookup = {p: i for i, p in enumerate(self.patient_ids)}
        return np.flatnonzero(np.isin(self.patient_index, [lookup[p] for p in patient_ids]))


def load_slices(
    data: Path | None, size: tuple[int, int], tmp: Path, cache_dir: Path | None = None
) -> Slices:
    """Slices of a kaggle_3m dataset at ``size`` (through the cache in ``cache_dir``, or the
    default one), or generated phantoms when ``data`` is None."""
    if data is None:
        side = max(SIZE_MULTIPLE, max(size) // SIZE_MULTIPLE * SIZE_MULTIPLE)
        was_quiet = con.state.quiet  # the cache of the export's own phantoms is no news
        con.configure(quiet=True)
        try:
            root = write_synthetic(tmp / "phantoms", patients=3, seed=0, size=side, slices=(8, 12))
            arrays = load_dataset(root, cache_dir=tmp / "cache")
        finally:
            con.configure(quiet=was_quiet)
        source = f"generated phantoms ({side}x{side})"
    else:
        arrays = load_dataset(data, cache_dir=cache_dir)
        source = str(data)
    own = arrays
    arrays = arrays.resized(size)
    return Slices(
        images=np.asarray(arrays.images).transpose(0, 2, 3, 1),
        masks=np.asarray(arrays.masks) != 0,
        patient_index=np.asarray(arrays.patient_index),
        slice_number=np.asarray(arrays.slice_number),
        patient_ids=list(arrays.patient_ids),
        source=source,
        phantoms=data is None,
        own_images=np.asarray(own.images).transpose(0, 2, 3, 1),
        own_masks=np.asarray(own.masks) != 0,
    )


def pick_rows(rows: np.ndarray, masks: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` rows, evenly spread, half of them with tumor when there are enough."""
    if len(rows) <= n:
        return rows
    tumor = rows[masks[rows].reshape(len(rows), -1).any(1)]
    k_t = min(len(tumor), n // 2)
    pick_t = tumor[np.linspace(0, len(tumor) - 1, k_t).round().astype(int)]
    rest = np.setdiff1d(rows, pick_t)
    pick_r = rest[np.linspace(0, len(rest) - 1, n - k_t).round().astype(int)]
    return np.sort(np.concatenate([pick_t, pick_r]))


def val_calib_patients(ids: list[str], split: Path | None) -> tuple[list[str], list[str]]:
    """(validation, calibration) patient ids: the split's val / train, else every fifth
    patient (sorted order) for validation and the rest for calibration."""
    if split is not None:
        sp = load_split(split)
        val = [p for p in sp.patients("val") if p in ids]
        cal = [p for p in sp.patients("train") if p in ids]
        if not val or not cal:
            raise BrainsegError(
                f"split {split} has no val or no train patients in the calibration data",
                hint="make the split from the same dataset: brainseg split DATA -o splits.yaml",
            )
        return val, cal
    ordered = sorted(ids)
    if len(ordered) < 2:
        return ordered, ordered
    val = ordered[::5] if len(ordered) >= 5 else ordered[:1]
    return val, [p for p in ordered if p not in val]


# --------------------------------------------------------------------------- running models
def open_cpu(path: Path, runtime: str | None = None, precision: str | None = None) -> Predictor:
    """The CPU Predictor ``brainseg predict`` opens for ``path``, with predict's load errors; an
    ONNX file runs with onnxruntime unless ``runtime`` says otherwise (the file is checked as
    written: OpenVINO's bf16 would change the logits it compares)."""
    if runtime is None and path.suffix.lower() == ".onnx":
        runtime = "onnxruntime"
    settings = InferenceSettings(
        device="cpu", batch_size=VERIFY_SLICES, runtime=runtime, precision=precision
    )
    return load_predictor([path], settings)


def logits(predictor: Predictor, images: np.ndarray, batch: int = VERIFY_SLICES) -> np.ndarray:
    """N x H x W x 3 uint8 -> N x H x W logits of the predictor's model; for an ensemble
    (several backends) the folds' logits combined as the merged ONNX graph does
    (:func:`brainseg.export.ensemble.ensemble_logits`)."""
    per_model = [_backend_logits(b, images, batch) for b in predictor.backends]
    return per_model[0] if len(per_model) == 1 else ensemble_logits(per_model)


def _backend_logits(backend: Any, images: np.ndarray, batch: int) -> np.ndarray:
    out = []
    for s in range(0, len(images), batch):
        x = np.ascontiguousarray(images[s : s + batch].transpose(0, 3, 1, 2), dtype=np.float32)
        if isinstance(backend, TorchBackend):
            torch = backend.torch
            with torch.inference_mode():
                t = torch.from_numpy(x).to(backend.device)
                if backend.channels_last:
                    t = t.contiguous(memory_format=torch.channels_last)
                out.append(backend.model(t)[:, 0].float().cpu().numpy())
        else:
            run = backend.session.run
            out.append(run([backend.output_name], {backend.input_name: x})[0][:, 0])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def _masks(prob: np.ndarray, post: PostSettings) -> np.ndarray:
    """The masks ``brainseg predict`` writes for model-size probabilities (per slice)."""
    size = (int(prob.shape[-2]), int(prob.shape[-1]))
    return postprocess.mask_from_output(prob, size, post.threshold, post.min_size)[1]


def compare_with_torch(
    reference: Path,
    variants: list[tuple[str, Path]],
    images: np.ndarray,
    post: PostSettings | None = None,
) -> list[dict[str, Any]]:
    """One row per ONNX file: max |Δlogit| at the model's size and a second size, the Dice
    agreement of its masks with PyTorch's (``reference``'s settings unless ``post`` is given),
    and its time per slice (``images`` at model size)."""
    size = (int(images.shape[1]), int(images.shape[2]))
    h2, w2 = size[0] + SECOND_SIZE_STEP[0], size[1] + SECOND_SIZE_STEP[1]  # dynamic axes
    images2 = np.stack([resize_image(im, (h2, w2)) for im in images[:3]])
    torch_model = open_cpu(reference)
    post = post or resolve(torch_model.metadata).post
    ref = logits(torch_model, images)
    ref2 = logits(torch_model, images2)
    ref_mask = _masks(torch_model.predict_model_size(images), post)
    checks = []
    for name, path in variants:
        onnx_model = open_cpu(path)
        t = time.perf_counter()
        prob = onnx_model.predict_model_size(images)
        ms = (time.perf_counter() - t) * 1000 / max(1, len(images))
        got = logits(onnx_model, images)
        got1 = logits(onnx_model, images[:1], batch=1)
        got2 = logits(onnx_model, images2, batch=3)
        if got.shape != ref.shape or got2.shape != ref2.shape or got1.shape[0] != 1:
            raise BrainsegRuntimeError(
                f"the {name} ONNX model returned shapes {got.shape} "
                f"/ {got2.shape}, expected {ref.shape} / {ref2.shape}"
            )
        checks.append(
            {
                "model": name,
                "size_mb": round(path.stat().st_size / 1e6, 2),
                "max_abs_diff": float(np.abs(got - ref).max()),
                "max_abs_diff_2nd_size": float(np.abs(got2 - ref2).max()),
                "second_size": [h2, w2],
                "mask_dice_vs_torch": metrics.dice(_masks(prob, post), ref_mask),
                "ms_per_slice": round(ms, 1),
            }
        )
    return checks


def int8_dice(
    fp32: Path, int8: Path, slices: Slices, val_ids: list[str], meta: dict[str, Any]
) -> dict[str, Any]:
    """Mean per-patient Dice of the fp32 and int8 files on the validation patients (the
    model's post-processing, :func:`brainseg.settings.resolve` of ``meta``, applied per
    patient: predict's per-slice mask, then the largest 3D component), at the model's size."""
    rows = slices.rows_of(val_ids)
    post = resolve(meta).post
    gt = slices.masks[rows]
    pidx = slices.patient_index[rows]
    masks = []
    for path in (fp32, int8):
        mask = _masks(open_cpu(path).predict_model_size(slices.images[rows]), post)
        if post.largest:
            mask = postprocess.largest_per_group(mask, pidx, slices.slice_number[rows])
        masks.append(mask)
    d32, d8 = (float(np.mean(metrics.per_patient_dice(m, gt, pidx))) for m in masks)
    return {
        "validation_patients": len(val_ids),
        "validation_patient_ids": sorted(val_ids),
        "validation_slices": len(rows),
        "patient_dice_fp32": d32,
        "patient_dice_int8": d8,
        "dice_loss": d32 - d8,
        "mask_dice_int8_vs_fp32": metrics.dice(masks[1], masks[0]),
        "within_tolerance": within_tolerance(d32 - d8),
        "tolerance": INT8_DICE_TOLERANCE,
    }


def precision_dice(
    fp32: Path, int8: Path, slices: Slices, val_ids: list[str], meta: dict[str, Any]
) -> dict[str, Any]:
    """What each precision costs in mean per-patient Dice at the images' own size (as eval
    and predict score it: probabilities resized back to each image, then the mask rule), on
    the validation patients: fp32 and int8 with onnxruntime, bf16 with OpenVINO where it is
    installed and the CPU has native bf16 (``--runtime openvino --precision bf16``)."""
    rows = slices.rows_of(val_ids)
    post = resolve(meta).post
    images, gt = slices.own_images[rows], slices.own_masks[rows]
    pidx, snum = slices.patient_index[rows], slices.slice_number[rows]
    runs: list[tuple[str, Path, str, str | None]] = [
        ("fp32", fp32, "onnxruntime", None),
        ("int8", int8, "onnxruntime", None),
    ]
    if runtimes._installed("openvino") and runtimes.native_bf16(runtimes.cpu_flags()):
        runs.append(("bf16", fp32, "openvino", "bf16"))
    dice: dict[str, float] = {}
    used: dict[str, str] = {}
    for name, path, runtime, precision in runs:
        predictor = open_cpu(path, runtime, precision)
        prob = predictor.predict_proba(images)
        mask = postprocess.apply(
            prob, post.threshold, post.min_size, post.largest, groups=pidx, order=snum
        )
        dice[name] = float(np.mean(metrics.per_patient_dice(mask, gt, pidx)))
        used[name] = predictor.runtime
    return {
        "size": [int(gt.shape[1]), int(gt.shape[2])],
        "patient_dice": dice,
        "dice_cost": {k: dice["fp32"] - v for k, v in dice.items() if k != "fp32"},
        "runtimes": used,
    }


def within_tolerance(delta: float, tolerance: float = INT8_DICE_TOLERANCE) -> bool:
    """Two-sided: a Dice that moved up by more than the tolerance moved too (|Δ| <= tol)."""
    return abs(delta) <= tolerance


def problems(checks: list[dict[str, Any]], int8: dict[str, Any] | None) -> list[str]:
    """What makes the export untrustworthy (warned loudly; ``--strict`` fails on them)."""
    found = [
        f"the {c['model']} ONNX masks agree with PyTorch's only {c['mask_dice_vs_torch']:.4f} "
        f"(Dice on the verification slices), below the floor {MASK_AGREEMENT_FLOOR}: "
        "this file does not segment like the checkpoint"
        for c in checks
        if c["mask_dice_vs_torch"] < MASK_AGREEMENT_FLOOR
    ]
    if int8 is None:
        return found
    d32, d8, delta = int8["patient_dice_fp32"], int8["patient_dice_int8"], int8["dice_loss"]
    if not int8["within_tolerance"]:
        moved = f"loses {delta:.4f}" if delta > 0 else f"gains {-delta:.4f}"
        found.append(
            f"int8 {moved} mean per-patient Dice on the validation patients ({d8:.4f} vs "
            f"fp32 {d32:.4f}), more than {INT8_DICE_TOLERANCE} either way: "
            "prefer the fp32 or fp16 export"
        )
    if int8["mask_dice_int8_vs_fp32"] < MASK_AGREEMENT_FLOOR:
        found.append(
            f"the int8 masks agree with the fp32 masks only {int8['mask_dice_int8_vs_fp32']:.4f} "
            f"(Dice on the validation patients), below the floor {MASK_AGREEMENT_FLOOR}"
        )
    return found
