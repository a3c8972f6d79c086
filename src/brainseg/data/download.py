"""Fetch the LGG dataset and torchvision's VGG16 weights: resumable HTTP, checksums, safe unpacking.

Only the standard library is imported at module level (torch / torchvision / numpy are imported
inside the functions that need them), so the command module can import this cheaply.

The download is written to ``<dest>.part`` and renamed to ``<dest>`` only once every byte has
arrived (and the checksum, when given, matches): the ``.part`` name is the temporary name of
the atomic write, kept between runs on purpose so an interrupted download resumes with an HTTP
``Range`` request. A small ``<dest>.part.json`` beside it remembers the URL and the server's
validator (ETag / Last-Modified) so a resume never splices bytes of two different files.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import http.client
import json
import lzma
import os
import re
import shutil
import socket
import ssl
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from brainseg import __version__
from brainseg import console as con
from brainseg.errors import BrainsegError, BrainsegRuntimeError, first_line
from brainseg.fsutil import atomic_path, atomic_write_text, remove_stale_temps, temp_prefix

KAGGLE_DATASET = "mateuszbuda/lgg-mri-segmentation"
KAGGLE_URL = f"https://www.kaggle.com/api/v1/datasets/download/{KAGGLE_DATASET}"
#: Hosts that receive Kaggle credentials by default (a mirror gets them only with kaggle_auth).
KAGGLE_HOSTS = frozenset({"www.kaggle.com", "kaggle.com"})
LGG_ARCHIVE_NAME = "lgg-mri-segmentation.zip"
LAYOUT_NAME = "kaggle_3m"

#: Archives that would expand to more than this are rejected before anything is written.
MAX_TOTAL_BYTES = 20 * 2**30
#: Largest accepted expansion ratio (uncompressed / compressed) of an archive or a member...
MAX_RATIO = 100.0
#: ...checked only above this many uncompressed bytes (small files may compress very well).
RATIO_MIN_BYTES = 64 * 2**20
#: More members than this is not an LGG archive (the real one holds about 16 000).
MAX_MEMBERS = 500_000

DEFAULT_RETRIES = 5
DEFAULT_BACKOFF = 1.0  # seconds; the n-th retry waits backoff * 2**(n-1), at most MAX_DELAY
DEFAULT_TIMEOUT = 60.0  # seconds without any byte from the server
MAX_DELAY = 60.0
CHUNK = 1 << 20
MiB = 2**20
USER_AGENT = f"brainseg/{__version__} (+python-urllib)"

_HEX = re.compile(r"^[0-9a-f]+$")
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class KaggleCredentials:
    """A Kaggle user name and API key, and where they came from (for the status line)."""

    username: str
    key: str
    source: str

    def header(self) -> str:
        """The value of the HTTP basic ``Authorization`` header."""
        token = base64.b64encode(f"{self.username}:{self.key}".encode()).decode("ascii")
        return f"Basic {token}"

    def __repr__(self) -> str:  # never print the key
        return f"KaggleCredentials(username={self.username!r}, key='***', source={self.source!r})"


def kaggle_config_path() -> Path:
    """``$KAGGLE_CONFIG_DIR/kaggle.json`` or ``~/.kaggle/kaggle.json`` (as the Kaggle CLI)."""
    cfg = os.environ.get("KAGGLE_CONFIG_DIR")
    return (Path(cfg) if cfg else Path.home() / ".kaggle") / "kaggle.json"


def kaggle_credentials() -> KaggleCredentials | None:
    """Credentials from KAGGLE_USERNAME / KAGGLE_KEY, else from kaggle.json; None if neither."""
    user, key = os.environ.get("KAGGLE_USERNAME"), os.environ.get("KAGGLE_KEY")
    if user and key:
        return KaggleCredentials(user, key, "KAGGLE_USERNAME / KAGGLE_KEY")
    if user or key:
        missing = "KAGGLE_KEY" if user else "KAGGLE_USERNAME"
        con.warn(f"{missing} is not set, so the other Kaggle variable is ignored")
    path = kaggle_config_path()
    if not path.is_file():
        return None
    hint = (
        'kaggle.json must be JSON like {"username": "you", "key": "0123..."}; create it at '
        "kaggle.com > Settings > API > Create New Token"
    )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BrainsegError(f"cannot read Kaggle credentials from {path}: {exc}", hint) from exc
    if not (
        isinstance(data, dict)
        and isinstance(data.get("username"), str)
        and isinstance(data.get("key"), str)
        and data["username"]
        and data["key"]
    ):
        raise BrainsegError(f"{path} has no 'username' and 'key' strings", hint)
    return KaggleCredentials(data["username"], data["key"], str(path))


def is_kaggle_url(url: str) -> bool:
    """True for https URLs on kaggle.com: only these get credentials unless asked otherwise."""
    p = urllib.parse.urlsplit(url)
    return p.scheme == "https" and (p.hostname or "").lower() in KAGGLE_HOSTS


# --------------------------------------------------------------------------- checksums


def normalize_sha256(value: str | None, what: str = "--sha256") -> str | None:
    """Lower-case hex, 8 to 64 digits (a prefix is accepted, as torch.hub does)."""
    if value is None:
        return None
    v = value.strip().lower()
    if v.startswith("sha256:"):
        v = v[len("sha256:") :]
    if not (8 <= len(v) <= 64 and _HEX.match(v)):
        raise BrainsegError(
            f"{what} {value!r} is not a SHA-256 hex digest",
            hint="give the 64 hex digits printed by `sha256sum FILE` "
            "(a prefix of at least 8 digits is accepted)",
        )
    return v


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- HTTP


class _Transient(Exception):
    """A failure worth retrying (timeouts, dropped connections, 5xx, 429)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Restart(Exception):
    """The partial file cannot be continued: start again from byte 0 (not a failure)."""


