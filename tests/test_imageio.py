"""brainseg.data.imageio: what is read (and how), what is refused, writers, resizing. No torch."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from brainseg.data import imageio
from brainseg.errors import BrainsegError


def _rgb(h: int = 20, w: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("suffix", [".tif", ".tiff", ".png", ".TIF", ".PNG"])
def test_rgb_lossless_formats_round_trip(tmp_path: Path, suffix: str) -> None:
    img = _rgb()
    p = tmp_path / f"x{suffix}"
    if suffix.lower().startswith(".tif"):
        tifffile.imwrite(p, img, photometric="rgb")
    else:
        Image.fromarray(img).save(p, format="PNG")
    loaded = imageio.load_image(p)
    assert loaded.array.dtype == np.uint8 and loaded.array.shape == (20, 30, 3)
    np.testing.assert_array_equal(loaded.array, img)
    assert loaded.notes == ()


def test_deflate_compressed_tif_is_read(tmp_path: Path) -> None:
    img = _rgb()
    p = tmp_path / "x.tif"
    tifffile.imwrite(p, img, photometric="rgb", compression="zlib", predictor=True)
    np.testing.assert_array_equal(imageio.read_image(p), img)


def test_jpeg_is_read_as_rgb(tmp_path: Path) -> None:
    img = np.full((16, 24, 3), 128, np.uint8)
    p = tmp_path / "x.jpeg"
    Image.fromarray(img).save(p, quality=95)
    out = imageio.read_image(p)
    assert out.shape == (16, 24, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - 128).max() <= 2


@pytest.mark.parametrize("kind", ["tif2d", "tif_hw1", "png_L", "jpg_L", "png_1bit"])
def test_single_channel_is_replicated_with_a_note(tmp_path: Path, kind: str) -> None:
    grey = (np.arange(12 * 10).reshape(12, 10) % 256).astype(np.uint8)
    if kind == "tif2d":
        p = tmp_path / "g.tif"
        tifffile.imwrite(p, grey)
    elif kind == "tif_hw1":
        p = tmp_path / "g.tif"
        tifffile.imwrite(p, grey[..., None], photometric="minisblack")
    elif kind == "png_L":
        p = tmp_path / "g.png"
        Image.fromarray(grey).save(p)
    elif kind == "jpg_L":
        grey = np.full((12, 10), 77, np.uint8)
        p = tmp_path / "g.jpg"
        Image.fromarray(grey).save(p, quality=100)
    else:
        grey = np.where(grey > 60, 255, 0).astype(np.uint8)
        p = tmp_path / "g.png"
        Image.fromarray(grey).convert("1").save(p)
    loaded = imageio.load_image(p)
    assert loaded.array.shape == (12, 10, 3)
    assert imageio.NOTE_GREY in loaded.notes
    for c in range(3):
        assert np.abs(loaded.array[..., c].astype(int) - grey).max() <= 1


def test_rgba_png_drops_alpha_with_a_note(tmp_path: Path) -> None:
    img = _rgb(8, 9)
    rgba = np.concatenate([img, np.full((8, 9, 1), 200, np.uint8)], axis=-1)
    p = tmp_path / "a.png"
    Image.fromarray(rgba).save(p)
    loaded = imageio.load_image(p)
    np.testing.assert_array_equal(loaded.array, img)
    assert loaded.notes == (imageio.NOTE_ALPHA,)


def test_palette_png_is_converted(tmp_path: Path) -> None:
    img = Image.fromarray(_rgb(8, 8)).convert("P")
    p = tmp_path / "p.png"
    img.save(p)
    out = imageio.read_image(p)
    np.testing.assert_array_equal(out, np.asarray(img.convert("RGB")))


def test_planar_tif_is_moved_to_channels_last(tmp_path: Path) -> None:
    img = _rgb(10, 12)
    p = tmp_path / "planar.tif"
    tifffile.imwrite(p, np.moveaxis(img, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(imageio.read_image(p), img)


def test_16bit_with_8bit_values_is_accepted(tmp_path: Path) -> None:
    img = _rgb().astype(np.uint16)
    p = tmp_path / "x16.tif"
    tifffile.imwrite(p, img, photometric="rgb")
    loaded = imageio.load_image(p)
    np.testing.assert_array_equal(loaded.array, img.astype(np.uint8))
    assert imageio.NOTE_16BIT in loaded.notes


def test_16bit_with_wide_values_is_refused(tmp_path: Path) -> None:
    img = (np.arange(20 * 30).reshape(20, 30) * 50).astype(np.uint16)
    p = tmp_path / "wide.tif"
    tifffile.imwrite(p, img)
    with pytest.raises(BrainsegError) as e:
        imageio.read_image(p)
    assert "wide.tif" in e.value.message
    assert "16-bit" in e.value.message and "expected an 8-bit image" in e.value.message
    assert e.value.hint


def test_16bit_png_with_wide_values_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "wide16.png"
    Image.fromarray((np.arange(100).reshape(10, 10) * 600).astype(np.uint16)).save(p)
    with pytest.raises(BrainsegError, match=r"wide16\.png"):
        imageio.read_image(p)


def test_float_tif_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "f.tif"
    tifffile.imwrite(p, np.zeros((8, 8), np.float32))
    with pytest.raises(BrainsegError, match=r"f\.tif: holds float32 pixels"):
        imageio.read_image(p)


def _peak_bytes(fn: Callable[[], object]) -> tuple[int, BaseException | None]:
    """Peak Python + numpy allocation while ``fn()`` runs (numpy reports to tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    err = None
    try:
        fn()
    except BaseException as exc:  # the caller inspects it
        err = exc
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, err


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        # issue 22: the limit was on elements (4 x 67 M), so a 16000 x 16000 RGB zlib TIFF of
        # 250 KB was decoded (3.9 GB peak); a grey 9000 x 9000 one (81 M pixels) was read.
        ((16000, 16000, 3), np.uint8, "16000x16000 pixels is too large"),
        ((9000, 9000), np.uint8, "9000x9000 pixels is too large"),
        # float pixels are refused anyway: from the header, not after a 611 MB decode
        ((8000, 8000), np.float64, "holds float64 pixels"),
        ((2000, 2000), np.float64, "holds float64 pixels"),
        # 16-bit RGBA at 8000 x 8000: 512 MB decoded, over the byte limit
        ((8000, 8000, 4), np.uint16, "too large to decode"),
    ],
    ids=["rgb-16000", "grey-9000", "float64-8000", "float64-2000", "rgba16-8000"],
)
def test_declared_size_is_checked_before_decoding(
    tmp_path: Path, shape: tuple[int, ...], dtype: type, message: str
) -> None:
    p = tmp_path / "big.tif"
    # A sparse file: the header declares the size, the data are never written (or read).
    photometric = "rgb" if len(shape) == 3 else "minisblack"
    extra = {"extrasamples": ["unassalpha"]} if len(shape) == 3 and shape[2] == 4 else {}
    tifffile.imwrite(p, shape=shape, dtype=dtype, photometric=photometric, **extra)
    peak, err = _peak_bytes(lambda: imageio.load_image(p))
    assert isinstance(err, BrainsegError), err
    assert message in err.message and "big.tif" in err.message
    assert peak < 8 * 1024 * 1024, f"{peak / 2**20:.0f} MiB allocated before refusing"


