"""Disk full: ENOSPC while writing a checkpoint, a mask, an ONNX file, the dataset cache, a
split, a download. Each time: one clear error that says so, the previous file intact, no
temporary litter. ENOSPC is injected by faultkit (writes to matching files fail once a byte
budget is spent), in-process or around the real CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import faultkit
import pytest
from _tiny import tiny_onnx, write_images

from brainseg.errors import BrainsegError, BrainsegRuntimeError

pytestmark = pytest.mark.faults


def litter(folder: Path) -> list[str]:
    """Temporary files and folders brainseg writers use (``.NAME.XXXX.tmp``, ``.tmp-*``...)."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob(".*")
        if p.name.endswith(".tmp") or p.name.startswith((".tmp-", ".brainseg-export-", ".kaggle"))
    )


def run_faulty(
    args: list[Any], faults: dict[str, Any], timeout: float = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``brainseg ARGS`` in a subprocess with ``faults`` installed (see faultkit), run in
    ``cwd`` (default: this process's working folder)."""
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "BRAINSEG_FAULTS": json.dumps(faults)}
    return subprocess.run(
        [sys.executable, str(faultkit.SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=cwd,
    )


def assert_one_clear_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, r.stderr
    for w in words:
        assert w in errors[0], r.stderr


# --------------------------------------------------------------------------- checkpoint


@pytest.fixture(scope="module")
def model() -> Any:
    from brainseg.model.unet import UNetVGG16

    return UNetVGG16(encoder_weights=None, decoder_channels=(8, 8, 8, 8, 8))


@pytest.mark.parametrize("budget", [0, 4096, 20_000_000])
def test_checkpoint_disk_full_keeps_the_previous_file(
    model: Any, tmp_path: Path, budget: int
) -> None:
    from brainseg.model.checkpoint import load_checkpoint, save_checkpoint

    path = save_checkpoint(tmp_path / "last.safetensors", model, {"epoch": 1})
    before = path.read_bytes()
    with (
        faultkit.installed({"enospc": {"name": ".last.safetensors.*.tmp", "budget": budget}}),
        pytest.raises(BrainsegRuntimeError, match="disk full") as info,
    ):
        save_checkpoint(path, model, {"epoch": 2})
    assert "last.safetensors" in info.value.message and info.value.exit_code == 1
    assert path.read_bytes() == before
    assert load_checkpoint(path)[1]["epoch"] == 1
    assert litter(tmp_path) == []


# --------------------------------------------------------------------------- masks (CLI)


def test_predict_disk_full_stops_with_one_line_and_keeps_finished_masks(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "m.onnx")
    write_images(tmp_path / "scans", 12, fmt="png")
    out = tmp_path / "out"
    first = run_faulty(["-q", "predict", model, tmp_path / "scans", "-o", out], {})
    assert first.returncode == 0, first.stderr
    masks = {p.name: p.read_bytes() for p in out.glob("*_mask.tif")}
    assert len(masks) == 12
    # again with --force: the 4th mask finds the disk full
    faults = {"enospc": {"name": ".*_mask.tif.*.tmp", "budget": 0, "skip": 3}}
    r = run_faulty(["predict", model, tmp_path / "scans", "-o", out, "--force"], faults)
    assert_one_clear_error(r, "disk full while writing", "_mask.tif")
    assert {p.name: p.read_bytes() for p in out.glob("*_mask.tif")} == masks  # all intact
    assert litter(out) == []


# --------------------------------------------------------------------------- ONNX export (CLI)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory, model: Any) -> Path:
    from brainseg.model.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    return save_checkpoint(path, model, {"image_size": 64})


@pytest.mark.slow
def test_export_disk_full_keeps_the_previous_onnx(small_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous export")
    full = {"enospc": {"name": ".model.onnx.*.tmp", "budget": 1000}}
    r = run_faulty(["export", small_checkpoint, "-o", out, "--force"], full)
    assert_one_clear_error(r, "disk full", "model.onnx")
    assert out.read_bytes() == b"the previous export"
    assert litter(tmp_path) == []
    # the disk fills while the exporter writes its temporary files
    r = run_faulty(
        ["export", small_checkpoint, "-o", out, "--force"], {"enospc": {"name": "*.onnx*"}}
    )
    assert_one_clear_error(r, "disk full")
    assert out.read_bytes() == b"the previous export"
    assert litter(tmp_path) == []


# --------------------------------------------------------------------------- dataset cache


def test_cache_disk_full_is_clear_and_leaves_no_half_cache(
    phantom_root: Path, tmp_path: Path
) -> None:
    from brainseg.data.cache import load_dataset

    data = tmp_path / "kaggle_3m"
    shutil.copytree(phantom_root, data)
    cache = tmp_path / "cache"
    old = load_dataset(data, cache_dir=cache)
    old_dirs = sorted(p.name for p in cache.iterdir())
    # the dataset changes (a new key), and the disk is full while the new cache is built
    victim = sorted(data.rglob("*_1.tif"))[0]
    victim.write_bytes(sorted(data.rglob("*_2.tif"))[0].read_bytes())
    for name, budget in (("*.npy", 0), ("slice_number.npy", 64), ("meta.json", 10)):
        with (
            faultkit.installed({"enospc": {"name": name, "budget": budget}}),
            pytest.raises(BrainsegRuntimeError, match="disk full") as info,
        ):
            load_dataset(data, cache_dir=cache)
        assert str(cache) in info.value.message
        assert sorted(p.name for p in cache.iterdir()) == old_dirs  # the old cache is kept
        assert litter(cache) == []
    assert len(old) > 0
    assert len(load_dataset(data, cache_dir=cache)) == len(old)  # space back: it works


# --------------------------------------------------------------------------- split, download


def test_split_disk_full_keeps_the_previous_file(tmp_path: Path) -> None:
    from brainseg.data.split import make_split, save_split

    ids = [f"TCGA_AA_{i:04d}_20000101" for i in range(5)]
    path = save_split(make_split(dict.fromkeys(ids, 1.0), seed=0), tmp_path / "splits.yaml")
    before = path.read_bytes()
    with (
        faultkit.installed({"enospc": {"name": ".splits.yaml.*.tmp", "budget": 5}}),
        pytest.raises(BrainsegRuntimeError, match="disk full"),
    ):
        save_split(make_split(dict.fromkeys(ids, 1.0), seed=1), path, force=True)
    assert path.read_bytes() == before and litter(tmp_path) == []


def test_unpacking_disk_full_leaves_no_half_dataset(phantom_root: Path, tmp_path: Path) -> None:
    import zipfile

    from brainseg.data.download import download_lgg

    archive = tmp_path / "lgg.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(phantom_root.rglob("*")):
            if p.is_file():
                zf.write(p, f"kaggle_3m/{p.relative_to(phantom_root)}")
    dest = tmp_path / "data"
    (dest / "kaggle_3m" / "TCGA_OLD").mkdir(parents=True)  # the install being replaced
    with (
        faultkit.installed({"enospc": {"name": "*.tif", "budget": 100_000}}),
        pytest.raises(BrainsegError, match="disk full while unpacking"),
    ):
        download_lgg(dest, from_file=archive, force=True)
    assert sorted(p.name for p in dest.iterdir()) == ["kaggle_3m"]
    assert [p.name for p in (dest / "kaggle_3m").iterdir()] == ["TCGA_OLD"]  # old one intact
    assert litter(dest) == []


# --------------------------------------------------------------------------- a real full disk


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Any:
    """A 1 MiB tmpfs (needs root / CAP_SYS_ADMIN; CI runs as root, so it runs there; skipped
    only where mounting is not allowed)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root): the ENOSPC injection tests cover it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_really_full_filesystem(tiny_fs: Path, tmp_path: Path, phantom_root: Path) -> None:
    """The same promises on a real 1 MiB filesystem (no injection): cache and masks."""
    from conftest import run_cli

    r = run_cli(
        ["split", phantom_root, "-o", tmp_path / "s.yaml"],
        env={"BRAINSEG_CACHE_DIR": str(tiny_fs / "cache")},
    )
    assert_one_clear_error(r, "disk full while building the dataset cache")
    assert litter(tiny_fs) == []
    model = tiny_onnx(tmp_path / "m.onnx")
    write_images(tmp_path / "scans", 120, fmt="png")
    r = run_cli(["predict", model, tmp_path / "scans", "-o", tiny_fs / "out", "--probabilities"])
    assert_one_clear_error(r, "disk full while writing")
    assert litter(tiny_fs) == []
    import tifffile

    for p in (tiny_fs / "out").glob("*_mask.tif"):  # every mask under its name is complete
        assert tifffile.imread(p).shape == (64, 64)
