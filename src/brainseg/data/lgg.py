"""Discover, validate and read a dataset in the Kaggle ``kaggle_3m`` layout (LGG, Buda et al.).

Layout::

    kaggle_3m/
      data.csv                              optional clinical table (one row per patient)
      TCGA_CS_4941_19960909/                one folder per patient
        TCGA_CS_4941_19960909_1.tif         slice 1: 256x256x3 uint8 (pre-contrast, FLAIR, post)
        TCGA_CS_4941_19960909_1_mask.tif    its mask: 256x256 uint8 in {0, 255}
        ...

Every problem is reported in one message: :func:`scan` checks the structure without decoding,
:func:`decode_slice` the content (while :mod:`brainseg.data.cache` builds its arrays), and
:func:`report_problems` raises one error listing both, or warns with ``skip_bad``.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brainseg import console
from brainseg.data.imageio import read_tiff_array
from brainseg.errors import BrainsegError, first_line

#: Lines of problems shown in an error message before "... and N more".
MAX_LISTED = 20

DOWNLOAD_HINT = (
    "point to a kaggle_3m folder (or the folder containing it); get one with "
    "`brainseg download lgg --dest DIR` or `brainseg download synthetic --dest DIR`"
)
SKIP_HINT = "fix or remove these files, or pass --skip-bad to skip these slices"

_SLICE_RE = re.compile(r"^(?P<case>.+)_(?P<num>\d+)(?P<mask>_mask)?\.tiff?$", re.IGNORECASE)
_TIF_RE = re.compile(r"\.tiff?$", re.IGNORECASE)


@dataclass(frozen=True)
class SliceFile:
    """One axial slice: its image file and its mask file."""

    patient: str
    number: int
    image: Path
    mask: Path


@dataclass
class Patient:
    """One patient folder; ``slices`` are ordered by slice number (10 after 9)."""

    id: str
    folder: Path
    slices: list[SliceFile] = field(default_factory=list)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file (relative to the root); ``patient`` / ``number`` name the
    slice ``--skip-bad`` skips (``number`` None: no slice, e.g. an empty folder)."""

    file: str
    message: str
    patient: str | None = None
    number: int | None = None

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"

    @classmethod
    def of(cls, s: SliceFile, path: Path, message: str) -> Problem:
        """A problem with ``path``, one of slice ``s``'s files."""
        return cls(f"{s.patient}/{path.name}", message, s.patient, s.number)