def _retry_after(headers: Any) -> float | None:
    try:
        v = headers.get("Retry-After") if headers is not None else None
        return max(0.0, float(v)) if v is not None else None
    except (TypeError, ValueError):
        return None  # an HTTP date: use our own back-off


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes a-b/total`` -> (a, total); ``bytes */total`` -> (None, total)."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return start, total


def _int_header(headers: Any, name: str) -> int | None:
    try:
        v = headers.get(name)
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _read_meta(meta: Path) -> dict[str, Any]:
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _fmt_bytes(n: int | float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _check_free_space(folder: Path, needed: int, what: str) -> None:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if needed > free:
        raise BrainsegRuntimeError(
            f"not enough disk space in {folder} for {what}: needs {_fmt_bytes(needed)}, "
            f"{_fmt_bytes(free)} free",
            hint="free some space or choose another --dest",
        )


def http_fetch(
    url: str,
    dest: str | os.PathLike[str],
    headers: Mapping[str, str] | None = None,
    sha256: str | None = None,
    *,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    timeout: float = DEFAULT_TIMEOUT,
    from_file_hint: str = "--from-file PATH",
    auth_hint: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Download ``url`` to ``dest`` via ``dest.part``, resuming and retrying; return ``dest``.

    ``headers`` are sent with every request; an ``Authorization`` header is not forwarded
    when the server redirects elsewhere (Kaggle redirects to signed storage URLs). ``sha256``
    (full digest or a prefix of at least 8 hex digits) is checked before the rename; on a
    mismatch the download is deleted so it is not resumed. Transient failures (timeouts,
    dropped connections, HTTP 5xx / 429) are retried up to ``retries`` times without progress,
    waiting ``backoff * 2**(n-1)`` seconds; an existing ``dest`` is replaced.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    meta = dest.with_name(dest.name + ".part.json")
    expected = normalize_sha256(sha256)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BrainsegRuntimeError(
            f"cannot create {dest.parent}: {exc.strerror or exc}",
            hint="check the folder is writable",
        ) from exc
    if part.exists() and _read_meta(meta).get("url") != url:
        if part.stat().st_size:
            con.info(f"{part.name} was started from another URL; starting over")
        part.unlink()
    opener = urllib.request.build_opener()
    failures, high = 0, part.stat().st_size if part.exists() else 0
    while True:
        try:
            _attempt(
                opener, url, part, meta, dict(headers or {}), timeout, from_file_hint, auth_hint
            )
            break
        except _Restart:
            part.unlink(missing_ok=True)
            continue
        except _Transient as exc:
            size = part.stat().st_size if part.exists() else 0
            if size > high:  # progress: the retry budget is per stall, not per download
                high, failures = size, 0
            failures += 1
            if failures > retries:
                kept = (
                    f"; {_fmt_bytes(size)} kept in {part}, run the command again to resume"
                    if size
                    else ""
                )
                tries = f"{failures} attempt{'s' if failures != 1 else ''}"
                raise BrainsegRuntimeError(
                    f"download of {url} failed after {tries}: {exc.reason}",
                    hint=f"try again later{kept}, or fetch the file elsewhere and pass "
                    f"{from_file_hint}",
                ) from exc
            delay = (
                0.0
                if backoff <= 0
                else min(
                    MAX_DELAY,
                    exc.retry_after
                    if exc.retry_after is not None
                    else backoff * 2 ** (failures - 1),
                )
            )
            con.warn(f"{exc.reason}; retry {failures}/{retries} in {delay:.0f} s")
            sleep(delay)
    if expected:
        actual = sha256_file(part)
        if not actual.startswith(expected):
            part.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            raise BrainsegRuntimeError(
                f"checksum mismatch for {url}: sha256 is {actual}, expected {expected}; "
                "the downloaded file was deleted",
                hint="check the --sha256 value and the --url, then run the command again",
            )
    try:
        os.replace(part, dest)
    except OSError as exc:
        raise BrainsegRuntimeError(
            f"cannot rename {part} to {dest}: {exc.strerror or exc}"
        ) from exc
    meta.unlink(missing_ok=True)
    return dest


def _attempt(
    opener: urllib.request.OpenerDirector,
    url: str,
    part: Path,
    meta: Path,
    headers: dict[str, str],
    timeout: float,
    from_file_hint: str,
    auth_hint: str | None,
) -> None:
    """One HTTP request: append to (206) or rewrite (200) ``part``; raise _Transient/_Restart."""
    offset = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(
        url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    )
    for k, v in headers.items():
        if k.lower() == "authorization":
            req.add_unredirected_header(k.capitalize(), v)  # not sent on to a redirect target
        else:
            req.add_header(k, v)
    if offset:
        req.add_header("Range", f"bytes={offset}-")
        info = _read_meta(meta)
        validator = info.get("etag") if not str(info.get("etag", "")).startswith("W/") else None
        validator = validator or info.get("last_modified")
        if validator:
            req.add_header("If-Range", str(validator))
    try:
        resp = opener.open(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        with contextlib.closing(exc):
            _http_error(exc, url, offset, part, from_file_hint, auth_hint)
        return  # 416 for a .part that is already complete
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(
            reason,
            (
                TimeoutError,
                socket.timeout,
                ConnectionResetError,
                ConnectionAbortedError,
                http.client.HTTPException,
            ),
        ):
            raise _Transient(f"{url}: {reason or 'timed out'}") from exc
        if isinstance(reason, ssl.SSLError):
            raise BrainsegRuntimeError(
                f"TLS error talking to {url}: {reason}",
                hint="check the system clock and CA certificates",
            ) from exc
        text = getattr(reason, "strerror", None) or str(reason)
        kept = (
            f"; the partial download ({_fmt_bytes(offset)} in {part}) is kept and resumes "
            "on the next try"
            if offset
            else ""
        )
        raise BrainsegRuntimeError(
            f"cannot reach {url} ({text}); without network access use {from_file_hint}",
            hint=f"check the network connection or proxy settings (HTTPS_PROXY){kept}",
        ) from exc
    except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise _Transient(f"{url}: {type(exc).__name__}: {exc or 'no response'}") from exc
    with contextlib.closing(resp):
        _receive(resp, url, part, meta, offset)


def _http_error(
    exc: urllib.error.HTTPError,
    url: str,
    offset: int,
    part: Path,
    from_file_hint: str,
    auth_hint: str | None,
) -> None:
    code = exc.code
    if code == 416 and offset:
        _start, total = _parse_content_range(exc.headers.get("Content-Range"))
        if total is not None and total == offset:
            return  # the .part already holds the whole file
        con.info(f"the server cannot resume {part.name} at byte {offset}; starting over")
        raise _Restart()
    if code == 429 or 500 <= code < 600:
        raise _Transient(f"HTTP {code} {exc.reason} from {url}", _retry_after(exc.headers))
    if code in (401, 403):
        raise BrainsegRuntimeError(
            f"HTTP {code} {exc.reason}: {url} refused the download",
            hint=auth_hint or f"check that the URL is public, or use {from_file_hint}",
        )
    if code == 404:
        raise BrainsegRuntimeError(
            f"HTTP 404 Not Found: {url}", hint=f"check the URL (--url), or use {from_file_hint}"
        )
    raise BrainsegRuntimeError(
        f"HTTP {code} {exc.reason} from {url}", hint=f"check the URL, or use {from_file_hint}"
    )


def _receive(resp: Any, url: str, part: Path, meta: Path, offset: int) -> None:
    status = resp.status
    content_length = _int_header(resp.headers, "Content-Length")
    start, range_total = _parse_content_range(resp.headers.get("Content-Range"))
    if status == 206 and offset:
        if start != offset:
            con.info(f"the server resumed {part.name} at the wrong byte; starting over")
            raise _Restart()
        mode, total = "ab", range_total
    elif status == 206 and start == 0:  # a whole file sent as a range we did not ask for
        mode, total = "wb", range_total
    elif status == 200:
        if offset:
            con.info(
                f"the server does not resume {part.name} (no Range support or the file "
                "changed); starting over"
            )
        offset, mode, total = 0, "wb", content_length
    else:
        raise BrainsegRuntimeError(f"unexpected HTTP {status} {resp.reason} from {url}")
    if mode == "wb":
        atomic_write_text(
            meta,
            json.dumps(
                {
                    "url": url,
                    "total": total,
                    "etag": resp.headers.get("ETag"),
                    "last_modified": resp.headers.get("Last-Modified"),
                }
            ),
        )
    body = (total - offset) if total is not None else content_length
    if body:
        _check_free_space(part.parent, body, part.name)
    verb = "resuming" if mode == "ab" else "downloading"
    desc = f"{verb} {part.name[: -len('.part')]}"
    if offset:
        con.info(f"{verb} {url} at {_fmt_bytes(offset)}")
    received, shown = 0, 0
    with (
        open(part, mode) as f,
        con.progress(
            -(-body // MiB) if body else None,
            desc,
            unit="MiB",
            plain_every=max(1, -(-(body or 0) // MiB) // 10),
        ) as bar,
    ):
        while True:
            try:
                # read1: what has arrived (up to CHUNK), so the bytes received before a
                # stall are kept and the retry resumes after them (read() dropped them)
                chunk = resp.read1(CHUNK) if hasattr(resp, "read1") else resp.read(CHUNK)
            except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as exc:
                f.flush()
                raise _Transient(
                    f"connection to {url} lost after "
                    f"{_fmt_bytes(offset + received)}: {exc or 'timed out'}"
                ) from exc
            if not chunk:
                break
            try:
                f.write(chunk)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise BrainsegRuntimeError(
                        f"disk full while writing {part}; the partial download is kept",
                        hint="free some space and run the command again to resume",
                    ) from exc
                raise BrainsegRuntimeError(f"cannot write {part}: {exc.strerror or exc}") from exc
            received += len(chunk)
            mib = received // MiB
            if mib > shown:
                bar.advance(mib - shown)
                shown = mib
        if body is not None and received >= body and bar.total and bar.total > shown:
            bar.advance(bar.total - shown)
    if body is not None and received < body:
        raise _Transient(
            f"connection to {url} closed after {_fmt_bytes(offset + received)} "
            f"of {_fmt_bytes(offset + body)}"
        )


# --------------------------------------------------------------------------- extraction


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
        zlib.error,  # corrupt deflate data inside a member (found by tests/test_properties.py)
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
            f"it would expand to {_fmt_bytes(total)}, more than the limit "
            f"of {_fmt_bytes(max_total)}",
        )
    size = max(archive.stat().st_size, 1)
    if total > ratio_min_bytes and total > max_ratio * size:
        raise _reject(
            archive,
            f"it would expand {total / size:.0f}-fold (limit "
            f"{max_ratio:.0f}): a decompression bomb?",
        )
    probe = dest if dest.exists() else dest.parent
    _check_free_space(probe, total, f"unpacking {archive.name}")


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


def find_layout_root(folder: Path) -> Path | None:
    """The shallowest ``kaggle_3m`` folder holding patients, else any folder of TCGA_* folders."""

    def has_patients(p: Path) -> bool:
        return any(c.is_dir() and c.name.startswith("TCGA_") for c in p.iterdir())

    dirs = sorted(
        (p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()),
        key=lambda p: (len(p.parts), str(p)),
    )
    named = [p for p in dirs if p.name == LAYOUT_NAME and has_patients(p)]
    if named:
        return named[0]
    for p in [folder, *dirs]:
        if has_patients(p):
            return p
    return None


# --------------------------------------------------------------------------- LGG


def _archive_name(url: str) -> str:
    base = PurePosixPath(urllib.parse.urlsplit(url).path).name
    if base.endswith((".zip", ".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")):
        return base
    return LGG_ARCHIVE_NAME


AUTH_HINT = (
    "set KAGGLE_USERNAME and KAGGLE_KEY, or put kaggle.json in ~/.kaggle/ "
    "($KAGGLE_CONFIG_DIR): kaggle.com > Settings > API > Create New Token; "
    "or download the zip in a browser and pass --from-file ZIP"
)


def download_lgg(
    dest: str | os.PathLike[str],
    url: str | None = None,
    from_file: str | os.PathLike[str] | None = None,
    sha256: str | None = None,
    *,
    force: bool = False,
    keep_archive: bool = False,
    kaggle_auth: bool | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Fetch (or take ``from_file``) the LGG archive and install ``dest/kaggle_3m``; return it.

    The archive is unpacked into a temporary folder inside ``dest``, its ``kaggle_3m`` folder
    is validated with :func:`brainseg.data.lgg.discover` and renamed into place; with
    ``force`` an existing ``dest/kaggle_3m`` is replaced only after that. Kaggle credentials
    are sent to kaggle.com, and to a mirror only with ``kaggle_auth=True``. A downloaded
    archive is deleted after a successful install unless ``keep_archive``; one that finished
    downloading earlier (an install that failed afterwards) is reused.
    """
    dest = Path(dest)
    if url and from_file:
        raise BrainsegError(
            "--url and --from-file cannot be used together",
            hint="--from-file installs an archive you already have, offline",
        )
    if dest.exists() and not dest.is_dir():
        raise BrainsegError(
            f"--dest {dest} is a file, not a folder",
            hint="give the folder that should hold kaggle_3m/",
        )
    target = dest / LAYOUT_NAME
    if (target.exists() or target.is_symlink()) and not force:
        raise BrainsegError(
            f"{target} already exists",
            hint="pass --force to replace it (the old folder is removed only "
            "once the new one is complete)",
        )
    expected = normalize_sha256(sha256)
    downloaded = False
    if from_file is not None:
        archive = Path(from_file)
        if not archive.is_file():
            raise BrainsegError(
                f"--from-file {archive} does not exist or is not a file",
                hint="give the lgg-mri-segmentation .zip you downloaded",
            )
        if expected:
            actual = sha256_file(archive)
            if not actual.startswith(expected):
                raise BrainsegError(
                    f"checksum mismatch for {archive}: sha256 is {actual}, expected {expected}",
                    hint="check the --sha256 value or download the file again",
                )
    else:
        src = url or KAGGLE_URL
        headers: dict[str, str] = {}
        to_kaggle = url is None or is_kaggle_url(src)
        if kaggle_auth if kaggle_auth is not None else to_kaggle:
            creds = kaggle_credentials()
            if creds:
                headers["Authorization"] = creds.header()
                con.info(f"using Kaggle credentials of {creds.username} ({creds.source})")
            elif kaggle_auth:
                raise BrainsegError(
                    "--kaggle-auth was given but no Kaggle credentials were found", hint=AUTH_HINT
                )
            else:
                con.info("no Kaggle credentials found; trying an anonymous download")
        archive = dest / _archive_name(src)
        if archive.is_file() and expected and not sha256_file(archive).startswith(expected):
            con.info(f"{archive} does not match --sha256; downloading it again")
            archive.unlink()
        if archive.is_file():
            con.info(f"using {archive}, downloaded before")
        else:
            con.info(f"downloading {src} to {dest}")
            http_fetch(
                src,
                archive,
                headers,
                expected,
                retries=retries,
                backoff=backoff,
                timeout=timeout,
                from_file_hint="--from-file ZIP",
                auth_hint=AUTH_HINT if to_kaggle or headers else None,
            )
        downloaded = True
    _install_archive(archive, dest, target, downloaded)
    if downloaded and not keep_archive:
        archive.unlink(missing_ok=True)
    return target


def _install_archive(archive: Path, dest: Path, target: Path, downloaded: bool) -> None:
    from brainseg.data.lgg import discover

    try:
        dest.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dest)  # what a killed unpack left here
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(f"{LAYOUT_NAME}-unpack"), dir=dest))
    except OSError as exc:
        raise BrainsegRuntimeError(
            f"cannot create a folder in {dest}: {exc.strerror or exc}",
            hint="check --dest is writable",
        ) from exc
    try:
        try:
            safe_extract(archive, tmp)
            root = find_layout_root(tmp)
            if root is None:
                raise BrainsegError(
                    f"{archive} holds no {LAYOUT_NAME} folder (nor folders of TCGA_* patients)",
                    hint="is this the LGG archive (mateuszbuda/lgg-mri-segmentation)?",
                )
            con.info(f"checking {root.relative_to(tmp)}")
            discover(root)
        except BrainsegError as exc:
            if downloaded and archive.exists() and exc.exit_code == 2:
                archive.unlink()  # a bad download must not be reused by the next run
                raise BrainsegError(
                    f"{exc.message}; the downloaded {archive.name} was deleted",
                    exc.hint,
                    exit_code=exc.exit_code,
                ) from exc
            raise
        _swap_into_place(root, target, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(new: Path, target: Path, dest: Path) -> None:
    """Rename ``new`` onto ``target``; an old ``target`` is removed only after the rename."""
    old: Path | None = None
    try:
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{LAYOUT_NAME}-old-", dir=dest)) / "old"
            os.replace(target, old)
        try:
            os.replace(new, target)
        except OSError:
            if old is not None:
                os.replace(old, target)
            raise
    except OSError as exc:
        raise BrainsegRuntimeError(
            f"cannot move the dataset into {target}: {exc.strerror or exc}"
        ) from exc
    if old is not None:
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(old.parent, ignore_errors=True)
    con.info(f"installed {target}")


@dataclass(frozen=True)
class DatasetSummary:
    """What the summary table shows after a download."""

    path: Path
    patients: int
    slices: int
    tumor_slices: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "patients": self.patients,
            "slices": self.slices,
            "tumor_slices": self.tumor_slices,
        }


def dataset_summary(root: str | os.PathLike[str]) -> DatasetSummary:
    """Patients, slices and slices with tumor, via the dataset cache (built once, reused)."""
    from brainseg.data.cache import load_dataset

    s: dict[str, Any] = load_dataset(Path(root)).summary()
    return DatasetSummary(Path(root), int(s["patients"]), int(s["slices"]), int(s["tumor_slices"]))


# --------------------------------------------------------------------------- VGG16


def vgg16_weights_url(bn: bool = False) -> str:
    """torchvision's URL of the ImageNet VGG16 (or VGG16-BN) weights."""
    from torchvision.models import VGG16_BN_Weights, VGG16_Weights

    return (VGG16_BN_Weights if bn else VGG16_Weights).IMAGENET1K_V1.url


def hub_checkpoint_dir() -> Path:
    """Where torch.hub (and so torchvision) looks for weights: ``$TORCH_HOME/hub/checkpoints``."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def expected_hash_prefix(file_name: str) -> str:
    """The sha256 prefix torch.hub encodes in names like ``vgg16-397923af.pth``."""
    stem = file_name.rsplit("-", 1)[-1].split(".", 1)[0] if "-" in file_name else ""
    if len(stem) < 8 or not _HEX.match(stem):
        raise BrainsegRuntimeError(f"{file_name} has no sha256 prefix after its last '-'")
    return stem


def check_vgg_state_dict(path: Path) -> int:
    """Load with ``weights_only=True`` and require VGG ``features.*`` tensors; return count."""
    import torch

    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BrainsegError(
            f"{path} is not a torch weights file that loads safely: "
            f"{type(exc).__name__}: {first_line(exc)}",
            hint="give torchvision's vgg16-*.pth (or vgg16_bn-*.pth) file",
        ) from exc
    feats = (
        [k for k in sd if isinstance(k, str) and k.startswith("features.")]
        if isinstance(sd, dict)
        else []
    )
    if (
        not feats
        or not isinstance(sd.get("features.0.weight"), torch.Tensor)
        or tuple(sd["features.0.weight"].shape) != (64, 3, 3, 3)
    ):
        raise BrainsegError(
            f"{path} holds no VGG16 'features.*' tensors",
            hint="give torchvision's vgg16-*.pth (or vgg16_bn-*.pth) file",
        )
    return len(feats)


def download_vgg16(
    bn: bool = False,
    from_file: str | os.PathLike[str] | None = None,
    url: str | None = None,
    *,
    force: bool = False,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Install torchvision's ImageNet VGG16(-BN) weights into the torch hub cache; return path.

    The file gets the name torchvision uses, so ``torchvision.models.vgg16(weights=
    "IMAGENET1K_V1")`` then works offline. Whatever the source (torchvision's URL, a mirror
    ``url`` or ``from_file``), the file's sha256 must start with the hex in that name and it
    must load with ``torch.load(weights_only=True)``. A valid installed file is kept as is.
    """
    if url and from_file:
        raise BrainsegError("--url and --from-file cannot be used together")
    tv_url = vgg16_weights_url(bn)
    name = PurePosixPath(urllib.parse.urlsplit(tv_url).path).name
    prefix = expected_hash_prefix(name)
    target = hub_checkpoint_dir() / name
    what = "VGG16-BN" if bn else "VGG16"
    if target.exists() and not force:
        if sha256_file(target).startswith(prefix):
            con.info(f"{target} is already installed (sha256 {prefix}...)")
            return target
        raise BrainsegError(
            f"{target} exists but its sha256 does not start with {prefix}",
            hint="pass --force to replace it",
        )
    if from_file is not None:
        src = Path(from_file)
        if not src.is_file():
            raise BrainsegError(
                f"--from-file {src} does not exist or is not a file",
                hint=f"give torchvision's {name}",
            )
        actual = sha256_file(src)
        if not actual.startswith(prefix):
            raise BrainsegError(
                f"{src} has sha256 {actual}, but torchvision's {what} file {name} must start "
                f"with {prefix}",
                hint=f"this is not torchvision's ImageNet {what} file "
                f"(download {tv_url}{'' if bn else '; --bn for VGG16-BN'})",
            )
        check_vgg_state_dict(src)
        if not (target.exists() and src.resolve() == target.resolve()):
            with atomic_path(target, force=True) as tmp:
                shutil.copyfile(src, tmp)
    else:
        src_url = url or tv_url
        con.info(f"downloading {src_url} to {target}")
        http_fetch(
            src_url,
            target,
            None,
            prefix,
            retries=retries,
            backoff=backoff,
            timeout=timeout,
            from_file_hint="--from-file PATH",
        )
        try:
            check_vgg_state_dict(target)
        except BrainsegError:
            target.unlink(missing_ok=True)
            raise
    con.info(f"installed {what} ImageNet weights at {target}")
    return target
