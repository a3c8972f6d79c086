"""Phantom MRI dataset in the kaggle_3m layout, for the offline demo and for tests.

Each phantom patient is one numpy 3D volume: a head (scalp, skull, CSF, gyri, white matter,
ventricles) and a deformed-ellipsoid tumour in the LGG channels' three contrasts. Intensities,
bias field and noise vary per patient, so a network has to learn shape and context rather
than a threshold. The same seed gives the same bytes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from brainseg import __version__
from brainseg.errors import BrainsegError, BrainsegRuntimeError
from brainseg.fsutil import make_temp_dir, remove_stale_temps
from brainseg.settings import SIZE_MULTIPLE

#: Institution codes that appear in the real TCGA-LGG folder names.
_INSTITUTIONS = ("CS", "DU", "EZ", "FG", "HT")

_CSV_COLUMNS = (
    "Patient,RNASeqCluster,MethylationCluster,miRNACluster,CNCluster,RPPACluster,"
    "OncosignCluster,COCCluster,histological_type,neoplasm_histologic_grade,tumor_tissue_site,"
    "laterality,tumor_location,gender,age_at_initial_pathologic,race,ethnicity,death01"
)

#: Value ranges [low, high) of the made-up data.csv columns after Patient (same order).
_CSV_LOW = (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 20, 3, 2, 0)
_CSV_HIGH = (5, 6, 4, 4, 5, 4, 4, 4, 3, 2, 4, 7, 3, 80, 4, 3, 2)


@dataclass(frozen=True)
class PhantomCase:
    """One generated patient: folder name, images D x H x W x 3 uint8, masks D x H x W 0/1."""

    folder: str
    images: np.ndarray
    masks: np.ndarray


def patient_names(patients: int, seed: int = 0) -> list[str]:
    """Unique TCGA-style folder names ``TCGA_<XX>_<dddd>_<yyyymmdd>``, deterministic per seed."""
    rng = np.random.default_rng([seed, 7919])
    names: dict[str, str] = {}  # by patient id
    start = _dt.date(1985, 1, 1).toordinal()
    end = _dt.date(2005, 12, 31).toordinal()
    while len(names) < patients:
        inst = _INSTITUTIONS[int(rng.integers(len(_INSTITUTIONS)))]
        pid = f"TCGA_{inst}_{int(rng.integers(1000, 10000)):04d}"
        if pid not in names:
            day = _dt.date.fromordinal(int(rng.integers(start, end + 1)))
            names[pid] = f"{pid}_{day:%Y%m%d}"
    return list(names.values())


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    """Soft step 0 -> 1 around x = 0 over ``width`` (partial-volume edges, cheap)."""
    return np.clip(0.5 + x / width, 0.0, 1.0)


def _wave(
    rng: np.random.Generator, dims: int, freq: tuple[float, float]
) -> tuple[np.ndarray, float]:
    """A random plane wave: its wave vector (length drawn from ``freq``) and phase."""
    w = rng.normal(size=dims)
    w *= rng.uniform(*freq) / max(float(np.linalg.norm(w)), 1e-6)
    return w, rng.uniform(0, 2 * np.pi)


def _smooth_field(
    rng: np.random.Generator, coords: tuple[np.ndarray, ...], terms: int, freq: tuple[float, float]
) -> np.ndarray:
    """A smooth random field in [-1, 1]: the mean of a few random plane waves."""
    out = np.zeros(np.broadcast_shapes(*(c.shape for c in coords)), dtype=np.float32)
    for _ in range(terms):
        w, phase = _wave(rng, len(coords), freq)
        arg = sum(float(wi) * c for wi, c in zip(w, coords, strict=True)) + phase
        out += np.sin(arg).astype(np.float32)
    return out / terms


def _volume_waves(
    rng: np.random.Generator, h: _Head, terms: int, freq: tuple[float, float]
) -> np.ndarray:
    """Like :func:`_smooth_field` over the head's volume, but separable: ``sin(a(x, y) + b(z))
    = sin a cos b + cos a sin b`` is one small matrix product, not a sine per voxel and term."""
    x, y, z = h.x2, h.y2, h.z1
    plane = np.broadcast_shapes(x.shape, y.shape)
    a = np.empty((2 * terms, plane[0] * plane[1]), dtype=np.float32)
    b = np.empty((z.shape[0], 2 * terms), dtype=np.float32)
    for t in range(terms):
        w, phase = _wave(rng, 3, freq)
        arg = np.broadcast_to(w[0] * x + w[1] * y, plane).ravel()
        a[2 * t], a[2 * t + 1] = np.sin(arg), np.cos(arg)
        bz = w[2] * z + phase
        b[:, 2 * t], b[:, 2 * t + 1] = np.cos(bz), np.sin(bz)
    return (b @ a).reshape(z.shape[0], *plane) / terms


def _span(lin: np.ndarray, lo: float, hi: float) -> slice:
    """The index range of the sorted coordinates ``lin`` that covers [lo, hi]."""
    a = max(int(np.searchsorted(lin, lo)) - 1, 0)
    b = min(int(np.searchsorted(lin, hi)) + 1, len(lin))
    return slice(a, b)


def _tumour_run(mask: np.ndarray, centre: int) -> np.ndarray:
    """Slices to keep: the contiguous run of tumour slices nearest the tumour centre."""
    from scipy import ndimage

    has = np.asarray(mask.any(axis=(1, 2)), dtype=bool)
    idx = np.flatnonzero(has)
    if not len(idx):
        return has
    runs, _ = ndimage.label(has)
    return np.asarray(runs == runs[idx[np.argmin(np.abs(idx - centre))]])


def _add_mimics(
    rng: np.random.Generator,
    base: np.ndarray,
    wm: np.ndarray,
    h: _Head,
    tumour: _Tumour,
    flair_level: float,
) -> None:
    """Small FLAIR-bright white-matter spots that are *not* tumour: iso-intense elsewhere, so a
    model has to use size and the pre-contrast channel, not a FLAIR threshold."""
    n_slices = base.shape[1]
    tx, ty, tr = tumour.where
    for _ in range(int(rng.integers(1, 5))):
        ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.55)
        sx, sy = rad * h.ax * np.cos(ang), rad * h.ay * np.sin(ang)
        sr = rng.uniform(0.04, 0.08)
        kc = rng.uniform(0.3, 0.7) * (n_slices - 1)
        kz = rng.uniform(1.0, 3.0)
        level = flair_level + rng.uniform(-30, 10)
        if np.hypot(sx - tx, sy - ty) < 1.3 * tr + sr:  # keep clear of the tumour
            continue
        k0, k1 = max(int(kc - kz), 0), min(int(np.ceil(kc + kz)) + 1, n_slices)
        dk = ((np.arange(k0, k1, dtype=np.float32) - kc) / kz)[:, None, None]
        q = (((h.xr - sx) ** 2 + (h.yr - sy) ** 2) / sr**2)[None]
        w = _ramp(1.0 - np.sqrt(q + dk**2), 0.3) * wm[k0:k1] * (tumour.mask[k0:k1] == 0)
        flair = base[1, k0:k1]
        flair[:] = flair * (1.0 - w) + level * w


_RGB = tuple[float, float, float]


@dataclass
class _Head:
    """One head's geometry: x, y in [-1, 1] across the image (and rotated: xr, yr), z in head
    units (bottom -> top); ``r`` is 1 at the scalp."""

    px: float
    lin: np.ndarray
    x2: np.ndarray
    y2: np.ndarray
    z1: np.ndarray
    xr: np.ndarray
    yr: np.ndarray
    ax: float
    ay: float
    rot: tuple[float, float, float, float]  # cos, sin of the rotation; centre x, y
    r: np.ndarray
    edge: float


def _head(rng: np.random.Generator, n_slices: int, size: int) -> _Head:
    """An ellipsoid head, slightly rotated and shifted (2D in-plane terms, then + z^2)."""
    f32 = np.float32
    px = 2.0 / size  # one pixel in normalised units
    lin = (np.arange(size, dtype=f32) + 0.5) * px - 1.0
    y2, x2 = lin[:, None], lin[None, :]
    z1 = np.linspace(-0.92, 0.85, n_slices, dtype=f32)
    ang = rng.uniform(-0.15, 0.15)
    ca, sa = float(np.cos(ang)), float(np.sin(ang))
    cx, cy = (float(v) for v in rng.uniform(-0.05, 0.05, size=2))
    xr = (ca * (x2 - cx) + sa * (y2 - cy)).astype(f32)  # H x W
    yr = (-sa * (x2 - cx) + ca * (y2 - cy)).astype(f32)
    ax, ay = float(rng.uniform(0.68, 0.78)), float(rng.uniform(0.82, 0.9))
    r = np.sqrt(((xr / ax) ** 2 + (yr / ay) ** 2)[None] + z1[:, None, None] ** 2, dtype=f32)
    edge = 1.5 * px / min(ax, ay)
    return _Head(px, lin, x2, y2, z1, xr, yr, ax, ay, (ca, sa, cx, cy), r, edge)


def _tissues(rng: np.random.Generator, h: _Head) -> dict[str, np.ndarray]:
    """Soft (0..1) maps of scalp, bone, csf, grey and white matter, ventricles; and brain."""
    f32 = np.float32
    head = _ramp(1.0 - h.r, h.edge)
    skull_in = float(rng.uniform(0.89, 0.91))
    inner = _ramp(skull_in - h.r, h.edge)  # inside the skull
    brain_edge = skull_in - 0.04
    brain = _ramp(brain_edge - h.r, h.edge)
    scalp = _ramp(h.r - 0.955, h.edge) * head
    # Cortex: a wavy band (gyri) inside the brain edge; white matter inside it.
    gk, gp = int(rng.integers(9, 15)), rng.uniform(0, 6.3)
    ga = (gk * np.arctan2(h.yr, h.xr) + gp).astype(f32)[None]
    # Fade the folds out near the in-plane centre, where theta would make a starburst.
    fade = np.clip((np.sqrt((h.xr / h.ax) ** 2 + (h.yr / h.ay) ** 2) - 0.2) / 0.3, 0, 1)[None]
    z = h.z1[:, None, None]
    gyri = 0.05 * fade * (np.sin(ga) * np.cos(6 * z) + np.cos(ga) * np.sin(6 * z))
    gyri += 0.03 * _volume_waves(rng, h, 3, (3.0, 6.0))
    wm = _ramp((brain_edge - 0.17 + gyri) - h.r, 2 * h.edge) * brain
    # Ventricles: two small ellipsoids beside the midline, in the middle of the head.
    vz = rng.uniform(-0.05, 0.15)
    vent = np.zeros_like(h.r)
    for side in (-1.0, 1.0):
        q = (((h.xr - side * 0.09) / 0.07) ** 2 + ((h.yr + 0.05) / 0.25) ** 2)[None]
        vr = np.sqrt(q + ((z - vz) / 0.25) ** 2, dtype=f32)
        np.maximum(vent, _ramp(1.0 - vr, 3 * h.px / 0.07), out=vent)
    vent *= wm
    return {
        "head": head,
        "brain": brain,
        "scalp": scalp,
        "bone": np.clip(head - inner - scalp, 0, 1),
        "csf": np.clip(inner - brain, 0, 1),
        "gm": np.clip(brain - wm, 0, 1),
        "wm": wm,
        "vent": vent,
    }


@dataclass
class _Tumour:
    """The tumour in its bounding box ``box``: soft maps of the whole tumour, the core and
    the enhancing rim; the full-volume mask; its in-plane centre and largest radius."""

    box: tuple[slice, slice, slice]
    t_box: np.ndarray
    core: np.ndarray
    rim: np.ndarray
    mask: np.ndarray
    where: tuple[float, float, float]


def _tumour(rng: np.random.Generator, h: _Head, brain: np.ndarray) -> _Tumour:
    """A star-shaped deformed ellipsoid (its radius depends on direction only, so every slice
    between its ends has tumour), computed in its bounding box only."""
    f32 = np.float32
    n_slices = len(h.z1)
    run = max(2, min(round(n_slices * rng.uniform(0.26, 0.46)), n_slices - 2))
    centre_k = rng.uniform(0.35, 0.65) * (n_slices - 1)
    tz = max(run / 2.0, 1.0)
    t_ang, t_rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.4)
    tx, ty = t_rad * h.ax * np.cos(t_ang), t_rad * h.ay * np.sin(t_ang)
    rx, ry = float(rng.uniform(0.12, 0.26)), float(rng.uniform(0.12, 0.26))
    reach = 1.35 * max(rx, ry) + 2 * h.px
    ca, sa, cx, cy = h.rot
    ix, iy = cx + ca * tx - sa * ty, cy + sa * tx + ca * ty  # tumour centre in image coords
    cols = _span(h.lin, ix - reach, ix + reach)
    rows = _span(h.lin, iy - reach, iy + reach)
    ks = slice(
        *np.clip([int(centre_k - 1.3 * tz), int(np.ceil(centre_k + 1.3 * tz)) + 1], 0, n_slices)
    )
    box = (ks, rows, cols)
    dx = ((h.xr[rows, cols] - tx) / rx)[None]
    dy = ((h.yr[rows, cols] - ty) / ry)[None]
    dk = ((np.arange(n_slices, dtype=f32)[ks] - centre_k) / tz)[:, None, None]
    tr = np.sqrt(dx**2 + dy**2 + dk**2, dtype=f32)
    inv = 1.0 / np.maximum(tr, 1e-6)
    deform = 0.22 * _smooth_field(rng, (dx * inv, dy * inv, dk * inv), 4, (1.5, 4.0))
    s = (1.0 + deform) - tr  # > 0 inside the tumour
    tedge = 2 * h.px / min(rx, ry)
    t_box = _ramp(s, tedge) * brain[box]
    m_box = t_box >= 0.5
    keep = _tumour_run(m_box, round(centre_k) - (ks.start or 0))[:, None, None]
    m_box &= keep
    t_box *= keep
    core = _ramp(s - 0.45 - 0.1 * deform, tedge) * t_box  # solid / necrotic core
    rim = np.clip(_ramp(s - 0.3, tedge) - core, 0, 1) * t_box
    rim *= _ramp(_smooth_field(rng, (dx, dy, dk), 3, (1.0, 3.0)) + 0.2, 0.4)  # patchy
    mask = np.zeros(brain.shape, dtype=np.uint8)
    mask[box] = m_box
    return _Tumour(box, t_box, core, rim, mask, (tx, ty, max(rx, ry)))


def _levels(rng: np.random.Generator) -> tuple[np.ndarray, _RGB, _RGB, _RGB]:
    """Per-patient intensities per channel (pre-contrast, FLAIR, post-contrast): tissues
    (3 x 6), tumour, core (3 each) and the enhancing rim (post-contrast only)."""

    def lvl(a: float, b: float) -> float:
        return float(rng.uniform(a, b))

    levels = np.array(
        [  # scalp, bone, csf, grey matter, white matter, ventricles
            [lvl(150, 200), lvl(15, 35), lvl(25, 45), lvl(80, 100), lvl(100, 125), lvl(20, 40)],
            [lvl(120, 190), lvl(10, 30), lvl(15, 35), lvl(95, 120), lvl(75, 95), lvl(15, 30)],
            [lvl(150, 200), lvl(15, 35), lvl(25, 45), lvl(85, 105), lvl(105, 125), lvl(20, 40)],
        ],
        dtype=np.float32,
    )
    flair_t = float(levels[1, 3]) + lvl(30, 85)  # tumour above grey matter in FLAIR
    tum = (lvl(60, 85), flair_t, lvl(60, 85))
    core_l = (lvl(45, 65), flair_t + lvl(-40, 20), lvl(40, 60))
    return levels, tum, core_l, (0.0, 0.0, lvl(180, 235))


def make_case(rng: np.random.Generator, folder: str, n_slices: int, size: int) -> PhantomCase:
    """Render one phantom patient (all slices at once, as one 3D volume)."""
    h = _head(rng, n_slices, size)
    t = _tissues(rng, h)
    tumour = _tumour(rng, h, t["brain"])
    levels, tum, core_l, rim_l = _levels(rng)
    texture = _volume_waves(rng, h, 4, (6.0, 14.0))
    bias = 1.0 + 0.12 * _volume_waves(rng, h, 2, (0.8, 2.0))
    names = ("scalp", "bone", "csf", "gm", "wm", "vent")
    layers = np.stack([t[k] - t["vent"] if k == "wm" else t[k] for k in names]).reshape(6, -1)
    base = (levels @ layers).reshape(3, n_slices, size, size)
    base *= (1.0 + 0.06 * texture)[None]
    _add_mimics(rng, base, t["wm"], h, tumour, tum[1])
    noise_w = (0.3 + 0.7 * t["head"]) * float(rng.uniform(3.0, 7.0))
    images = np.empty((n_slices, size, size, 3), dtype=np.uint8)
    for ch in range(3):
        img = base[ch]
        sub = img[tumour.box]  # the tumour replaces the tissue under it
        sub[:] = sub * (1.0 - tumour.t_box) + tum[ch] * tumour.t_box
        sub[:] = sub * (1.0 - tumour.core) + core_l[ch] * tumour.core
        if ch == 2:
            sub[:] = sub * (1.0 - tumour.rim) + rim_l[ch] * tumour.rim
        img *= bias
        img += rng.standard_normal(img.shape, dtype=np.float32) * noise_w
        np.rint(img, out=img)
        np.clip(img, 0, 255, out=img)
        images[..., ch] = img
    return PhantomCase(folder=folder, images=images, masks=tumour.mask)


def generate(
    patients: int = 10, seed: int = 0, size: int = 256, slices: tuple[int, int] = (20, 40)
) -> list[PhantomCase]:
    """All phantom patients in memory (what :func:`write_synthetic` writes)."""
    check_arguments(patients, size, slices, seed)
    return list(_cases(patient_names(patients, seed), seed, size, slices))


def _cases(
    names: list[str], seed: int, size: int, slices: tuple[int, int]
) -> Iterator[PhantomCase]:
    """The phantom patients one at a time, each from its own seeded generator."""
    for i, folder in enumerate(names):
        rng = np.random.default_rng([seed, i])
        n = int(rng.integers(slices[0], slices[1] + 1))
        yield make_case(rng, folder, n, size)


#: Most phantom patients one run writes (the real dataset has 110; names run out at 45,000).
MAX_PATIENTS = 1000
#: Largest image side (the real slices are 256 x 256).
MAX_SIZE = 1024
#: Most slices per patient (the real patients have 20 to 88).
MAX_SLICES = 256


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_arguments(
    patients: int, size: int, slices: tuple[int, int] = (20, 40), seed: int = 0
) -> None:
    """Refuse, at once, arguments that cannot make a phantom dataset (or would run for days)."""
    if not _is_int(patients) or not 1 <= patients <= MAX_PATIENTS:
        raise BrainsegError(
            f"--patients must be an integer from 1 to {MAX_PATIENTS}, got {patients!r}",
            hint="for example --patients 10",
        )
    if not _is_int(size) or not SIZE_MULTIPLE <= size <= MAX_SIZE or size % SIZE_MULTIPLE:
        raise BrainsegError(
            f"--size must be a multiple of {SIZE_MULTIPLE} from {SIZE_MULTIPLE} to {MAX_SIZE}, "
            f"got {size!r}",
            hint="for example --size 256 (the real data) or 64 (fast tests)",
        )
    if not _is_int(seed) or seed < 0:
        raise BrainsegError(
            f"--seed must be a non-negative integer, got {seed!r}", hint="for example --seed 0"
        )
    lo, hi = slices
    if not (_is_int(lo) and _is_int(hi) and 4 <= lo <= hi <= MAX_SLICES):
        raise BrainsegError(
            f"slices per patient must be a range (lo, hi) with 4 <= lo <= hi <= {MAX_SLICES}, "
            f"got {slices!r}",
            hint="for example (20, 40)",
        )


def _csv_text(names: list[str], seed: int) -> str:
    rng = np.random.default_rng([seed, 104729])
    lines = [_CSV_COLUMNS]
    for folder in names:
        pid = "_".join(folder.split("_")[:3])
        vals = [int(rng.integers(lo, hi)) for lo, hi in zip(_CSV_LOW, _CSV_HIGH, strict=True)]
        lines.append(",".join([pid, *map(str, vals)]))
    return "\n".join(lines) + "\n"


def _readme_text(patients: int, seed: int, size: int, slices: tuple[int, int]) -> str:
    return (
        "# Synthetic LGG phantoms (not real patients)\n\n"
        f"Generated by brainseg {__version__}: `write_synthetic(patients={patients}, "
        f"seed={seed}, size={size}, slices={tuple(slices)})`.\n\n"
        "Same layout as the LGG kaggle_3m dataset: one folder per patient, "
        "`<folder>_<k>.tif` slices (H x W x 3 uint8: pre-contrast, FLAIR, post-contrast) "
        "and `<folder>_<k>_mask.tif` masks (0 / 255). The tumour is a smooth deformed "
        "ellipsoid, bright in FLAIR, with a partly enhancing rim in post-contrast.\n\n"
        "Regenerate with `brainseg download synthetic --dest DIR "
        f"--patients {patients} --seed {seed}`. See docs/synthetic.md.\n"
    )


def _write_tif(path: Path, arr: np.ndarray, rgb: bool) -> None:
    tifffile.imwrite(
        path,
        arr,
        photometric="rgb" if rgb else "minisblack",
        compression="zlib",
        compressionargs={"level": 1},
        metadata=None,
    )


def write_synthetic(
    dest: str | os.PathLike[str],
    patients: int = 10,
    seed: int = 0,
    size: int = 256,
    slices: tuple[int, int] = (20, 40),
    force: bool = False,
) -> Path:
    """Write a phantom dataset to ``dest/kaggle_3m`` and return that folder: built under a
    temporary name and renamed into place; an existing one is refused unless ``force``."""
    check_arguments(patients, size, slices, seed)
    dest = Path(dest)
    root = dest / "kaggle_3m"
    if dest.exists() and not dest.is_dir():
        raise BrainsegError(
            f"{dest} is a file, not a folder",
            hint="give --dest a folder (it is created if missing)",
        )
    if root.exists() and not force:
        raise BrainsegError(
            f"{root} already exists", hint="pass --force to replace it, or choose another --dest"
        )
    try:
        dest.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dest)  # what a killed run left here
        tmp = make_temp_dir(dest, "kaggle_3m")  # the umask applies (mkdtemp: 0700)
    except OSError as exc:
        raise BrainsegRuntimeError(
            f"cannot create {dest}: {exc.strerror or exc}", hint="check the folder is writable"
        ) from exc
    old: Path | None = None
    try:
        names = patient_names(patients, seed)
        for case in _cases(names, seed, size, slices):
            pdir = tmp / case.folder
            pdir.mkdir()
            masks = case.masks * np.uint8(255)
            for k in range(len(masks)):
                _write_tif(pdir / f"{case.folder}_{k + 1}.tif", case.images[k], rgb=True)
                _write_tif(pdir / f"{case.folder}_{k + 1}_mask.tif", masks[k], rgb=False)
        (tmp / "data.csv").write_text(_csv_text(names, seed), encoding="utf-8")
        (tmp / "README.md").write_text(_readme_text(patients, seed, size, slices), encoding="utf-8")
        if root.exists() or root.is_symlink():
            if not force:  # it was not there at the start: another run made it meanwhile
                raise FileExistsError(errno.EEXIST, "created meanwhile", str(root))
            old = Path(tempfile.mkdtemp(prefix=".kaggle_3m.", suffix=".old", dir=dest))
            os.replace(root, old / "kaggle_3m")
        os.replace(tmp, root)
    except OSError as exc:
        if old is not None and not root.exists() and (old / "kaggle_3m").exists():
            with contextlib.suppress(OSError):
                os.replace(old / "kaggle_3m", root)
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and old is None and root.exists():
            raise BrainsegRuntimeError(  # another run (another process) finished first
                f"{root} was created by another run while this one was writing phantoms; "
                "it was left as it is and nothing of this run was kept",
                hint="pass --force to replace it, or choose another --dest",
            ) from exc
        raise BrainsegRuntimeError(
            f"cannot write the phantom dataset to {root}: {exc.strerror or exc}",
            hint="check free space and permissions",
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone after a successful rename
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return root
