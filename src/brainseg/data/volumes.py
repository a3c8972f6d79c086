"""Volumes in, volumes out: read NIfTI or DICOM cases, slice them as the model learned, write NIfTI.

A *case* is three co-registered contrasts (pre-contrast, FLAIR, post-contrast): three 3D NIfTI
files or DICOM series folders matched by the ``--channels`` patterns, or one 4D NIfTI file.

The model sees axial slices with rows running anterior -> posterior and columns from the
patient's right to left, as in the LGG TIFs: the LPS array SimpleITK gives (docs/volumes.md).
Any orientation is brought to LPS (axes permuted and flipped, never resampled) and the result
mapped back, so a written mask has the input's shape and affine. nibabel and SimpleITK are
imported inside functions: the slice and ONNX paths never load them.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np

from brainseg.errors import BrainsegError, first_line
from brainseg.fsutil import atomic_write_bytes, file_kind, one_line

#: The model's input channels, in order (the LGG TIF's R, G, B).
CHANNELS: tuple[str, ...] = ("pre", "flair", "post")
#: Default ``--channels``: BraTS-style names (``<case>_t1.nii.gz`` ...).
DEFAULT_CHANNELS = "pre=*_t1.nii*,flair=*_flair.nii*,post=*_t1ce.nii*"
#: Percentiles of the nonzero voxels mapped to 0 and 255 for non-uint8 contrasts.
PERCENTILES: tuple[float, float] = (0.5, 99.5)
#: Largest affine difference (mm) still counted as the same grid (float32 headers).
AFFINE_ATOL = 1e-3

_CHANNEL_HINT = (
    "pass --channels 'pre=PATTERN,flair=PATTERN,post=PATTERN' (glob patterns matched against "
    f"the file / folder names of a case; default {DEFAULT_CHANNELS!r})"
)
#: mm per unit of a NIfTI xyzt_units spatial code (0 unknown, 1 meter, 2 mm, 3 micron).
_UNIT_MM = {0: 1.0, 1: 1000.0, 2: 1.0, 3: 0.001}
#: Name endings of label volumes (truth, or our ``<case>_mask``): never a case, eval's truth.
TRUTH_NAME = re.compile(r"_(mask|seg|gt|label)$", re.IGNORECASE)


def is_nifti(path: str | Path) -> bool:
    """True for ``.nii`` / ``.nii.gz`` names (case-insensitive)."""
    return Path(path).name.lower().endswith((".nii", ".nii.gz"))


def nifti_stem(path: str | Path) -> str:
    """The name without ``.nii`` / ``.nii.gz``."""
    return re.sub(r"\.nii(\.gz)?$", "", Path(path).name, flags=re.IGNORECASE)


def is_truth_name(path: str | Path) -> bool:
    """True for a NIfTI label file (``<case>_seg.nii.gz``, ``<case>_mask.nii.gz``...)."""
    return is_nifti(path) and TRUTH_NAME.search(nifti_stem(path)) is not None


def is_dicom_folder(path: Path) -> bool:
    """A folder holding at least one file with the DICOM preamble (``DICM`` at byte 128)."""
    if not path.is_dir():
        return False
    for f in sorted(path.iterdir())[:50]:
        if f.is_file():
            with contextlib.suppress(OSError), open(f, "rb") as fh:
                if fh.read(132)[128:] == b"DICM":
                    return True
    return False


def looks_like_volume_input(item: str) -> bool:
    """True when a predict INPUT is a NIfTI file or a folder of NIfTI files / DICOM series."""
    p = Path(item)
    if is_nifti(p):
        return True
    if not p.is_dir():
        return False
    for child in sorted(p.iterdir())[:200]:
        if is_nifti(child) or is_dicom_folder(child):
            return True
        if child.is_dir() and any(is_nifti(c) for c in sorted(child.iterdir())[:50]):
            return True
    return is_dicom_folder(p)


def parse_channels(spec: str | None) -> dict[str, str]:
    """``'pre=GLOB,flair=GLOB,post=GLOB'`` -> {channel: pattern} (all three, nothing else)."""
    text = DEFAULT_CHANNELS if spec is None or not spec.strip() else spec
    out: dict[str, str] = {}
    for part in text.split(","):
        name, sep, pattern = part.partition("=")
        name, pattern = name.strip().lower(), pattern.strip()
        if not sep or not pattern or name not in CHANNELS:
            raise BrainsegError(
                f"--channels {text!r}: {part.strip()!r} is not NAME=PATTERN "
                f"with NAME one of {', '.join(CHANNELS)}",
                hint=_CHANNEL_HINT,
            )
        if name in out:
            raise BrainsegError(f"--channels {text!r}: {name} is given twice", hint=_CHANNEL_HINT)
        out[name] = pattern
    missing = [c for c in CHANNELS if c not in out]
    if missing:
        raise BrainsegError(
            f"--channels {text!r} has no pattern for {', '.join(missing)}", hint=_CHANNEL_HINT
        )
    return {c: out[c] for c in CHANNELS}


@dataclass
class Case:
    """One case to predict: a 4D file, or one path (file or DICOM folder) per channel."""

    id: str
    four_d: Path | None = None
    sources: dict[str, Path] = field(default_factory=dict)
    error: str = ""  # a case that cannot be read (a missing contrast...): reported, not read

    @property
    def paths(self) -> list[Path]:
        return [self.four_d] if self.four_d is not None else list(self.sources.values())


def _key(pattern: str, name: str) -> str | None:
    """The text the pattern's first ``*`` matched in ``name`` (None: no match)."""
    if not fnmatchcase(name.lower(), pattern.lower()):
        return None
    parts = [re.escape(p).replace(r"\?", ".") for p in pattern.lower().split("*")]
    m = re.fullmatch("(.*?)".join(parts), name.lower())
    return name[m.start(1) : m.end(1)] if m and m.groups() else ""


