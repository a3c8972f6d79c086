"""Read and write the image files that predict consumes and produces (numpy, Pillow, tifffile).

No torch here: this module is on the ONNX predict path (onnxruntime, numpy, Pillow, tifffile).

The images accepted and why are in docs/predict.md: 8-bit RGB as is; grey replicated and
alpha dropped with a note (the caller warns once per run); 16-bit only when every value fits
0..255 (guessing a windowing would give wrong masks); anything else is a BrainsegError.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from brainseg.errors import BrainsegError, first_line
from brainseg.fsutil import atomic_path
from brainseg.settings import SIZE_MULTIPLE

#: File name suffixes that are read as images (lower case).
TIFF_SUFFIXES = (".tif", ".tiff")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_SUFFIXES = TIFF_SUFFIXES + PIL_SUFFIXES

EXPECTED = (
    "an 8-bit image with 3 channels (HxWx3) or 1 channel (HxW), as .tif/.tiff/.png/.jpg/.jpeg"
)
_HINT = "convert it to an 8-bit RGB or greyscale .tif/.png (e.g. one MRI slice per file)"

#: Notes on conversions (the caller warns once per kind and run).
NOTE_GREY = "single-channel image replicated to 3 channels"
NOTE_ALPHA = "alpha channel dropped"
NOTE_16BIT = "16-bit image with values in 0..255 read as 8-bit"

#: Images with more pixels (an MRI slice has 65,536), or a larger decoded array, are refused from
#: their header: a 250 KB zlib TIFF declaring 16000 x 16000 must not allocate gigabytes.
MAX_PIXELS = 1 << 26
MAX_DECODED_BYTES = 4 * MAX_PIXELS  # an 8-bit RGBA image of MAX_PIXELS


@dataclass(frozen=True)
class Declared:
    """What an image file's header declares, read without decoding any pixel."""

    height: int
    width: int
    samples: int
    itemsize: int
    kind: str  # numpy dtype kind: "u", "i", "f", "b" ("?" when the header does not say)

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def nbytes(self) -> int:
        return self.pixels * self.samples * self.itemsize


@dataclass(frozen=True)
class LoadedImage:
    """An image as the model wants it (HxWx3 uint8) plus what was done to get it."""

    array: np.ndarray
    notes: tuple[str, ...] = ()


def is_image_path(path: str | os.PathLike[str]) -> bool:
    """True for the file name suffixes this module reads (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def is_mask_name(path: str | os.PathLike[str]) -> bool:
    """True for ``*_mask.*`` (the ground-truth masks next to kaggle_3m images)."""
    return Path(path).stem.lower().endswith("_mask")


def _bad(path: Path, what: str) -> BrainsegError:
    return BrainsegError(f"{path}: {what}; expected {EXPECTED}", hint=_HINT)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one image file as HxWx3 uint8 (see the module docstring for the rules)."""
    return load_image(path).array


