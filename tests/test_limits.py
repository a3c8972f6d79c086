"""Input limits (issue 22): predict's read-ahead is bounded by bytes, NIfTI volumes by voxels,
damaged or out-of-range volumes are errors. Each test failed before its fix."""

from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _tiny import tiny_onnx
from PIL import Image

from brainseg.data import imageio
from brainseg.inference import batch, pipeline


def _live_images(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the decoded images alive at once (load_image's arrays, until garbage)."""
    count = {"live": 0, "max": 0}
    lock = threading.Lock()
    real = imageio.load_image

    def dead() -> None:
        with lock:
            count["live"] -= 1

    def load(path: Any) -> imageio.LoadedImage:
        loaded = real(path)
        with lock:
            count["live"] += 1
            count["max"] = max(count["max"], count["live"])
        weakref.finalize(loaded.array, dead)
        return loaded

    monkeypatch.setattr(imageio, "load_image", load)
    return count


def test_predict_read_ahead_is_bounded_by_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 22: read-ahead held 2 x batch + workers images whatever their size (six 16000 x
    16000 TIFFs: 11.6 GB). With a budget of one image, at most a few are alive at once
    (before: all 24, the whole folder)."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(24):
        Image.fromarray(np.full((1000, 1000, 3), i, np.uint8)).save(scans / f"s{i:02d}.png")
    one = imageio.declared_size(scans / "s00.png")
    assert one is not None
    monkeypatch.setattr(pipeline, "READ_AHEAD_BYTES", one.nbytes + 3 * one.pixels)
    count = _live_images(monkeypatch)
    results: list[Any] = []
    opts = batch.PredictOptions(
        models=[tiny_onnx(tmp_path / "m.onnx")],
        inputs=[str(scans)],
        out_dir=tmp_path / "out",
        device="cpu",
        batch_size=8,
        on_result=results.append,
    )
    batch.predict_inputs(opts)
    assert [r.status for r in results] == ["ok"] * 24
    assert count["max"] <= 8, f"{count['max']} decoded images alive at once"


# --------------------------------------------------------------------------- NIfTI


def _nifti(path: Path, data: np.ndarray, **header: Any) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(data, np.eye(4))
    for k, v in header.items():
        img.header[k] = v
    nib.save(img, str(path))
    return path


def _case(seed: int = 0, dtype: Any = np.int16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((64, 64, 8, 3)) * 1000).astype(dtype)


def test_nifti_gzip_crc_failure_is_an_error(tmp_path: Path) -> None:
    """issue 22: a .nii.gz whose gzip CRC fails was read (nibabel stops before the trailer)
    and predicted, exit 0. Python's gzip module is the oracle for the damage."""
    import gzip
    import zlib

    from brainseg.data.volumes import read_nifti
    from brainseg.errors import BrainsegError

    good = _nifti(tmp_path / "good.nii.gz", _case())
    raw = good.read_bytes()
    content = bytearray(gzip.decompress(raw))
    content[2000] ^= 0x01  # one voxel bit; the stored CRC still describes the old content
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = comp.compress(bytes(content)) + comp.flush()
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(raw[:10] + body + raw[-8:])
    with pytest.raises(gzip.BadGzipFile):  # the oracle: gzip says it is damaged
        gzip.decompress(bad.read_bytes())
    read_nifti(good)  # the intact file reads
    with pytest.raises(BrainsegError, match=r"bad\.nii\.gz: cannot be read .*CRC check failed"):
        read_nifti(bad)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[:-4])  # the length field cut off: the data are all there
    with pytest.raises(BrainsegError, match=r"cut\.nii\.gz: cannot be read"):
        read_nifti(cut)


def test_float64_beyond_float32_is_an_error_without_warnings(tmp_path: Path) -> None:
    """issue 22: float64 voxels above 3.4e38 became inf in the cast to float32, every voxel
    was marked tumour, exit 0, with a RuntimeWarning on stderr."""
    from conftest import run_cli

    data = np.zeros((64, 64, 8, 3))
    data[10:20, 10:20, 2:5, :] = 1e39
    data[0, 0, 0, :] = 1.0
    vol = _nifti(tmp_path / "big.nii.gz", data)
    r = run_cli(["predict", tiny_onnx(tmp_path / "m.onnx"), vol, "-o", tmp_path / "out"])
    assert r.returncode != 0
    assert "big.nii.gz: 900 voxel(s) beyond +-3.4e+38" in r.stderr, r.stderr
    assert "Warning" not in r.stderr and "internal error" not in r.stderr
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_extreme_float32_intensities_scale_without_warnings() -> None:
    import warnings

    from brainseg.data.volumes import to_model_range

    v = np.array([0, -3.3e38, 3.3e38, 1.0, 2.0], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning is a failure
        out, info = to_model_range(v)
    assert out.tolist() == [128, 0, 255, 128, 128]  # lo < 0: zero is mid-grey (the rule)
    assert info["lo"] < 0 < info["hi"]


def test_nifti_xyzt_units_255_is_a_clear_error(tmp_path: Path) -> None:
    """issue 22: xyzt_units = 255 raised KeyError in nibabel ("internal error")."""
    from brainseg.data.volumes import read_nifti
    from brainseg.errors import BrainsegError

    vol = _nifti(tmp_path / "units.nii.gz", _case(), xyzt_units=255)
    with pytest.raises(BrainsegError, match=r"units.nii.gz: its header's xyzt_units \(255\)"):
        read_nifti(vol)


def test_nifti_voxel_limit_is_checked_from_the_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 22: no size limit (a 4.4 MB .nii.gz declaring 1000 x 1000 x 334 x 3 took 5.4 GB
    and 36 s). The header is checked before any data is read; BRAINSEG_MAX_VOXELS moves the
    limit (docs/volumes.md)."""
    import gzip
    import tracemalloc

    import nibabel as nib

    from brainseg.data.volumes import read_nifti
    from brainseg.errors import BrainsegError

    header = nib.Nifti1Header()
    header.set_data_shape((1000, 1000, 334, 3))
    header.set_data_dtype(np.uint8)
    huge = tmp_path / "huge.nii.gz"
    with gzip.open(huge, "wb") as f:  # the header and the first 1 MB of zeros
        f.write(header.binaryblock + b"\0" * 4 + b"\0" * (1 << 20))
    tracemalloc.start()
    with pytest.raises(BrainsegError, match=r"declares 1000x1000x334x3 = 1,002,000,000 voxels"):
        read_nifti(huge)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20

    small = _nifti(tmp_path / "small.nii.gz", _case())  # 98,304 voxels
    read_nifti(small)
    monkeypatch.setenv("BRAINSEG_MAX_VOXELS", "90000")
    with pytest.raises(BrainsegError, match="more than the limit of 90,000") as e:
        read_nifti(small)
    assert "BRAINSEG_MAX_VOXELS" in (e.value.hint or "")
    monkeypatch.setenv("BRAINSEG_MAX_VOXELS", "lots")
    with pytest.raises(BrainsegError, match="BRAINSEG_MAX_VOXELS='lots' is not a positive"):
        read_nifti(small)


# --------------------------------------------------------------------------- --shard


@pytest.mark.parametrize(
    ("value", "message", "hint"),
    [
        # issue 22: N beyond sys.maxsize died in itertools.islice ("internal error")
        ("0/" + "1" + "0" * 30, "N from 1 to 1,000,000", "e.g. --shard 0/4"),
        # the hint for 1/0 said "shards of N=1 are 0/1 ... 0/1"
        ("1/0", "N from 1 to 1,000,000", "e.g. --shard 0/4 on the first of 4 machines"),
        ("2/2", "need 0 <= I < N (I from 0 to 1)", "the shards of N=2 are 0/2 ... 1/2"),
    ],
)
def test_shard_out_of_range_is_a_clear_error(
    tmp_path: Path, value: str, message: str, hint: str
) -> None:
    from conftest import run_cli

    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(scans / "a.png")
    model = tiny_onnx(tmp_path / "m.onnx")
    r = run_cli(["predict", model, scans, "-o", tmp_path / "o", "--shard", value])
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and hint in r.stderr and "internal error" not in r.stderr
    assert "0/1 ... 0/1" not in r.stderr