def _group_entries(entries: Sequence[Path], patterns: dict[str, str], folder: Path) -> list[Case]:
    """Cases of ``entries`` (of one folder) grouped by the text the patterns' ``*`` matched."""
    groups: dict[str, dict[str, Path]] = {}
    for entry in entries:
        hits = [(c, k) for c, pat in patterns.items() if (k := _key(pat, entry.name)) is not None]
        if len(hits) > 1:
            raise BrainsegError(
                f"{entry}: matches the patterns of {' and '.join(c for c, _ in hits)}",
                hint="make the --channels patterns more specific (e.g. '*_t1.nii.gz')",
            )
        if hits:
            channel, key = hits[0]
            group = groups.setdefault(key, {})
            if channel in group:
                raise BrainsegError(
                    f"{folder}: both {group[channel].name} and {entry.name} match the "
                    f"{channel} pattern {patterns[channel]!r}",
                    hint="one file (or DICOM folder) per contrast per case",
                )
            group[channel] = entry
    cases = []
    for key, found in groups.items():
        case_id = key.strip("_-. ") or folder.name
        case = Case(case_id, sources={c: found[c] for c in CHANNELS if c in found})
        missing = [c for c in CHANNELS if c not in found]
        if missing:
            case.error = (
                f"case {case_id} in {folder}: no {', '.join(missing)} contrast (found "
                f"{', '.join(p.name for p in found.values())}; patterns "
                f"{', '.join(f'{c}={patterns[c]}' for c in missing)})"
            )
        cases.append(case)
    return cases


def _walk_cases(folder: Path, patterns: dict[str, str], depth: int = 0) -> Iterator[Case]:
    entries = [e for e in sorted(folder.iterdir()) if not e.name.startswith(".")]
    grouped = _group_entries(entries, patterns, folder)
    yield from grouped
    if grouped or depth > 8:
        return
    for entry in entries:
        if entry.is_file() and is_nifti(entry) and not is_truth_name(entry):
            yield Case(nifti_stem(entry), four_d=entry)
        elif entry.is_dir():
            yield from _walk_cases(entry, patterns, depth + 1)


