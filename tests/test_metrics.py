"""Metrics on hand-computed cases, the empty-mask policy, and per-patient Dice on real masks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from brainseg.evaluation import metrics as M


def _mask(shape: tuple[int, ...], *points: tuple[int, ...]) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    for pt in points:
        m[pt] = True
    return m


# ----------------------------------------------------------------- hand-computed overlap


def test_overlap_metrics_on_a_hand_computed_case() -> None:
    # pred: 4 pixels, gt: 6 pixels, overlap 3 -> TP 3, FP 1, FN 3, TN 100 - 7 = 93
    pred = np.zeros((10, 10), np.uint8)
    gt = np.zeros((10, 10), np.uint8)
    pred[0, 0:4] = 1
    gt[0, 1:4] = 1
    gt[1, 1:4] = 1
    assert M.dice(pred, gt) == pytest.approx(2 * 3 / (4 + 6))
    assert M.overlap(pred, gt)["iou"] == pytest.approx(3 / 7)
    assert M.overlap(pred, gt)["precision"] == pytest.approx(3 / 4)
    assert M.overlap(pred, gt)["recall"] == pytest.approx(3 / 6)
    assert M.overlap(pred, gt)["specificity"] == pytest.approx(93 / 94)


def test_identical_one_pixel_masks_are_perfect() -> None:
    a = _mask((5, 5), (2, 3))
    assert M.dice(a, a) == 1.0
    for value in M.overlap(a, a).values():  # dice, iou, precision, recall, specificity
        assert value == 1.0
    assert M.hd95(a, a) == 0.0


def test_disjoint_one_pixel_masks() -> None:
    a, b = _mask((5, 5), (0, 0)), _mask((5, 5), (4, 4))
    assert M.dice(a, b) == 0.0
    assert M.overlap(a, b)["iou"] == 0.0
    assert M.overlap(a, b)["precision"] == 0.0
    assert M.overlap(a, b)["recall"] == 0.0
    assert M.overlap(a, b)["specificity"] == pytest.approx(23 / 24)


def test_both_empty_counts_as_correct() -> None:
    e = np.zeros((4, 4), bool)
    assert M.dice(e, e) == 1.0
    assert M.overlap(e, e)["iou"] == 1.0
    assert M.overlap(e, e)["precision"] == 1.0
    assert M.overlap(e, e)["recall"] == 1.0
    assert M.overlap(e, e)["specificity"] == 1.0
    assert math.isnan(M.hd95(e, e))


def test_empty_prediction_on_a_tumor_scores_zero() -> None:
    e = np.zeros((4, 4), bool)
    g = _mask((4, 4), (1, 1), (1, 2))
    assert M.dice(e, g) == 0.0
    assert M.overlap(e, g)["iou"] == 0.0
    assert M.overlap(e, g)["precision"] == 0.0  # empty denominator, truth not empty -> 0
    assert M.overlap(e, g)["recall"] == 0.0
    assert M.overlap(e, g)["specificity"] == 1.0
    assert math.isnan(M.hd95(e, g))


def test_false_alarm_on_an_empty_slice_scores_zero() -> None:
    e = np.zeros((4, 4), bool)
    p = _mask((4, 4), (3, 3))
    assert M.dice(p, e) == 0.0
    assert M.overlap(p, e)["precision"] == 0.0
    assert M.overlap(p, e)["recall"] == 0.0  # empty denominator, prediction not empty -> 0
    assert M.overlap(p, e)["specificity"] == pytest.approx(15 / 16)
    assert math.isnan(M.hd95(p, e))


def test_specificity_without_negatives_is_one() -> None:
    full = np.ones((3, 3), bool)
    assert M.overlap(full, full)["specificity"] == 1.0
    assert M.overlap(np.zeros((3, 3), bool), full)["specificity"] == 1.0


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        M.dice(np.zeros((3, 3)), np.zeros((3, 4)))


# ----------------------------------------------------------------- HD95


@pytest.mark.parametrize(
    ("a", "b", "dist"),
    [
        ((2, 2), (2, 7), 5.0),
        ((0, 0), (3, 4), 5.0),
        ((9, 9), (0, 0), math.hypot(9, 9)),
    ],
)
def test_hd95_of_two_single_pixels_is_their_distance(
    a: tuple[int, int], b: tuple[int, int], dist: float
) -> None:
    assert M.hd95(_mask((10, 10), a), _mask((10, 10), b)) == pytest.approx(dist)


def test_hd95_3d_counts_the_slice_axis_in_pixels() -> None:
    a = _mask((6, 8, 8), (0, 1, 1))
    b = _mask((6, 8, 8), (4, 1, 4))
    assert M.hd95(a, b) == pytest.approx(5.0)


def test_hd95_of_a_shifted_square() -> None:
    # A 5x5 square and the same square shifted by 3 columns: every boundary point of one
    # is at most 3 pixels from the other's boundary, and the far edge is exactly 3 away.
    a = np.zeros((20, 20), bool)
    b = np.zeros((20, 20), bool)
    a[5:10, 5:10] = True
    b[5:10, 8:13] = True
    d = M.hd95(a, b)
    assert 2.0 <= d <= 3.0
    # ... and symmetric
    assert M.hd95(b, a) == pytest.approx(d)


def test_hd95_uses_boundaries_not_interiors() -> None:
    # A filled 9x9 square vs its own boundary ring: same boundary -> distance 0.
    a = np.zeros((12, 12), bool)
    a[1:10, 1:10] = True
    ring = a.copy()
    ring[2:9, 2:9] = False
    assert M.hd95(a, ring) == 0.0


def test_hd95_does_not_depend_on_cropping() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.random((30, 30)) > 0.8
        b = rng.random((30, 30)) > 0.8
        big_a = np.zeros((90, 90), bool)
        big_b = np.zeros((90, 90), bool)
        big_a[30:60, 30:60] = a
        big_b[30:60, 30:60] = b
        assert M.hd95(a, b) == pytest.approx(M.hd95(big_a, big_b))


# ----------------------------------------------------------------- evaluate / Report


def _two_patient_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Patient A: 3 slices (tumor in slices 1 and 2); patient B: 2 slices, no tumor."""
    gt = np.zeros((5, 8, 8), bool)
    pred = np.zeros((5, 8, 8), bool)
    # A slice 0: both empty. A slice 1: gt 4 px, pred same 4 px. A slice 2: gt 2 px, pred 0.
    gt[1, 2:4, 2:4] = True
    pred[1, 2:4, 2:4] = True
    gt[2, 0, 0:2] = True
    # B slice 0: false alarm of one pixel at (7, 7); B slice 1: both empty.
    pred[3, 7, 7] = True
    pidx = np.array([0, 0, 0, 1, 1])
    snum = np.array([1, 2, 3, 1, 2])
    return pred, gt, pidx, snum, ["A", "B"]


