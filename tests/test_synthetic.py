"""The phantom dataset: kaggle_3m layout, masks, tumour statistics, determinism, safety."""

from __future__ import annotations

import csv
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import tifffile

from brainseg.data.synthetic import generate, patient_names, write_synthetic
from brainseg.errors import BrainsegError

NAME = re.compile(r"^TCGA_[A-Z]{2}_\d{4}_(\d{8})$")


def _slices(folder: Path) -> list[int]:
    nums = []
    for f in folder.glob("*.tif"):
        m = re.fullmatch(re.escape(folder.name) + r"_(\d+)\.tif", f.name)
        if m:
            nums.append(int(m.group(1)))
    return sorted(nums)


def test_layout_names_and_files(phantom_root: Path) -> None:
    assert phantom_root.name == "kaggle_3m"
    folders = sorted(p for p in phantom_root.iterdir() if p.is_dir())
    assert len(folders) == 6
    assert sorted(p.name for p in phantom_root.iterdir() if p.is_file()) == [
        "README.md",
        "data.csv",
    ]
    for folder in folders:
        m = NAME.match(folder.name)
        assert m, folder.name
        y, mo, d = int(m.group(1)[:4]), int(m.group(1)[4:6]), int(m.group(1)[6:])
        assert 1985 <= y <= 2005 and 1 <= mo <= 12 and 1 <= d <= 31
        nums = _slices(folder)
        assert nums == list(range(1, len(nums) + 1))  # numbered from 1, no gaps
        assert 20 <= len(nums) <= 40
        files = {f.name for f in folder.iterdir()}
        assert len(files) == 2 * len(nums)
        for k in nums:
            assert f"{folder.name}_{k}_mask.tif" in files
    # No temporary folders left behind.
    assert not [p for p in phantom_root.parent.iterdir() if p.name.startswith(".")]


def test_images_and_masks(phantom_root: Path) -> None:
    folder = sorted(p for p in phantom_root.iterdir() if p.is_dir())[0]
    img = tifffile.imread(folder / f"{folder.name}_1.tif")
    mask = tifffile.imread(folder / f"{folder.name}_1_mask.tif")
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert mask.shape == (64, 64) and mask.dtype == np.uint8
    values: set[int] = set()
    for f in folder.glob("*_mask.tif"):
        values |= set(np.unique(tifffile.imread(f)).tolist())
    assert values == {0, 255}


def test_data_csv_like_the_real_one(phantom_root: Path) -> None:
    with open(phantom_root / "data.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    folders = sorted(p.name for p in phantom_root.iterdir() if p.is_dir())
    assert sorted(r["Patient"] for r in rows) == sorted(n.rsplit("_", 1)[0] for n in folders)
    assert "age_at_initial_pathologic" in rows[0] and "death01" in rows[0]
    assert "not real patients" in (phantom_root / "README.md").read_text()


def test_tumour_burden_and_contiguous_runs() -> None:
    cases = generate(patients=10, seed=3, size=64)
    total = sum(len(c.masks) for c in cases)
    tumour = sum(int(c.masks.any(axis=(1, 2)).sum()) for c in cases)
    assert 0.2 <= tumour / total <= 0.5
    for c in cases:
        has = np.flatnonzero(c.masks.any(axis=(1, 2)))
        assert len(has) >= 2, c.folder
        assert np.array_equal(has, np.arange(has[0], has[-1] + 1)), c.folder  # one run
        assert has[0] > 0 and has[-1] < len(c.masks) - 1  # not at the very ends of the head
        assert set(np.unique(c.masks).tolist()) == {0, 1}


def test_tumour_bright_in_flair_and_channels_differ() -> None:
    for c in generate(patients=4, seed=1, size=64):
        m = c.masks.astype(bool)
        head = c.images[..., 1] > 40
        flair = c.images[..., 1].astype(float)
        brain = head & ~m
        # FLAIR: the tumour is clearly brighter than the rest of the head.
        assert flair[m].mean() > flair[brain].mean() + 40, c.folder
        # Pre-contrast: the tumour is not bright.
        assert c.images[..., 0][m].mean() < flair[m].mean() - 40, c.folder
        # The three channels are different images.
        a, b, p = (c.images[..., i].astype(float) for i in range(3))
        assert np.abs(a - b).mean() > 5 and np.abs(b - p).mean() > 5 and np.abs(a - p).mean() > 2


def test_deterministic_bytes(tmp_path: Path) -> None:
    a = write_synthetic(tmp_path / "a", patients=2, seed=5, size=32, slices=(6, 8))
    b = write_synthetic(tmp_path / "b", patients=2, seed=5, size=32, slices=(6, 8))
    c = write_synthetic(tmp_path / "c", patients=2, seed=6, size=32, slices=(6, 8))
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert sorted(p.name for p in c.iterdir()) != sorted(p.name for p in a.iterdir())


def test_names_unique_and_deterministic() -> None:
    names = patient_names(300, seed=0)
    assert len(set(names)) == 300
    assert len({n.rsplit("_", 1)[0] for n in names}) == 300  # patient ids unique too
    assert names == patient_names(300, seed=0)
    assert names[:5] != patient_names(5, seed=1)


def test_refuses_existing_without_force(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path, patients=1, seed=0, size=32, slices=(4, 4))
    marker = root / "keep.txt"
    marker.write_text("x")
    with pytest.raises(BrainsegError) as exc:
        write_synthetic(tmp_path, patients=1, seed=0, size=32, slices=(4, 4))
    assert str(root) in exc.value.message
    assert "--force" in (exc.value.hint or "")
    assert marker.exists()
    again = write_synthetic(tmp_path, patients=2, seed=0, size=32, slices=(4, 4), force=True)
    assert again == root and not marker.exists()
    assert len([p for p in root.iterdir() if p.is_dir()]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["kaggle_3m"]  # no temporaries left


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"patients": 0}, "--patients"),
        ({"size": 50}, "--size"),
        ({"slices": (10, 5)}, "slices"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, word: str) -> None:
    with pytest.raises(BrainsegError, match=word):
        write_synthetic(tmp_path, **kwargs)
    assert not (tmp_path / "kaggle_3m").exists()


