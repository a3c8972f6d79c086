"""A one-time cache of a whole dataset as uint8 arrays, memory-mapped on every later load.

Decoding 3929 TIF pairs takes seconds on every run; the cache decodes (and checks, see
:mod:`brainseg.data.lgg`) them once and stores::

    $BRAINSEG_CACHE_DIR/datasets/<key>/       (default ~/.cache/brainseg/datasets/<key>/)
      images.npy          N x 3 x H x W uint8
      masks.npy           N x H x W uint8 in {0, 1}
      patient_index.npy   N int32, index into meta.json's "patient_ids" (sorted)
      slice_number.npy    N int32, the <k> of <case>_<k>.tif
      tumor_pixels.npy    N int32, tumour pixels per slice (for splits and summaries)
      meta.json           key, root, size, patient_ids, skipped problems, versions

Later loads are ``np.load(mmap_mode="r")``. The key hashes the files' names, sizes and
contents (plus the format version and ``skip_bad``): identical data reuses its cache wherever
it lies, any edit builds a new one. A cache remembers the stat keys (names, sizes, mtimes) it
was found under, so an unchanged folder is matched without hashing. A build is renamed into
place from a temporary folder (a killed build leaves no half cache; the next build removes it).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from brainseg import __version__, console
from brainseg.data import lgg
from brainseg.data.imageio import resize_image, resize_prob
from brainseg.errors import BrainsegError
from brainseg.fsutil import pid_alive, write_error

#: Bump when the stored layout changes: old caches are then simply not found.
FORMAT_VERSION = 1
#: Temporary build folders older than this are removed even if their process may live.
STALE_SECONDS = 24 * 3600
_ARRAYS = ("images", "masks", "patient_index", "slice_number", "tumor_pixels")


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``datasets/`` in ``cache_dir``, ``$BRAINSEG_CACHE_DIR`` or ~/.cache/brainseg."""
    if cache_dir is None:
        env = os.environ.get("BRAINSEG_CACHE_DIR")
        cache_dir = Path(env) if env else Path.home() / ".cache" / "brainseg"
    return Path(cache_dir).expanduser() / "datasets"


@dataclass
class ArrayData:
    """The dataset as arrays (memory-mapped unless ``resized``), patient by patient (sorted ids)."""

    images: np.ndarray  # N x 3 x H x W uint8
    masks: np.ndarray  # N x H x W uint8 in {0, 1}
    patient_index: np.ndarray  # N int32, index into patient_ids
    slice_number: np.ndarray  # N int32
    patient_ids: list[str]
    key: str
    root: Path | None  # the dataset folder (None when unknown)
    tumor_pixels: np.ndarray  # N int32, tumour pixels per slice
    problems: list[str] = field(default_factory=list)  # skipped with skip_bad
    path: Path | None = None  # the cache folder, None for in-memory arrays

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of every slice."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def indices_of(self, patient_ids: Iterable[str]) -> np.ndarray:
        """Row indices (int64, dataset order) of these patients' slices; unknown ids raise."""
        ids = list(patient_ids)
        lookup = {p: i for i, p in enumerate(self.patient_ids)}
        unknown = [p for p in ids if p not in lookup]
        if unknown:
            shown = ", ".join(unknown[:10]) + (
                f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            )
            where = f" {self.root}" if self.root else ""
            raise BrainsegError(
                f"{len(unknown)} patient id(s) not in dataset{where}: {shown} (the dataset has "
                f"{len(self.patient_ids)} patients, e.g. {', '.join(self.patient_ids[:2])})",
                hint="the split was made for another dataset: make a new one with "
                "`brainseg split DATA -o splits.yaml`",
            )
        wanted = np.array(sorted({lookup[p] for p in ids}), dtype=np.int32)
        return np.flatnonzero(np.isin(self.patient_index, wanted))

    def resized(self, size: int | tuple[int, int]) -> ArrayData:
        """The same data at ``size`` (in memory); ``self`` when the size already matches."""
        hw = _hw(size)
        if hw == self.size:
            return self
        masks = resize_masks(self.masks, hw)
        return replace(
            self,
            images=resize_images(self.images, hw),
            masks=masks,
            patient_index=np.asarray(self.patient_index),
            slice_number=np.asarray(self.slice_number),
            patient_ids=list(self.patient_ids),
            tumor_pixels=_tumor_pixels(masks),
            problems=list(self.problems),
            path=None,
        )

    def _per_patient(self, values: np.ndarray) -> dict[str, int]:
        sums = np.bincount(self.patient_index, weights=values, minlength=len(self.patient_ids))
        return {p: round(float(sums[i])) for i, p in enumerate(self.patient_ids)}

    def slices_per_patient(self) -> dict[str, int]:
        """Number of slices of each patient."""
        return self._per_patient(np.ones(len(self)))

    def tumor_slices_per_patient(self) -> dict[str, int]:
        """Number of slices with any tumour pixel, per patient."""
        return self._per_patient(self.tumor_pixels > 0)

    def tumor_pixels_per_patient(self) -> dict[str, int]:
        """Total tumour pixels per patient (at the stored size)."""
        return self._per_patient(self.tumor_pixels)

    def burden(self) -> dict[str, dict[str, int]]:
        """Per patient: ``{"slices", "tumor_slices", "tumor_pixels"}`` (for stratified splits)."""
        n, t = self.slices_per_patient(), self.tumor_slices_per_patient()
        px = self.tumor_pixels_per_patient()
        return {
            p: {"slices": n[p], "tumor_slices": t[p], "tumor_pixels": px[p]}
            for p in self.patient_ids
        }

    def summary(self) -> dict[str, Any]:
        """``patients``, ``slices``, ``tumor_slices``, ``tumor_fraction``, ``size``, ``skipped``."""
        n = len(self)
        tumor = int((self.tumor_pixels > 0).sum())
        return {
            "patients": len(self.patient_ids),
            "slices": n,
            "tumor_slices": tumor,
            "tumor_fraction": tumor / n if n else 0.0,
            "size": list(self.size),
            "skipped_problems": len(self.problems),
        }