def test_evaluate_per_slice_per_patient_global_and_detection() -> None:
    pred, gt, pidx, snum, ids = _two_patient_case()
    r = M.evaluate(pred, gt, pidx, snum, ids)
    assert [row["dice"] for row in r.per_slice] == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert [row["patient_id"] for row in r.per_slice] == ["A", "A", "A", "B", "B"]
    assert [row["gt_pixels"] for row in r.per_slice] == [0, 4, 2, 0, 0]
    hd = [row["hd95"] for row in r.per_slice]
    assert hd[1] == 0.0 and all(math.isnan(h) for h in hd[0:1] + hd[2:])

    a, b = r.per_patient
    assert a["patient_id"] == "A" and b["patient_id"] == "B"
    assert a["dice"] == pytest.approx(2 * 4 / (4 + 6))
    assert a["recall"] == pytest.approx(4 / 6)
    assert a["precision"] == 1.0
    assert a["slices"] == 3 and a["tumor_slices"] == 2
    assert b["dice"] == 0.0 and math.isnan(b["hd95"])

    assert r.global_metrics["dice"] == pytest.approx(2 * 4 / (5 + 6))
    assert r.global_metrics["precision"] == pytest.approx(4 / 5)
    assert r.detection["tp"] == 1 and r.detection["fn"] == 1
    assert r.detection["fp"] == 1 and r.detection["tn"] == 2
    assert r.detection["sensitivity"] == pytest.approx(0.5)
    assert r.detection["specificity"] == pytest.approx(2 / 3)
    assert r.counts == {"slices": 5, "patients": 2, "tumor_slices": 2, "tumor_patients": 1}