def test_dest_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(BrainsegError, match="not a folder"):
        write_synthetic(f, patients=1, size=32)


def test_readable_by_the_dataset_layer(phantom_root: Path) -> None:
    lgg = pytest.importorskip("brainseg.data.lgg")
    ds = lgg.discover(phantom_root)
    assert len(ds.patients) == 6
    img, mask = lgg.read_slice(ds.patients[0].slices[0])
    assert img.shape == (64, 64, 3) and set(np.unique(mask).tolist()) <= {0, 1}


def test_flair_bright_mimics_are_not_tumour() -> None:
    """Some FLAIR-bright spots are outside the mask; the pre-contrast channel tells them apart."""
    cases = generate(patients=6, seed=0, size=64)
    mimic_pre, tumour_pre, n_mimic = [], [], 0
    for c in cases:
        flair = c.images[..., 1].astype(float)
        m = c.masks.astype(bool)
        thr = np.percentile(flair[m], 25)
        # Bright FLAIR outside the tumour, away from the scalp (the centre of the image).
        centre = np.zeros_like(m)
        centre[:, 16:48, 16:48] = True
        mimic = (flair >= thr) & ~m & centre
        n_mimic += int(mimic.sum())
        mimic_pre += c.images[..., 0][mimic].tolist()
        tumour_pre += c.images[..., 0][m].tolist()
    assert n_mimic > 20
    assert np.mean(mimic_pre) > np.mean(tumour_pre) + 15


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_folders_and_files_respect_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        root = write_synthetic(tmp_path / "d", patients=1, seed=0, size=32, slices=(4, 4))
    finally:
        os.umask(old)
    folders = [root, *(p for p in root.rglob("*") if p.is_dir())]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in folders} == {oct(0o777 & ~umask)}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o666 & ~umask)}


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"patients": 10**20}, "--patients"),
        ({"size": 10**9}, "--size"),
        ({"seed": -1}, "--seed"),
        ({"slices": (4, 10**9)}, "slices"),
    ],
)
def test_out_of_range_arguments_are_refused_at_once(
    tmp_path: Path, kwargs: dict, word: str
) -> None:
    with pytest.raises(BrainsegError, match=word) as exc:
        write_synthetic(tmp_path, **kwargs)
    assert str(next(iter(kwargs.values()))) in exc.value.message
    assert not (tmp_path / "kaggle_3m").exists()


def test_a_run_that_loses_the_race_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process installs DEST/kaggle_3m while this run writes its phantoms (through the
    library: no lock): this run says what happened and leaves the other's folder alone."""
    from brainseg.data import synthetic
    from brainseg.errors import BrainsegRuntimeError

    real = synthetic.make_case

    def make_case_while_another_finishes(*args: object, **kwargs: object) -> object:
        (tmp_path / "kaggle_3m").mkdir(exist_ok=True)
        (tmp_path / "kaggle_3m" / "theirs.txt").write_text("x")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(synthetic, "make_case", make_case_while_another_finishes)
    with pytest.raises(BrainsegRuntimeError, match="created by another run") as exc:
        write_synthetic(tmp_path, patients=1, seed=0, size=32, slices=(4, 4))
    assert str(tmp_path / "kaggle_3m") in exc.value.message and "\n" not in exc.value.message
    assert [p.name for p in (tmp_path / "kaggle_3m").iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["kaggle_3m"]  # no temporary left
