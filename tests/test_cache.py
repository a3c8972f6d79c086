"""data.cache: the uint8 array cache round trip, its key, atomic builds, resizing, burden."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    if k % 2 == 0:  # even slices have a tumour of 10 x k pixels
        m[10 : 10 + k, 20:30] = 255
    return m


def make_dataset(base: Path, patients: dict[str, int]) -> Path:
    """A kaggle_3m-style folder ``{patient: n_slices}`` of 64x64 deflate TIFs."""
    root = base / "kaggle_3m"
    root.mkdir(parents=True)
    for p, n in patients.items():
        (root / p).mkdir()
        for k in range(1, n + 1):
            seed = hash((p, k)) % 10_000
            tifffile.imwrite(
                root / p / f"{p}_{k}.tif", _image(seed), photometric="rgb", compression="zlib"
            )
            tifffile.imwrite(root / p / f"{p}_{k}_mask.tif", _mask(k), compression="zlib")
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data", {"PB": 3, "PA": 11, "PC": 2})


def _cache_dirs(cache_dir: Path) -> list[str]:
    return sorted(d.name for d in (cache_dir / "datasets").iterdir())


def test_round_trip_equals_direct_decode(root: Path, tmp_path: Path) -> None:
    data = cache.load_dataset(root, cache_dir=tmp_path / "c")
    ds = lgg.discover(root)
    assert len(data) == len(ds) == 16
    assert data.patient_ids == ["PA", "PB", "PC"]
    assert isinstance(data.images, np.memmap) and isinstance(data.masks, np.memmap)
    assert data.images.shape == (16, 3, SIZE, SIZE) and data.images.dtype == np.uint8
    assert data.masks.shape == (16, SIZE, SIZE) and data.masks.dtype == np.uint8
    assert data.patient_index.dtype == np.int32 and data.slice_number.dtype == np.int32
    for i, s in enumerate(ds.slices):
        img, msk = lgg.read_slice(s)
        np.testing.assert_array_equal(data.images[i], img.transpose(2, 0, 1))
        np.testing.assert_array_equal(data.masks[i], msk)
        assert data.patient_ids[data.patient_index[i]] == s.patient
        assert data.slice_number[i] == s.number
    assert data.slice_number[:11].tolist() == list(range(1, 12))  # numeric order kept
    assert set(np.unique(data.masks).tolist()) == {0, 1}
    assert data.root == root.resolve() and data.path is not None
    assert data.path.parent == tmp_path / "c" / "datasets"
    meta = json.loads((data.path / "meta.json").read_text())
    assert meta["key"] == data.key and meta["slices"] == 16 and meta["size"] == [SIZE, SIZE]


def test_second_load_uses_cache(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = cache.load_dataset(root)  # BRAINSEG_CACHE_DIR is set by the autouse fixture
    assert first.path is not None
    assert first.path.parent == Path(os.environ["BRAINSEG_CACHE_DIR"]) / "datasets"

    def boom(_: lgg.SliceFile) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(lgg, "decode_slice", boom)
    second = cache.load_dataset(root)
    assert second.path == first.path and second.key == first.key
    np.testing.assert_array_equal(second.images, first.images)
    with pytest.raises(AssertionError, match="decoded again"):
        cache.load_dataset(root, rebuild=True)


def test_same_content_with_new_file_times_reuses_the_cache(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-installed zip stamps new mtimes on identical files: the cache is reused (keyed by
    content), not built a second time, and the new stats are remembered (no hashing next)."""
    cdir = tmp_path / "c"
    before = cache.load_dataset(root, cache_dir=cdir)
    for f in root.rglob("*.tif"):
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(lgg, "decode_slice", boom)
    after = cache.load_dataset(root, cache_dir=cdir)
    assert after.key == before.key and after.path == before.path
    assert _cache_dirs(cdir) == [before.path.name]
    hashed: list[object] = []
    monkeypatch.setattr(cache, "dataset_key", lambda *a, **k: hashed.append(a) or "x")
    assert cache.load_dataset(root, cache_dir=cdir).key == before.key and hashed == []
    # a copy of the same files elsewhere is the same dataset, too
    import shutil

    shutil.copytree(root, tmp_path / "copy")
    assert cache.load_dataset(tmp_path / "copy", cache_dir=cdir).path == before.path


