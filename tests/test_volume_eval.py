"""`brainseg eval MODEL CASES` on volumes (predict + score in one), and volume paths on stdin."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _tiny import tiny_onnx
from _volkit import blob_volume, csv_rows, read_volume, save_case, save_nifti

pytest.importorskip("nibabel")

#: The tiny model marks the 16 x 16 x 3 FLAIR blob of blob_volume (rows 20:36, cols 24:40).
PRED_VOXELS = 16 * 16 * 3
#: The truth is the blob moved two columns: 16 x 14 x 3 voxels overlap.
DICE = 2 * (16 * 14 * 3) / (PRED_VOXELS + PRED_VOXELS)


def _truth(shape: tuple[int, ...]) -> np.ndarray:
    seg = np.zeros(shape[:3], np.uint8)
    seg[20:36, 26:42, 1:4] = 1
    return seg


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return tiny_onnx(tmp_path / "tiny.onnx", image_size=64)


@pytest.fixture
def cases(tmp_path: Path) -> Path:
    """cases/A/ (three 3D contrasts + A_seg) and cases/B.nii.gz (4D) + cases/B_seg.nii.gz."""
    top = tmp_path / "cases"
    v = blob_volume(0)
    save_case(top / "A", "A", v)
    save_nifti(top / "A" / "A_seg.nii.gz", _truth(v.shape))
    w = blob_volume(1)
    save_nifti(top / "B.nii.gz", w)
    save_nifti(top / "B_seg.nii.gz", _truth(w.shape))
    return top


def test_eval_on_volume_cases_scores_exactly_the_masks_predict_writes(vol_run, tiny, cases):
    r = vol_run(["eval", tiny, cases, "--json"])
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["mode"] == "volumes" and summary["counts"]["patients"] == 2
    assert summary["per_patient"]["dice"]["mean"] == pytest.approx(DICE)
    assert summary["surface"]["unit"] == "mm"
    # two columns of 0.5 mm: the HD95 of a 2-column shift is 1 mm
    assert summary["surface"]["hd95"]["mean"] == pytest.approx(1.0)
    run_dir = Path("runs/eval/exp")
    rows = {row["patient_id"]: row for row in csv_rows(run_dir / "per_patient.csv")}
    assert sorted(rows) == ["A", "B"]
    assert all(float(row["dice"]) == pytest.approx(DICE) for row in rows.values())
    assert (run_dir / "surface.csv").is_file() and (run_dir / "summary.json").is_file()
    # the masks scored are the files `brainseg predict` ships for these cases
    out = Path("predicted")
    assert vol_run(["predict", tiny, cases, "-o", out]).returncode == 0
    for case in ("A", "B"):
        scored, affine = read_volume(run_dir / "masks" / f"{case}_mask.nii.gz")
        shipped, shipped_affine = read_volume(out / f"{case}_mask.nii.gz")
        assert np.array_equal(scored, shipped) and int(scored.sum()) == PRED_VOXELS
        np.testing.assert_array_equal(affine, shipped_affine)
    # and `brainseg score` of those shipped masks gives the same numbers
    labels = Path("labels")
    labels.mkdir()
    for f in cases.rglob("*_seg.nii.gz"):
        (labels / f.name).write_bytes(f.read_bytes())
    s = vol_run(["score", "--pred", out, "--gt", labels, "--json"])
    assert s.returncode == 0, s.stderr
    assert json.loads(s.stdout)["per_patient"] == summary["per_patient"]


def test_eval_volumes_with_a_gt_folder_and_a_case_without_truth(vol_run, tiny, cases):
    labels = Path("labels")
    labels.mkdir()
    (labels / "A_seg.nii.gz").write_bytes((cases / "A" / "A_seg.nii.gz").read_bytes())
    r = vol_run(["eval", tiny, cases, "--gt", labels, "--json", "--name", "gt"])
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["counts"]["patients"] == 1 and summary["gt"] == str(labels)
    assert "1 prediction(s)" in r.stderr and "have no true mask" in r.stderr


def test_eval_volume_refusals_are_one_line_and_leave_no_run_folder(vol_run, tiny, cases, tmp_path):
    r = vol_run(["eval", tiny, cases, "--split", "s.yaml"])
    assert r.returncode == 2 and "--split: for kaggle_3m slices only" in r.stderr
    slices = tmp_path / "kaggle" / "P1"
    slices.mkdir(parents=True)
    (slices / "P1_1.tif").write_bytes(b"")
    r = vol_run(["eval", tiny, tmp_path / "kaggle", "--gt", cases])
    assert r.returncode == 2 and "--gt: for volume cases only" in r.stderr
    (cases / "A" / "A_t1ce.nii.gz").unlink()  # case A loses a contrast
    r = vol_run(["eval", tiny, cases])
    assert r.returncode == 2, r.stderr
    assert "1 of 2 case(s) could not be predicted" in r.stderr and "no post contrast" in r.stderr
    nolabels = tmp_path / "nolabels"
    save_nifti(nolabels / "C.nii.gz", blob_volume(2))
    r = vol_run(["eval", tiny, nolabels])
    assert r.returncode == 2 and f"no label volume in {nolabels}" in r.stderr
    assert "Traceback" not in r.stderr
    assert not Path("runs/eval").exists() or list(Path("runs/eval").iterdir()) == []


def _stdin(monkeypatch: pytest.MonkeyPatch, lines: list[Any]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{x}\n" for x in lines)))


def test_volume_cases_and_files_on_stdin(vol_run, tiny, cases, monkeypatch):
    direct = Path("direct")
    assert vol_run(["predict", tiny, cases, "-o", direct]).returncode == 0
    _stdin(monkeypatch, [cases / "A", cases / "B.nii.gz"])
    r = vol_run(["predict", tiny, "-", "-o", "piped"])
    assert r.returncode == 0, r.stderr
    for case in ("A", "B"):
        want = read_volume(direct / f"{case}_mask.nii.gz")[0]
        assert np.array_equal(read_volume(Path("piped") / f"{case}_mask.nii.gz")[0], want)
    # `find cases -name '*.nii.gz' | brainseg predict model -`: contrasts grouped, labels skipped
    _stdin(monkeypatch, sorted(cases.rglob("*.nii.gz")))
    r = vol_run(["predict", tiny, "-", "-o", "found"])
    assert r.returncode == 0, r.stderr
    assert "2 label volume(s) skipped" in r.stderr
    assert [row["case"] for row in csv_rows(Path("found") / "summary.csv")] == ["A", "B"]
    _stdin(monkeypatch, [])
    r = vol_run(["predict", tiny, "-", "-o", "empty", "--channels", "pre=*_t1*"])
    assert r.returncode == 2 and "error:" in r.stderr


def test_label_volumes_are_never_cases(vol_run, tiny, cases):
    r = vol_run(["predict", tiny, cases / "B_seg.nii.gz", "-o", "out"])
    assert r.returncode == 2 and "is a label volume" in r.stderr
    # predicting into the cases' own folder: <case>_mask.nii.gz there is ground truth, so the
    # layout is refused whatever the flags (issue 22; tests/test_volumes.py has the details)
    for flags in ([], ["--force"]):
        r = vol_run(["predict", tiny, cases, "-o", cases, *flags])
        assert r.returncode == 2 and "ground-truth" in r.stderr, r.stderr
    assert not (cases / "B_mask.nii.gz").exists() and not (cases / "summary.csv").exists()


def test_eval_reusing_a_run_folder_never_scores_the_masks_of_an_earlier_run(vol_run, tiny, cases):
    """--exist-ok reuses runs/eval/exp: case B's mask from the first run must not stand in
    for a case that is gone (its label then has no prediction: the run fails, exit 2)."""
    labels = Path("labels")
    labels.mkdir()
    for f in cases.rglob("*_seg.nii.gz"):
        (labels / f.name).write_bytes(f.read_bytes())
    r = vol_run(["eval", tiny, cases, "--gt", labels, "--json"])
    assert r.returncode == 0 and json.loads(r.stdout)["counts"]["patients"] == 2
    (cases / "B.nii.gz").unlink()
    r = vol_run(["eval", tiny, cases, "--gt", labels, "--exist-ok", "--json"])
    assert r.returncode == 2, r.stdout
    assert "1 of 2 true mask(s) have no prediction" in r.stderr and "'B'" in r.stderr