def find_cases(inputs: Iterable[str | Path], channels: str | None = None) -> list[Case]:
    """Every case under ``inputs`` (4D files, case folders, folders of cases), sorted by id:
    entries are grouped by what the channel patterns' ``*`` matched (a flat folder works)."""
    patterns = parse_channels(channels)
    cases: list[Case] = []
    files: dict[Path, list[Path]] = {}  # named contrast files, by folder
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise BrainsegError(f"input {p} does not exist", hint="pass NIfTI files or folders")
        if not p.is_dir():
            _check_regular(p)
            _check_named_file(p)
            if any(_key(pat, p.name) is not None for pat in patterns.values()):
                files.setdefault(p.parent, []).append(p)
            else:
                cases.append(Case(nifti_stem(p), four_d=p))
            continue
        found = list(_walk_cases(p, patterns))
        if not found:
            raise BrainsegError(
                f"{p}: no case found (no 4D NIfTI file and no file or folder matching "
                f"{', '.join(f'{c}={v}' for c, v in patterns.items())})",
                hint=_CHANNEL_HINT,
            )
        cases.extend(found)
    for folder, named in files.items():
        cases.extend(_group_entries(sorted(set(named)), patterns, folder))
    return sorted(cases, key=lambda c: c.id)


def _check_regular(p: Path) -> None:
    """BrainsegError unless ``p`` is a regular file (a FIFO named ``*.nii.gz`` would hang)."""
    try:
        mode = p.stat().st_mode
    except OSError as exc:
        raise BrainsegError(f"{one_line(str(p))}: cannot be read ({exc.strerror})") from exc
    if not stat.S_ISREG(mode):
        raise BrainsegError(
            f"{one_line(str(p))}: is a {file_kind(mode)}, not a regular file",
            hint="pass NIfTI files, or folders of cases",
        )


def _check_named_file(p: Path) -> None:
    if not is_nifti(p):
        raise BrainsegError(
            f"{p}: not a NIfTI file (.nii / .nii.gz)",
            hint="pass a 4D NIfTI file, a case folder or a folder of cases",
        )
    if is_truth_name(p):
        raise BrainsegError(
            f"input {p} is a label volume (*_mask / *_seg / *_gt / *_label), not a case",
            hint="pass the image volume(s) of the case; eval takes labels with --gt",
        )


@dataclass
class Grid:
    """Where a volume lives: its affine (RAS, mm), spatial shape and the header to copy."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    header: Any = None  # a nibabel NIfTI header (None for DICOM: a fresh one is made)
    image_class: Any = None
    unit_mm: float = 1.0

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along each array axis in mm (column norms of the affine)."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)) * self.unit_mm

    @property
    def voxel_mm3(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) * self.unit_mm**3

    @property
    def axcodes(self) -> str:
        import nibabel as nib

        return "".join(str(c) for c in nib.aff2axcodes(self.affine))


@dataclass
class CaseVolume:
    """A case read and checked: X x Y x Z x 3 uint8 contrasts on its input grid."""

    id: str
    data: np.ndarray
    grid: Grid
    intensity: dict[str, Any]
    paths: list[Path]


def _read_error(path: Path, exc: BaseException) -> BrainsegError:
    return BrainsegError(
        f"{path}: cannot be read ({first_line(exc, 160)})",
        hint="is the file complete? a truncated download or copy reads this way",
    )


#: Most voxels one NIfTI file may declare (256 Mi; a brain MRI case is ~10 M), checked from the
#: header before any data is read (a 4.4 MB .nii.gz declaring 1000 x 1000 x 334 x 3 took 5.4 GB).
MAX_VOXELS = 1 << 28
MAX_VOXELS_ENV = "BRAINSEG_MAX_VOXELS"


def max_voxels() -> int:
    """The voxel limit: BRAINSEG_MAX_VOXELS when set (a positive integer), else MAX_VOXELS."""
    text = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not text:
        return MAX_VOXELS
    value = 0
    with contextlib.suppress(ValueError):
        value = int(text.replace("_", ""))
    if value < 1:
        raise BrainsegError(
            f"{MAX_VOXELS_ENV}={text!r} is not a positive integer",
            hint=f"e.g. {MAX_VOXELS_ENV}={MAX_VOXELS * 2}, or unset it for the default "
            f"({MAX_VOXELS})",
        )
    return value


def _check_voxels(path: Path, shape: Sequence[int]) -> int:
    """The number of voxels ``shape`` declares; BrainsegError above the limit."""
    n = math.prod(int(s) for s in shape)
    limit = max_voxels()
    if n > limit:
        raise BrainsegError(
            f"{path}: its header declares {'x'.join(map(str, shape))} = {n:,} voxels, more "
            f"than the limit of {limit:,}",
            hint=f"crop or resample the volume, or raise the limit with {MAX_VOXELS_ENV}=N "
            "if the machine has the memory (see docs/volumes.md)",
        )
    return n


def _read_gzip(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of a gzip file, the stream read to its end so that its CRC is
    checked (nibabel alone predicted a damaged .nii.gz, exit 0); over 1 MiB more is refused."""
    with gzip.open(path, "rb") as f:
        data = f.read(size)
        extra = len(f.read(1 << 20))
        if extra >= 1 << 20 and f.read(1):
            raise BrainsegError(
                f"{path}: holds more data than its header declares ({size:,} bytes)",
                hint="is it a NIfTI file? re-save it with nibabel or FSL",
            )
    return data


