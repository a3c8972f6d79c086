"""DICOM SEG out (``--format dicom-seg``): checked by readers brainseg did not write.

Oracles: dciodvfy (dicom3tools) validates the object against the standard's IOD; highdicom
reads it back; SimpleITK (GDCM) reads the source series, and the SEG's frames, fetched by the
SOP Instance UIDs they reference, are compared voxel for voxel with the NIfTI mask of the same
case resampled by SimpleITK onto that series.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _volkit import PATIENTS, blob_volume, conv_onnx, save_case, save_dicom_slices, save_nifti

pytest.importorskip("nibabel")
pytest.importorskip("SimpleITK")
pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

CHANNELS = ["--channels", "pre=pre,flair=flair,post=post"]
TH = np.deg2rad(12)
#: ImageOrientationPatient of the series the tests write: axial, and oblique 12 degrees.
IOPS = {
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "oblique": (np.cos(TH), np.sin(TH), 0.0, -np.sin(TH), np.cos(TH), 0.0),
}


@pytest.fixture
def run(vol_run: Any) -> Any:
    return vol_run


def _dicom_case(
    root: Path, slices: np.ndarray, iop: tuple[float, ...], seed: int = 0, prefix: str = ""
) -> Path:
    """One case of three DICOM series folders ``<prefix>pre / flair / post`` (S x H x W x 3
    images); file names shuffled, so file order is not slice order."""
    rng = np.random.default_rng(seed)
    for i, contrast in enumerate(("pre", "flair", "post")):
        folder = save_dicom_slices(root / f"{prefix}{contrast}", slices[..., i], iop=iop)
        files = sorted(folder.glob("*.dcm"))
        for f, n in zip(files, rng.permutation(len(files)), strict=True):
            f.rename(folder / f"x{n:04d}.tmp")
        for f in folder.glob("*.tmp"):
            f.rename(f.with_suffix(".dcm"))
    return root


def _dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's "Error" lines for ``path`` (skipped where dicom3tools is not installed)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (dicom3tools) not installed: apt-get install dicom3tools")
    r = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = (r.stdout + r.stderr).splitlines()
    assert any(ln.strip() == "Segmentation" for ln in lines), lines  # it checked the SEG IOD
    return [ln for ln in lines if ln.startswith("Error")]


def _series(folder: Path) -> tuple[Any, list[str], list[Any]]:
    """SimpleITK's image of a series, its files' SOP Instance UIDs in SimpleITK's slice
    order, and their pydicom headers."""
    import pydicom
    import SimpleITK as sitk

    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return reader.Execute(), [h.SOPInstanceUID for h in headers], headers


def _check_seg(seg_file: Path, series: Path, nifti_mask: Path) -> np.ndarray:
    """Every check of one written SEG against its source series; the SEG on the series."""
    import highdicom as hd
    import SimpleITK as sitk

    from brainseg import __version__

    assert _dciodvfy_errors(seg_file) == []
    seg = hd.seg.segread(seg_file)
    image, uids, headers = _series(series)
    src = headers[0]
    # what it is
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    desc = seg.get_segment_description(1)
    assert seg.number_of_segments == 1 and desc.segment_label == "tumour"
    cat, typ = desc.segmented_property_category, desc.segmented_property_type
    assert (cat.value, cat.scheme_designator) == ("49755003", "SCT")
    assert (typ.value, typ.scheme_designator) == ("108369006", "SCT")
    alg = desc.algorithm_identification[0]
    assert (alg.AlgorithmName, alg.AlgorithmVersion) == ("brainseg", __version__)
    assert "conv.onnx" in alg.AlgorithmParameters and "brainseg" in alg.AlgorithmParameters
    # whose it is: the source's patient, study, frame of reference; new UIDs of its own
    assert (seg.PatientID, str(seg.PatientName)) == (src.PatientID, str(src.PatientName))
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID and seg.SOPInstanceUID not in uids
    refs = seg.ReferencedSeriesSequence
    assert len(refs) == 1 and refs[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in refs[0].ReferencedInstanceSequence} == set(uids)
    # where each frame is: the position and orientation of the image it references
    by_uid = {h.SOPInstanceUID: h for h in headers}
    iop = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    assert np.allclose(iop.ImageOrientationPatient, src.ImageOrientationPatient, atol=1e-6)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ipp = frame.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose(ipp, by_uid[ref].ImagePositionPatient, atol=1e-4)
    # what is where: the frames, fetched by the SOP instances they reference, in SimpleITK's
    # slice order, equal the NIfTI mask resampled by SimpleITK onto the series
    on_series = seg.get_pixels_by_source_instance(uids, segment_numbers=[1])[..., 0]
    nifti = sitk.ReadImage(str(nifti_mask))
    expected = sitk.GetArrayFromImage(
        sitk.Resample(nifti, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    )
    assert expected.shape == on_series.shape
    assert np.array_equal(on_series != 0, expected != 0)
    return on_series


def _volume() -> np.ndarray:
    """X x Y x Z x 3 with an asymmetric FLAIR blob on some slices (a flip or transpose shows)."""
    v = blob_volume(shape=(64, 48, 6))
    v[40:46, 8:12, 2, 1] = 230
    return v


@pytest.mark.parametrize("geometry", ["axial", "oblique"])
def test_dicom_seg_refers_to_the_flair_series_and_equals_the_nifti_mask(
    run: Any, tmp_path: Path, geometry: str
) -> None:
    """Axial and 12-degree oblique series, file names shuffled: dciodvfy finds no error, the
    SEG refers to the FLAIR series and its frames equal the NIfTI mask; empty slices omitted."""
    model = conv_onnx(tmp_path / "conv.onnx", image_size=64)
    case = _dicom_case(tmp_path / "cases" / "A", _volume().transpose(2, 1, 0, 3), IOPS[geometry])
    out = tmp_path / "out"
    r = run(["predict", model, tmp_path / "cases", "-o", out, "--format", "dicom-seg", *CHANNELS])
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "A.json", "A_mask.nii.gz", "A_seg.dcm", "summary.csv"
    ]  # fmt: skip
    on_series = _check_seg(out / "A_seg.dcm", case / "flair", out / "A_mask.nii.gz")
    tumour_slices = int(np.count_nonzero(on_series.any(axis=(1, 2))))
    assert 0 < tumour_slices < 6  # some tumour, some empty slices
    import pydicom

    assert int(pydicom.dcmread(out / "A_seg.dcm").NumberOfFrames) == tumour_slices  # omitted


def test_an_empty_mask_gives_a_valid_seg_with_every_frame_empty(run: Any, tmp_path: Path) -> None:
    import highdicom as hd

    model = conv_onnx(tmp_path / "conv.onnx", image_size=64)
    quiet = np.random.default_rng(1).integers(0, 60, size=(6, 48, 64, 3), dtype=np.uint8)
    case = _dicom_case(tmp_path / "cases" / "E", quiet, IOPS["oblique"])
    out = tmp_path / "out"
    r = run(["predict", model, tmp_path / "cases", "-o", out, "--format", "dicom-seg", *CHANNELS])
    assert r.returncode == 0, r.stderr
    on_series = _check_seg(out / "E_seg.dcm", case / "flair", out / "E_mask.nii.gz")
    assert not on_series.any()
    seg = hd.seg.segread(out / "E_seg.dcm")
    assert int(seg.NumberOfFrames) == 6 and not seg.pixel_array.any()


def test_dicom_seg_for_cases_that_are_not_dicom_series_is_one_line_before_any_work(
    run: Any, tmp_path: Path
) -> None:
    """NIfTI cases, a DICOM case beside a NIfTI one, image slices: exit 2, one line, no file."""
    from _tiny import write_images

    model = conv_onnx(tmp_path / "conv.onnx", image_size=64)
    save_case(tmp_path / "nifti", "B", _volume())
    _dicom_case(tmp_path / "mixed", _volume().transpose(2, 1, 0, 3), IOPS["axial"], prefix="A_")
    for i, name in enumerate(("pre", "flair", "post")):
        save_nifti(tmp_path / "mixed" / f"B_{name}.nii.gz", _volume()[..., i])
    write_images(tmp_path / "imgs", 1, size=64)
    mixed = ["--channels", "pre=*_pre*,flair=*_flair*,post=*_post*"]
    for src, extra, words in [
        ("nifti", [], "case B: its flair"),
        ("mixed", mixed, "case B: its flair"),  # A is DICOM, and is not predicted either
        ("imgs", [], "--format dicom-seg: for volume cases only"),
    ]:
        out = tmp_path / f"out-{src}"
        r = run(["predict", model, tmp_path / src, "-o", out, "--format", "dicom-seg", *extra])
        assert r.returncode == 2, (src, r.stderr)
        errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
        assert len(errors) == 1 and words in errors[0], (src, r.stderr)
        assert "not a DICOM series" in errors[0] or src == "imgs", errors
        assert not out.exists(), src


def test_skip_existing_redoes_a_case_whose_seg_is_missing(run: Any, tmp_path: Path) -> None:
    model = conv_onnx(tmp_path / "conv.onnx", image_size=64)
    _dicom_case(tmp_path / "cases" / "A", _volume().transpose(2, 1, 0, 3), IOPS["axial"])
    out = tmp_path / "out"
    args = ["predict", model, tmp_path / "cases", "-o", out, *CHANNELS]
    assert run(args).returncode == 0 and not (out / "A_seg.dcm").exists()  # NIfTI by default
    r = run([*args, "--format", "dicom-seg", "--skip-existing"])
    assert r.returncode == 0 and (out / "A_seg.dcm").is_file(), r.stderr
    r = run([*args, "--format", "dicom-seg", "--skip-existing", "--json"])
    assert r.returncode == 0 and '"status": "skipped"' in r.stdout, r.stdout


def test_missing_highdicom_is_one_line_naming_the_extra(
    run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    model = conv_onnx(tmp_path / "conv.onnx", image_size=64)
    _dicom_case(tmp_path / "cases" / "A", _volume().transpose(2, 1, 0, 3), IOPS["axial"])
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom -> ImportError
    out = tmp_path / "out"
    r = run(["predict", model, tmp_path / "cases", "-o", out, "--format", "dicom-seg", *CHANNELS])
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "brainseg[volumes]" in errors[0], r.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_dicom_series_axial_and_oblique_give_segs_equal_to_the_nifti_masks(
    run: Any, tmp_path: Path, real_data: Path
) -> None:
    """A dev patient's TIFs as scanner-style DICOM series (axial, and oblique 12 degrees):
    each SEG passes dciodvfy, refers to the FLAIR series and equals the NIfTI mask."""
    from brainseg.data.lgg import discover, read_slice

    subset = tmp_path / "kaggle_3m"
    subset.mkdir()
    (subset / PATIENTS[0]).symlink_to(real_data / PATIENTS[0])
    patient = discover(subset).patients[0]
    images = np.stack([read_slice(s)[0] for s in sorted(patient.slices, key=lambda s: s.number)])
    model = conv_onnx(tmp_path / "conv.onnx", image_size=256)
    for name, iop in IOPS.items():
        case = _dicom_case(tmp_path / name / PATIENTS[0], images, iop)
        out = tmp_path / f"out-{name}"
        r = run(["predict", model, tmp_path / name, "-o", out, "--format", "dicom-seg", *CHANNELS])
        assert r.returncode == 0, r.stderr
        pid = PATIENTS[0]
        on_series = _check_seg(out / f"{pid}_seg.dcm", case / "flair", out / f"{pid}_mask.nii.gz")
        assert on_series.any() and not on_series.all(axis=(1, 2)).any(), name


def test_a_flair_image_off_the_series_grid_is_that_cases_error_and_nothing_is_written(
    run: Any, tmp_path: Path
) -> None:
    """The images are placed by ImagePositionPatient: with the last image of each series moved
    0.2 mm (within the reader's 10 % spacing tolerance, so the series is read, on an evenly
    spaced grid; a larger shift is refused by the reader: test_volumes) that image lies off the
    grid, and the case gets one error line and no file."""
    import pydicom

    model = conv_onnx(tmp_path / "conv.onnx", image_size=64)
    case = _dicom_case(tmp_path / "cases" / "A", _volume().transpose(2, 1, 0, 3), IOPS["axial"])
    for contrast in ("pre", "flair", "post"):
        last = max(
            (pydicom.dcmread(f) for f in (case / contrast).glob("*.dcm")),
            key=lambda ds: float(ds.ImagePositionPatient[2]),
        )
        x, y, z = last.ImagePositionPatient
        last.ImagePositionPatient = [x, y, z + 0.2]
        last.save_as(last.filename)
    out = tmp_path / "out"
    r = run(["predict", model, tmp_path / "cases", "-o", out, "--format", "dicom-seg", *CHANNELS])
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert "lies on no slice of the series grid" in errors[0], r.stderr
    assert not list(out.glob("A*")), sorted(out.iterdir())


def test_eval_on_dicom_cases_writes_the_segs_it_scores_the_nifti_of(
    run: Any, tmp_path: Path
) -> None:
    """issue 26: eval's mask writing takes --format dicom-seg as predict does: masks/ gets the
    SEG (valid for dciodvfy, equal to the scored NIfTI mask)."""
    import shutil

    model = conv_onnx(tmp_path / "conv.onnx", image_size=64)
    case = _dicom_case(tmp_path / "cases" / "A", _volume().transpose(2, 1, 0, 3), IOPS["oblique"])
    r = run(["predict", model, tmp_path / "cases", "-o", tmp_path / "p", *CHANNELS])
    assert r.returncode == 0, r.stderr
    (tmp_path / "gt").mkdir()
    shutil.copy(tmp_path / "p" / "A_mask.nii.gz", tmp_path / "gt" / "A_seg.nii.gz")
    r = run(
        ["eval", model, tmp_path / "cases", "--gt", tmp_path / "gt", "--format", "dicom-seg",
         *CHANNELS, "--project", tmp_path / "e", "--name", "x", "--json"]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    masks = tmp_path / "e" / "x" / "masks"
    _check_seg(masks / "A_seg.dcm", case / "flair", masks / "A_mask.nii.gz")
    assert json.loads(r.stdout)["per_patient"]["dice"]["mean"] == 1.0


def test_seg_series_names_the_series_the_seg_refers_to(run: Any, tmp_path: Path) -> None:
    """issue 26: "or of the series named by an option": --seg-series post refers the SEG to
    the post-contrast series (its UIDs read back by pydicom); without dicom-seg it is refused."""
    import pydicom

    model = conv_onnx(tmp_path / "conv.onnx", image_size=64)
    case = _dicom_case(tmp_path / "cases" / "A", _volume().transpose(2, 1, 0, 3), IOPS["axial"])
    out = tmp_path / "out"
    r = run(
        ["predict", model, tmp_path / "cases", "-o", out, "--format", "dicom-seg",
         "--seg-series", "post", *CHANNELS]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    _check_seg(out / "A_seg.dcm", case / "post", out / "A_mask.nii.gz")
    post = pydicom.dcmread(next((case / "post").iterdir()))
    seg = pydicom.dcmread(out / "A_seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == post.SeriesInstanceUID
    assert seg.FrameOfReferenceUID == post.FrameOfReferenceUID
    r = run(["predict", model, tmp_path / "cases", "-o", tmp_path / "n", "--seg-series", "post",
             *CHANNELS])  # fmt: skip
    assert r.returncode == 2 and "--seg-series post: only with --format dicom-seg" in r.stderr
