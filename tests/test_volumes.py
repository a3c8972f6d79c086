"""Volumes in, volumes out: NIfTI / DICOM cases predict exactly as the TIF slices they hold."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _tiny import tiny_onnx
from _volkit import (
    PATIENTS,
    RAS,
    blob_volume,
    conv_onnx,
    csv_rows,
    read_volume,
    save_case,
    save_dicom_series,
    save_dicom_slices,
    save_nifti,
)

pytest.importorskip("nibabel")
pytest.importorskip("SimpleITK")
pytest.importorskip("pydicom")


@pytest.fixture
def run(vol_run: Any) -> Any:
    return vol_run


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory, real_data: Path) -> dict[str, Any]:
    """Two real patients: a kaggle_3m subset, their TIF stacks and the model."""
    from brainseg.data.lgg import discover, read_slice

    base = tmp_path_factory.mktemp("vol-real")
    subset = base / "kaggle_3m"
    subset.mkdir()
    for pid in PATIENTS:
        (subset / pid).symlink_to(real_data / pid)
    ds = discover(subset)
    stacks = {}
    for p in ds.patients:
        pairs = [read_slice(s) for s in sorted(p.slices, key=lambda s: s.number)]
        # The TIFs as they are: S x H x W (x 3), slice k = TIF k+1 (no convention of ours).
        stacks[p.id] = (np.stack([im for im, _ in pairs]), np.stack([m for _, m in pairs]))
    model = conv_onnx(base / "conv.onnx", image_size=256)
    return {"base": base, "subset": subset, "stacks": stacks, "model": model}


def _slice_masks(run: Any, real: dict[str, Any], out: Path) -> dict[str, np.ndarray]:
    """The slice path: `brainseg predict` on the TIFs, stacked S x H x W per patient."""
    from brainseg.data.imageio import read_image

    r = run(["predict", real["model"], real["subset"], "-o", out, "--device", "cpu"])
    assert r.returncode == 0, r.stderr
    masks = {}
    for pid, (images, _) in real["stacks"].items():
        files = [out / pid / f"{pid}_{k + 1}_mask.tif" for k in range(len(images))]
        masks[pid] = np.stack([read_image(f)[..., 0] > 0 for f in files])
    return masks


def _sitk_lps(path: Path) -> np.ndarray:
    """The oracle: SimpleITK reads a volume and reorients it to LPS (its ``DICOMOrient``);
    ``GetArrayFromImage`` is then [slice, row, column] with the nose at the top and the patient's
    right on the left: the TIFs' own layout."""
    import SimpleITK as sitk

    img = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
    return sitk.GetArrayFromImage(img)


def _sitk_series(path: Path) -> np.ndarray:
    """A DICOM series read by SimpleITK (GDCM) and reoriented to LPS, as :func:`_sitk_lps`."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path)))
    return sitk.GetArrayFromImage(sitk.DICOMOrient(reader.Execute(), "LPS"))


def _sitk_case(folder: Path, pid: str, images: np.ndarray, **geometry: Any) -> None:
    """SimpleITK's defaults: each contrast's S x H x W stack straight into an image (identity
    direction, LPS), written as ``<pid>_t1 / _flair / _t1ce.nii.gz``."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("t1", "flair", "t1ce")):
        img = sitk.GetImageFromArray(np.ascontiguousarray(images[..., i]))
        for key, value in geometry.items():
            getattr(img, f"Set{key}")(value)
        sitk.WriteImage(img, str(folder / f"{pid}_{name}.nii.gz"))