def read_nifti(path: Path) -> tuple[np.ndarray, Grid]:
    """The data (scaled) and grid of a NIfTI file, the voxel limit checked from its header."""
    import nibabel as nib

    try:
        img: Any = nib.load(str(path))  # lazy: the header only
        if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            _check_voxels(path, img.header.get_data_shape())
            if path.name.lower().endswith(".gz"):
                end = int(img.dataobj.offset) + int(  # type: ignore[attr-defined]
                    math.prod(img.shape) * img.header.get_data_dtype().itemsize
                )
                buf = io.BytesIO(_read_gzip(path, end))
                img = type(img).from_file_map(
                    type(img).make_file_map({"image": buf, "header": buf})
                )
        data = np.asanyarray(img.dataobj)
    except BrainsegError:
        raise
    except FileNotFoundError as exc:
        raise BrainsegError(f"{path}: no such file", hint="check the path") from exc
    except MemoryError as exc:
        raise BrainsegError(
            f"{path}: too large to read into memory", hint="crop or resample the volume"
        ) from exc
    except Exception as exc:  # nibabel, gzip, zlib and numpy raise many types
        raise _read_error(path, exc) from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BrainsegError(f"{path}: not a NIfTI image ({type(img).__name__})")
    code = int(img.header["xyzt_units"]) & 0x07
    unit_mm = _UNIT_MM.get(code)
    if unit_mm is None:
        raise BrainsegError(
            f"{path}: its header's xyzt_units ({int(img.header['xyzt_units'])}) names no "
            f"spatial unit (code {code}; NIfTI has 0 unknown, 1 meter, 2 mm, 3 micron)",
            hint="fix the header (e.g. nibabel: img.header.set_xyzt_units('mm'))",
        )
    return data, Grid(
        affine=np.asarray(img.affine, dtype=np.float64),
        shape=tuple(int(s) for s in data.shape[:3]),  # type: ignore[arg-type]
        header=img.header,
        image_class=type(img),
        unit_mm=unit_mm,
    )


