"""Safe unpacking of zip and tar archives: every member is checked before anything is written.

A member with an absolute path, ``..``, a NUL byte or a drive letter, a link, a device, an
encrypted member, a member larger than declared, or an archive that would expand past the
limits (total size, expansion ratio, member count, free disk space) rejects the whole archive
with nothing extracted. Files are created with ``O_EXCL | O_NOFOLLOW`` so nothing already in
the destination is overwritten or followed. Standard library only.
"""

from __future__ import annotations

import errno
import gzip
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from brainseg import console as con
from brainseg.errors import BrainsegError, BrainsegRuntimeError, first_line
from brainseg.fsutil import check_free_space, fmt_bytes

#: Archives that would expand to more than this are rejected before anything is written.
MAX_TOTAL_BYTES = 20 * 2**30
#: Largest accepted expansion ratio (uncompressed / compressed) of an archive or a member...
MAX_RATIO = 100.0
#: ...checked only above this many uncompressed bytes (small files may compress very well).
RATIO_MIN_BYTES = 64 * 2**20
#: More members than this is not an LGG archive (the real one holds about 16 000).
MAX_MEMBERS = 500_000
CHUNK = 1 << 20


@dataclass(frozen=True)
class _Member:
    name: str  # normalised relative POSIX path
    is_dir: bool
    size: int
    ref: Any  # ZipInfo or TarInfo


def _reject(archive: Path, why: str) -> BrainsegError:
    return BrainsegError(
        f"unsafe archive {archive}: {why}; nothing was extracted",
        hint="use the original Kaggle archive, or check the mirror (--url)",
    )


