"""Safe unpacking of zip and tar archives: every member is checked before anything is written.

An unsafe member (absolute, ``..``, NUL, drive letter, too long or deep, link, device,
encrypted, larger or smaller than declared), an archive past the limits (size, ratio, members,
free space) or a damaged one (a tar is read to its true end) is refused with nothing written.
tarfile's ``data`` filter also runs, but it accepts links, ``a/../b`` and a leading ``/`` and
has no size limits, so those checks stay ours. Files are created ``O_EXCL | O_NOFOLLOW``.
"""

from __future__ import annotations

import errno
import gzip
import lzma
import os
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from brainseg import console as con
from brainseg.errors import BrainsegError, BrainsegRuntimeError, first_line
from brainseg.fsutil import check_free_space, fmt_bytes, write_error

#: Archives that would expand to more than this are rejected before anything is written.
MAX_TOTAL_BYTES = 20 * 2**30
#: Largest accepted expansion ratio (uncompressed / compressed) of an archive or a member...
MAX_RATIO = 100.0
#: ...checked only above this many uncompressed bytes (small files may compress very well).
RATIO_MIN_BYTES = 64 * 2**20
#: More members than this is not an LGG archive (the real one holds about 16 000).
MAX_MEMBERS = 100_000
#: Longest member name (characters) and deepest folder nesting; longest name component (bytes).
MAX_NAME_CHARS = 1024
MAX_NAME_DEPTH = 32
MAX_COMPONENT_BYTES = 255
#: Most bytes a tar may hold after its end-of-archive blocks (zero padding to a record).
MAX_TAR_PADDING = 16 * 2**20
CHUNK = 1 << 20
#: errno values an OS gives for a name it cannot create (bad bytes, too long): input errors.
_NAME_ERRORS = frozenset({errno.EINVAL, errno.ENAMETOOLONG, errno.EILSEQ})


@dataclass(frozen=True)
class _Limits:
    total: int
    ratio: float
    ratio_min_bytes: int
    members: int


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
    longest = max((len(os.fsencode(p)) for p in parts), default=0)
    if len(name) > MAX_NAME_CHARS or len(parts) > MAX_NAME_DEPTH or longest > MAX_COMPONENT_BYTES:
        shown = repr(raw[:60]) + ("..." if len(raw) > 60 else "")
        raise _reject(
            archive,
            f"member name {shown} is too long ({len(name)} characters, {len(parts)} levels; "
            f"limits {MAX_NAME_CHARS} characters, {MAX_NAME_DEPTH} levels, "
            f"{MAX_COMPONENT_BYTES} bytes per name)",
        )
    return "/".join(parts)