def test_a_png_declaring_too_many_pixels_is_refused_before_decoding(tmp_path: Path) -> None:
    p = tmp_path / "big.png"
    Image.new("L", (9000, 9000)).save(p)  # 81 M pixels, a small file
    peak, err = _peak_bytes(lambda: imageio.load_image(p))
    assert isinstance(err, BrainsegError) and "9000x9000 pixels is too large" in err.message
    assert peak < 8 * 1024 * 1024


def test_declared_size_reads_only_the_header(tmp_path: Path) -> None:
    p = tmp_path / "big.tif"
    tifffile.imwrite(p, shape=(16000, 16000, 3), dtype=np.uint8, photometric="rgb")
    d = imageio.declared_size(p)
    assert d is not None and (d.height, d.width, d.samples, d.itemsize) == (16000, 16000, 3, 1)
    assert d.nbytes == 16000 * 16000 * 3
    q = tmp_path / "x.png"
    Image.fromarray(_rgb()).save(q)
    assert imageio.declared_size(q) == imageio.Declared(20, 30, 3, 1, "u")
    (tmp_path / "junk.png").write_bytes(b"junk")
    assert imageio.declared_size(tmp_path / "junk.png") is None
    os.mkfifo(tmp_path / "pipe.png")  # never opened (it would block predict's main thread)
    assert imageio.declared_size(tmp_path / "pipe.png") is None


@pytest.mark.parametrize("suffix", [".tif", ".png", ".jpg"])
def test_empty_file_says_empty(tmp_path: Path, suffix: str) -> None:
    """issue 22: a 0-byte file said "not a TIFF file: header=b''"."""
    p = tmp_path / f"empty{suffix}"
    p.write_bytes(b"")
    with pytest.raises(BrainsegError, match=r"empty\.\w+: is an empty file \(0 bytes\)"):
        imageio.load_image(p)


@pytest.mark.parametrize("channels", [5, 6])
def test_wrong_channel_count_is_refused(tmp_path: Path, channels: int) -> None:
    p = tmp_path / "multi.tif"
    tifffile.imwrite(
        p, np.zeros((8, 9, channels), np.uint8), photometric="minisblack", planarconfig="contig"
    )
    with pytest.raises(BrainsegError) as e:
        imageio.read_image(p)
    assert "multi.tif" in e.value.message and f"8x9x{channels}" in e.value.message
    assert "3 channels" in e.value.message