def read_dicom_series(folder: Path) -> tuple[np.ndarray, Grid]:
    """One DICOM series folder as an X x Y x Z array and its RAS grid (SimpleITK + GDCM)."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise _read_error(folder, exc) from exc
    if not ids:
        raise BrainsegError(
            f"{folder}: no DICOM series found", hint="pass a folder of .dcm files of one series"
        )
    if len(ids) > 1:
        raise BrainsegError(
            f"{folder}: holds {len(ids)} DICOM series ({', '.join(ids[:3])}"
            f"{', ...' if len(ids) > 3 else ''}); expected one",
            hint="put each series (one contrast) in its own folder",
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's position, for the spacing check
    try:
        first = sitk.ImageFileReader()
        first.SetFileName(files[0])
        first.ReadImageInformation()  # the header only: the size is checked before the pixels
        _check_voxels(folder, (*first.GetSize()[:2], len(files)))
        img = reader.Execute()
    except RuntimeError as exc:
        raise _read_error(folder, exc) from exc
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise BrainsegError(f"{folder}: a colour DICOM series; expected a greyscale MRI series")
    arr = sitk.GetArrayFromImage(img)  # z, y, x
    if arr.ndim != 3:
        raise BrainsegError(f"{folder}: a {arr.ndim}D DICOM image; expected a 3D series")
    _check_even_spacing(folder, reader, img)
    data = np.ascontiguousarray(arr.transpose(2, 1, 0))
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM is LPS, NIfTI affines are RAS
    return data, Grid(affine=affine, shape=data.shape)  # type: ignore[arg-type]


#: Largest DICOM slice position error off the series' regular grid, in slice spacings.
SPACING_TOL = 0.1


def _check_even_spacing(folder: Path, reader: Any, img: Any) -> None:
    """Refuse a series whose slices are not evenly spaced (a missing slice, varying spacing):
    the volume's grid assumes one spacing, so its slices would be placed wrongly."""
    n = img.GetSize()[2]
    if n < 3:
        return
    normal = np.array(img.GetDirection()).reshape(3, 3)[:, 2]
    try:
        xyz = [[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)]
        pos = np.array(xyz) @ normal
    except (RuntimeError, ValueError):
        return  # no ImagePositionPatient per slice: SimpleITK's own spacing stands
    steps = np.diff(pos)
    step = float(np.median(steps))
    if step == 0 or np.max(np.abs(steps - step)) <= SPACING_TOL * abs(step):
        return
    k = int(np.argmax(np.abs(steps - step)))
    raise BrainsegError(
        f"{folder}: the DICOM slices are not evenly spaced (slice {k + 1} to {k + 2}: "
        f"{abs(steps[k]):.3g} mm, the series' spacing {abs(step):.3g} mm): a slice is missing "
        "or the spacing varies",
        hint="export the complete series, or resample it to even spacing first",
    )


def read_source(path: Path) -> tuple[np.ndarray, Grid]:
    """A NIfTI file or a DICOM series folder (a FIFO or device is never opened: it could block)."""
    if path.is_dir():
        return read_dicom_series(path)
    _check_regular(path)
    if not is_nifti(path):
        raise BrainsegError(f"{path}: not a NIfTI file (.nii / .nii.gz) or a DICOM folder")
    return read_nifti(path)


def _check_3d(path: Path, data: np.ndarray) -> np.ndarray:
    shape = "x".join(map(str, data.shape))
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2 or (data.ndim == 3 and 1 in data.shape[:3]):
        raise BrainsegError(
            f"{path}: is 2D (shape {shape}); expected a 3D volume",
            hint="pass whole volumes (for single slices use the TIF/PNG path of brainseg predict)",
        )
    if data.ndim != 3:
        raise BrainsegError(f"{path}: has shape {shape}; expected a 3D volume per contrast")
    return data


#: Largest intensity magnitude accepted: float32's range, in which intensities are scaled.
MAX_INTENSITY = float(np.finfo(np.float32).max)


def _check_finite(path: Path, data: np.ndarray) -> None:
    """Refuse NaN / infinite voxels, and float voxels beyond float32's range (+-3.4e38): the
    cast to float32 made them infinite and every voxel came out as tumour, exit 0."""
    if data.dtype.kind not in "uifb":
        raise BrainsegError(
            f"{path}: holds {data.dtype} voxels; expected integer or real intensities",
            hint="save the volume as int16 / float32 intensities (one contrast per volume)",
        )
    if data.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise BrainsegError(
                f"{path}: {bad} NaN or infinite voxel(s)",
                hint="fix or mask them (e.g. set them to 0) before predicting",
            )
        if data.dtype.itemsize > 4:
            over = int(np.count_nonzero(np.abs(data) > MAX_INTENSITY))
            if over:
                raise BrainsegError(
                    f"{path}: {over} voxel(s) beyond +-{MAX_INTENSITY:.3g}, the float32 "
                    "range intensities are scaled in (a damaged or mis-scaled volume)",
                    hint="check the file's scl_slope / scl_inter and its values; rescale it",
                )