@dataclass
class LGGDataset:
    """A discovered dataset: the patients with their usable slices, the rows of ``data.csv``
    and the structural problems found (with ``skip_bad`` the bad slices are left out)."""

    root: Path
    patients: list[Patient]
    clinical: list[dict[str, str]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def slices(self) -> list[SliceFile]:
        """All slices, patient by patient (patients sorted by id), slice order within."""
        return [s for p in self.patients for s in p.slices]

    @property
    def patient_ids(self) -> list[str]:
        return [p.id for p in self.patients]

    def __len__(self) -> int:
        return sum(len(p.slices) for p in self.patients)


def _looks_like_dataset(path: Path) -> bool:
    """A folder named kaggle_3m, or one with data.csv, or a sub-folder holding TIF files."""
    if path.name == "kaggle_3m" or (path / "data.csv").is_file():
        return True
    with contextlib.suppress(OSError):
        for sub in path.iterdir():
            if sub.is_dir() and not sub.name.startswith("."):
                with os.scandir(sub) as it:
                    if any(_TIF_RE.search(e.name) for e in it if e.is_file()):
                        return True
    return False


def find_root(path: str | os.PathLike[str]) -> Path:
    """``path`` itself, or its ``kaggle_3m`` or ``lgg-mri-segmentation/kaggle_3m`` sub-folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise BrainsegError(f"dataset folder {p} does not exist", hint=DOWNLOAD_HINT)
    if not p.is_dir():
        raise BrainsegError(
            f"{p} is a file, expected a kaggle_3m dataset folder", hint=DOWNLOAD_HINT
        )
    for cand in (p / "kaggle_3m", p / "lgg-mri-segmentation" / "kaggle_3m"):
        if cand.is_dir():
            return cand
    if _looks_like_dataset(p):
        return p
    raise BrainsegError(
        f"{p} is not a kaggle_3m dataset: expected patient folders holding <case>_<k>.tif "
        f"and <case>_<k>_mask.tif, or a kaggle_3m sub-folder",
        hint=DOWNLOAD_HINT,
    )


def read_clinical(root: Path) -> list[dict[str, str]]:
    """Rows of ``root/data.csv`` as dicts (``[]`` when absent); a broken file is a problem."""
    path = root / "data.csv"
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [dict(row) for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BrainsegError(
            f"cannot read {path}: {exc}", hint="fix or remove data.csv (it is optional)"
        ) from exc


def _scan_patient(root: Path, folder: Path) -> tuple[Patient, list[Problem]]:
    pid = folder.name
    problems: list[Problem] = []
    images: dict[int, Path] = {}
    masks: dict[int, Path] = {}

    def problem(name: str, message: str, num: int | None = None) -> None:
        problems.append(Problem(f"{pid}/{name}", message, pid, num))

    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if not e.name.startswith(".")]
    except OSError as exc:
        rel = folder.relative_to(root).as_posix()
        return Patient(pid, folder, []), [Problem(rel, f"cannot list folder: {exc.strerror}", pid)]
    for e in sorted(entries, key=lambda e: e.name):
        if not e.is_file() or not _TIF_RE.search(e.name):
            continue  # notes, thumbnails...: not part of the dataset
        m = _SLICE_RE.match(e.name)
        if m is None:
            problem(e.name, "unexpected TIF name, expected <case>_<k>.tif or <case>_<k>_mask.tif")
            continue
        num = int(m.group("num"))
        target = masks if m.group("mask") else images
        if num in target:
            problem(e.name, f"duplicate of {pid}/{target[num].name} (slice {num})", num)
        else:
            target[num] = Path(e.path)
    slices: list[SliceFile] = []
    for num in sorted(images.keys() | masks.keys()):
        img, msk = images.get(num), masks.get(num)
        if img is not None and msk is not None:
            slices.append(SliceFile(pid, num, img, msk))
        elif img is not None:
            expected = _SLICE_RE.sub(r"\g<case>_\g<num>_mask.tif", img.name)
            problem(img.name, f"missing mask (expected {pid}/{expected})", num)
        elif msk is not None:
            expected = msk.name.replace("_mask.", ".")
            problem(msk.name, f"missing image (expected {pid}/{expected})", num)
    if not images and not masks:
        problem("", "empty patient folder (expected <case>_<k>.tif and <case>_<k>_mask.tif files)")
    return Patient(pid, folder, slices), problems


def scan(path: str | os.PathLike[str]) -> LGGDataset:
    """Find the root and every patient and slice; structural problems are collected, not raised."""
    root = find_root(path)
    clinical = read_clinical(root)
    problems: list[Problem] = []
    try:
        folders = sorted(
            (d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "__"))),
            key=lambda d: d.name,
        )
    except OSError as exc:
        raise BrainsegError(
            f"cannot list {root}: {exc.strerror or exc}", hint="check the folder is readable"
        ) from exc
    if not folders:
        problems.append(
            Problem(
                ".",
                "no patients: expected one sub-folder per patient (e.g. TCGA_CS_4941_19960909/)",
            )
        )
    scanned = [_scan_patient(root, folder) for folder in folders]
    problems += [p for _, found in scanned for p in found]
    return LGGDataset(root, [patient for patient, _ in scanned], clinical, problems)


def drop_bad(dataset: LGGDataset, problems: list[Problem]) -> LGGDataset:
    """A copy of ``dataset`` without the slices named in ``problems`` nor empty patients."""
    bad = {(p.patient, p.number) for p in problems if p.number is not None}
    patients = []
    for pat in dataset.patients:
        slices = [s for s in pat.slices if (s.patient, s.number) not in bad]
        if slices:
            patients.append(Patient(pat.id, pat.folder, slices))
    return LGGDataset(dataset.root, patients, dataset.clinical, list(problems))


def format_problems(root: Path, problems: list[Problem], limit: int = MAX_LISTED) -> str:
    """A header line naming the root, then one line per problem (``limit`` at most)."""
    n = len(problems)
    lines = [f"{n} problem{'s' if n != 1 else ''} in dataset {root}:"]
    lines += [f"  {p}" for p in problems[:limit]]
    if n > limit:
        lines.append(f"  ... and {n - limit} more")
    return "\n".join(lines)


def report_problems(dataset: LGGDataset, problems: list[Problem], skip_bad: bool) -> LGGDataset:
    """Raise one error listing all ``problems``, or (``skip_bad``) warn and return the dataset
    without those slices (raising still when nothing usable is left)."""
    if not problems:
        return dataset
    if not skip_bad:
        raise BrainsegError(format_problems(dataset.root, problems), hint=SKIP_HINT)
    kept = drop_bad(dataset, problems)
    skipped = len({(p.patient, p.number) for p in problems if p.number is not None})
    if not kept.patients:
        raise BrainsegError(
            format_problems(dataset.root, problems) + "\nno usable slices are left",
            hint="fix the files listed above, or point to another dataset",
        )
    console.warn(
        f"--skip-bad: skipping {skipped} slice{'s' if skipped != 1 else ''} "
        f"({len(problems)} problem{'s' if len(problems) != 1 else ''}) in "
        f"{dataset.root}; using {len(kept)} slices of {len(kept.patients)} patients"
    )
    show_problems(problems)
    return kept


def show_problems(problems: Sequence[object]) -> None:
    """The first 5 problems as info lines (every one with --debug)."""
    shown = len(problems) if console.state.debug else 5
    for p in problems[:shown]:
        console.info(f"  {p}")
    if len(problems) > shown:
        console.info(f"  ... and {len(problems) - shown} more (--debug lists all)")


def discover(path: str | os.PathLike[str], skip_bad: bool = False) -> LGGDataset:
    """Find a dataset and check its structure (no decoding), see :func:`report_problems`."""
    ds = scan(path)
    return report_problems(ds, ds.problems, skip_bad)


def _read_or_problem(s: SliceFile, path: Path) -> np.ndarray | Problem:
    try:
        return read_tiff_array(path)  # first page only (see imageio)
    except Exception as exc:  # tifffile raises many types for broken files
        return Problem.of(s, path, f"unreadable or truncated TIF ({first_line(exc, 120)})")


def _image_problem(img: np.ndarray) -> str | None:
    """What is wrong with a decoded image (HxW grey or HxWx3 RGB, uint8), if anything."""
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        return f"image shape {_shape(img)}, expected HxWx3 (RGB) or HxW (grayscale)"
    if img.dtype != np.uint8:
        return f"image dtype {img.dtype}, expected uint8"
    return None


def _mask_problem(msk: np.ndarray) -> str | None:
    """What is wrong with a decoded mask (HxW uint8 in {0, 255} or {0, 1}), if anything."""
    if msk.ndim != 2:
        return f"mask shape {_shape(msk)}, expected HxW (one channel)"
    if msk.dtype != np.uint8:
        return f"mask dtype {msk.dtype}, expected uint8"
    values = np.unique(msk)
    found = set(values.tolist())
    if not (found <= {0, 255} or found <= {0, 1}):
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        return f"mask values {{{shown}}}, expected {{0, 255}} or {{0, 1}}"
    return None


def decode_slice(s: SliceFile) -> tuple[np.ndarray, np.ndarray] | list[Problem]:
    """Decode and check one slice: ``(HxWx3 uint8, HxW uint8 0/1)`` or its problems."""
    img, msk = _read_or_problem(s, s.image), _read_or_problem(s, s.mask)
    if isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    problems = [x for x in (img, msk) if isinstance(x, Problem)]
    for path, arr, what in ((s.image, img, _image_problem), (s.mask, msk, _mask_problem)):
        wrong = what(arr) if isinstance(arr, np.ndarray) else None
        if wrong:
            problems.append(Problem.of(s, path, wrong))
    if problems or not isinstance(img, np.ndarray) or not isinstance(msk, np.ndarray):
        return problems
    if img.shape[:2] != msk.shape:
        h, w = img.shape[:2]
        wrong = (
            f"mask shape {_shape(msk)} does not match its image {_shape(img)} (expected {h}x{w})"
        )
        return [Problem.of(s, s.mask, wrong)]
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img), (msk > 0).astype(np.uint8)


def _shape(a: np.ndarray) -> str:
    return "x".join(str(d) for d in a.shape)


def read_slice(slice_file: SliceFile) -> tuple[np.ndarray, np.ndarray]:
    """``(HxWx3 uint8 image, HxW uint8 0/1 mask)``, grey made RGB; a bad slice raises, naming it."""
    res = decode_slice(slice_file)
    if isinstance(res, list):
        root = slice_file.image.parent.parent  # Problem.file is relative to the dataset root
        raise BrainsegError("; ".join(f"{root / p.file}: {p.message}" for p in res), hint=SKIP_HINT)
    return res