def test_stack_of_slices_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "stack.tif"
    tifffile.imwrite(p, np.zeros((4, 8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(BrainsegError, match=r"stack\.tif"):
        imageio.read_image(p)


@pytest.mark.parametrize("name", ["junk.tif", "junk.png", "junk.jpg"])
def test_non_image_bytes_are_refused(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    p.write_text("this is not an image\n")
    with pytest.raises(BrainsegError) as e:
        imageio.read_image(p)
    assert name in e.value.message and "cannot be read as an image" in e.value.message


def test_truncated_png_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "cut.png"
    Image.fromarray(_rgb(64, 64)).save(p)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(BrainsegError, match=r"cut\.png"):
        imageio.read_image(p)


def test_unsupported_suffix_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BrainsegError, match=r"unsupported file type '\.txt'"):
        imageio.read_image(tmp_path / "notes.txt")
    with pytest.raises(BrainsegError, match="no such file"):
        imageio.read_image(tmp_path / "missing.png")


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_write_mask_is_uint8_0_255(tmp_path: Path, suffix: str) -> None:
    m = np.zeros((10, 12), np.uint8)
    m[2:5, 3:7] = 1
    p = imageio.write_mask(tmp_path / f"sub/m{suffix}", m)
    back = tifffile.imread(p) if suffix == ".tif" else np.asarray(Image.open(p))
    assert back.dtype == np.uint8 and back.shape == (10, 12)
    assert set(np.unique(back)) == {0, 255}
    assert int((back == 255).sum()) == 12
    assert not list(p.parent.glob(".*tmp"))  # nothing left of the atomic write


def test_writers_refuse_overwrite_without_force(tmp_path: Path) -> None:
    p = tmp_path / "m.tif"
    imageio.write_mask(p, np.zeros((4, 4), np.uint8))
    with pytest.raises(BrainsegError, match="already exists"):
        imageio.write_mask(p, np.ones((4, 4), np.uint8))
    assert tifffile.imread(p).max() == 0
    imageio.write_mask(p, np.ones((4, 4), np.uint8), force=True)
    assert tifffile.imread(p).min() == 255


def test_write_probability_float32(tmp_path: Path) -> None:
    prob = np.linspace(0, 1, 30, dtype=np.float32).reshape(5, 6)
    p = imageio.write_probability(tmp_path / "p.tif", prob)
    back = tifffile.imread(p)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, prob)
    with pytest.raises(BrainsegError, match="unsupported suffix"):
        imageio.write_probability(tmp_path / "p.png", prob)


def test_overlay_draws_the_outline_on_flair(tmp_path: Path) -> None:
    img = np.zeros((12, 12, 3), np.uint8)
    img[..., 1] = 90  # FLAIR
    img[..., 0] = 10
    m = np.zeros((12, 12), bool)
    m[3:9, 3:9] = True
    p = imageio.write_overlay(tmp_path / "o.png", img, m)
    ov = np.asarray(Image.open(p))
    assert ov.shape == (12, 12, 3)
    edge = imageio.mask_outline(m)
    assert edge.sum() == 20  # the 6x6 square's border
    assert (ov[edge] == (255, 40, 40)).all()
    assert (ov[~edge] == 90).all()  # grey FLAIR elsewhere, interior untouched
    rgb = imageio.overlay(img, m, channel=None)
    assert (rgb[~edge] == img[~edge]).all()


# --------------------------------------------------------------------------- resizing


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an HxW mask to ``size`` = (height, width), nearest neighbour (a test helper)."""
    h, w = int(size[0]), int(size[1])
    if mask.shape[:2] == (h, w):
        return mask
    # Index arithmetic instead of Pillow: exact nearest sampling on pixel centres, any dtype.
    rows = np.minimum(
        ((np.arange(h) + 0.5) * mask.shape[0] / h).astype(np.int64), mask.shape[0] - 1
    )
    cols = np.minimum(
        ((np.arange(w) + 0.5) * mask.shape[1] / w).astype(np.int64), mask.shape[1] - 1
    )
    return mask[rows[:, None], cols[None, :]]


def test_resize_helpers() -> None:
    img = _rgb(50, 70)
    small = imageio.resize_image(img, (64, 64))
    assert small.shape == (64, 64, 3) and small.dtype == np.uint8
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 20:40] = 255
    back = resize_mask(mask, (50, 70))
    assert back.shape == (50, 70) and set(np.unique(back)) <= {0, 255}
    # nearest: fraction of tumor preserved to within a pixel row/column
    assert abs(back.mean() / 255 - mask.mean() / 255) < 0.03
    prob = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    pb = imageio.resize_prob(prob, (50, 70))
    assert pb.shape == (50, 70) and pb.dtype == np.float32 and 0 <= pb.min() <= pb.max() <= 1
    padded, orig = imageio.pad_to_multiple(img, 32)
    assert padded.shape == (64, 96, 3) and orig == (50, 70)
    np.testing.assert_array_equal(padded[:50, :70], img)
    assert padded[50:].max() == 0


def test_imageio_imports_no_torch() -> None:
    code = (
        "import sys, "
        "brainseg.data.imageio, brainseg.inference.predict\nprint('TORCH', 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "TORCH False" in out.stdout