def _safe_name(raw: str, archive: Path) -> str:
    """The member's path relative to the extraction folder, or an error if it could escape."""
    name = raw.replace("\\", "/")
    if "\x00" in name:
        raise _reject(archive, f"member {raw!r} has a NUL byte in its name")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise _reject(archive, f"member {raw!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _reject(archive, f"member {raw!r} points outside the folder ('..')")
    return "/".join(parts)


def archive_kind(path: Path) -> str | None:
    """'zip', 'tar' (plain, gz, bz2, xz) or None, from the file's content, not its name."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise BrainsegError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06") or zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, EOFError, tarfile.TarError):
        return None
    return None


def _zip_members(
    zf: zipfile.ZipFile, archive: Path, max_ratio: float, ratio_min_bytes: int
) -> list[_Member]:
    out = []
    for info in zf.infolist():
        name = _safe_name(info.filename, archive)
        ftype = stat.S_IFMT(info.external_attr >> 16)
        if ftype == stat.S_IFLNK:
            raise _reject(archive, f"member {info.filename!r} is a symbolic link")
        if ftype and ftype not in (stat.S_IFREG, stat.S_IFDIR):
            raise _reject(archive, f"member {info.filename!r} is not a regular file or folder")
        if info.flag_bits & 0x1:
            raise _reject(archive, f"member {info.filename!r} is encrypted")
        if info.file_size > ratio_min_bytes and info.file_size > max_ratio * max(
            info.compress_size, 1
        ):
            raise _reject(
                archive,
                f"member {info.filename!r} expands "
                f"{info.file_size / max(info.compress_size, 1):.0f}-fold "
                f"(limit {max_ratio:.0f}): a decompression bomb?",
            )
        if name:
            out.append(
                _Member(
                    name,
                    info.is_dir() or ftype == stat.S_IFDIR,
                    0 if info.is_dir() else info.file_size,
                    info,
                )
            )
    return out


def _tar_members(tf: tarfile.TarFile, archive: Path) -> list[_Member]:
    out = []
    for ti in tf.getmembers():
        name = _safe_name(ti.name, archive)
        if ti.issym() or ti.islnk():
            raise _reject(archive, f"member {ti.name!r} is a link (to {ti.linkname!r})")
        if not (ti.isfile() or ti.isdir()):
            raise _reject(archive, f"member {ti.name!r} is not a regular file or folder")
        if name:
            out.append(_Member(name, ti.isdir(), ti.size if ti.isfile() else 0, ti))
    return out


def safe_extract(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    max_total: int = MAX_TOTAL_BYTES,
    max_ratio: float = MAX_RATIO,
    ratio_min_bytes: int = RATIO_MIN_BYTES,
    max_members: int = MAX_MEMBERS,
) -> Path:
    """Unpack a zip or tar(.gz) archive into ``dest`` after checking every member first.

    The whole archive is rejected, before anything is written, when a member has an absolute
    path or ``..``, is a link or a device, or when the archive would expand to more than
    ``max_total`` bytes or more than ``max_ratio`` times its size (above ``ratio_min_bytes``).
    ``dest`` is created; files already in it are never overwritten.
    """
    archive, dest = Path(archive), Path(dest)
    kind = archive_kind(archive)
    if kind is None:
        raise BrainsegError(
            f"{archive} is not a zip or tar archive",
            hint="give the .zip downloaded from Kaggle (or a .tar.gz mirror)",
        )
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                members = _zip_members(zf, archive, max_ratio, ratio_min_bytes)
                _check_sizes(
                    archive, members, max_total, max_ratio, ratio_min_bytes, max_members, dest
                )
                _write_members(members, dest, archive, zf.open)
        else:
            with tarfile.open(archive, "r:*") as tf:
                members = _tar_members(tf, archive)
                _check_sizes(
                    archive, members, max_total, max_ratio, ratio_min_bytes, max_members, dest
                )

                def open_tar(ti: tarfile.TarInfo) -> IO[bytes]:
                    f = tf.extractfile(ti)
                    if f is None:  # pragma: no cover - only regular files get here
                        raise _reject(archive, f"member {ti.name!r} has no data")
                    return f

                _write_members(members, dest, archive, open_tar)
    except (
        zipfile.BadZipFile,
        tarfile.TarError,
        EOFError,
        zipfile.LargeZipFile,
        zlib.error,  # corrupt deflate data inside a member
        gzip.BadGzipFile,  # a .tar.gz whose CRC or length check fails
        lzma.LZMAError,
        NotImplementedError,  # an unknown compression method in a damaged header
    ) as exc:
        raise BrainsegError(
            f"{archive} is damaged: {first_line(exc)}",
            hint="download it again (delete the file first)",
        ) from exc
    return dest


def safe_extract_zip(
    zip: str | os.PathLike[str], dest: str | os.PathLike[str], **limits: Any
) -> Path:
    """:func:`safe_extract` for a zip file (the contract name); refuses non-zip files."""
    if archive_kind(Path(zip)) != "zip":
        raise BrainsegError(f"{zip} is not a zip archive", hint="give the Kaggle .zip file")
    return safe_extract(zip, dest, **limits)


def _check_sizes(
    archive: Path,
    members: list[_Member],
    max_total: int,
    max_ratio: float,
    ratio_min_bytes: int,
    max_members: int,
    dest: Path,
) -> None:
    if len(members) > max_members:
        raise _reject(archive, f"{len(members)} members (limit {max_members})")
    total = sum(m.size for m in members)
    if total > max_total:
        raise _reject(
            archive,
            f"it would expand to {fmt_bytes(total)}, more than the limit of {fmt_bytes(max_total)}",
        )
    size = max(archive.stat().st_size, 1)
    if total > ratio_min_bytes and total > max_ratio * size:
        raise _reject(
            archive,
            f"it would expand {total / size:.0f}-fold (limit "
            f"{max_ratio:.0f}): a decompression bomb?",
        )
    probe = dest if dest.exists() else dest.parent
    check_free_space(probe, total, f"unpacking {archive.name}")


def _write_members(
    members: list[_Member], dest: Path, archive: Path, open_member: Callable[[Any], IO[bytes]]
) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(dest)
    files = [m for m in members if not m.is_dir]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        for m in members:
            if m.is_dir:
                Path(root, *m.name.split("/")).mkdir(parents=True, exist_ok=True)
        with con.progress(len(files), f"unpacking {archive.name}", unit="files") as bar:
            for m in files:
                target = Path(root, *m.name.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                if os.path.commonpath([root, os.path.realpath(target.parent)]) != root:
                    raise _reject(archive, f"member {m.name!r} resolves outside {dest}")
                fd = os.open(target, flags, 0o644)
                with os.fdopen(fd, "wb") as out, open_member(m.ref) as src:
                    n = 0
                    while chunk := src.read(CHUNK):
                        n += len(chunk)
                        if n > m.size:
                            raise _reject(archive, f"member {m.name!r} is larger than declared")
                        out.write(chunk)
                bar.advance(1)
    except FileExistsError as exc:
        raise BrainsegError(
            f"{archive} holds {exc.filename} twice (or {dest} is not empty)",
            hint="use the original archive",
        ) from exc
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise BrainsegRuntimeError(
                f"disk full while unpacking {archive} into {dest}",
                hint="free some space and run the command again",
            ) from exc
        raise BrainsegRuntimeError(
            f"cannot unpack {archive} into {dest}: {exc.strerror or exc} ({exc.filename})"
        ) from exc