def load_image(path: str | os.PathLike[str]) -> LoadedImage:
    """Read one image file as HxWx3 uint8 and report any conversion that was applied."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise _bad(path, f"unsupported file type {suffix or '(no suffix)'!r}")
    try:
        if path.is_file() and path.stat().st_size == 0:
            raise _bad(path, "is an empty file (0 bytes)")
        arr = read_tiff_array(path, _bad) if suffix in TIFF_SUFFIXES else _read_pil(path)
    except BrainsegError:
        raise
    except FileNotFoundError as exc:
        raise BrainsegError(f"{path}: no such file", hint="check the path") from exc
    except IsADirectoryError as exc:
        raise _bad(path, "is a folder, not a file") from exc
    except PermissionError as exc:
        raise BrainsegError(
            f"{path}: permission denied", hint="check the file's read permission"
        ) from exc
    except MemoryError as exc:
        raise _bad(path, "too large to read") from exc
    except Exception as exc:  # corrupt bytes: tifffile / Pillow raise many types
        text = first_line(exc, 160)
        detail = type(exc).__name__ if str(path) in text else text
        raise _bad(path, f"cannot be read as an image ({detail})") from exc
    return _to_rgb(path, arr)


def read_tiff_array(
    path: str | os.PathLike[str], bad: Callable[[Path, str], Exception] | None = None
) -> np.ndarray:
    """The first image of a TIFF file as stored (planar RGB moved to channels-last); the page
    chain is never iterated (a damaged file's looping pages made ``series`` loop forever)."""
    path = Path(path)
    fail = bad or (lambda p, what: ValueError(f"{p}: {what}"))
    with _tifffile().TiffFile(path) as tif:
        pages = tif.pages
        n = len(pages)  # walks the IFD offsets only, with tifffile's loop check
        if n == 0:
            raise fail(path, "TIFF holds no image")
        page = pages.first
        _check_declared(path, _tiff_declared(page), fail)
        if n > 1:
            second = pages[1]
            reduced = bool(getattr(second, "subfiletype", 0) & 1)  # a thumbnail / pyramid level
            if not reduced and getattr(second, "shape", None) == page.shape:
                raise fail(path, f"TIFF holds a stack of {n} images")
        arr = page.asarray()
        axes = page.axes
    channel_first = arr.ndim == 3 and axes and axes[0] in "SC" and arr.shape[0] in (1, 2, 3, 4)
    if channel_first and arr.shape[-1] not in (1, 2, 3, 4):  # planar RGB: "SYX" / "CYX"
        arr = np.moveaxis(arr, 0, -1)
    return arr


def _tifffile() -> ModuleType:
    """tifffile, its log messages about damaged files silenced (we raise a BrainsegError)."""
    import tifffile

    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    return tifffile


def _tiff_declared(page: Any) -> Declared:
    dtype = getattr(page, "dtype", None)
    return Declared(
        height=int(page.imagelength),
        width=int(page.imagewidth),
        samples=int(page.samplesperpixel) * max(1, int(getattr(page, "imagedepth", 1) or 1)),
        itemsize=int(dtype.itemsize) if dtype is not None else 1,
        kind=dtype.kind if dtype is not None else "?",
    )


def _pil_declared(im: Any) -> Declared:
    mode = im.mode
    itemsize = 2 if mode.startswith("I;16") else 4 if mode in ("I", "F") else 1
    kind = "f" if mode == "F" else "u"
    return Declared(im.height, im.width, len(im.getbands()), itemsize, kind)


def _check_declared(path: Path, d: Declared, fail: Callable[[Path, str], Exception]) -> None:
    """Refuse from the header alone: too many pixels, too many bytes, float pixels."""
    if d.pixels > MAX_PIXELS:
        raise fail(
            path,
            f"image of {d.width}x{d.height} pixels is too large (the limit is {MAX_PIXELS:,} "
            "pixels)",
        )
    if d.kind in "fc":
        raise fail(path, f"holds float{d.itemsize * 8} pixels")
    if d.nbytes > MAX_DECODED_BYTES:
        raise fail(
            path,
            f"image of {d.width}x{d.height} pixels x {d.samples} samples x {d.itemsize * 8} bits "
            f"is too large to decode (the limit is {MAX_DECODED_BYTES:,} bytes)",
        )


def declared_size(path: str | os.PathLike[str]) -> Declared | None:
    """What an image file's header declares (None when unreadable): predict's read-ahead bound."""
    path = Path(path)
    suffix = path.suffix.lower()
    with contextlib.suppress(Exception):  # the real read reports what is wrong, as its error
        if not path.is_file():  # a FIFO or a device would block here: only regular files
            return None
        if suffix in TIFF_SUFFIXES:
            with _tifffile().TiffFile(path) as tif:
                return _tiff_declared(tif.pages.first)
        if suffix in PIL_SUFFIXES:
            from PIL import Image

            with Image.open(path) as im:
                return _pil_declared(im)
    return None


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        _check_declared(path, _pil_declared(im), _bad)
        n_frames = getattr(im, "n_frames", 1)
        if n_frames > 1:
            raise _bad(path, f"holds {n_frames} frames")
        mode = im.mode
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode == "1":
            im = im.convert("L")
        elif mode in ("YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        elif mode == "CMYK":
            raise _bad(path, "is a CMYK image (4 ink channels)")
        im.load()
        arr = np.asarray(im)
    return arr.astype(np.int64) if mode == "I" else arr


def _to_rgb(path: Path, arr: np.ndarray) -> LoadedImage:
    notes: list[str] = []
    if arr.dtype == np.bool_:
        raise _bad(path, "is a 1-bit (boolean) image")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer):
            raise _bad(path, f"holds {arr.dtype} pixels")
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 255:
            raise _bad(
                path,
                f"is a {arr.dtype.itemsize * 8}-bit image with values {lo}..{hi} (16-bit MRI "
                "must be windowed to 8 bits the way the training data were)",
            )
        arr = arr.astype(np.uint8)
        notes.append(NOTE_16BIT)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
        notes.append(NOTE_GREY)
    elif arr.ndim == 3 and arr.shape[-1] == 2:  # grey + alpha
        arr = np.repeat(arr[..., :1], 3, axis=-1)
        notes += [NOTE_GREY, NOTE_ALPHA]
    elif arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
        notes.append(NOTE_ALPHA)
    elif not (arr.ndim == 3 and arr.shape[-1] == 3):
        raise _bad(path, f"has shape {'x'.join(map(str, arr.shape))}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise _bad(path, "is empty")
    return LoadedImage(np.ascontiguousarray(arr), tuple(notes))


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize an HxWx3 uint8 image to ``size`` = (height, width), bilinear (Pillow)."""
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    if image.shape[:2] == (h, w):
        return image
    out = Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(out)


def resize_prob(prob: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize an HxW float probability map to ``size`` = (height, width), bilinear."""
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    if prob.shape[:2] == (h, w):
        return prob.astype(np.float32, copy=False)
    out = Image.fromarray(np.ascontiguousarray(prob, dtype=np.float32))
    return np.clip(np.asarray(out.resize((w, h), Image.Resampling.BILINEAR)), 0.0, 1.0)


def pad_to_multiple(image: np.ndarray, multiple: int = 32) -> tuple[np.ndarray, tuple[int, int]]:
    """Zero-pad an HxWx... array at the bottom/right to multiples of ``multiple``; returns it
    and the original (height, width) to crop back with."""
    h, w = image.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return image, (h, w)
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, pad, mode="constant"), (h, w)


def to_model_input(
    slices: np.ndarray, size: tuple[int, int] | None, *, pad: bool = False
) -> tuple[np.ndarray, bool]:
    """S x H x W x 3 uint8 slices -> (S x h x w x 3 at the model's input size, padded): resized
    to ``size``, or zero-padded to multiples of 32 with ``pad`` or when the size is unknown."""
    if pad or size is None:
        x, _ = pad_to_multiple(slices.transpose(1, 2, 0, 3), SIZE_MULTIPLE)
        return np.ascontiguousarray(x.transpose(2, 0, 1, 3)), True
    if slices.shape[1:3] == tuple(size):
        return slices, False
    return np.stack([resize_image(s, size) for s in slices]), False


def _suffix_of(path: Path, allowed: tuple[str, ...], what: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise BrainsegError(
            f"cannot write {what} as {path}: unsupported suffix {suffix!r}",
            hint=f"use one of {', '.join(allowed)}",
        )
    return suffix


def write_mask(path: str | os.PathLike[str], mask: np.ndarray, *, force: bool = False) -> Path:
    """Write an HxW mask as uint8 0/255 (.tif or .png; any non-zero is tumour), atomically."""
    path = Path(path)
    suffix = _suffix_of(path, (*TIFF_SUFFIXES, ".png"), "a mask")
    if mask.ndim != 2:
        raise BrainsegError(f"cannot write {path}: a mask must be HxW, got shape {mask.shape}")
    data = np.where(mask > 0, np.uint8(255), np.uint8(0))
    with atomic_path(path, force=force) as tmp:
        if suffix in TIFF_SUFFIXES:
            import tifffile

            tifffile.imwrite(tmp, data, photometric="minisblack", compression="zlib")
        else:
            from PIL import Image

            Image.fromarray(data).save(tmp, format="PNG")
    return path


def write_probability(
    path: str | os.PathLike[str], prob: np.ndarray, *, force: bool = False
) -> Path:
    """Write an HxW float32 probability map (0..1) as a .tif, atomically."""
    path = Path(path)
    _suffix_of(path, TIFF_SUFFIXES, "a probability map")
    import tifffile

    data = np.ascontiguousarray(prob, dtype=np.float32)
    with atomic_path(path, force=force) as tmp:
        tifffile.imwrite(tmp, data, photometric="minisblack", compression="zlib")
    return path


def read_probability(path: str | os.PathLike[str]) -> np.ndarray:
    """An HxW float32 probability map as :func:`write_probability` wrote it (for eval --tune)."""
    import tifffile

    return np.asarray(tifffile.imread(path), dtype=np.float32)


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a binary mask (4-neighbourhood), as a bool array."""
    m = mask > 0
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    channel: int | None = 1,
    color: tuple[int, int, int] = (255, 40, 40),
) -> np.ndarray:
    """An RGB picture of ``image`` with the outline of ``mask`` drawn in ``color``: ``channel=1``
    shows FLAIR in grey (LGG tumours are most visible there), ``None`` the RGB."""
    if channel is None:
        rgb = image.copy()
    else:
        rgb = np.repeat(image[..., channel : channel + 1], 3, axis=-1)
    rgb[mask_outline(mask)] = color
    return rgb


def write_overlay(
    path: str | os.PathLike[str],
    image: np.ndarray,
    mask: np.ndarray,
    *,
    channel: int | None = 1,
    force: bool = False,
) -> Path:
    """Write :func:`overlay` as a .png, atomically."""
    from PIL import Image

    path = Path(path)
    _suffix_of(path, (".png",), "an overlay")
    rgb = overlay(image, mask, channel=channel)
    with atomic_path(path, force=force) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return path