def test_a_patient_without_tumor_and_without_prediction_has_dice_one() -> None:
    pred, gt, pidx, snum, ids = _two_patient_case()
    pred[3] = False
    r = M.evaluate(pred, gt, pidx, snum, ids)
    assert r.per_patient[1]["dice"] == 1.0
    assert r.per_patient[1]["iou"] == 1.0
    assert r.detection["specificity"] == 1.0


def test_summary_statistics_and_hd95_skipped_counts() -> None:
    pred, gt, pidx, snum, ids = _two_patient_case()
    s = M.evaluate(pred, gt, pidx, snum, ids).summary()
    assert set(s) == {
        "per_patient",
        "per_slice_tumor",
        "per_slice_all",
        "global",
        "detection",
        "hd95_skipped",
        "counts",
    }
    all_dice = s["per_slice_all"]["dice"]
    assert all_dice["mean"] == pytest.approx(3 / 5)
    assert all_dice["median"] == 1.0
    assert all_dice["min"] == 0.0
    assert all_dice["std"] == pytest.approx(np.std([1, 1, 0, 0, 1]))
    assert all_dice["n"] == 5
    tumor = s["per_slice_tumor"]["dice"]
    assert tumor["mean"] == pytest.approx(0.5) and tumor["n"] == 2
    pp = s["per_patient"]["dice"]
    assert pp["mean"] == pytest.approx((0.8 + 0.0) / 2)
    assert pp["min"] == 0.0
    # HD95: defined only for slice 1 and patient A
    assert s["per_slice_all"]["hd95"]["n"] == 1
    assert s["hd95_skipped"] == {"per_patient": 1, "per_slice_tumor": 1, "per_slice_all": 4}
    assert s["per_patient"]["hd95"]["mean"] == pytest.approx(M.hd95(pred[:3], gt[:3]))


def test_patient_volume_is_stacked_in_slice_number_order() -> None:
    # Same slices given out of order must give the same 3D HD95 as in order.
    rng = np.random.default_rng(1)
    gt = rng.random((6, 16, 16)) > 0.7
    pred = rng.random((6, 16, 16)) > 0.7
    snum = np.arange(1, 7)
    perm = rng.permutation(6)
    ordered = M.evaluate(pred, gt, np.zeros(6, int), snum, ["P"])
    shuffled = M.evaluate(pred[perm], gt[perm], np.zeros(6, int), snum[perm], ["P"])
    assert shuffled.per_patient[0]["hd95"] == pytest.approx(ordered.per_patient[0]["hd95"])
    assert ordered.per_patient[0]["hd95"] == pytest.approx(M.hd95(pred, gt))


def test_describe_skips_nan_and_handles_all_nan() -> None:
    d = M.describe([1.0, math.nan, 3.0])
    assert d == {"mean": 2.0, "median": 2.0, "std": 1.0, "min": 1.0, "n": 2}
    e = M.describe([math.nan])
    assert e["n"] == 0 and math.isnan(e["mean"])


def test_per_patient_dice_matches_evaluate() -> None:
    pred, gt, pidx, snum, ids = _two_patient_case()
    fast = M.per_patient_dice(pred, gt, pidx)
    slow = [r["dice"] for r in M.evaluate(pred, gt, pidx, snum, ids).per_patient]
    np.testing.assert_allclose(fast, slow)