def _tumor_pixels(masks: np.ndarray) -> np.ndarray:
    """Tumour pixels of each of N x H x W 0/1 masks (N int32)."""
    return masks.sum(axis=(1, 2), dtype=np.int64).astype(np.int32)


def _hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    sides = [size, size] if isinstance(size, (int, np.integer)) else list(size)
    hw = tuple(int(s) for s in sides)
    if len(hw) != 2 or min(hw) < 1:
        raise BrainsegError(
            f"image size {size!r} is not valid, expected a positive integer or (height, width)",
            hint="e.g. --size 256",
        )
    return hw[0], hw[1]


def resize_images(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """N x 3 x H x W uint8 -> N x 3 x h x w uint8, antialiased bilinear (Pillow: thin
    structures alias less when shrinking; as torch's ``antialias=True`` up to rounding)."""
    hw = _hw(size)
    out = np.empty((len(images), 3, *hw), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = resize_image(img.transpose(1, 2, 0), hw).transpose(2, 0, 1)
    return out


def resize_masks(masks: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """N x H x W 0/1 -> N x h x w 0/1: antialiased bilinear, ``>= 0.5``; a slice that had tumour
    keeps its most covered pixel, so the "tumour present" label never changes with the size."""
    hw = _hw(size)
    out = np.empty((len(masks), *hw), dtype=np.uint8)
    for i, src in enumerate(masks):
        prob = resize_prob(src.astype(np.float32), hw)
        m = (prob >= 0.5).astype(np.uint8)
        if not m.any() and src.any():
            m[prob >= prob.max()] = 1
        out[i] = m
    return out


def _stat_key(dataset: lgg.LGGDataset, skip_bad: bool) -> str:
    """SHA-256 of the files' relative names, sizes and mtimes: a cheap memo of the cache key
    (:func:`dataset_key` hashes the contents only when the stat key is new)."""
    entries: list[list[object]] = []
    for f in _files(dataset):
        try:
            st = f.stat()
            entries.append([f.relative_to(dataset.root).as_posix(), st.st_size, st.st_mtime_ns])
        except OSError:
            entries.append([str(f), -1, -1])
    return _key_of(dataset, skip_bad, entries, "stat")


def _files(dataset: lgg.LGGDataset) -> list[Path]:
    return [f for s in dataset.slices for f in (s.image, s.mask)]


def _key_of(dataset: lgg.LGGDataset, skip_bad: bool, entries: list[list[object]], kind: str) -> str:
    for p in dataset.problems:  # files found but not paired: adding their partner changes the key
        entries.append([p.file, p.message])
    entries.sort(key=lambda e: str(e[0]))
    blob = {"format": FORMAT_VERSION, "skip_bad": bool(skip_bad), kind: entries}
    return hashlib.sha256(json.dumps(blob, separators=(",", ":")).encode("utf-8")).hexdigest()


def dataset_key(dataset: lgg.LGGDataset, skip_bad: bool = False) -> str:
    """The cache key: SHA-256 of the files' relative names, sizes and contents, the format
    version and ``skip_bad``: identical data has one key wherever it lies, whatever its times."""
    entries: list[list[object]] = []
    for f in _files(dataset):
        rel = f.relative_to(dataset.root).as_posix()
        try:
            data = f.read_bytes()  # slices are small (about 40 kB each)
            entries.append([rel, len(data), hashlib.sha256(data).hexdigest()])
        except OSError:
            entries.append([rel, -1, ""])
    return _key_of(dataset, skip_bad, entries, "content")


def _memo_store(folder: Path, stat_key: str) -> None:
    """Remember ``stat_key`` in the cache's meta.json (best effort; at most 8 kept)."""
    meta = _read_meta(folder)
    keys = [*[k for k in meta.get("stat_keys", []) if k != stat_key][-7:], stat_key]
    if not meta or keys == meta.get("stat_keys"):
        return
    meta["stat_keys"] = keys
    with contextlib.suppress(OSError):
        tmp = folder / f".meta-{os.getpid()}.json"
        tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
        os.replace(tmp, folder / "meta.json")


_KEY_NAME = re.compile(r"^[0-9a-f]{32}$")


def is_cache(folder: Path) -> bool:
    """Whether ``folder`` is a dataset cache brainseg made (named by its key's first 32 hex
    digits, its meta.json holding that key): nothing else is ever listed, reused or removed."""
    if not _KEY_NAME.match(folder.name) or folder.is_symlink() or not folder.is_dir():
        return False
    meta = _read_meta(folder)
    key = meta.get("key")
    return isinstance(key, str) and key.startswith(folder.name) and type(meta.get("format")) is int


def _caches(root: Path) -> list[Path]:
    """The dataset caches in ``root`` (see :func:`is_cache`), sorted by name."""
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if is_cache(d))


def _read_meta(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _resolve_key(ds: lgg.LGGDataset, skip_bad: bool, root: Path) -> tuple[str, str]:
    """``(content key, stat key)``: the content key from the memo when the files' stats match."""
    stat_key = _stat_key(ds, skip_bad)
    for d in _caches(root):  # a cache's meta.json holds its key (see is_cache)
        meta = _read_meta(d)
        if stat_key in meta.get("stat_keys", []):
            return str(meta["key"]), stat_key
    return dataset_key(ds, skip_bad), stat_key


def load_dataset(
    path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    skip_bad: bool = False,
    rebuild: bool = False,
) -> ArrayData:
    """The dataset at ``path`` as :class:`ArrayData`, from the cache (built the first time).

    Every problem is reported in one :class:`BrainsegError`, or with ``skip_bad`` warned about
    on every load and skipped. ``rebuild`` ignores an existing cache."""
    ds = lgg.scan(path)
    root = cache_root(cache_dir)
    if skip_bad and not rebuild:  # a cache built without skip_bad holds a clean dataset: reuse
        data = _reuse(ds, root, *_resolve_key(ds, False, root))
        if data is not None:
            return data
    key, stat_key = _resolve_key(ds, skip_bad, root)
    final = root / key[:32]
    if not rebuild and final.is_dir():
        data = _reuse(ds, root, key, stat_key)
        if data is not None:
            if data.problems:
                console.warn(
                    f"--skip-bad: {len(data.problems)} problem(s) in {ds.root} were skipped when "
                    f"the cache was built; using {len(data)} slices of {len(data.patient_ids)} "
                    "patients"
                )
                lgg.show_problems(data.problems)
            return data
        console.warn(f"dataset cache {final} is damaged; rebuilding it")
    data = _build(ds, key, final, skip_bad)
    _memo_store(final, stat_key)
    return data


def _reuse(ds: lgg.LGGDataset, root: Path, key: str, stat_key: str) -> ArrayData | None:
    """The finished cache of ``key`` (None when missing or damaged), its stat key remembered."""
    folder = root / key[:32]
    data = _open(folder, key) if folder.is_dir() else None
    if data is not None:
        _memo_store(folder, stat_key)
        data.root = ds.root.resolve()  # the same files may have been found elsewhere
    return data


def _open(folder: Path, key: str) -> ArrayData | None:
    """Map a finished cache folder; None when it is missing pieces or does not match."""
    meta = _read_meta(folder)
    if meta.get("key") != key or meta.get("format") != FORMAT_VERSION:
        return None
    try:
        arrs = {
            name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            for name in _ARRAYS
        }
    except (OSError, ValueError):
        return None
    n, (h, w) = int(meta["slices"]), meta["size"]
    images = {"images": (n, 3, h, w), "masks": (n, h, w)}  # uint8; the others are N int32
    for name, arr in arrs.items():
        dtype = np.uint8 if name in images else np.int32
        if arr.shape != images.get(name, (n,)) or arr.dtype != dtype:
            return None
    return ArrayData(
        **arrs,
        patient_ids=list(meta["patient_ids"]),
        key=key,
        root=Path(meta["root"]) if meta.get("root") else None,
        problems=list(meta.get("problems", [])),
        path=folder,
    )


def clean_stale(root: Path) -> None:
    """Remove temporary folders left by killed builds (process gone, or older than a day)."""
    if not root.is_dir():
        return
    host = socket.gethostname()
    now = time.time()
    for d in root.iterdir():
        if not d.name.startswith((".tmp-", ".old-")):
            continue
        parts = d.name.split("-")
        try:
            stale = "-".join(parts[2:-2]) == host and not pid_alive(int(parts[-2]))
        except (ValueError, IndexError):
            stale = False
        with contextlib.suppress(OSError):
            stale = stale or now - d.stat().st_mtime > STALE_SECONDS
        if stale:
            shutil.rmtree(d, ignore_errors=True)


@dataclass(frozen=True)
class CacheEntry:
    """One dataset cache on disk, as ``brainseg cache list`` shows it."""

    key: str  # the folder name (first 32 hex digits of the content key)
    path: Path
    dataset: str  # the folder it was built from (the same content may lie elsewhere now)
    slices: int
    patients: int
    size: tuple[int, int]
    bytes: int
    created: str

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path), "size": list(self.size)}


def _folder_bytes(folder: Path) -> int:
    total = 0
    for f in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if f.is_file() and not f.is_symlink():
                total += f.stat().st_size
    return total


def list_caches(cache_dir: str | os.PathLike[str] | None = None) -> list[CacheEntry]:
    """Every finished dataset cache (temporary build folders are not listed), oldest first."""
    out: list[CacheEntry] = []
    for d in _caches(cache_root(cache_dir)):
        meta = _read_meta(d)
        size = meta.get("size") or [0, 0]
        out.append(
            CacheEntry(
                key=d.name,
                path=d,
                dataset=str(meta.get("root", "?")),
                slices=int(meta.get("slices", 0)),
                patients=len(meta.get("patient_ids", [])),
                size=(int(size[0]), int(size[1])),
                bytes=_folder_bytes(d),
                created=str(meta.get("created", "")),
            )
        )
    return sorted(out, key=lambda e: (e.created, e.key))


def remove_cache(key: str, cache_dir: str | os.PathLike[str] | None = None) -> CacheEntry:
    """Delete the one cache whose key starts with ``key`` (at least 4 hex digits)."""
    found = [e for e in list_caches(cache_dir) if len(key) >= 4 and e.key.startswith(key.lower())]
    if not found:
        raise BrainsegError(
            f"no dataset cache with key {key!r} in {cache_root(cache_dir)}",
            hint="`brainseg cache list` shows the keys (give at least 4 of its first hex "
            "digits), or use --all",
        )
    if len(found) > 1:
        raise BrainsegError(
            f"key {key!r} matches {len(found)} caches: {', '.join(e.key for e in found)}",
            hint="give more digits of the key",
        )
    shutil.rmtree(found[0].path, ignore_errors=True)
    return found[0]


def clear_cache(cache_dir: str | os.PathLike[str] | None = None) -> int:
    """Delete every dataset cache and killed builds' temporary folders; returns how many caches."""
    root = cache_root(cache_dir)
    caches = _caches(root)
    for d in caches:
        shutil.rmtree(d, ignore_errors=True)
    clean_stale(root)
    return len(caches)


def _decode_all(
    slices: list[lgg.SliceFile], tmp: Path
) -> tuple[list[lgg.Problem], np.ndarray, tuple[int, int] | None]:
    """Decode every slice into ``tmp``'s memory-mapped arrays (little RAM); returns (problems,
    ok, size). The arrays are redone at the most common size if the first slice was odd."""
    n = len(slices)
    problems: list[lgg.Problem] = []
    ok = np.zeros(n, dtype=bool)
    odd: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    size: tuple[int, int] | None = None
    imgs: np.memmap | None = None
    msks: np.memmap | None = None

    def open_arrays(hw: tuple[int, int]) -> tuple[np.memmap, np.memmap]:
        fmt = np.lib.format
        arrays = (
            fmt.open_memmap(tmp / "images.part.npy", "w+", np.uint8, (n, 3, *hw)),
            fmt.open_memmap(tmp / "masks.part.npy", "w+", np.uint8, (n, *hw)),
        )
        for name in ("images.part.npy", "masks.part.npy"):
            _reserve(tmp / name)
        return arrays

    with (
        console.progress(n, "caching dataset", "slices", max(50, n // 10)) as bar,
        ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool,
    ):
        try:
            for i, res in enumerate(pool.map(lgg.decode_slice, slices)):
                if isinstance(res, list):
                    problems.extend(res)
                else:
                    img, msk = res
                    if size is None:
                        size = (img.shape[0], img.shape[1])
                        imgs, msks = open_arrays(size)
                    assert imgs is not None and msks is not None
                    if img.shape[:2] == size:
                        imgs[i] = img.transpose(2, 0, 1)
                        msks[i] = msk
                        ok[i] = True
                    else:
                        odd[i] = (img, msk)
                bar.advance(1)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    if size is None or imgs is None or msks is None:
        return problems, ok, None
    counts = Counter({size: int(ok.sum())})
    counts.update(img.shape[:2] for img, _ in odd.values())
    best = max(counts, key=lambda s: (counts[s], s == size))
    if best != size:  # the first slice was the odd one: redo the arrays at the common size
        for j in np.flatnonzero(ok).tolist():
            odd[j] = (np.array(imgs[j]).transpose(1, 2, 0), np.array(msks[j]))
        del imgs, msks
        ok[:] = False
        size = (int(best[0]), int(best[1]))
        imgs, msks = open_arrays(size)
        for j, (img, msk) in list(odd.items()):
            if img.shape[:2] == size:
                imgs[j] = img.transpose(2, 0, 1)
                msks[j] = msk
                ok[j] = True
                del odd[j]
    for i, (img, _) in sorted(odd.items()):
        found, want = f"{img.shape[0]}x{img.shape[1]}", f"{size[0]}x{size[1]}"
        wrong = f"size {found}, expected {want} like the other {counts[best]} slices of the dataset"
        problems.append(lgg.Problem.of(slices[i], slices[i].image, wrong))
    imgs.flush()
    msks.flush()
    del imgs, msks
    return problems, ok, size


def _reserve(path: Path) -> None:
    """Allocate a memory-mapped file's blocks now, so a full disk is an ENOSPC here and not a
    SIGBUS later, when a page of the mapping is written."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:  # pragma: no cover - macOS / Windows
        return
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # these: a filesystem without it
            raise
    finally:
        os.close(fd)


def _build(ds: lgg.LGGDataset, key: str, final: Path, skip_bad: bool) -> ArrayData:
    root = final.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BrainsegError(
            f"cannot create the dataset cache folder {root}: {exc.strerror or exc}",
            hint="set BRAINSEG_CACHE_DIR to a writable folder",
        ) from exc
    clean_stale(root)
    slices = ds.slices
    console.info(
        f"building the dataset cache for {ds.root} ({len(slices)} slices of "
        f"{sum(1 for p in ds.patients if p.slices)} patients) in {final}"
    )
    tmp = root / f".tmp-{key[:32]}-{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
    tmp.mkdir()
    try:
        content, ok, size = _decode_all(slices, tmp)
        problems = sorted(
            ds.problems + content,
            key=lambda p: (p.patient or "", -1 if p.number is None else p.number, p.file),
        )
        # Raises (listing every problem) unless skip_bad; then warns and drops bad slices.
        lgg.report_problems(ds, problems, skip_bad)
        bad = {(p.patient, p.number) for p in problems if p.number is not None}
        keep = ok & np.array([(s.patient, s.number) not in bad for s in slices], dtype=bool)
        assert size is not None  # report_problems raised when no slice is usable
        _finish_arrays(tmp, keep)
        kept_slices = [s for i, s in enumerate(slices) if keep[i]]
        patient_ids = _write_index(tmp, kept_slices)
        meta = {
            "format": FORMAT_VERSION,
            "key": key,
            "root": str(ds.root.resolve()),
            "skip_bad": bool(skip_bad),
            "slices": len(kept_slices),
            "size": list(size),
            "patient_ids": patient_ids,
            "problems": [str(p) for p in problems],
            "brainseg": __version__,
            "numpy": np.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        for f in tmp.iterdir():  # on disk before the rename publishes them
            with contextlib.suppress(OSError), open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _move_into_place(tmp, final)
    except OSError as exc:  # disk full, unwritable cache folder: one clear line
        raise write_error(
            f"the dataset cache in {root}",
            exc,
            doing=f"building the dataset cache in {root}",
            kept="nothing was kept",
            hint="check the folder is writable, or set BRAINSEG_CACHE_DIR to another folder",
            full_hint="free some space, or set BRAINSEG_CACHE_DIR to a disk with room",
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone after a successful move
    _prune_older(root, final, ds.root, skip_bad)
    data = _open(final, key)
    if data is None:  # pragma: no cover - only if someone deletes it under us
        raise BrainsegError(
            f"the dataset cache {final} vanished right after it was built",
            hint="run the command again",
        )
    return data


def _write_index(tmp: Path, kept: Sequence[lgg.SliceFile]) -> list[str]:
    """Write the per-row index arrays beside images / masks; returns the sorted patient ids."""
    patient_ids = sorted({s.patient for s in kept})
    lookup = {p: i for i, p in enumerate(patient_ids)}
    np.save(tmp / "patient_index.npy", np.array([lookup[s.patient] for s in kept], np.int32))
    np.save(tmp / "slice_number.npy", np.array([s.number for s in kept], dtype=np.int32))
    np.save(tmp / "tumor_pixels.npy", _tumor_pixels(np.load(tmp / "masks.npy", mmap_mode="r")))
    return patient_ids


def _finish_arrays(tmp: Path, keep: np.ndarray) -> None:
    """Turn the row-aligned ``*.part.npy`` into the final arrays, dropping skipped rows."""
    for name in ("images", "masks"):
        part = tmp / f"{name}.part.npy"
        if keep.all():
            os.replace(part, tmp / f"{name}.npy")
            continue
        src = np.load(part, mmap_mode="r")
        dst = np.lib.format.open_memmap(
            tmp / f"{name}.npy", "w+", np.uint8, (int(keep.sum()), *src.shape[1:])
        )
        for j, i in enumerate(np.flatnonzero(keep)):
            dst[j] = src[i]
        dst.flush()
        del src, dst
        part.unlink()


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished build onto ``final`` (replacing an old one, e.g. with rebuild); a
    ``tmp`` left behind is the caller's to remove."""
    old: Path | None = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{socket.gethostname()}-{os.getpid()}-x"
        shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # else another process finished the same build first: use theirs
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prune_older(root: Path, final: Path, dataset_root: Path, skip_bad: bool) -> None:
    """Remove caches of the same dataset folder made before its files changed."""
    here = str(dataset_root.resolve())
    for d in _caches(root):
        meta = _read_meta(d)
        if d != final and meta.get("root") == here and bool(meta.get("skip_bad")) == skip_bad:
            shutil.rmtree(d, ignore_errors=True)