def _oriented_volumes(root: Path, pid: str, images: np.ndarray) -> dict[str, Path]:
    """One correctly oriented case, stored five ways (name -> case folder or 4D file).

    Each is built by SimpleITK's or nibabel's own rules from the TIF stack, never through
    brainseg: SimpleITK's defaults; SimpleITK with spacing, origin and an oblique direction;
    nibabel with an explicit LPS affine; nibabel with the same anatomy stored RAS; nibabel with
    rows and columns swapped and the affine rotated 12 degrees (oblique, axes permuted).
    """
    xyz = images.transpose(2, 1, 0, 3)  # nibabel's X x Y x Z: x = column (-> L), y = row (-> P)
    lps = np.array([[-0.5, 0, 0, 60.0], [0, -0.5, 0, 70.0], [0, 0, 3.0, -21.0], [0, 0, 0, 1]])
    ras = lps.copy()
    ras[:2, :2] *= -1  # the same points with the x and y array axes reversed
    ras[:2, 3] = lps[:2, 3] - 0.5 * (np.array(xyz.shape[:2]) - 1)
    th = np.deg2rad(12)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]
    swap = np.eye(4)[[1, 0, 2, 3]]  # array axes (y, x, z): columns of the affine swapped
    out = {"sitk-defaults": root / "sitk-defaults"}
    _sitk_case(out["sitk-defaults"], pid, images)
    c, s = float(np.cos(th)), float(np.sin(th))
    out["sitk-oblique"] = root / "sitk-oblique"
    _sitk_case(
        out["sitk-oblique"], pid, images,
        Spacing=(0.5, 0.5, 3.0), Origin=(-20.0, 15.0, 40.0), Direction=(c, -s, 0, s, c, 0, 0, 0, 1),
    )  # fmt: skip
    out["nib-lps"] = save_nifti(root / "nib-lps" / f"{pid}.nii.gz", xyz, lps)
    out["nib-ras"] = save_nifti(root / "nib-ras" / f"{pid}.nii.gz", xyz[::-1, ::-1], ras)
    out["nib-swapped-oblique"] = root / "nib-swapped-oblique"
    save_case(out["nib-swapped-oblique"], pid, xyz.transpose(1, 0, 2, 3), rot @ lps @ swap)
    return out


@pytest.mark.realdata
def test_real_volumes_built_by_sitk_and_nibabel_predict_exactly_as_the_tif_slices(
    run: Any, real: dict, tmp_path: Path
):
    """Issue 21: correctly oriented volumes (by SimpleITK's and nibabel's rules, never ours)
    give the TIF-slice masks, read back and reoriented by SimpleITK; each mask keeps its input's
    grid. (The old RAS-rows convention fed these volumes rotated: Dice 0.36-0.46 to the slices.)"""
    import nibabel as nib

    expected = _slice_masks(run, real, tmp_path / "slices")
    for pid, (images, _) in real["stacks"].items():
        assert expected[pid].any(), pid  # the model marks something on these patients
        for name, src in _oriented_volumes(tmp_path / pid, pid, images).items():
            out = tmp_path / f"out-{pid}-{name}"
            r = run(["predict", real["model"], src, "-o", out, "--device", "cpu"])
            assert r.returncode == 0, (name, r.stderr)
            mask_file = out / f"{pid}_mask.nii.gz"
            got = _sitk_lps(mask_file) != 0
            assert got.shape == expected[pid].shape, name
            assert np.array_equal(got, expected[pid]), (pid, name)
            first_input = src if src.is_file() else sorted(src.glob("*.nii.gz"))[0]
            np.testing.assert_allclose(
                nib.load(str(mask_file)).affine, nib.load(str(first_input)).affine, atol=1e-4
            )
            row = csv_rows(out / "summary.csv")[0]
            assert int(row["tumor_slices"]) == int(expected[pid].any(axis=(1, 2)).sum()), name


