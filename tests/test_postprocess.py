"""Post-processing: threshold, small 2D components removed, largest 3D component kept."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from brainseg.inference import postprocess as P


def test_binarize_default_threshold_is_inclusive() -> None:
    prob = np.array([[0.1, 0.49], [0.5, 0.9]], dtype=np.float32)
    np.testing.assert_array_equal(P.binarize(prob), [[False, False], [True, True]])
    np.testing.assert_array_equal(P.binarize(prob, 0.95), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="threshold"):
        P.binarize(prob, 1.5)


def test_remove_small_drops_components_below_min_size() -> None:
    m = np.zeros((10, 10), np.uint8)
    m[0:3, 0:3] = 1  # 9 px
    m[6:8, 6:8] = 1  # 4 px
    m[9, 0] = 1  # 1 px
    out = P.remove_small(m, 5)
    assert out.dtype == bool
    assert out.sum() == 9 and out[0:3, 0:3].all()
    assert P.remove_small(m, 4).sum() == 13  # exactly min_size is kept
    assert P.remove_small(m, 0).sum() == 14
    assert P.remove_small(m, 100).sum() == 0


def test_remove_small_uses_8_connectivity() -> None:
    m = np.zeros((5, 5), bool)
    m[0, 0] = m[1, 1] = m[2, 2] = True  # a diagonal line: one 3-pixel component
    assert P.remove_small(m, 3).sum() == 3


def test_remove_small_works_slice_by_slice() -> None:
    # The same 2x2 blob on three consecutive slices: 12 px in 3D, but 4 px per slice.
    v = np.zeros((3, 6, 6), bool)
    v[:, 2:4, 2:4] = True
    v[1, 0:3, 5] = True  # a 3 px component on slice 1 only
    out = P.remove_small(v, 4)
    assert out[:, 2:4, 2:4].all()
    assert not out[1, :, 5].any()
    assert P.remove_small(v, 5).sum() == 0


def test_keep_largest_3d_keeps_the_component_spanning_slices() -> None:
    v = np.zeros((4, 8, 8), bool)
    v[0:4, 1:3, 1:3] = True  # 4 slices x 4 px = 16 px, connected across slices
    v[1, 5:8, 5:8] = True  # 9 px on one slice: larger than any single slice of the first
    out = P.keep_largest_3d(v)
    assert out.sum() == 16
    assert out[:, 1:3, 1:3].all() and not out[1, 5:8, 5:8].any()


def test_keep_largest_3d_joins_diagonal_neighbours_across_slices() -> None:
    v = np.zeros((3, 6, 6), bool)
    v[0, 0, 0] = v[1, 1, 1] = v[2, 2, 2] = True  # 26-connected chain
    v[0, 5, 5] = v[0, 5, 4] = True  # 2 px
    assert P.keep_largest_3d(v).sum() == 3


def test_keep_largest_3d_matches_a_plain_labelling() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(3)
    for _ in range(10):
        v = np.zeros((6, 20, 20), bool)
        v[1:5, 4:16, 3:15] = rng.random((4, 12, 12)) > 0.6
        labels, _ = ndimage.label(v, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        expected = labels == np.argmax(sizes)
        np.testing.assert_array_equal(P.keep_largest_3d(v), expected)


def test_keep_largest_3d_empty_stays_empty() -> None:
    v = np.zeros((2, 4, 4), np.uint8)
    out = P.keep_largest_3d(v)
    assert out.dtype == bool and not out.any()


def test_apply_thresholds_then_filters() -> None:
    prob = np.zeros((3, 10, 10), np.float32)
    prob[:, 2:5, 2:5] = 0.8  # 27 px over 3 slices
    prob[1, 8:10, 8:10] = 0.6  # 4 px
    prob[2, 0, 9] = 0.4  # below threshold
    assert P.apply(prob).sum() == 31
    assert P.apply(prob, threshold=0.3).sum() == 32
    assert P.apply(prob, min_size=5).sum() == 27
    assert P.apply(prob, threshold=0.3, largest=True).sum() == 27
    assert P.apply(prob, threshold=0.7).sum() == 27


def test_apply_with_groups_never_joins_two_patients() -> None:
    prob = np.zeros((4, 6, 6), np.float32)
    prob[0:2, 0:2, 0:2] = 0.9  # patient 0: 8 px
    prob[1, 4:6, 4:6] = 0.9  # patient 0: a 4 px component
    prob[2:4, 0:3, 0:3] = 0.9  # patient 1: 18 px, would win if patients were merged
    groups = np.array([0, 0, 1, 1])
    out = P.apply(prob, largest=True, groups=groups)
    assert out[0:2, 0:2, 0:2].all() and not out[1, 4:6, 4:6].any()
    assert out[2:4].sum() == 18


def test_largest_per_group_orders_slices_by_number() -> None:
    # Slices of one patient given out of order: 0 and 2 only touch through slice 1.
    m = np.zeros((3, 4, 4), bool)
    m[0, 0, 0] = True  # slice number 1
    m[1, 3, 3] = True  # slice number 3 (alone, touches nothing)
    m[2, 0, 1] = True  # slice number 2: joins slice 1
    out = P.largest_per_group(m, np.zeros(3, int), order=np.array([1, 3, 2]))
    assert out[0, 0, 0] and out[2, 0, 1] and not out[1, 3, 3]


def test_postprocess_does_not_import_torch() -> None:
    code = (
        "import sys, "
        "brainseg.inference.postprocess, brainseg.evaluation.metrics; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