def test_evaluate_rejects_bad_indices() -> None:
    pred, gt, pidx, snum, ids = _two_patient_case()
    with pytest.raises(ValueError, match="one entry per slice"):
        M.evaluate(pred, gt, pidx[:3], snum, ids)
    with pytest.raises(ValueError, match="out of range"):
        M.evaluate(pred, gt, pidx + 5, snum, ids)


def test_evaluate_on_many_slices() -> None:
    # A larger stack: every row is present and consistent.
    rng = np.random.default_rng(2)
    n = 120
    gt = np.zeros((n, 64, 64), bool)
    gt[::3, 20:30, 20:30] = True
    pred = gt.copy()
    pred[::6] = np.roll(pred[::6], 2, axis=2)
    pred[1::9, 0:2, 0:2] = rng.random((len(range(1, n, 9)), 2, 2)) > 0.5
    pidx = np.repeat(np.arange(6), n // 6)
    snum = np.tile(np.arange(n // 6), 6)
    r = M.evaluate(pred, gt, pidx, snum, [f"p{i}" for i in range(6)])
    assert len(r.per_slice) == n and len(r.per_patient) == 6
    shifted = r.per_slice[0]
    assert shifted["dice"] == pytest.approx(2 * 80 / 200)
    assert shifted["hd95"] == pytest.approx(2.0)


# ----------------------------------------------------------------- real data


def _read_real_patients(
    root: Path, n_patients: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    import re

    import tifffile

    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("TCGA_"))
    masks, pidx, snum, ids = [], [], [], []
    for j, folder in enumerate(folders[:n_patients]):
        ids.append(folder.name)
        for f in folder.glob("*_mask.tif"):
            num = int(re.search(r"_(\d+)_mask\.tif$", f.name).group(1))  # type: ignore[union-attr]
            m = tifffile.imread(f)
            masks.append(np.asarray(m).reshape(m.shape[0], m.shape[1], -1)[..., 0] > 0)
            pidx.append(j)
            snum.append(num)
    return np.stack(masks), np.array(pidx), np.array(snum), ids


@pytest.mark.realdata
def test_per_patient_dice_on_real_masks_matches_plain_numpy(real_data: Path) -> None:
    from scipy import ndimage

    gt, pidx, snum, ids = _read_real_patients(real_data)
    assert gt.any()
    st = ndimage.generate_binary_structure(2, 1)[None]  # per slice
    pred = gt.copy()
    pred[0::2] = ndimage.binary_dilation(gt[0::2], structure=st, iterations=2)
    pred[1::2] = ndimage.binary_erosion(gt[1::2], structure=st, iterations=2)

    r = M.evaluate(pred, gt, pidx, snum, ids)
    for j, row in enumerate(r.per_patient):
        a, b = pred[pidx == j], gt[pidx == j]
        inter = np.logical_and(a, b).sum()
        denom = a.sum() + b.sum()
        expected = 1.0 if denom == 0 else 2.0 * inter / denom
        assert row["patient_id"] == ids[j]
        assert row["dice"] == pytest.approx(expected, abs=1e-12)
        assert row["slices"] == int((pidx == j).sum())
    # the perturbation is not a no-op and keeps the Dice high but below 1
    tumor_rows = [row for row in r.per_patient if row["gt_pixels"] > 0]
    assert tumor_rows and all(0.5 < row["dice"] < 1.0 for row in tumor_rows)
    # per-slice Dice against plain numpy too
    for i in range(0, len(gt), 7):
        a, b = pred[i], gt[i]
        denom = a.sum() + b.sum()
        expected = 1.0 if denom == 0 else 2.0 * np.logical_and(a, b).sum() / denom
        assert r.per_slice[i]["dice"] == pytest.approx(expected, abs=1e-12)