def _four_d_channels(path: Path, data: np.ndarray) -> list[np.ndarray]:
    shape = "x".join(map(str, data.shape))
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim == 3:
        raise BrainsegError(
            f"{path}: is a 3D volume (shape {shape}); a one-file case must be 4D with the "
            "3 contrasts (pre, FLAIR, post) as its 4th dimension",
            hint="for one file per contrast pass the case folder and --channels",
        )
    if data.ndim != 4 or data.shape[3] != 3:
        n = data.shape[3] if data.ndim >= 4 else 1
        raise BrainsegError(
            f"{path}: shape {shape} has {n} volume(s); expected 3 (pre, FLAIR, post)",
            hint="stack the contrasts in the dataset's order as the 4th dimension",
        )
    return [_check_3d(path, data[..., i]) for i in range(3)]


def _same_grid(a: Grid, b: Grid) -> bool:
    return a.shape == b.shape and bool(np.allclose(a.affine, b.affine, atol=AFFINE_ATOL))


def read_case(case: Case) -> CaseVolume:
    """Read, check and scale a case; BrainsegError (one line naming the file) when bad."""
    if case.error:
        raise BrainsegError(case.error, hint=_CHANNEL_HINT)
    if case.four_d is not None:
        data, grid = read_source(case.four_d)
        _check_finite(case.four_d, data)
        vols = _four_d_channels(case.four_d, data)
        paths = [case.four_d] * 3
    else:
        paths = [case.sources[c] for c in CHANNELS]
        vols, grids = [], []
        for p in paths:
            d, g = read_source(p)
            _check_finite(p, d)
            vols.append(_check_3d(p, d))
            grids.append(g)
        grid = grids[0]
        for c, p, g in zip(CHANNELS[1:], paths[1:], grids[1:], strict=True):
            if not _same_grid(grid, g):
                what = "shape" if g.shape != grid.shape else "affine"
                raise BrainsegError(
                    f"case {case.id}: {c} ({p.name}) and pre ({paths[0].name}) differ in {what} "
                    f"({_grid_text(g)} vs {_grid_text(grid)}): the contrasts are not co-registered",
                    hint="register / resample the contrasts onto one grid first "
                    "(e.g. with ANTs, FSL flirt or SimpleITK)",
                )
    out = np.empty((*grid.shape, 3), dtype=np.uint8)
    info: dict[str, Any] = {}
    for i, (c, v) in enumerate(zip(CHANNELS, vols, strict=True)):
        out[..., i], info[c] = to_model_range(v)
    return CaseVolume(case.id, out, grid, info, paths)


def _grid_text(g: Grid) -> str:
    diag = ", ".join(f"{v:.3g}" for v in g.spacing)
    origin = ", ".join(f"{v:.4g}" for v in g.affine[:3, 3])
    return f"{'x'.join(map(str, g.shape))}, spacing {diag} mm, origin {origin}"


def to_model_range(volume: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """One contrast as uint8 0..255 and a note of what was done: uint8 as is (as the LGG TIFs),
    else scaled between the 0.5th and 99.5th percentiles of the nonzero voxels."""
    v = np.asarray(volume)
    if v.dtype == np.uint8:
        return v, {"rule": "uint8 as is"}
    x = v.astype(np.float32, copy=False)  # callers check the range first (_check_finite)
    nz = x[x != 0]
    if nz.size == 0:
        return np.zeros(v.shape, np.uint8), {"rule": "all zero"}
    # Percentiles and the span in float64: float32 near its limits overflowed (a warning).
    lo, hi = (float(q) for q in np.percentile(nz.astype(np.float64), PERCENTILES))
    if not hi > lo:
        out = np.where(x != 0, 255, 0).astype(np.uint8)
        return out, {"rule": "constant: 255 where nonzero", "lo": lo, "hi": hi}
    if not 1e-30 < hi - lo < 1e30:  # extreme spans are scaled in float64 (no overflow)
        x = v.astype(np.float64)
    scaled = np.clip((x - x.dtype.type(lo)) / x.dtype.type(hi - lo), 0.0, 1.0)
    out = np.rint(scaled * x.dtype.type(255.0)).astype(np.uint8)
    return out, {
        "rule": f"p{PERCENTILES[0]}-p{PERCENTILES[1]} of nonzero -> 0..255",
        "lo": lo,
        "hi": hi,
        "dtype": str(v.dtype),
    }


#: The model's input orientation as nibabel axis codes of an X x Y x Z array: DICOM's LPS, the
#: LGG TIFs stacked (SimpleITK's ``[slice, row, column]``; radiological display).
MODEL_AXCODES: tuple[str, str, str] = ("L", "P", "S")


def to_model_ornt(affine: np.ndarray) -> np.ndarray:
    """The nibabel transform to :data:`MODEL_AXCODES` (the closest axes, never resampled)."""
    import nibabel as nib

    ornt = nib.orientations
    return ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(MODEL_AXCODES))


