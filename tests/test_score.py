"""`brainseg score`: masks from any tool scored with eval's metrics and files; mm metrics."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _tiny import tiny_onnx
from _volkit import csv_rows, save_nifti

from brainseg.evaluation import metrics


@pytest.fixture
def run(vol_run: Any) -> Any:
    return vol_run


# --------------------------------------------------------------------------- metrics in mm


def test_hd95_in_mm_uses_the_spacing_and_pixels_without_it() -> None:
    a = np.zeros((5, 8, 8), bool)
    b = np.zeros((5, 8, 8), bool)
    a[1, 3, 3] = True
    b[3, 3, 3] = True  # two slices apart
    assert metrics.hd95(a, b) == pytest.approx(2.0)
    assert metrics.hd95(a, b, spacing=(3.0, 0.5, 0.5)) == pytest.approx(6.0)
    assert math.isnan(metrics.hd95(a, np.zeros_like(b), spacing=(3.0, 0.5, 0.5)))
    with pytest.raises(ValueError, match="spacing"):
        metrics.hd95(a, b, spacing=(1.0, 1.0))


def test_surface_dice_tolerance_and_empty_policy() -> None:
    a = np.zeros((1, 20, 20), bool)
    a[0, 5:15, 5:15] = True
    b = np.roll(a, 2, axis=2)  # shifted 2 columns
    assert metrics.surface_dice(a, a, 0.0) == 1.0
    assert metrics.surface_dice(a, b, 2.0) == 1.0  # every boundary pixel within 2 px
    part = metrics.surface_dice(a, b, 0.0)
    assert 0.0 < part < 1.0
    assert metrics.surface_dice(a, b, 2.0, spacing=(1.0, 1.0, 2.0)) < 1.0  # 2 px = 4 mm
    empty = np.zeros_like(a)
    assert metrics.surface_dice(empty, empty, 1.0) == 1.0
    assert metrics.surface_dice(a, empty, 1.0) == 0.0


# --------------------------------------------------------------------------- slices


def test_score_of_predicted_slices_equals_eval(run, tmp_path: Path, phantom_root: Path) -> None:
    model = tiny_onnx(tmp_path / "tiny.onnx", image_size=64)
    r = run(["predict", model, phantom_root, "-o", tmp_path / "pred"])
    assert r.returncode == 0, r.stderr
    r = run(["score", "--pred", tmp_path / "pred", "--gt", phantom_root, "--project", "s"])
    assert r.returncode == 0, r.stderr
    assert "pixels" in r.stdout
    r = run(["eval", model, phantom_root, "--project", "e"])
    assert r.returncode == 0, r.stderr
    got, want = (
        csv_rows(tmp_path / "s/exp/per_patient.csv"),
        csv_rows(tmp_path / "e/exp/per_patient.csv"),
    )
    assert list(got[0]) == list(want[0])  # the same columns
    assert got == want  # the same numbers, empty-mask policy included
    assert csv_rows(tmp_path / "s/exp/per_slice.csv") == csv_rows(tmp_path / "e/exp/per_slice.csv")
    s = json.loads((tmp_path / "s/exp/summary.json").read_text())
    e = json.loads((tmp_path / "e/exp/summary.json").read_text())
    for key in ("per_patient", "per_slice_tumor", "global", "detection", "counts"):
        assert s[key] == e[key], key
    assert s["surface"]["unit"] == "pixels"
    surf = csv_rows(tmp_path / "s/exp/surface.csv")
    assert {row["hd95_unit"] for row in surf} == {"pixels"}


def test_missing_prediction_is_an_error_unless_allowed(run, tmp_path, phantom_root) -> None:
    pred = tmp_path / "pred"
    shutil.copytree(phantom_root, pred)  # the true masks as "predictions": Dice 1
    first = sorted(pred.rglob("*_mask.tif"))[0]
    first.unlink()
    r = run(["score", "--pred", pred, "--gt", phantom_root])
    assert r.returncode == 2 and "have no prediction" in r.stderr
    assert not (tmp_path / "runs").exists()
    r = run(["score", "--pred", pred, "--gt", phantom_root, "--allow-missing"])
    assert r.returncode == 0, r.stderr
    rows = csv_rows(tmp_path / "runs/score/exp/per_slice.csv")
    missing = [x for x in rows if f"{x['patient_id']}_{x['slice_number']}_mask.tif" == first.name]
    assert len(missing) == 1 and missing[0]["pred_pixels"] == "0"


# --------------------------------------------------------------------------- volumes


def test_nifti_volumes_scored_by_case_with_mm_metrics(run, tmp_path: Path) -> None:
    pytest.importorskip("nibabel")
    gt = np.zeros((20, 20, 6), np.uint8)
    gt[5:10, 5:10, 1:4] = 1
    pred = np.zeros_like(gt)
    pred[5:10, 7:12, 1:4] = 1  # shifted 2 voxels along y (0.5 mm each)
    save_nifti(tmp_path / "gt" / "A_seg.nii.gz", gt)
    save_nifti(tmp_path / "gt" / "B_seg.nii.gz", np.zeros_like(gt))
    save_nifti(tmp_path / "pred" / "A.nii.gz", pred)
    save_nifti(tmp_path / "pred" / "B.nii.gz", np.zeros_like(gt))
    save_nifti(tmp_path / "pred" / "A_prob.nii.gz", pred.astype(np.float32))  # not a mask
    r = run(["score", "--pred", tmp_path / "pred", "--gt", tmp_path / "gt", "--tolerance", "1"])
    assert r.returncode == 0, r.stderr
    assert "mm" in r.stdout
    run_dir = tmp_path / "runs/score/exp"
    rows = {x["patient_id"]: x for x in csv_rows(run_dir / "per_patient.csv")}
    assert float(rows["A"]["dice"]) == pytest.approx(metrics.dice(pred, gt))
    assert rows["B"]["dice"] == "1.0" and rows["A"]["slices"] == "6"
    surf = {x["patient_id"]: x for x in csv_rows(run_dir / "surface.csv")}
    assert surf["A"]["hd95_unit"] == "mm" and surf["A"]["nsd_unit"] == "mm"
    assert float(surf["A"]["hd95"]) == pytest.approx(1.0)  # 2 voxels x 0.5 mm
    assert float(surf["A"]["nsd"]) == 1.0  # within 1 mm everywhere
    assert surf["B"]["hd95"] == "" and float(surf["B"]["nsd"]) == 1.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mode"] == "volumes" and summary["surface"]["unit"] == "mm"


def test_prediction_on_another_grid_is_refused(run, tmp_path: Path) -> None:
    pytest.importorskip("nibabel")
    gt = np.zeros((20, 20, 6), np.uint8)
    save_nifti(tmp_path / "gt" / "A.nii.gz", gt)
    save_nifti(tmp_path / "pred" / "A_mask.nii.gz", gt[:, :, :5])
    r = run(["score", "--pred", tmp_path / "pred", "--gt", tmp_path / "gt"])
    assert r.returncode == 2 and "is not on the grid" in r.stderr


# --------------------------------------------------------------------------- which masks are truth


def _nib_dice(pred_path: Path, gt_path: Path) -> float:
    """Dice of two NIfTI masks read with nibabel and counted with numpy (independent oracle)."""
    import nibabel as nib

    p = np.asanyarray(nib.load(str(pred_path)).dataobj) > 0
    g = np.asanyarray(nib.load(str(gt_path)).dataobj) > 0
    return 1.0 if not (p.any() or g.any()) else 2.0 * (p & g).sum() / (p.sum() + g.sum())


def test_a_cases_folder_as_gt_scores_only_its_label_files(run, tmp_path: Path) -> None:
    pytest.importorskip("nibabel")
    from _volkit import blob_volume, save_case

    rng = np.random.default_rng(7)
    want = {}
    for i, case in enumerate(("c1", "c2")):
        save_case(tmp_path / "cases", case, blob_volume(seed=i, shape=(24, 24, 4)))
        seg = np.zeros((24, 24, 4), np.uint8)
        seg[5 + i : 15, 6:16, 1:3] = 1
        pred = (seg.astype(bool) ^ (rng.random(seg.shape) < 0.05)).astype(np.uint8)
        g = save_nifti(tmp_path / "cases" / f"{case}_seg.nii.gz", seg)
        p = save_nifti(tmp_path / "pred" / f"{case}_mask.nii.gz", pred)
        want[case] = _nib_dice(p, g)
    # the contrasts (_t1, _flair, _t1ce) are inputs, never truth: no --allow-missing needed
    r = run(["score", "--pred", tmp_path / "pred", "--gt", tmp_path / "cases"])
    assert r.returncode == 0, r.stderr
    got = csv_rows(tmp_path / "runs/score/exp/per_patient.csv")
    rows = {x["patient_id"]: float(x["dice"]) for x in got}
    assert rows == pytest.approx(want)
    # a folder of contrasts only has no truth at all
    for f in (tmp_path / "cases").glob("*_seg.nii.gz"):
        f.unlink()
    r = run(["score", "--pred", tmp_path / "pred", "--gt", tmp_path / "cases"])
    assert r.returncode == 2 and "no label volume" in r.stderr and "never truth" in r.stderr


# --------------------------------------------------------------------------- which patients


def test_score_follows_symlinked_patient_folders(run, tmp_path: Path, phantom_root: Path) -> None:
    patient = sorted(p for p in phantom_root.iterdir() if p.is_dir())[0]
    shutil.copytree(patient, tmp_path / "store" / patient.name)
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / patient.name).symlink_to(tmp_path / "store" / patient.name)
    (tmp_path / "store" / patient.name / "loop").symlink_to(tmp_path / "gt")  # no endless walk
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / patient.name).symlink_to(patient)  # the true masks: Dice 1
    r = run(["score", "--pred", tmp_path / "pred", "--gt", tmp_path / "gt"])
    assert r.returncode == 0, r.stderr
    rows = csv_rows(tmp_path / "runs/score/exp/per_patient.csv")
    n_masks = len(list(patient.glob("*_mask.tif")))
    assert [(x["patient_id"], x["slices"], x["dice"]) for x in rows] == [
        (patient.name, str(n_masks), "1.0")
    ]


def _predict_patients(phantom_root: Path, out: Path, ids: list[str]) -> None:
    """Perfect "predictions" (the true masks) for the patients ``ids``."""
    for pid in ids:
        shutil.copytree(phantom_root / pid, out / pid)


def test_score_a_split_subset_or_only_the_predicted_patients(
    run, tmp_path: Path, phantom_root: Path
) -> None:
    import yaml

    r = run(["split", phantom_root, "-o", tmp_path / "s.yaml", "--val-fraction", "0.34"])
    assert r.returncode == 0, r.stderr
    subsets = yaml.safe_load((tmp_path / "s.yaml").read_text())["subsets"]
    val = sorted(subsets["val"])
    _predict_patients(phantom_root, tmp_path / "pred", val)
    args = ["score", "--pred", tmp_path / "pred", "--gt", phantom_root, "--exist-ok"]

    def scored() -> list[str]:
        rows = csv_rows(tmp_path / "runs/score/exp/per_patient.csv")
        return sorted(x["patient_id"] for x in rows)

    r = run(args)  # every patient of --gt: the train ones have no prediction
    assert r.returncode == 2 and "have no prediction" in r.stderr
    r = run([*args, "--split", tmp_path / "s.yaml", "--subset", "val"])
    assert r.returncode == 0, r.stderr
    assert scored() == val
    summary = json.loads((tmp_path / "runs/score/exp/summary.json").read_text())
    assert summary["subset"] == "val" and summary["split"] == str(tmp_path / "s.yaml")
    r = run([*args, "--split", tmp_path / "s.yaml", "--subset", "train"])
    assert r.returncode == 2 and "have no prediction" in r.stderr
    r = run([*args, "--only-predicted"])
    assert r.returncode == 0, r.stderr
    assert scored() == val
    # a predicted patient with a slice missing is still an error without --allow-missing
    sorted((tmp_path / "pred" / val[0]).glob("*_mask.tif"))[0].unlink()
    r = run([*args, "--only-predicted"])
    assert r.returncode == 2 and "have no prediction" in r.stderr
    r = run([*args, "--only-predicted", "--allow-missing"])
    assert r.returncode == 0 and scored() == val


def test_the_score_table_names_each_hd95_once_at_80_columns(tmp_path: Path) -> None:
    from conftest import run_cli

    from brainseg.data.synthetic import write_synthetic

    root = write_synthetic(tmp_path / "d", patients=2, seed=1, size=64)
    shutil.copytree(root, tmp_path / "pred")
    env = {"COLUMNS": "80"}
    r = run_cli(["score", "--pred", tmp_path / "pred", "--gt", root, "--project", tmp_path / "s"],
                env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    labels = [ln.split("│")[1].strip() for ln in r.stdout.splitlines() if ln.startswith("│")]
    assert [x for x in labels if x.startswith("hd95")] == ["hd95 (pixels)"], r.stdout
    assert "…" not in r.stdout
    pytest.importorskip("nibabel")
    gt = np.zeros((20, 20, 6), np.uint8)
    gt[5:10, 5:10, 1:4] = 1
    save_nifti(tmp_path / "vgt" / "A_seg.nii.gz", gt)
    save_nifti(tmp_path / "vpred" / "A_mask.nii.gz", gt)
    r = run_cli(["score", "--pred", tmp_path / "vpred", "--gt", tmp_path / "vgt", "--project",
                 tmp_path / "v"], env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    labels = [ln.split("│")[1].strip() for ln in r.stdout.splitlines() if ln.startswith("│")]
    assert [x for x in labels if x.startswith("hd95")] == ["hd95 (voxels)", "hd95 (mm)"]