def archive_kind(path: Path) -> str | None:
    """'zip', 'tar' (plain, gz, bz2, xz) or None, from the file's content, not its name."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise BrainsegError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if head in (b"PK\x03\x04", b"PK\x05\x06") or zipfile.is_zipfile(path):
        return "zip"
    try:
        return "tar" if tarfile.is_tarfile(path) else None
    except (OSError, EOFError, tarfile.TarError):
        return None


def _zip_members(zf: zipfile.ZipFile, archive: Path, lim: _Limits) -> list[_Member]:
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
        packed = max(info.compress_size, 1)
        if info.file_size > lim.ratio_min_bytes and info.file_size > lim.ratio * packed:
            raise _reject(
                archive,
                f"member {info.filename!r} expands {info.file_size / packed:.0f}-fold "
                f"(limit {lim.ratio:.0f}): a decompression bomb?",
            )
        if name:
            size = 0 if info.is_dir() else info.file_size
            out.append(_Member(name, info.is_dir() or ftype == stat.S_IFDIR, size, info))
    return out


def _tar_members(tf: tarfile.TarFile, archive: Path, dest: Path, lim: _Limits) -> list[_Member]:
    """The members, read one header at a time (limits checked as they come), then the end."""
    out = []
    total = 0
    for n, ti in enumerate(tf, 1):  # not getmembers(): stop at the limit, not after the end
        if n > lim.members:
            raise _reject(archive, f"more than {lim.members} members (limit {lim.members})")
        name = _safe_name(ti.name, archive)
        if ti.issym() or ti.islnk():  # the filter takes links that stay inside; we take none
            raise _reject(archive, f"member {ti.name!r} is a link (to {ti.linkname!r})")
        try:  # devices, FIFOs, unknown types; a path through a link already in ``dest``
            tarfile.data_filter(ti, str(dest))
        except tarfile.FilterError as exc:
            raise _reject(archive, f"member {ti.name!r}: {first_line(exc)}") from exc
        total += ti.size if ti.isfile() else 0
        if total > lim.total:
            raise _reject(
                archive, f"it would expand to more than the limit of {fmt_bytes(lim.total)}"
            )
        if name:
            out.append(_Member(name, ti.isdir(), ti.size if ti.isfile() else 0, ti))
    _check_tar_end(tf, archive)
    return out


def _check_tar_end(tf: tarfile.TarFile, archive: Path) -> None:
    """Raise unless the listing ended at a real end-of-archive block, followed by zero padding.

    tarfile ends its listing quietly at a damaged header or at the end of the data, so a cut or
    damaged archive would look like a shorter valid one; reading to the last byte makes the
    decompressor check its trailer (gzip's CRC-32 and length; bzip2's and xz's checks).
    """
    f = tf.fileobj
    assert f is not None
    f.seek(tf.offset)
    end = f.read(tarfile.BLOCKSIZE)
    if len(end) < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(
            f"it ends after {tf.offset} bytes without the tar end-of-archive blocks (cut short?)"
        )
    if end.count(0) != tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"the tar header at byte {tf.offset} is damaged")
    padding = 0
    while chunk := f.read(CHUNK):
        padding += len(chunk)
        if chunk.count(0) != len(chunk) or padding > MAX_TAR_PADDING:
            raise tarfile.ReadError(f"data after the end of the tar archive (byte {tf.offset})")


def safe_extract(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    max_total: int = MAX_TOTAL_BYTES,
    max_ratio: float = MAX_RATIO,
    ratio_min_bytes: int = RATIO_MIN_BYTES,
    max_members: int = MAX_MEMBERS,
) -> Path:
    """Unpack a zip or tar(.gz) archive into ``dest`` once every member passed the checks."""
    archive, dest = Path(archive), Path(dest)
    lim = _Limits(max_total, max_ratio, ratio_min_bytes, max_members)
    kind = archive_kind(archive)
    if kind is None:
        raise BrainsegError(
            f"{archive} is not a zip or tar archive",
            hint="give the .zip downloaded from Kaggle (or a .tar.gz mirror)",
        )
    try:
        if kind == "zip":
            declared = _zip_declared_count(archive)
            if declared is not None and declared > max_members:  # before listing them all
                raise _reject(archive, f"{declared} members (limit {max_members})")
            with zipfile.ZipFile(archive) as zf:
                members = _zip_members(zf, archive, lim)
                _check_sizes(archive, members, dest, lim)
                _write_members(members, dest, archive, zf.open)
        else:
            with tarfile.open(archive, "r:*") as tf:
                members = _tar_members(tf, archive, dest, lim)
                _check_sizes(archive, members, dest, lim)
                # Only regular files are written, and extractfile gives None only for others.
                _write_members(
                    members, dest, archive, lambda ti: cast(IO[bytes], tf.extractfile(ti))
                )
    except (
        zipfile.BadZipFile,
        tarfile.TarError,
        EOFError,
        zipfile.LargeZipFile,
        zlib.error,  # corrupt deflate data inside a member
        gzip.BadGzipFile,  # a .tar.gz whose CRC or length check fails
        lzma.LZMAError,
        NotImplementedError,  # an unknown compression method in a damaged header
        OverflowError,  # a damaged zip64 field
    ) as exc:
        raise _damaged(archive, first_line(exc)) from exc
    except UnicodeDecodeError as exc:  # zipfile decodes names flagged UTF-8 strictly
        raise _damaged(
            archive, f"a member name is flagged UTF-8 but is not valid UTF-8 ({exc.reason})"
        ) from exc
    return dest


def _damaged(archive: Path, why: str) -> BrainsegError:
    return BrainsegError(
        f"{archive} is damaged: {why}; nothing was extracted",
        hint="download it again (delete the file first)",
    )


def _zip_declared_count(path: Path) -> int | None:
    """The member count a zip's end record declares (zip64 too), read before the listing."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        n = min(size, 22 + 0xFFFF + 20)  # the record, its longest comment, the zip64 locator
        f.seek(size - n)
        tail = f.read(n)
        i = tail.rfind(b"PK\x05\x06")
        if i < 0 or len(tail) - i < 22:
            return None
        (count,) = struct.unpack("<H", tail[i + 10 : i + 12])
        if count != 0xFFFF or i < 20 or tail[i - 20 : i - 16] != b"PK\x06\x07":
            return int(count)
        (offset,) = struct.unpack("<Q", tail[i - 12 : i - 4])  # the zip64 end record
        if offset > size - 56:
            return None
        f.seek(offset)
        rec = f.read(56)
    if rec[:4] != b"PK\x06\x06":
        return None
    return int(struct.unpack("<Q", rec[32:40])[0])


def safe_extract_zip(
    zip: str | os.PathLike[str], dest: str | os.PathLike[str], **limits: Any
) -> Path:
    """:func:`safe_extract` for a zip file (the contract name); refuses non-zip files."""
    if archive_kind(Path(zip)) != "zip":
        raise BrainsegError(f"{zip} is not a zip archive", hint="give the Kaggle .zip file")
    return safe_extract(zip, dest, **limits)


def _check_sizes(archive: Path, members: list[_Member], dest: Path, lim: _Limits) -> None:
    if len(members) > lim.members:
        raise _reject(archive, f"{len(members)} members (limit {lim.members})")
    total = sum(m.size for m in members)
    if total > lim.total:
        raise _reject(
            archive,
            f"it would expand to {fmt_bytes(total)}, more than the limit of {fmt_bytes(lim.total)}",
        )
    size = max(archive.stat().st_size, 1)
    if total > lim.ratio_min_bytes and total > lim.ratio * size:
        raise _reject(
            archive,
            f"it would expand {total / size:.0f}-fold (limit "
            f"{lim.ratio:.0f}): a decompression bomb?",
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
    current = ""
    try:
        for m in members:
            current = m.name
            if m.is_dir:
                Path(root, *m.name.split("/")).mkdir(parents=True, exist_ok=True)
        with con.progress(len(files), f"unpacking {archive.name}", unit="files") as bar:
            for m in files:
                target = Path(root, *m.name.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                if os.path.commonpath([root, os.path.realpath(target.parent)]) != root:
                    raise _reject(archive, f"member {m.name!r} resolves outside {dest}")
                current = m.name
                fd = os.open(target, flags, 0o644)
                with os.fdopen(fd, "wb") as out, open_member(m.ref) as src:
                    n = 0
                    while chunk := src.read(CHUNK):
                        n += len(chunk)
                        if n > m.size:
                            raise _reject(archive, f"member {m.name!r} is larger than declared")
                        out.write(chunk)
                if n != m.size:  # the listing said more: the data ends early
                    raise _damaged(archive, f"member {m.name!r} has {n} of {m.size} bytes")
                bar.advance(1)
    except FileExistsError as exc:
        raise BrainsegError(
            f"{archive} holds {exc.filename} twice (or {dest} is not empty)",
            hint="use the original archive",
        ) from exc
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            doing = f"unpacking {archive} into {dest}"
            raise write_error(dest, exc, doing=doing, kept=None) from exc
        if exc.errno in _NAME_ERRORS:  # the member's name, not the disk: an input error
            raise _reject(
                archive, f"member {current!r} cannot be created: {exc.strerror or exc}"
            ) from exc
        raise BrainsegRuntimeError(
            f"cannot unpack {archive} into {dest}: {exc.strerror or exc} (member {current!r})"
        ) from exc