def to_slices(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """X x Y x Z (x C) on the input grid -> S x H x W (x C), the model's axial slices."""
    import nibabel as nib

    lps = nib.orientations.apply_orientation(data, to_model_ornt(affine))
    return np.ascontiguousarray(lps.transpose(2, 1, 0, *range(3, lps.ndim)))


def from_slices(slices: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_slices`: S x H x W model slices -> the input grid."""
    import nibabel as nib

    ornt = nib.orientations
    lps = slices.transpose(2, 1, 0, *range(3, slices.ndim))
    back = ornt.ornt_transform(ornt.axcodes2ornt(MODEL_AXCODES), ornt.io_orientation(affine))
    return np.ascontiguousarray(ornt.apply_orientation(lps, back))


def slice_axis(affine: np.ndarray) -> int:
    """The input array axis that becomes the model's slice (superior) axis."""
    return int(np.flatnonzero(to_model_ornt(affine)[:, 0] == 2)[0])


def slice_spacing(grid: Grid) -> tuple[float, float, float]:
    """Voxel size (mm) of the :func:`to_slices` axes: (slice, row, column)."""
    lps = [0.0, 0.0, 0.0]
    for i, (axis, _) in enumerate(to_model_ornt(grid.affine)):
        lps[int(axis)] = float(grid.spacing[i])
    return lps[2], lps[1], lps[0]


def nifti_bytes(data: np.ndarray, grid: Grid, *, kind: str, gz: bool = True) -> bytes:
    """A NIfTI file (bytes) of ``data`` (``kind``: mask or prob) on ``grid``, with its header."""
    import nibabel as nib

    dtype = np.uint8 if kind == "mask" else np.float32
    arr = np.asarray(data).astype(dtype, copy=False)
    if grid.header is not None:
        hdr = grid.header.copy()
        hdr.set_data_dtype(dtype)
        cls = grid.image_class or nib.Nifti1Image
        img = cls(arr, None, header=hdr)  # affine (qform and sform) from the input header
    else:
        img = nib.Nifti1Image(arr, grid.affine)
        img.header.set_qform(grid.affine, code=1)
        img.header.set_sform(grid.affine, code=1)
        img.header.set_xyzt_units("mm")
    h = img.header
    h.set_slope_inter(1.0, 0.0)
    h.set_intent("none")
    h["cal_min"], h["cal_max"] = 0.0, 1.0
    h["descrip"] = b"brainseg tumour mask" if kind == "mask" else b"brainseg tumour probability"
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if gz else raw


def write_nifti(path: Path, data: np.ndarray, grid: Grid, *, kind: str, force: bool) -> Path:
    """Write :func:`nifti_bytes` atomically (``.nii.gz`` compressed, ``.nii`` not)."""
    gz = path.name.lower().endswith(".gz")
    return atomic_write_bytes(path, nifti_bytes(data, grid, kind=kind, gz=gz), force=force)


def read_mask_volume(path: Path) -> tuple[np.ndarray, Grid]:
    """A NIfTI mask as a boolean X x Y x Z array (nonzero = tumour) and its grid."""
    data, grid = read_nifti(path)
    _check_finite(path, data)
    return _check_3d(path, data) != 0, grid


def volume_ml(voxels: int, grid: Grid) -> float:
    """Tumour volume in millilitres (1 mL = 1000 mm³)."""
    return voxels * grid.voxel_mm3 / 1000.0


def ceil_voxels(mm3: float, grid: Grid) -> int:
    """The smallest voxel count whose volume is at least ``mm3``."""
    return math.ceil(mm3 / grid.voxel_mm3 - 1e-9)
