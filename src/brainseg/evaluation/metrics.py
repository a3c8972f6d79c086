"""Segmentation metrics for binary masks: per slice, per patient (Buda et al.) and global.

numpy + scipy only (no torch), so evaluation and the ONNX path can use it. The empty-mask
policy is explicit (see docs/metrics.md):

- Dice, IoU: both masks empty -> 1.0 (a correct "no tumor"); one empty -> 0.0.
- precision = TP / (TP + FP), recall = TP / (TP + FN): when the denominator is zero the
  value is 1.0 if prediction and ground truth are both empty, else 0.0 (the same rule as
  Dice, so a missed tumor or a false alarm on an empty slice scores 0 everywhere).
- specificity = TN / (TN + FP): 1.0 when the ground truth has no negative pixel.
- HD95 (pixels): NaN when either mask is empty; NaN values are skipped by the summaries,
  which report how many were skipped.
- Slice detection sensitivity / specificity: NaN when there is no slice of that class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

#: Metrics computed for every slice and every patient (in this column order).
METRICS: tuple[str, ...] = ("dice", "iou", "precision", "recall", "specificity", "hd95")
#: The counts columns of a per-patient table (eval's per_patient.csv, cv's, score's).
PATIENT_COUNTS = ["slices", "tumor_slices", "gt_pixels", "pred_pixels"]
#: eval's per_patient.csv.
PATIENT_COLUMNS = ["patient_id", *PATIENT_COUNTS, "tp", "fp", "fn", *METRICS]
#: cv's per_patient.csv: the fold, the institution and the Dice before post-processing beside
#: eval's counts and metrics.
CV_PATIENT_COLUMNS = ["patient_id", "fold", "institution", *PATIENT_COUNTS, "dice_before", *METRICS]
#: The overlap metrics that the pooled (global) evaluation reports.
OVERLAP_METRICS: tuple[str, ...] = ("dice", "iou", "precision", "recall", "specificity")


# --------------------------------------------------------------------------- counts
def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground truth shape {g.shape}")
    return p, g


def _ratio(num: ArrayLike, den: ArrayLike, both_empty: ArrayLike) -> np.ndarray:
    """num / den, and where den == 0: 1.0 if both masks are empty else 0.0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.where(both_empty, 1.0, 0.0)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _metrics_from_counts(
    tp: ArrayLike, fp: ArrayLike, fn: ArrayLike, tn: ArrayLike
) -> dict[str, np.ndarray]:
    """Vectorised overlap metrics from confusion counts, with the empty-mask policy."""
    tp, fp, fn, tn = (np.asarray(x, dtype=np.int64) for x in (tp, fp, fn, tn))
    both_empty = (tp + fp + fn) == 0
    spec = np.ones(np.shape(tn), dtype=np.float64)
    den = tn + fp
    np.divide(tn, den, out=spec, where=den > 0)
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "precision": _ratio(tp, tp + fp, both_empty),
        "recall": _ratio(tp, tp + fn, both_empty),
        "specificity": spec,
    }


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice = 2|A∩B| / (|A| + |B|); 1.0 when both are empty."""
    return overlap(pred, gt)["dice"]


def dice_from_counts(intersection: ArrayLike, pred_sum: ArrayLike, gt_sum: ArrayLike) -> np.ndarray:
    """Dice from pixel tallies (vectorised; e.g. summed over ranks): 1.0 where both are empty."""
    inter = np.asarray(intersection, dtype=np.float64)
    den = np.asarray(pred_sum, dtype=np.float64) + np.asarray(gt_sum, dtype=np.float64)
    return _ratio(2 * inter, den, den == 0)


def overlap(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Dice, IoU, precision, recall and specificity of one pair of masks (the policy above)."""
    p, g = _check_pair(pred, gt)
    tp, fp, fn, tn = _slice_counts(p.reshape(1, -1), g.reshape(1, -1))
    return overlap_from_counts(int(tp[0]), int(fp[0]), int(fn[0]), int(tn[0]))