@pytest.mark.realdata
def test_real_per_patient_dice_of_volumes_equals_eval_on_the_slices(run, real, tmp_path):
    """`predict` on volumes + `score` give eval's per-patient Dice, with and without --largest."""
    import SimpleITK as sitk

    src, gt = tmp_path / "in", tmp_path / "gt"
    gt.mkdir()
    for pid, (images, masks) in real["stacks"].items():
        _sitk_case(src / pid, pid, images)
        sitk.WriteImage(
            sitk.GetImageFromArray((masks > 0).astype(np.uint8)), str(gt / f"{pid}.nii.gz")
        )
    for flag in ("--no-largest", "--largest"):
        out = tmp_path / f"out{flag}"
        r = run(["predict", real["model"], src, "-o", out, flag, "--device", "cpu"])
        assert r.returncode == 0, r.stderr
        r = run(["score", "--pred", out, "--gt", gt, "--project", tmp_path / "s", "--name", flag])
        assert r.returncode == 0, r.stderr
        r = run(
            ["eval", real["model"], real["subset"], flag, "--device", "cpu",
             "--project", tmp_path / "e", "--name", flag]
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        got = {p["patient_id"]: p for p in csv_rows(tmp_path / "s" / flag / "per_patient.csv")}
        want = {p["patient_id"]: p for p in csv_rows(tmp_path / "e" / flag / "per_patient.csv")}
        assert set(got) == set(PATIENTS) == set(want)
        for pid in PATIENTS:
            for col in ("dice", "tp", "fp", "fn", "gt_pixels", "pred_pixels", "slices"):
                assert got[pid][col] == want[pid][col], (flag, pid, col)
            assert int(got[pid]["pred_pixels"]) > 0  # masks are not all empty
        assert max(float(got[pid]["dice"]) for pid in PATIENTS) > 0.0  # some overlap


@pytest.mark.realdata
def test_real_dicom_series_predict_as_the_tif_slices(run: Any, real: dict, tmp_path: Path):
    """Scanner-style series (each file one TIF image, ImageOrientationPatient axial, and one
    oblique 12 degrees): the mask, read back by SimpleITK in LPS, equals the TIF-slice masks."""
    pid = PATIENTS[0]
    images, _ = real["stacks"][pid]
    expected = _slice_masks(run, real, tmp_path / "slices")[pid]
    c, s = float(np.cos(np.deg2rad(12))), float(np.sin(np.deg2rad(12)))
    for name, iop in {"axial": (1, 0, 0, 0, 1, 0), "oblique": (c, s, 0, -s, c, 0)}.items():
        case = tmp_path / name / pid
        for i, contrast in enumerate(("pre", "flair", "post")):
            save_dicom_slices(case / contrast, images[..., i], iop=iop)
        out = tmp_path / f"out-{name}"
        r = run(
            ["predict", real["model"], tmp_path / name, "-o", out, "--device", "cpu",
             "--channels", "pre=pre,flair=flair,post=post"]
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert np.array_equal(_sitk_series(case / "flair") > 0, images[..., 1] > 0)  # oracle
        assert np.array_equal(_sitk_lps(out / f"{pid}_mask.nii.gz") != 0, expected), name


# --------------------------------------------------------------------------- synthetic cases


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return tiny_onnx(tmp_path / "tiny.onnx", image_size=64)


def _outputs(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*")) if out.exists() else []


def _bad_cases(tmp_path: Path) -> dict[str, tuple[Path, list[str], str]]:
    """name -> (input, extra CLI args, the expected words of the one error line)."""
    v = blob_volume()
    cases: dict[str, tuple[Path, list[str], str]] = {}
    d = tmp_path / "missing"
    save_case(d, "A", v)
    (d / "A_t1ce.nii.gz").unlink()
    cases["missing"] = (d, [], "case A in")
    d = tmp_path / "shape"
    save_case(d, "A", v)
    save_nifti(d / "A_flair.nii.gz", v[:, :, :5, 1])
    cases["shape"] = (d, [], "differ in shape")
    d = tmp_path / "affine"
    save_case(d, "A", v)
    moved = RAS.copy()
    moved[0, 3] += 5.0
    save_nifti(d / "A_t1ce.nii.gz", v[..., 2], moved)
    cases["affine"] = (d, [], "not co-registered")
    d = tmp_path / "flat"
    save_case(d, "A", v)
    save_nifti(d / "A_flair.nii.gz", v[:, :, 0, 1])
    cases["2d"] = (d, [], "is 2D")
    d = tmp_path / "trunc"
    save_nifti(d / "A.nii.gz", v)
    blob = (d / "A.nii.gz").read_bytes()
    (d / "A.nii.gz").write_bytes(blob[: len(blob) // 2])
    cases["truncated"] = (d, [], "cannot be read")
    d = tmp_path / "nan"
    f = v.astype(np.float32)
    f[3, 3, 3, 0] = np.nan
    save_nifti(d / "A.nii.gz", f)
    cases["nan"] = (d, [], "NaN")
    d = tmp_path / "three-d"
    save_nifti(d / "A.nii.gz", v[..., 1])
    cases["3d-as-4d"] = (d, [], "must be 4D")
    d = tmp_path / "dicom" / "A"
    for i, name in enumerate(("pre", "flair", "post")):
        save_dicom_series(d / name, v[..., i])
    save_dicom_series(d / "flair", v[..., 1], start=100)  # a second series in one folder
    cases["two-series"] = (d.parent, ["--channels", "pre=pre,flair=flair,post=post"], "2 DICOM")
    return cases


def test_each_bad_case_gives_one_line_exit_2_and_writes_nothing(run, tiny, tmp_path):
    for name, (src, extra, words) in _bad_cases(tmp_path).items():
        out = tmp_path / f"out-{name}"
        r = run(["predict", tiny, src, "-o", out, *extra])
        assert r.returncode == 2, (name, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if words in ln]
        assert len(lines) == 1, (name, r.stderr)
        assert "Traceback" not in r.stderr
        assert _outputs(out) == [], (name, _outputs(out))


def test_a_bad_case_among_good_ones_is_reported_and_the_others_are_written(run, tiny, tmp_path):
    src = tmp_path / "cases"
    save_nifti(src / "good.nii.gz", blob_volume())
    save_nifti(src / "bad.nii.gz", blob_volume()[..., :2])
    r = run(["predict", tiny, src, "-o", tmp_path / "out", "--json"])
    assert r.returncode == 1
    assert "bad.nii.gz" in r.stderr and "2 volume(s); expected 3" in r.stderr
    assert _outputs(tmp_path / "out") == ["good.json", "good_mask.nii.gz", "summary.csv"]
    rows = {row["case"]: row for row in csv_rows(tmp_path / "out" / "summary.csv")}
    assert rows["bad"]["status"] == "error" and rows["good"]["status"] == "ok"
    lines = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [ln["case"] for ln in lines] == ["bad", "good"]


def test_shard_skip_existing_and_refusing_to_overwrite(run, tiny, tmp_path):
    src = tmp_path / "cases"
    for i in range(3):
        save_nifti(src / f"c{i}.nii.gz", blob_volume(i))
    out = tmp_path / "out"
    r = run(["predict", tiny, src, "-o", out, "--shard", "1/2"])
    assert r.returncode == 0, r.stderr
    assert [row["case"] for row in csv_rows(out / "summary-1-of-2.csv")] == ["c1"]
    r = run(["predict", tiny, src, "-o", out, "--shard", "0/2"])
    assert r.returncode == 0
    assert [row["case"] for row in csv_rows(out / "summary-0-of-2.csv")] == ["c0", "c2"]
    r = run(["predict", tiny, src, "-o", out])
    assert r.returncode == 2 and r.stderr.count("already exists") == 3
    before = (out / "c0_mask.nii.gz").stat().st_mtime_ns
    r = run(["predict", tiny, src, "-o", out, "--skip-existing"])
    assert r.returncode == 0
    rows = csv_rows(out / "summary.csv")
    assert [row["status"] for row in rows] == ["skipped"] * 3
    assert rows[0]["tumor_voxels"] == str(16 * 16 * 3)
    assert (out / "c0_mask.nii.gz").stat().st_mtime_ns == before


def test_mask_volume_and_probabilities_keep_the_input_header(run, tiny, tmp_path):
    src = tmp_path / "cases"
    save_nifti(src / "A.nii.gz", blob_volume())
    out = tmp_path / "out"
    r = run(["predict", tiny, src, "-o", out, "--probabilities"])
    assert r.returncode == 0, r.stderr
    mask, affine = read_volume(out / "A_mask.nii.gz")
    prob, paffine = read_volume(out / "A_prob.nii.gz")
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert prob.dtype == np.float32 and 0.0 <= prob.min() <= prob.max() <= 1.0
    np.testing.assert_array_equal(affine, read_volume(src / "A.nii.gz")[1])
    np.testing.assert_array_equal(paffine, affine)
    assert mask.sum() == 16 * 16 * 3
    row = csv_rows(out / "summary.csv")[0]
    assert float(row["tumor_volume_ml"]) == pytest.approx(16 * 16 * 3 * 0.75 / 1000)
    assert row["tumor_slices"] == "3" and row["slices"] == "6"


def test_min_volume_in_voxels_and_mm3_removes_small_3d_components(run, tiny, tmp_path):
    v = blob_volume()
    v[50:52, 50:52, 2, 1] = 220  # a 4-voxel speck = 3 mm3 at 0.5 x 0.5 x 3 mm
    src = tmp_path / "cases"
    save_nifti(src / "A.nii.gz", v)
    counts = {}
    for arg in ("0", "5", "3mm3", "4mm3"):
        out = tmp_path / f"out{arg}"
        assert run(["predict", tiny, src, "-o", out, "--min-volume", arg]).returncode == 0
        counts[arg] = int(read_volume(out / "A_mask.nii.gz")[0].sum())
    big = 16 * 16 * 3
    assert counts == {"0": big + 4, "5": big, "3mm3": big + 4, "4mm3": big}
    r = run(["predict", tiny, src, "-o", tmp_path / "x", "--min-volume", "lots"])
    assert r.returncode == 2 and "--min-volume" in r.stderr


def test_float_volumes_are_scaled_per_contrast_by_the_documented_rule(tmp_path: Path) -> None:
    from brainseg.data.volumes import to_model_range

    x = np.zeros((10, 10, 10), dtype=np.float32)
    x[1:, :, :] = np.linspace(100, 1100, 900).reshape(9, 10, 10)
    out, info = to_model_range(x)
    lo, hi = np.percentile(x[x != 0], [0.5, 99.5])
    assert info["lo"] == pytest.approx(lo) and info["hi"] == pytest.approx(hi)
    assert out.dtype == np.uint8 and out[0].max() == 0  # background stays 0
    assert out.max() == 255 and out[1:].min() == 0
    mid = x[5, 5, 5]
    assert out[5, 5, 5] == round(255 * (mid - lo) / (hi - lo))
    u = blob_volume()[..., 0]
    assert to_model_range(u)[0] is u  # uint8: already the model's domain


def test_int16_case_predicts_after_scaling(run, tiny, tmp_path):
    v = blob_volume().astype(np.int16) * 7 + 3
    save_nifti(tmp_path / "cases" / "A.nii.gz", v)
    r = run(["predict", tiny, tmp_path / "cases", "-o", tmp_path / "out"])
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "out" / "A.json").read_text())
    assert meta["intensity"]["flair"]["rule"].startswith("p0.5-p99.5")
    assert meta["tumor_voxels"] == 16 * 16 * 3


def test_channel_patterns_flat_folder_and_errors(tmp_path: Path) -> None:
    from brainseg.data.volumes import find_cases, parse_channels
    from brainseg.errors import BrainsegError

    flat = tmp_path / "flat"
    for case in ("A", "B"):
        save_case(flat, case, blob_volume())
    cases = find_cases([flat])
    assert [c.id for c in cases] == ["A", "B"]
    assert cases[0].sources["post"].name == "A_t1ce.nii.gz"
    assert list(parse_channels(None)) == ["pre", "flair", "post"]
    with pytest.raises(BrainsegError, match="no pattern for post"):
        parse_channels("pre=*a*,flair=*b*")
    with pytest.raises(BrainsegError, match="matches the patterns of"):
        find_cases([flat], "pre=*t1*,flair=*flair*,post=*t1ce*")


def test_volume_libraries_are_not_imported_by_help_or_the_slice_path(tmp_path: Path) -> None:
    from _tiny import write_images

    model = tiny_onnx(tmp_path / "m.onnx", image_size=64)
    write_images(tmp_path / "imgs", 2, size=64)
    code = (
        "import sys\n"
        "from brainseg.cli.app import main\n"
        f"runs = [['--help'], ['predict', '--help'], ['score', '--help'],"
        f" ['predict', {str(model)!r}, {str(tmp_path / 'imgs')!r}, '-o', "
        f"{str(tmp_path / 'o')!r}]]\n"
        "for argv in runs:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), (argv, e.code)\n"
        "print('LOADED', [m for m in ('nibabel', 'SimpleITK', 'pydicom', 'torch')"
        " if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout
    assert (tmp_path / "o" / "img00000_mask.tif").is_file()


# --------------------------------------------------------------------------- dispatch


def test_predict_takes_the_volume_path_for_nifti_and_the_slice_path_for_images(run, tiny, tmp_path):
    from _tiny import write_images

    save_nifti(tmp_path / "cases" / "A.nii.gz", blob_volume())
    write_images(tmp_path / "imgs", 1, size=64)
    r = run(["predict", tiny, tmp_path / "cases" / "A.nii.gz", "-o", tmp_path / "v1"])
    assert r.returncode == 0, r.stderr
    assert _outputs(tmp_path / "v1") == ["A.json", "A_mask.nii.gz", "summary.csv"]
    r = run(["predict", tiny, tmp_path / "imgs", "-o", tmp_path / "s", "--summary", "csv"])
    assert r.returncode == 0, r.stderr
    assert _outputs(tmp_path / "s") == ["img00000_mask.tif", "summary.csv"]
    # --summary csv is what volumes write anyway: accepted there too.
    r = run(["predict", tiny, tmp_path / "cases", "-o", tmp_path / "v2", "--summary", "csv"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "v2" / "A_mask.nii.gz").is_file()
    r = run(["predict-volumes", tiny, tmp_path / "cases", "-o", tmp_path / "gone"])
    assert r.returncode == 2 and not (tmp_path / "gone").exists()


def test_options_of_the_other_path_are_refused_with_one_line_and_nothing_written(
    run, tiny, tmp_path
):
    from _tiny import write_images

    save_nifti(tmp_path / "cases" / "A.nii.gz", blob_volume())
    write_images(tmp_path / "imgs", 1, size=64)
    for src, extra, words in [
        ("cases", ["--overlay"], "--overlay: for image slices only"),
        # --pad and --workers are for volumes too (one pipeline): not refused
        ("cases", ["--format", "png", "--overlay-rgb"], "--format, --overlay-rgb: for image"),
        ("cases", ["--include-masks"], "--include-masks: for image slices only"),
        ("imgs", ["--min-volume", "20"], "--min-volume: for volume cases only"),
        ("imgs", ["--no-largest"], "--largest/--no-largest: for volume cases only"),
    ]:
        out = tmp_path / f"out-{src}-{extra[0]}"
        r = run(["predict", tiny, tmp_path / src, "-o", out, *extra])
        assert r.returncode == 2, (extra, r.stderr)
        errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
        assert len(errors) == 1 and words in errors[0], (extra, r.stderr)
        assert not out.exists(), extra


def test_volume_shards_use_the_slice_shard_rule(run, tiny, tmp_path):
    from brainseg.errors import BrainsegError
    from brainseg.inference.pipeline import PredictOptions
    from brainseg.inference.volume_predict import predict_volumes

    save_nifti(tmp_path / "cases" / "A.nii.gz", blob_volume())
    for bad, words in (("2/2", "--shard 2/2: need 0 <= I < N"), ("x", "is not of the form I/N")):
        opts = PredictOptions([tiny], [str(tmp_path / "cases")], tmp_path / "o", shard=bad)
        with pytest.raises(BrainsegError, match=re.escape(words)):  # shards.parse_shard's words
            predict_volumes(opts)
        r = run(["predict", tiny, tmp_path / "cases", "-o", tmp_path / "o", "--shard", bad])
        assert r.returncode == 2 and words in r.stderr, r.stderr
        assert not (tmp_path / "o").exists()


def test_volume_json_lines_stop_cleanly_when_stdout_closes(run, tiny, tmp_path, monkeypatch):
    from brainseg import console

    src = tmp_path / "cases"
    for i in range(3):
        save_nifti(src / f"c{i}.nii.gz", blob_volume(i))
    calls: list[str] = []

    def closed_after_one(obj: Any) -> None:
        calls.append(obj["case"])
        if len(calls) > 1:
            raise BrokenPipeError  # `brainseg predict ... --json | head -n 1`
        print(json.dumps(obj))

    monkeypatch.setattr(console, "emit_json", closed_after_one)
    r = run(["predict", tiny, src, "-o", tmp_path / "o", "--json"])
    assert r.returncode == 141, r.stderr
    assert [json.loads(ln)["case"] for ln in r.stdout.splitlines()] == ["c0"]
    assert "stdout closed: stopped after 2 case(s)" in r.stderr
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- issue 22


@pytest.mark.parametrize("flag", [[], ["--skip-existing"], ["--force"]])
def test_a_label_volume_beside_its_case_is_never_an_output(run, tiny, tmp_path, flag):
    """-o into the cases: <case>_mask.nii.gz there is the case's ground truth (the label
    naming eval reads), so predict refuses the layout whatever the flags, and writes nothing."""
    src = tmp_path / "cases"
    v = blob_volume()
    save_nifti(src / "A.nii.gz", v)
    save_nifti(src / "A_mask.nii.gz", (v[..., 1] > 200).astype(np.uint8))
    save_case(src / "B", "B", blob_volume(1))  # a case folder, no label yet
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    for out in (src, src / "B"):
        r = run(["predict", tiny, src, "-o", out, *flag])
        assert r.returncode == 2, (out, r.stderr)
        assert "ground-truth" in r.stderr and "choose an -o folder outside" in r.stderr
        assert "already exists" not in r.stderr, r.stderr  # no flag makes it right
        assert "Traceback" not in r.stderr
        after = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
        assert after == before, sorted(set(after) - set(before))
    r = run(["predict", tiny, src, "-o", tmp_path / "masks"])
    assert r.returncode == 0, r.stderr
    assert _outputs(tmp_path / "masks") == sorted(
        ["A.json", "A_mask.nii.gz", "B.json", "B_mask.nii.gz", "summary.csv"]
    )


def test_a_later_volume_run_over_fewer_cases_keeps_the_earlier_rows(run, tiny, tmp_path):
    src = tmp_path / "cases"
    for i in range(3):
        save_nifti(src / f"c{i}.nii.gz", blob_volume(i))
    out = tmp_path / "out"
    assert run(["predict", tiny, src, "-o", out]).returncode == 0
    r = run(["predict", tiny, src / "c1.nii.gz", "-o", out, "--force"])
    assert r.returncode == 0, r.stderr
    rows = csv_rows(out / "summary.csv")
    assert sorted((x["case"], x["status"]) for x in rows) == [(f"c{i}", "ok") for i in range(3)]
    assert not (out / ".brainseg-predict.lock").exists()


@pytest.mark.timeout(120)
def test_a_fifo_named_like_a_contrast_is_an_error_row_never_a_hang(run, tiny, tmp_path):
    """Issue 22: only regular files are read; a FIFO would block the reader forever."""
    import os

    src = tmp_path / "cases"
    save_case(src / "A", "A", blob_volume())
    save_case(src / "B", "B", blob_volume(1))
    (src / "B" / "B_flair.nii.gz").unlink()
    os.mkfifo(src / "B" / "B_flair.nii.gz")
    out = tmp_path / "out"
    r = run(["predict", tiny, src, "-o", out])
    assert r.returncode == 1, r.stderr  # some cases failed
    rows = {row["case"]: row for row in csv_rows(out / "summary.csv")}
    assert rows["A"]["status"] == "ok"
    assert rows["B"]["status"] == "error" and "FIFO" in rows["B"]["error"], rows["B"]
    r = run(["predict", tiny, src / "B" / "B_flair.nii.gz", "-o", tmp_path / "out2"])
    assert r.returncode == 2 and "not a regular file" in r.stderr, r.stderr


def test_a_dicom_series_over_the_voxel_limit_is_refused(run, tiny, tmp_path, monkeypatch):
    """The NIfTI voxel limit (BRAINSEG_MAX_VOXELS) holds for DICOM series too, from the
    headers of the series' first file and its file count."""
    v = blob_volume()  # 64 x 64 x 6
    case = tmp_path / "dicom" / "A"
    for i, name in enumerate(("pre", "flair", "post")):
        save_dicom_series(case / name, v[..., i])
    args = ["--channels", "pre=pre,flair=flair,post=post"]
    monkeypatch.setenv("BRAINSEG_MAX_VOXELS", str(64 * 64 * 6 - 1))
    r = run(["predict", tiny, tmp_path / "dicom", "-o", tmp_path / "out", *args])
    assert r.returncode == 2, r.stderr
    assert "64x64x6 = 24,576 voxels, more than the limit of 24,575" in r.stderr
    monkeypatch.setenv("BRAINSEG_MAX_VOXELS", str(64 * 64 * 6))
    r = run(["predict", tiny, tmp_path / "dicom", "-o", tmp_path / "out2", *args])
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- one case pipeline


def _two_blobs() -> np.ndarray:
    """A case with a big and a small bright FLAIR blob, apart: two 3D components."""
    v = blob_volume(3)
    v[50:56, 50:56, 2:4, 1] = 230
    return v


def test_volumes_read_the_models_largest_setting_as_slices_and_eval_do(run, tmp_path):
    """issue 23: volumes resolved the model's settings with their own copy of settings.resolve,
    which read ``postprocess.largest_component`` but not ``postprocess.largest``: a model
    storing ``largest`` kept every component on volumes (eval kept one)."""
    import onnx
    from scipy import ndimage

    from brainseg.settings import resolve

    model = conv_onnx(tmp_path / "m.onnx", image_size=64)
    m = onnx.load(str(model))
    meta = json.loads(m.metadata_props[0].value)
    meta["postprocess"] = {"min_size": 0, "largest": True}
    m.metadata_props[0].value = json.dumps(meta)
    onnx.save(m, str(model))
    assert resolve(meta).post.largest  # what eval and slices read
    save_case(tmp_path / "cases", "A", _two_blobs())
    r = run(["predict", model, tmp_path / "cases", "-o", tmp_path / "out"])
    assert r.returncode == 0, r.stderr
    mask, _ = read_volume(tmp_path / "out" / "A_mask.nii.gz")
    _, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    assert n == 1, f"{n} components: the model's largest-component rule was not applied"


def test_volumes_take_pad_and_workers_and_pad_predicts_as_the_slice_path(run, tmp_path):
    """One pipeline: --pad and --workers work for volumes as for slices, and a padded volume's
    slices get the masks the slice path gives the same slices as PNG files."""
    from PIL import Image

    from brainseg.data.volumes import to_slices

    model = conv_onnx(tmp_path / "m.onnx", image_size=64)
    vol = blob_volume(5, shape=(50, 44, 4))  # not multiples of 32: padding matters
    save_case(tmp_path / "cases", "A", vol)
    r = run(["predict", model, tmp_path / "cases", "-o", tmp_path / "v", "--pad", "--workers", "1"])
    assert r.returncode == 0, r.stderr
    mask, affine = read_volume(tmp_path / "v" / "A_mask.nii.gz")
    slices = to_slices(vol, RAS)
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i, s in enumerate(slices):
        Image.fromarray(s).save(pngs / f"s{i}.png")
    r = run(["predict", model, pngs, "-o", tmp_path / "p", "--pad", "--format", "png"])
    assert r.returncode == 0, r.stderr
    want = np.stack(
        [np.asarray(Image.open(tmp_path / "p" / f"s{i}_mask.png")) > 0 for i in range(len(slices))]
    )
    assert want.any()
    assert np.array_equal(to_slices(mask[..., None].repeat(3, -1), affine)[..., 0] > 0, want)


def test_volume_summaries_are_written_as_the_slices_are_jsonl_too(run, tiny, tmp_path):
    """One summary writer: --summary jsonl works for volumes (it was refused), one JSON line
    per case; a later run on other cases keeps the earlier cases' rows."""
    save_nifti(tmp_path / "a" / "A.nii.gz", blob_volume(1))
    save_nifti(tmp_path / "b" / "B.nii.gz", blob_volume(2))
    out = tmp_path / "out"
    r = run(["predict", tiny, tmp_path / "a", "-o", out, "--summary", "jsonl"])
    assert r.returncode == 0, r.stderr
    r = run(["predict", tiny, tmp_path / "b", "-o", out, "--summary", "jsonl", "--skip-existing"])
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert [(row["case"], row["status"]) for row in rows] == [("B", "ok"), ("A", "ok")]
    assert rows[1]["tumor_voxels"] > 0 and not (out / "summary.csv").exists()


def test_a_dicom_series_with_a_missing_slice_is_refused_not_misplaced(run, tiny, tmp_path):
    """A series with a slice missing was read as evenly spaced, so every slice after the gap
    sat 3 mm off its true position (the masks went back on a wrong grid). Now that case is
    one line naming the gap, and nothing is written for it."""
    import pydicom

    v = blob_volume()  # 64 x 64 x 6
    case = tmp_path / "dicom" / "A"
    for i, name in enumerate(("pre", "flair", "post")):
        save_dicom_series(case / name, v[..., i])
        files = sorted(
            (case / name).iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2])
        )
        files[3].unlink()  # the oracle: pydicom's positions now have one 6 mm step
    zs = sorted(
        float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in (case / "flair").iterdir()
    )
    assert sorted(set(np.round(np.diff(zs), 3))) == [3.0, 6.0]
    r = run(["predict", tiny, tmp_path / "dicom", "-o", tmp_path / "out", "--channels",
             "pre=pre,flair=flair,post=post"])  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "not evenly spaced" in r.stderr and "6 mm" in r.stderr, r.stderr
    assert not (tmp_path / "out" / "A_mask.nii.gz").exists()


@pytest.mark.parametrize("kind", ["images", "volumes"])
def test_image_files_and_volume_cases_are_refused_alike_before_anything_is_written(
    run: Any, tiny: Path, tmp_path: Path, kind: str
) -> None:
    """issue 23: one predict run for both kinds, so the shared checks say the same words and a
    model that cannot be loaded leaves no output folder (volume runs made an empty -o folder,
    and took its lock, before loading the model)."""
    from PIL import Image

    src = tmp_path / "in"
    if kind == "volumes":
        save_nifti(src / "A.nii.gz", blob_volume())
    else:
        src.mkdir()
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(src / "s.png")
    cut = tmp_path / "cut.onnx"  # an ONNX file cut short: it sniffs as ONNX, it does not load
    cut.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    out = tmp_path / "out"
    r = run(["predict", cut, src, "-o", out])
    assert r.returncode == 2 and "cut.onnx" in r.stderr, r.stderr
    assert not out.exists()
    r = run(["predict", tiny, src, "-o", out, "--force", "--skip-existing"])
    assert r.returncode == 2, r.stderr
    assert "--force and --skip-existing cannot be used together" in r.stderr
    out.write_text("")
    r = run(["predict", tiny, src, "-o", out])
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr, r.stderr
    assert "hint: pass a folder to -o" in r.stderr