@pytest.mark.parametrize("change", ["content", "added", "removed"])
def test_changed_file_rebuilds(root: Path, tmp_path: Path, change: str) -> None:
    cdir = tmp_path / "c"
    before = cache.load_dataset(root, cache_dir=cdir)
    mask = root / "PB" / "PB_1_mask.tif"
    if change == "content":
        tifffile.imwrite(mask, np.full((SIZE, SIZE), 255, np.uint8), compression="zlib")
    elif change == "added":
        tifffile.imwrite(root / "PB" / "PB_4.tif", _image(4), photometric="rgb")
        tifffile.imwrite(root / "PB" / "PB_4_mask.tif", _mask(4))
    else:
        (root / "PC" / "PC_2.tif").unlink()
        (root / "PC" / "PC_2_mask.tif").unlink()
    after = cache.load_dataset(root, cache_dir=cdir)
    assert after.key != before.key and after.path != before.path
    assert _cache_dirs(cdir) == [after.path.name]  # the outdated cache was removed
    n = {"content": 16, "added": 17, "removed": 15}[change]
    assert len(after) == n
    row = int(cache.ArrayData.indices_of(after, ["PB"])[0])
    assert after.masks[row].all() == (change == "content")


def test_skip_bad_is_part_of_the_key(root: Path, tmp_path: Path) -> None:
    other = make_dataset(tmp_path / "other", {"PX": 2})
    b = cache.load_dataset(other, cache_dir=tmp_path / "c")
    a = cache.load_dataset(root, cache_dir=tmp_path / "c")
    assert a.key != b.key and len(_cache_dirs(tmp_path / "c")) == 2
    # a clean dataset cached without skip_bad is reused with skip_bad (nothing to skip)
    c = cache.load_dataset(root, cache_dir=tmp_path / "d")
    d = cache.load_dataset(root, cache_dir=tmp_path / "d", skip_bad=True)
    assert c.key == d.key and len(_cache_dirs(tmp_path / "d")) == 1