# --------------------------------------------------------------------------- HD95
def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels: mask pixels with a face neighbour (4 in 2D, 6 in 3D) outside it (or
    on the array border: outside the array is background)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _hd95_bool(p: np.ndarray, g: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """HD95 of two non-empty boolean arrays (the caller checks emptiness)."""
    d_to_g, d_to_p = _surface_distances(p, g, spacing)
    return float(max(np.percentile(d_to_g, 95), np.percentile(d_to_p, 95)))


def _surface_distances(
    p: np.ndarray, g: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances of each boundary pixel of ``p`` to the boundary of ``g``, and the other way
    (in pixels, or in the units of ``spacing``: one value per axis, e.g. mm)."""
    # Crop to the joint bounding box plus one pixel of margin: the erosion sees the same
    # neighbourhood as in the full array, and every surface pixel lies inside the crop, so
    # the Euclidean distance transform inside the crop is exact.
    box = ndimage.find_objects((p | g).astype(np.uint8))[0]
    crop = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
    pc, gc = p[crop], g[crop]
    sp, sg = _surface(pc), _surface(gc)
    # distance_transform_edt gives each pixel's distance to the nearest zero: zeros = surface.
    sampling = None if spacing is None else [float(v) for v in spacing]
    d_to_g = ndimage.distance_transform_edt(~sg, sampling=sampling)[sp]
    d_to_p = ndimage.distance_transform_edt(~sp, sampling=sampling)[sg]
    return d_to_g, d_to_p


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> Sequence[float] | None:
    if spacing is None:
        return None
    s = [float(v) for v in np.atleast_1d(np.asarray(spacing, dtype=np.float64))]
    if len(s) != ndim or not all(math.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"spacing {spacing!r} must be {ndim} positive numbers (one per axis)")
    return s


def hd95(pred: np.ndarray, gt: np.ndarray, *, spacing: Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the mask boundaries (MONAI's
    definition), in pixels or in the units of ``spacing`` (the voxel size along each axis, e.g.
    mm); a 2D slice or a 3D stack of slices. NaN when either mask is empty."""
    p, g = _check_pair(pred, gt)
    sp = _check_spacing(spacing, p.ndim)
    if not p.any() or not g.any():
        return math.nan
    return _hd95_bool(p, g, sp)


def surface_dice(
    pred: np.ndarray,
    gt: np.ndarray,
    tolerance_mm: float,
    spacing: Sequence[float] | None = None,
) -> float:
    """Normalised surface Dice (NSD): the share of both boundaries' pixels within the tolerance
    of the other, counting pixels (MONAI's ``compute_surface_dice``, not DeepMind's surfel
    areas), in the units of ``spacing`` (else pixels).
    Empty masks follow the Dice policy: both empty 1.0, one empty 0.0."""
    p, g = _check_pair(pred, gt)
    sp = _check_spacing(spacing, p.ndim)
    tol = float(tolerance_mm)  # checked where it is read (score's --tolerance)
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p or not has_g:
        return 1.0 if has_p == has_g else 0.0
    d_to_g, d_to_p = _surface_distances(p, g, sp)
    within = int(np.count_nonzero(d_to_g <= tol)) + int(np.count_nonzero(d_to_p <= tol))
    return within / float(d_to_g.size + d_to_p.size)


def overlap_from_counts(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """Dice, IoU, precision, recall, specificity of pooled counts (the empty-mask policy)."""
    return {m: float(v) for m, v in _metrics_from_counts(tp, fp, fn, tn).items()}


# --------------------------------------------------------------------------- summaries
def describe(values: Sequence[float] | np.ndarray) -> dict[str, float | int]:
    """mean / median / std (population, ddof=0) / min of the finite values, and their count
    (NaN skipped; with no finite value every statistic is NaN and ``n`` is 0)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": math.nan, "median": math.nan, "std": math.nan, "min": math.nan, "n": 0}
    return {
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "std": float(v.std()),
        "min": float(v.min()),
        "n": int(v.size),
    }


# --------------------------------------------------------------------------- report
@dataclass
class Report:
    """The result of :func:`evaluate`: one dict per slice / patient (the CSV columns), the
    metrics of all pixels pooled and the slice-level tumor detection."""

    per_slice: list[dict[str, Any]]
    per_patient: list[dict[str, Any]]
    global_metrics: dict[str, float]
    detection: dict[str, float | int]
    counts: dict[str, int] = field(default_factory=dict)

    def column(self, rows: str, name: str, *, tumor_only: bool = False) -> np.ndarray:
        """One column of ``per_slice`` or ``per_patient`` as a float array (``tumor_only``:
        of the rows whose ground truth has tumor)."""
        table = self.per_slice if rows == "per_slice" else self.per_patient
        keep = [r for r in table if not tumor_only or r["gt_pixels"] > 0]
        return np.array([r[name] for r in keep], dtype=np.float64)

    def summary(self) -> dict[str, Any]:
        """Statistics per metric for per-patient and per-slice (tumor slices / all slices);
        ``hd95_skipped`` counts the NaN HD95s (an empty mask on either side)."""
        groups = {
            "per_patient": ("per_patient", False),
            "per_slice_tumor": ("per_slice", True),
            "per_slice_all": ("per_slice", False),
        }
        out: dict[str, Any] = {}
        skipped: dict[str, int] = {}
        for key, (rows, tumor_only) in groups.items():
            out[key] = {m: describe(self.column(rows, m, tumor_only=tumor_only)) for m in METRICS}
            hd = self.column(rows, "hd95", tumor_only=tumor_only)
            skipped[key] = int(np.count_nonzero(~np.isfinite(hd)))
        out["global"] = dict(self.global_metrics)
        out["detection"] = dict(self.detection)
        out["hd95_skipped"] = skipped
        out["counts"] = dict(self.counts)
        return out


def _slice_counts(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-slice (TP, FP, FN, TN) of N x H x W boolean stacks, as int64 arrays."""
    pf, gf = p.reshape(len(p), -1), g.reshape(len(g), -1)
    tp = np.count_nonzero(pf & gf, axis=1).astype(np.int64)
    n_p = np.count_nonzero(pf, axis=1).astype(np.int64)
    n_g = np.count_nonzero(gf, axis=1).astype(np.int64)
    fp, fn = n_p - tp, n_g - tp
    tn = pf.shape[1] - tp - fp - fn
    return tp, fp, fn, tn


def _rate(num: int, den: int) -> float:
    return num / den if den > 0 else math.nan


def detection(pred_positive: np.ndarray, gt_positive: np.ndarray) -> dict[str, float | int]:
    """Slice-level tumor detection (a slice is predicted positive when it has any pixel);
    a rate is NaN when there is no slice of its class."""
    pp, gp = np.asarray(pred_positive, bool), np.asarray(gt_positive, bool)
    tp = int(np.count_nonzero(pp & gp))
    fp = int(np.count_nonzero(pp & ~gp))
    fn = int(np.count_nonzero(~pp & gp))
    tn = int(np.count_nonzero(~pp & ~gp))
    return {
        "sensitivity": _rate(tp, tp + fn),
        "specificity": _rate(tn, tn + fp),
        "accuracy": _rate(tp + tn, tp + fp + fn + tn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def evaluate(
    pred: np.ndarray,
    gt: np.ndarray,
    patient_index: np.ndarray,
    slice_number: np.ndarray,
    patient_ids: Sequence[str],
    *,
    compute_hd95: bool = True,
) -> Report:
    """Evaluate N x H x W binary predictions against the truth, per slice, per patient (its
    slices stacked in ``slice_number`` order) and globally; ``compute_hd95=False``: HD95 NaN
    (fast)."""
    p, g = _check_pair(pred, gt)
    if p.ndim != 3:
        raise ValueError(f"expected N x H x W masks, got shape {p.shape}")
    n = p.shape[0]
    pidx = np.asarray(patient_index, dtype=np.int64).reshape(-1)
    snum = np.asarray(slice_number, dtype=np.int64).reshape(-1)
    if pidx.shape[0] != n or snum.shape[0] != n:
        raise ValueError(
            f"patient_index ({pidx.shape[0]}) and slice_number ({snum.shape[0]}) "
            f"must have one entry per slice ({n})"
        )
    if n and (pidx.min() < 0 or pidx.max() >= len(patient_ids)):
        raise ValueError("patient_index out of range of patient_ids")

    tp, fp, fn, tn = _slice_counts(p, g)
    s_metrics = _metrics_from_counts(tp, fp, fn, tn)
    n_pred = tp + fp
    n_gt = tp + fn
    s_hd = np.full(n, math.nan)
    if compute_hd95:
        for both in np.flatnonzero((n_pred > 0) & (n_gt > 0)):
            s_hd[both] = _hd95_bool(p[both], g[both])

    per_slice = [
        {
            "patient_id": patient_ids[pidx[i]],
            "slice_number": int(snum[i]),
            "gt_pixels": int(n_gt[i]),
            "pred_pixels": int(n_pred[i]),
            "tp": int(tp[i]),
            "fp": int(fp[i]),
            "fn": int(fn[i]),
            **{m: float(s_metrics[m][i]) for m in OVERLAP_METRICS},
            "hd95": float(s_hd[i]),
        }
        for i in range(n)
    ]

    # Per patient: the slices stacked into one volume; counts add up across slices.
    present = np.unique(pidx)
    k = len(patient_ids)
    sums = [np.bincount(pidx, weights=x, minlength=k).astype(np.int64) for x in (tp, fp, fn, tn)]
    p_metrics = _metrics_from_counts(*sums)
    n_slices = np.bincount(pidx, minlength=k)
    n_tumor_slices = np.bincount(pidx, weights=(n_gt > 0), minlength=k).astype(np.int64)
    per_patient = []
    for j in present:
        hd = math.nan
        if compute_hd95 and sums[0][j] + sums[1][j] > 0 and sums[0][j] + sums[2][j] > 0:
            rows = np.flatnonzero(pidx == j)
            rows = rows[np.argsort(snum[rows], kind="stable")]
            hd = _hd95_bool(p[rows], g[rows])
        per_patient.append(
            {
                "patient_id": patient_ids[j],
                "slices": int(n_slices[j]),
                "tumor_slices": int(n_tumor_slices[j]),
                "gt_pixels": int(sums[0][j] + sums[2][j]),
                "pred_pixels": int(sums[0][j] + sums[1][j]),
                "tp": int(sums[0][j]),
                "fp": int(sums[1][j]),
                "fn": int(sums[2][j]),
                **{m: float(p_metrics[m][j]) for m in OVERLAP_METRICS},
                "hd95": hd,
            }
        )

    return report_from_rows(per_slice, per_patient, int(p.size))


def report_from_rows(
    per_slice: list[dict[str, Any]], per_patient: list[dict[str, Any]], pixels: int
) -> Report:
    """The :class:`Report` of per-slice and per-patient rows (of one evaluation, or of several
    joined: patients of different sizes): the pooled metrics add up the patients' counts (the
    true negatives are the rest of the ``pixels`` scored), detection reads the slices'."""
    tp, fp, fn = (sum(int(r[k]) for r in per_patient) for k in ("tp", "fp", "fn"))
    pred_pos = np.array([r["pred_pixels"] > 0 for r in per_slice], dtype=bool)
    gt_pos = np.array([r["gt_pixels"] > 0 for r in per_slice], dtype=bool)
    counts = {
        "slices": len(per_slice),
        "patients": len(per_patient),
        "tumor_slices": int(gt_pos.sum()),
        "tumor_patients": sum(1 for r in per_patient if r["gt_pixels"] > 0),
    }
    return Report(
        per_slice=per_slice,
        per_patient=per_patient,
        global_metrics=overlap_from_counts(tp, fp, fn, pixels - tp - fp - fn),
        detection=detection(pred_pos, gt_pos),
        counts=counts,
    )


def per_patient_dice(
    pred: np.ndarray, gt: np.ndarray, patient_index: np.ndarray, n_patients: int | None = None
) -> np.ndarray:
    """Dice of each patient's stacked volume (both empty -> 1), for fast tuning loops: one
    value per patient index that occurs in ``patient_index`` (sorted order)."""
    p, g = _check_pair(pred, gt)
    tp, fp, fn, _ = _slice_counts(p, g)
    pidx = np.asarray(patient_index, dtype=np.int64)
    k = int(n_patients if n_patients is not None else (pidx.max() + 1 if pidx.size else 0))
    inter, fp_sum, fn_sum = (np.bincount(pidx, weights=x, minlength=k) for x in (tp, fp, fn))
    return dice_from_counts(inter, inter + fp_sum, inter + fn_sum)[np.unique(pidx)]
