"""data.lgg: finding a kaggle_3m dataset, slice order, validation reported all at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from brainseg.data import cache, lgg
from brainseg.errors import BrainsegError

SIZE = 64


def _image(seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _mask(k: int, size: int = SIZE) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    if k % 2 == 0:  # even slices have a tumour
        m[10 : 10 + k, 20:30] = 255
    return m


def make_dataset(
    base: Path, patients: dict[str, int], name: str = "kaggle_3m", ext: str = ".tif"
) -> Path:
    """A kaggle_3m-style folder: ``{patient: n_slices}``, 64x64, deflate like the real data."""
    root = base / name
    root.mkdir(parents=True)
    for p, n in patients.items():
        (root / p).mkdir()
        for k in range(1, n + 1):
            tifffile.imwrite(
                root / p / f"{p}_{k}{ext}", _image(k), photometric="rgb", compression="zlib"
            )
            tifffile.imwrite(root / p / f"{p}_{k}_mask{ext}", _mask(k), compression="zlib")
    return root


def test_slices_ordered_numerically(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, {"TCGA_AA_0001_20000101": 12})
    ds = lgg.discover(root)
    (patient,) = ds.patients
    assert [s.number for s in patient.slices] == list(range(1, 13))  # 10 after 9, not after 1
    assert patient.slices[9].image.name == "TCGA_AA_0001_20000101_10.tif"
    assert patient.slices[9].mask.name == "TCGA_AA_0001_20000101_10_mask.tif"
    assert patient.id == "TCGA_AA_0001_20000101" and patient.folder == root / patient.id
    assert ds.problems == [] and len(ds) == 12


def test_find_root_itself_parent_and_renamed(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, {"P1": 2})
    assert lgg.find_root(root) == root
    assert lgg.find_root(tmp_path) == root  # the folder containing kaggle_3m
    other = make_dataset(tmp_path / "x", {"P1": 1}, name="my_lgg")  # renamed root folder
    assert lgg.find_root(other) == other
    assert lgg.discover(tmp_path).root == root


@pytest.mark.parametrize("kind", ["missing", "file", "unrelated"])
def test_find_root_rejects_non_datasets(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "nothing"
    if kind == "file":
        path.write_text("x")
    elif kind == "unrelated":
        path.mkdir()
        (path / "notes.txt").write_text("x")
        (path / "sub").mkdir()
    with pytest.raises(BrainsegError) as ei:
        lgg.discover(path)
    assert str(path) in ei.value.message
    assert "brainseg download lgg --dest DIR" in ei.value.hint
    assert "brainseg download synthetic --dest DIR" in ei.value.hint


def test_ignores_hidden_and_extra_files_reads_clinical(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, {"P2": 1, "P1": 2}, ext=".tiff")
    (root / "README.md").write_text("readme")
    (root / "data.csv").write_text("Patient,age\nP1,50\nP2,61\n")
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "x_1.tif").write_bytes(b"junk")
    (root / "P1" / ".DS_Store").write_bytes(b"junk")
    (root / "P1" / "notes.txt").write_text("not a slice")
    ds = lgg.discover(root)
    assert ds.patient_ids == ["P1", "P2"]  # sorted, hidden folder ignored
    assert [len(p.slices) for p in ds.patients] == [2, 1]
    assert ds.patients[0].slices[0].image.suffix == ".tiff"  # .tiff accepted
    assert ds.clinical == [{"Patient": "P1", "age": "50"}, {"Patient": "P2", "age": "61"}]
    assert ds.problems == []


def test_read_slice_rgb_and_grayscale(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, {"P1": 2})
    s = lgg.discover(root).patients[0].slices[1]
    img, msk = lgg.read_slice(s)
    assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, _image(2))
    assert msk.dtype == np.uint8 and set(np.unique(msk).tolist()) == {0, 1}
    np.testing.assert_array_equal(msk, _mask(2) // 255)
    gray = np.arange(SIZE * SIZE, dtype=np.uint32).reshape(SIZE, SIZE).astype(np.uint8)
    tifffile.imwrite(s.image, gray)
    img, _ = lgg.read_slice(s)
    assert img.shape == (SIZE, SIZE, 3)
    for c in range(3):
        np.testing.assert_array_equal(img[:, :, c], gray)
    ones = (_mask(2) // 255).astype(np.uint8)  # a {0, 1} mask is accepted as is
    tifffile.imwrite(s.mask, ones)
    np.testing.assert_array_equal(lgg.read_slice(s)[1], ones)


def test_read_slice_error_names_file(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, {"P1": 1})
    s = lgg.discover(root).patients[0].slices[0]
    tifffile.imwrite(s.mask, np.full((SIZE, SIZE), 7, np.uint8))
    with pytest.raises(BrainsegError, match=r"P1/P1_1_mask.tif: mask values \{7\}, expected") as e:
        lgg.read_slice(s)
    assert e.value.message.startswith(f"{root}/P1/P1_1_mask.tif: ")  # the full path


def _break_everything(root: Path) -> None:
    """One patient per kind of problem (patients P0 and P9 stay good)."""
    (root / "Pmissmask" / "Pmissmask_2_mask.tif").unlink()
    (root / "Pmissimg" / "Pmissimg_1.tif").unlink()
    f = root / "Ptrunc" / "Ptrunc_1.tif"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    tifffile.imwrite(root / "Pshape" / "Pshape_1_mask.tif", np.zeros((SIZE, SIZE, 3), np.uint8))
    tifffile.imwrite(
        root / "Pdtype" / "Pdtype_1.tif", np.zeros((SIZE, SIZE, 3), np.uint16), photometric="rgb"
    )
    tifffile.imwrite(root / "Pvalues" / "Pvalues_2_mask.tif", np.full((SIZE, SIZE), 128, np.uint8))
    tifffile.imwrite(root / "Psize" / "Psize_1.tif", _image(1, 32), photometric="rgb")
    tifffile.imwrite(root / "Psize" / "Psize_1_mask.tif", _mask(1, 32))
    (root / "Pempty").mkdir()


EXPECTED_LINES = [
    "Pdtype/Pdtype_1.tif: image dtype uint16, expected uint8",
    "Pempty/: empty patient folder",
    "Pmissimg/Pmissimg_1_mask.tif: missing image (expected Pmissimg/Pmissimg_1.tif)",
    "Pmissmask/Pmissmask_2.tif: missing mask (expected Pmissmask/Pmissmask_2_mask.tif)",
    "Pshape/Pshape_1_mask.tif: mask shape 64x64x3, expected HxW",
    "Psize/Psize_1.tif: size 32x32, expected 64x64",
    "Ptrunc/Ptrunc_1.tif: unreadable or truncated TIF",
    "Pvalues/Pvalues_2_mask.tif: mask values {128}, expected {0, 255} or {0, 1}",
]
BROKEN = ["P0", "Pmissmask", "Pmissimg", "Ptrunc", "Pshape", "Pdtype", "Pvalues", "Psize", "P9"]


def test_every_problem_reported_together(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, dict.fromkeys(BROKEN, 2))
    _break_everything(root)
    with pytest.raises(BrainsegError) as ei:
        cache.load_dataset(root)
    msg = ei.value.message
    assert msg.splitlines()[0] == f"8 problems in dataset {root}:"
    for line in EXPECTED_LINES:
        assert line in msg, line
    assert ei.value.hint is not None and "--skip-bad" in ei.value.hint
    assert ei.value.exit_code == 2
    # discover() alone checks the structure only (no decoding) and lists those problems
    with pytest.raises(BrainsegError) as ei:
        lgg.discover(root)
    assert ei.value.message.splitlines()[0] == f"3 problems in dataset {root}:"


def test_skip_bad_skips_and_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_dataset(tmp_path, dict.fromkeys(BROKEN, 2))
    _break_everything(root)
    data = cache.load_dataset(root, skip_bad=True)
    err = capsys.readouterr().err
    assert "--skip-bad: skipping 7 slices (8 problems)" in err
    assert "... and 3 more (--debug lists all)" in err
    kept = {
        (data.patient_ids[i], int(n))
        for i, n in zip(data.patient_index, data.slice_number, strict=True)
    }
    assert kept == {
        ("P0", 1),
        ("P0", 2),
        ("P9", 1),
        ("P9", 2),
        ("Pmissmask", 1),
        ("Pmissimg", 2),
        ("Ptrunc", 2),
        ("Pshape", 2),
        ("Pdtype", 2),
        ("Pvalues", 1),
        ("Psize", 2),
    }
    assert len(data) == 11 and "using 11 slices of 9 patients" in err
    assert "Pempty" not in data.patient_ids
    assert len(data.problems) == 8
    # structural check alone, with skip_bad: a warning and the bad slices left out
    ds = lgg.discover(root, skip_bad=True)
    assert (
        "Pmissimg" in ds.patient_ids
        and len(ds.patients[ds.patient_ids.index("Pmissimg")].slices) == 1
    )
    # the warning comes back on every load from the cache, without decoding again
    data2 = cache.load_dataset(root, skip_bad=True)
    assert data2.path == data.path
    assert "8 problem(s)" in capsys.readouterr().err


def test_cli_prints_eight_problems_as_one_error_with_a_list(tmp_path: Path) -> None:
    """What the user sees (docs/dataset.md): one `error:` line naming the dataset and the
    count, one indented line per problem, the hint; exit 2, no traceback."""
    from _reliability import assert_clear_error
    from conftest import run_cli

    root = make_dataset(tmp_path, dict.fromkeys(BROKEN, 2))
    _break_everything(root)
    r = run_cli(["split", root, "-o", tmp_path / "s.yaml"], timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    start = next(i for i, x in enumerate(lines) if x.startswith("error:"))
    assert lines[start] == f"error: 8 problems in dataset {root}:"
    listed = lines[start + 1 : start + 9]
    assert all(x.startswith("  ") for x in listed)
    for got, want in zip(listed, EXPECTED_LINES, strict=True):  # sorted by patient
        assert got[2:].startswith(want), (got, want)
    assert lines[start + 9 :] == [f"hint: {lgg.SKIP_HINT}"]
    assert not (tmp_path / "s.yaml").exists()
    with pytest.raises(BrainsegError) as ei:
        cache.load_dataset(root, cache_dir=tmp_path / "c")
    assert_clear_error(ei.value, [root])  # the oracle the property tests use


def test_no_patients(tmp_path: Path) -> None:
    root = tmp_path / "kaggle_3m"
    root.mkdir()
    (root / "README.md").write_text("x")
    (root / "data.csv").write_text("Patient\n")
    for skip in (False, True):
        with pytest.raises(BrainsegError, match="no patients"):
            cache.load_dataset(root, skip_bad=skip)


def test_many_problems_are_truncated(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, {"P1": 30})
    for k in range(1, 31):
        (root / "P1" / f"P1_{k}_mask.tif").unlink()
    with pytest.raises(BrainsegError) as ei:
        lgg.discover(root)
    lines = ei.value.message.splitlines()
    assert lines[0] == f"30 problems in dataset {root}:"
    assert len(lines) == 1 + 20 + 1 and lines[-1] == "  ... and 10 more"
    with pytest.raises(BrainsegError, match="no usable slices"):
        lgg.discover(root, skip_bad=True)


def test_bad_file_name_and_duplicates(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, {"P1": 2})
    (root / "P1" / "scan.tif").write_bytes(b"x")
    tifffile.imwrite(root / "P1" / "P1_1.tiff", _image(1), photometric="rgb")
    with pytest.raises(BrainsegError) as ei:
        lgg.discover(root)
    assert "P1/scan.tif: unexpected TIF name, expected <case>_<k>.tif" in ei.value.message
    assert "P1/P1_1.tiff: duplicate of P1/P1_1.tif (slice 1)" in ei.value.message