def test_no_temp_litter(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cdir = tmp_path / "c"
    # a failed build (a bad file) leaves nothing behind
    bad = root / "PA" / "PA_3_mask.tif"
    good = bad.read_bytes()
    tifffile.imwrite(bad, np.full((SIZE, SIZE), 3, np.uint8))
    with pytest.raises(BrainsegError, match=r"PA/PA_3_mask\.tif: mask values"):
        cache.load_dataset(root, cache_dir=cdir)
    assert _cache_dirs(cdir) == []
    bad.write_bytes(good)
    # a build interrupted midway (Ctrl-C) leaves nothing behind either
    real = lgg.decode_slice
    calls = {"n": 0}

    def interrupted(s: lgg.SliceFile) -> object:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(s)

    monkeypatch.setattr(lgg, "decode_slice", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.load_dataset(root, cache_dir=cdir)
    assert _cache_dirs(cdir) == []
    monkeypatch.setattr(lgg, "decode_slice", real)
    # a killed build's temp folder (its process is gone) is cleaned by the next build
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    import socket

    dead = cdir / "datasets" / f".tmp-{'0' * 32}-{socket.gethostname()}-{proc.stdout.strip()}-ab"
    dead.mkdir(parents=True)
    (dead / "images.part.npy").write_bytes(b"half")
    alive = cdir / "datasets" / f".tmp-{'1' * 32}-{socket.gethostname()}-{os.getpid()}-cd"
    alive.mkdir()  # a build in progress in a live process is left alone
    data = cache.load_dataset(root, cache_dir=cdir)
    assert _cache_dirs(cdir) == sorted([alive.name, data.path.name])
    assert sorted(p.name for p in data.path.iterdir()) == [
        "images.npy",
        "masks.npy",
        "meta.json",
        "patient_index.npy",
        "slice_number.npy",
        "tumor_pixels.npy",
    ]


def test_damaged_cache_is_rebuilt(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = cache.load_dataset(root, cache_dir=tmp_path / "c")
    (data.path / "masks.npy").write_bytes(b"garbage")
    again = cache.load_dataset(root, cache_dir=tmp_path / "c")
    assert "is damaged; rebuilding it" in capsys.readouterr().err
    assert again.masks.shape == (16, SIZE, SIZE)
    assert cache.clear_cache(tmp_path / "c") == 1
    assert _cache_dirs(tmp_path / "c") == []


def test_indices_of(root: Path) -> None:
    data = cache.load_dataset(root)
    idx = data.indices_of(["PC", "PA"])
    assert idx.tolist() == [*range(11), 14, 15]  # dataset order
    assert data.indices_of([]).tolist() == []
    with pytest.raises(BrainsegError) as ei:
        data.indices_of(["PA", "TCGA_XX_9999", "nope"])
    assert "2 patient id(s) not in dataset" in ei.value.message
    assert "TCGA_XX_9999, nope" in ei.value.message and ei.value.hint


def test_resized(root: Path) -> None:
    data = cache.load_dataset(root)
    assert data.resized(SIZE) is data and data.resized((SIZE, SIZE)) is data
    small = data.resized(32)
    assert small.images.shape == (16, 3, 32, 32) and small.images.dtype == np.uint8
    assert small.masks.shape == (16, 32, 32) and set(np.unique(small.masks)) <= {0, 1}
    assert small.path is None and small.patient_ids == data.patient_ids
    # same tumour slices at any size: no small tumour lost
    assert small.summary()["tumor_slices"] == data.summary()["tumor_slices"]
    # a constant image stays constant, a big square mask keeps about 1/4 of its area
    flat = cache.resize_images(np.full((1, 3, 64, 64), 77, np.uint8), 32)
    assert (flat == 77).all()
    sq = np.zeros((1, 64, 64), np.uint8)
    sq[0, 16:48, 16:48] = 1
    assert abs(int(cache.resize_masks(sq, 32).sum()) - 256) <= 32
    dot = np.zeros((1, 64, 64), np.uint8)
    dot[0, 33, 17] = 1  # one pixel: bilinear gives 0.25, kept by the never-empty rule
    out = cache.resize_masks(dot, 16)
    assert out.sum() >= 1 and out[0, 33 // 4, 17 // 4] == 1
    up = data.resized((96, 128))
    assert up.images.shape == (16, 3, 96, 128)
    with pytest.raises(BrainsegError, match="not valid"):
        data.resized(0)


def test_burden_and_summary(root: Path) -> None:
    data = cache.load_dataset(root)
    # PA: 11 slices, tumours on 2, 4, 6, 8, 10 (10 x k pixels); PB: 3 (slice 2); PC: 2 (2)
    assert data.tumor_slices_per_patient() == {"PA": 5, "PB": 1, "PC": 1}
    assert data.tumor_pixels_per_patient() == {"PA": 300, "PB": 20, "PC": 20}
    assert data.slices_per_patient() == {"PA": 11, "PB": 3, "PC": 2}
    assert data.burden()["PA"] == {"slices": 11, "tumor_slices": 5, "tumor_pixels": 300}
    s = data.summary()
    assert (s["patients"], s["slices"], s["tumor_slices"]) == (3, 16, 7)
    assert s["size"] == [SIZE, SIZE]


def test_find_root_error_passes_through(tmp_path: Path) -> None:
    with pytest.raises(BrainsegError, match="does not exist"):
        cache.load_dataset(tmp_path / "missing")


def test_phantom_dataset_integration(phantom_root: Path) -> None:
    data = cache.load_dataset(phantom_root)
    s = data.summary()
    assert s["patients"] == 6 and s["size"] == [64, 64]
    assert 0 < s["tumor_slices"] < s["slices"]
    img, _ = lgg.read_slice(lgg.discover(phantom_root).slices[0])
    np.testing.assert_array_equal(data.images[0], img.transpose(2, 0, 1))


@pytest.mark.realdata
def test_real_dev_subset(real_data: Path, tmp_path: Path) -> None:
    data = cache.load_dataset(real_data.parent, cache_dir=tmp_path / "c")  # parent works too
    s = data.summary()
    assert (s["patients"], s["slices"], s["tumor_slices"]) == (25, 840, 287)
    assert s["size"] == [256, 256] and data.problems == []
    assert data.images.shape == (840, 3, 256, 256)
    assert sum(data.tumor_slices_per_patient().values()) == 287
    assert data.slice_number[:10].tolist() == list(range(1, 11))
    ds = lgg.discover(real_data)
    assert len(ds.clinical) == 25 and "Patient" in ds.clinical[0]
    i = 500
    img, msk = lgg.read_slice(ds.slices[i])
    np.testing.assert_array_equal(data.images[i], img.transpose(2, 0, 1))
    np.testing.assert_array_equal(data.masks[i], msk)


def test_benchmark_script_smoke(root: Path, tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cache.py"
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "--data",
            str(root.parent),
            "--smoke",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["patients"] == 2 and res["slices"] == 14 and res["arrays_equal_decode"] is True
    assert res["load_s"] > 0 and res["speedup_vs_decode"] == res["decode_s"] / res["load_s"]
    assert "load cache + read all bytes" in proc.stdout
    assert res["versions"]["numpy"] == np.__version__ and res["command"].startswith("python ")
    assert res["targets"]["met"] == (res["speedup_vs_decode"] >= 10)


def test_odd_size_first_slice(tmp_path: Path) -> None:
    """The first slice decoded has another size than the rest: the rest wins."""
    root = make_dataset(tmp_path / "data", {"PB": 2, "PC": 1})
    (root / "PA").mkdir()  # sorted first, 32x32
    tifffile.imwrite(root / "PA" / "PA_1.tif", _image(1, 32), photometric="rgb")
    tifffile.imwrite(root / "PA" / "PA_1_mask.tif", _mask(1, 32))
    with pytest.raises(BrainsegError) as ei:
        cache.load_dataset(root)
    assert ei.value.message.splitlines()[1] == (
        "  PA/PA_1.tif: size 32x32, expected 64x64 like the other 3 slices of the dataset"
    )
    data = cache.load_dataset(root, skip_bad=True)
    assert data.patient_ids == ["PB", "PC"] and data.images.shape == (3, 3, SIZE, SIZE)
    ds = lgg.discover(root)
    for i, s in enumerate(ds.slices[1:]):
        np.testing.assert_array_equal(data.images[i], lgg.read_slice(s)[0].transpose(2, 0, 1))
        np.testing.assert_array_equal(data.masks[i], lgg.read_slice(s)[1])


def test_cache_command_lists_with_sizes_and_clears(root: Path, tmp_path: Path) -> None:
    """`brainseg cache list` shows each cache with its dataset and disk use; `clear KEY`
    removes that one, `clear --all` the rest; neither or both is a usage error."""
    import json

    from conftest import run_cli

    env = {"BRAINSEG_CACHE_DIR": str(tmp_path / "c")}
    a = cache.load_dataset(root, cache_dir=tmp_path / "c")
    other = make_dataset(tmp_path / "other", {"PX": 2})
    b = cache.load_dataset(other, cache_dir=tmp_path / "c")
    assert a.path is not None and b.path is not None
    r = run_cli(["cache", "list", "--json"], env=env)
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    on_disk = {
        d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in (a.path, b.path)
    }
    assert {c["key"]: c["bytes"] for c in listed["caches"]} == on_disk
    assert listed["bytes"] == sum(on_disk.values())
    assert {c["dataset"] for c in listed["caches"]} == {str(root.resolve()), str(other.resolve())}
    r = run_cli(["cache", "list"], env=env)
    assert "2 dataset cache(s)" in r.stdout and a.path.name[:12] in r.stdout

    r = run_cli(["cache", "clear", a.path.name[:8]], env=env)
    assert r.returncode == 0, r.stderr
    assert "removed 1 dataset cache(s)" in r.stdout
    assert not a.path.exists() and b.path.exists()
    r = run_cli(["cache", "clear", "ffff0000"], env=env)
    assert r.returncode == 2 and "no dataset cache with key 'ffff0000'" in r.stderr
    r = run_cli(["cache", "clear"], env=env)
    assert r.returncode == 2 and "give a KEY or --all" in r.stderr
    r = run_cli(["cache", "clear", "--all", "--json"], env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["removed"] == [b.path.name]
    assert _cache_dirs(tmp_path / "c") == []


def test_only_folders_brainseg_made_are_caches(root: Path, tmp_path: Path) -> None:
    """A user folder under $BRAINSEG_CACHE_DIR/datasets/ is never listed nor removed."""
    from conftest import run_cli

    base = tmp_path / "X"
    env = {"BRAINSEG_CACHE_DIR": str(base)}
    mine = base / "datasets" / "kaggle_3m"  # the case: a dataset kept there by hand
    (mine / "TCGA_A").mkdir(parents=True)
    (mine / "TCGA_A" / "scan.tif").write_bytes(b"precious")
    fake = base / "datasets" / ("ab" * 16)  # a key-like name, but no meta.json of ours
    fake.mkdir()
    (fake / "notes.txt").write_text("mine")
    odd = base / "datasets" / ("cd" * 16)  # a meta.json whose key is not the folder's
    odd.mkdir()
    (odd / "meta.json").write_text(json.dumps({"format": 1, "key": "ef" * 32}))
    (base / "datasets" / ".hidden-user-folder").mkdir()
    data = cache.load_dataset(root, cache_dir=base)
    assert data.path is not None

    assert [e.path for e in cache.list_caches(base)] == [data.path]
    r = run_cli(["cache", "list", "--json"], env=env)
    assert r.returncode == 0, r.stderr
    assert [c["key"] for c in json.loads(r.stdout)["caches"]] == [data.path.name]
    r = run_cli(["cache", "clear", "abab"], env=env)
    assert r.returncode == 2 and "no dataset cache with key 'abab'" in r.stderr
    r = run_cli(["cache", "clear", "--all", "--json"], env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["removed"] == [data.path.name]
    assert not data.path.exists()
    assert (mine / "TCGA_A" / "scan.tif").read_bytes() == b"precious"
    assert (fake / "notes.txt").read_text() == "mine"
    assert (odd / "meta.json").exists() and (base / "datasets" / ".hidden-user-folder").is_dir()


def test_pruning_an_older_cache_never_touches_a_user_folder(root: Path, tmp_path: Path) -> None:
    """A rebuild removes the cache of the old content of the same folder, and only caches."""
    base = tmp_path / "c"
    cache.load_dataset(root, cache_dir=base)
    mine = base / "datasets" / "copy"  # a user's folder holding a meta.json of the same root
    mine.mkdir()
    (mine / "meta.json").write_text(json.dumps({"root": str(root.resolve()), "skip_bad": False}))
    tifffile.imwrite(root / "PA" / "PA_1.tif", _image(99), photometric="rgb")  # new content
    new = cache.load_dataset(root, cache_dir=base)
    assert new.path is not None and (mine / "meta.json").exists()
    assert _cache_dirs(base) == sorted(["copy", new.path.name])
