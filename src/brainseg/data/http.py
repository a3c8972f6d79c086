"""Resumable HTTP downloads with checksums and a bounded retry policy; Kaggle credentials.

The download goes to ``<dest>.part`` (kept between runs, so a resume sends ``Range``), renamed
to ``<dest>`` once complete. ``<dest>.part.json`` holds the URL and ETag / Last-Modified (sent
as ``If-Range``) so a resume never splices two files; with ``record=True`` it stays as the
record (URL, size, SHA-256) that tells brainseg's own download from a user's file.

Transient (retried with back-off, the budget counted per stall): timeouts, dropped
connections, HTTP 5xx / 429 (``Retry-After`` honoured), a short body; and, once the server has
answered in this run, any connection failure. A server never reached fails fast.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from brainseg import __version__
from brainseg import console as con
from brainseg.errors import BrainsegError, BrainsegRuntimeError, first_line
from brainseg.fsutil import atomic_write_text, check_free_space, fmt_bytes, write_error

KAGGLE_URL = "https://www.kaggle.com/api/v1/datasets/download/mateuszbuda/lgg-mri-segmentation"

DEFAULT_RETRIES = 5
DEFAULT_BACKOFF = 1.0  # seconds; the n-th retry waits backoff * 2**(n-1), at most MAX_DELAY
DEFAULT_TIMEOUT = 60.0  # seconds without any byte from the server
MAX_DELAY = 60.0
CHUNK = 1 << 20
MiB = 2**20
USER_AGENT = f"brainseg/{__version__} (+python-urllib)"

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)
#: Failures to open a connection that are retried even before the server ever answered.
_ALWAYS_TRANSIENT = (
    TimeoutError,
    ConnectionResetError,
    ConnectionAbortedError,
    http.client.HTTPException,
)


@dataclass(frozen=True)
class KaggleCredentials:
    """A Kaggle user name and API key, and where they came from (for the status line)."""

    username: str
    key: str = field(repr=False)  # never printed
    source: str

    def header(self) -> str:
        """The value of the HTTP basic ``Authorization`` header."""
        token = base64.b64encode(f"{self.username}:{self.key}".encode()).decode("ascii")
        return f"Basic {token}"


def kaggle_credentials() -> KaggleCredentials | None:
    """Credentials from KAGGLE_USERNAME / KAGGLE_KEY, else from kaggle.json; None if neither."""
    user, key = os.environ.get("KAGGLE_USERNAME"), os.environ.get("KAGGLE_KEY")
    if user and key:
        return KaggleCredentials(user, key, "KAGGLE_USERNAME / KAGGLE_KEY")
    if user or key:
        missing = "KAGGLE_KEY" if user else "KAGGLE_USERNAME"
        con.warn(f"{missing} is not set, so the other Kaggle variable is ignored")
    cfg = os.environ.get("KAGGLE_CONFIG_DIR")  # as the Kaggle CLI
    path = (Path(cfg) if cfg else Path.home() / ".kaggle") / "kaggle.json"
    if not path.is_file():
        return None
    hint = (
        'kaggle.json must be JSON like {"username": "you", "key": "0123..."}; create it at '
        "kaggle.com > Settings > API > Create New Token"
    )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BrainsegError(
            f"cannot read Kaggle credentials from {path}: {first_line(exc)}", hint
        ) from exc
    ok = isinstance(data, dict) and all(isinstance(data.get(k), str) for k in ("username", "key"))
    if not (ok and data["username"] and data["key"]):
        raise BrainsegError(f"{path} has no 'username' and 'key' strings", hint)
    return KaggleCredentials(data["username"], data["key"], str(path))


def is_kaggle_url(url: str) -> bool:
    """True for https URLs on kaggle.com: only these get credentials unless asked otherwise."""
    p = urllib.parse.urlsplit(url)
    return p.scheme == "https" and (p.hostname or "").lower() in ("www.kaggle.com", "kaggle.com")


def normalize_sha256(value: str | None) -> str | None:
    """Lower-case hex, 8 to 64 digits (a prefix is accepted, as torch.hub does)."""
    if value is None:
        return None
    v = value.strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{8,64}", v):
        raise BrainsegError(
            f"--sha256 {value!r} is not a SHA-256 hex digest",
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


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a download is retried (``sleep``: tests pass their own)."""

    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF
    timeout: float = DEFAULT_TIMEOUT
    sleep: Callable[[float], None] = time.sleep

    def delay(self, failures: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``failures`` (1-based)."""
        if self.backoff <= 0:
            return 0.0
        wait = retry_after if retry_after is not None else self.backoff * 2 ** (failures - 1)
        return min(MAX_DELAY, wait)


class _Transient(Exception):
    """A failure worth retrying (timeouts, dropped connections, 5xx, 429)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
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


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def check_url(url: str, what: str = "--url") -> str:
    """``url`` when it is an http(s) URL with a host; else a usage error naming it."""
    hint = "give the http:// or https:// address of the file (or --from-file for a local one)"
    try:
        parts = urllib.parse.urlsplit(url)
        host, _port = parts.hostname, parts.port  # .port raises ValueError for a bad port
    except ValueError as exc:
        raise BrainsegError(f"{what} {url!r} is not a valid URL: {first_line(exc)}", hint) from exc
    if parts.scheme.lower() not in ("http", "https"):
        raise BrainsegError(f"{what} {url!r} is not an http:// or https:// URL", hint)
    if not host:
        raise BrainsegError(f"{what} {url!r} names no host", hint)
    return url


def record_path(dest: Path) -> Path:
    """The record of brainseg's download of ``dest``: ``<dest>.part.json``."""
    return dest.with_name(dest.name + ".part.json")


def download_record(dest: Path) -> dict[str, Any] | None:
    """The record of brainseg's download of ``dest`` if it still matches (else: hands off)."""
    info = _read_meta(record_path(dest))
    if not info.get("complete") or dest.is_symlink() or not dest.is_file():
        return None
    if info.get("size") != dest.stat().st_size or info.get("sha256") != sha256_file(dest):
        return None
    return info


def forget_download(dest: Path) -> None:
    """Delete brainseg's download ``dest`` and its record."""
    dest.unlink(missing_ok=True)
    record_path(dest).unlink(missing_ok=True)


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
    record: bool = False,
) -> Path:
    """Download ``url`` to ``dest`` via ``dest.part``, resuming and retrying; return ``dest``.
    ``Authorization`` is not forwarded to a redirect (Kaggle redirects to signed storage URLs).
    """
    check_url(url, "URL")
    dest = Path(dest)
    expected = normalize_sha256(sha256)
    fetch = _Fetch(url, dest, dict(headers or {}), timeout, from_file_hint, auth_hint)
    fetch.prepare()
    _retry_loop(fetch, RetryPolicy(retries, backoff, timeout, sleep))
    fetch.finish(expected, record)
    return dest


def _retry_loop(fetch: _Fetch, policy: RetryPolicy) -> None:
    """Run attempts until one completes; the failure budget restarts whenever bytes arrive."""
    failures, high = 0, _size(fetch.part)
    while True:
        try:
            fetch.attempt()
            return
        except _Restart:
            fetch.part.unlink(missing_ok=True)
        except _Transient as exc:
            size = _size(fetch.part)
            if size > high:  # progress: the retry budget is per stall, not per download
                high, failures = size, 0
            failures += 1
            if failures > policy.retries:
                raise fetch.gave_up(exc, failures, size) from exc
            delay = policy.delay(failures, exc.retry_after)
            con.warn(f"{exc}; retry {failures}/{policy.retries} in {delay:.0f} s")
            policy.sleep(delay)


@dataclass
class _Fetch:
    """One download of ``url`` into ``dest.part``: the attempts, and what they remember."""

    url: str
    dest: Path
    headers: dict[str, str]
    timeout: float
    from_file_hint: str
    auth_hint: str | None
    #: The server answered at least once in this run: later connection failures are a blip.
    contacted: bool = False

    def __post_init__(self) -> None:
        self.part = self.dest.with_name(self.dest.name + ".part")
        self.meta = record_path(self.dest)
        self.opener = urllib.request.build_opener()

    def prepare(self) -> None:
        """Create the folder; drop a ``.part`` that was started from another URL."""
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BrainsegRuntimeError(
                f"cannot create {self.dest.parent}: {exc.strerror or exc}",
                hint="check the folder is writable",
            ) from exc
        if not (self.part.exists() or self.part.is_symlink()):
            return
        if self.part.is_symlink() or not self.part.is_file() or "url" not in _read_meta(self.meta):
            raise BrainsegError(
                f"{self.part} exists and was not downloaded by brainseg (no {self.meta.name} "
                "beside it); it is left alone",
                hint="move it away or choose another destination folder",
            )
        if _read_meta(self.meta).get("url") != self.url:
            if self.part.stat().st_size:
                con.info(f"{self.part.name} was started from another URL; starting over")
            self.part.unlink()

    def gave_up(self, exc: _Transient, failures: int, size: int) -> BrainsegRuntimeError:
        kept = ""
        if size:
            kept = f"; {fmt_bytes(size)} kept in {self.part}, run the command again to resume"
        tries = f"{failures} attempt{'s' if failures != 1 else ''}"
        return BrainsegRuntimeError(
            f"download of {self.url} failed after {tries}: {exc}",
            hint=f"try again later{kept}, or fetch the file elsewhere and pass "
            f"{self.from_file_hint}",
        )

    def finish(self, expected: str | None, record: bool = False) -> None:
        """Check the checksum, then rename ``.part`` onto ``dest`` (recording it if asked)."""
        part, meta = self.part, self.meta
        actual = sha256_file(part) if expected or record else ""
        if expected and not actual.startswith(expected):
            part.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            raise BrainsegRuntimeError(
                f"checksum mismatch for {self.url}: sha256 is {actual}, expected {expected}; "
                "the downloaded file was deleted",
                hint="check the --sha256 value and the --url, then run the command again",
            )
        if record:  # written first: a file under the final name always has its record
            info = {**_read_meta(meta), "url": self.url, "complete": True}
            info.update(size=part.stat().st_size, sha256=actual)
            atomic_write_text(meta, json.dumps(info))
        try:
            os.replace(part, self.dest)
        except OSError as exc:
            raise BrainsegRuntimeError(
                f"cannot rename {part} to {self.dest}: {exc.strerror or exc}"
            ) from exc
        if not record:
            meta.unlink(missing_ok=True)

    def _request(self, offset: int) -> urllib.request.Request:
        req = urllib.request.Request(
            self.url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        )
        for k, v in self.headers.items():
            if k.lower() == "authorization":
                req.add_unredirected_header(k.capitalize(), v)  # not sent on to a redirect
            else:
                req.add_header(k, v)
        if offset:
            req.add_header("Range", f"bytes={offset}-")
            info = _read_meta(self.meta)
            etag = info.get("etag")
            validator = etag if not str(etag or "").startswith("W/") else None
            validator = validator or info.get("last_modified")
            if validator:
                req.add_header("If-Range", str(validator))
        return req

    def attempt(self) -> None:
        """One request: append to (206) or rewrite (200) ``part``; raise _Transient / _Restart."""
        offset = _size(self.part)
        try:
            resp = self.opener.open(self._request(offset), timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            self.contacted = True
            with contextlib.closing(exc):
                self._http_error(exc, offset)
            return  # 416 for a .part that is already complete
        except urllib.error.URLError as exc:
            raise self._connect_error(exc, offset) from exc
        except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            raise _Transient(f"{self.url}: {type(exc).__name__}: {exc or 'no response'}") from exc
        self.contacted = True
        with contextlib.closing(resp):
            self._receive(resp, offset)

    def _connect_error(self, exc: urllib.error.URLError, offset: int) -> Exception:
        """Transient, or the one clear line for a server that cannot be reached."""
        reason = exc.reason
        if isinstance(reason, _ALWAYS_TRANSIENT):
            return _Transient(f"{self.url}: {reason or 'timed out'}")
        if isinstance(reason, ssl.SSLError):
            return BrainsegRuntimeError(
                f"TLS error talking to {self.url}: {reason}",
                hint="check the system clock and CA certificates",
            )
        text = getattr(reason, "strerror", None) or str(reason)
        if self.contacted and isinstance(reason, OSError):  # refused, unreachable: a blip
            return _Transient(f"cannot reach {self.url} ({text}), which answered before")
        kept = ""
        if offset:
            kept = f"; the partial download ({fmt_bytes(offset)} in {self.part}) is kept and "
            kept += "resumes on the next try"
        return BrainsegRuntimeError(
            f"cannot reach {self.url} ({text}); without network access use {self.from_file_hint}",
            hint=f"check the network connection or proxy settings (HTTPS_PROXY){kept}",
        )

    def _http_error(self, exc: urllib.error.HTTPError, offset: int) -> None:
        code, url, hint = exc.code, self.url, self.from_file_hint
        if code == 416 and offset:
            _start, total = _parse_content_range(exc.headers.get("Content-Range"))
            if total is not None and total == offset:
                return  # the .part already holds the whole file
            con.info(f"the server cannot resume {self.part.name} at byte {offset}; starting over")
            raise _Restart()
        if code == 429 or 500 <= code < 600:
            raise _Transient(f"HTTP {code} {exc.reason} from {url}", _retry_after(exc.headers))
        if code in (401, 403):
            raise BrainsegRuntimeError(
                f"HTTP {code} {exc.reason}: {url} refused the download",
                hint=self.auth_hint or f"check that the URL is public, or use {hint}",
            )
        if code == 404:
            raise BrainsegRuntimeError(
                f"HTTP 404 Not Found: {url}", hint=f"check the URL (--url), or use {hint}"
            )
        raise BrainsegRuntimeError(
            f"HTTP {code} {exc.reason} from {url}", hint=f"check the URL, or use {hint}"
        )

    def _mode(self, resp: Any, offset: int) -> tuple[str, int | None]:
        """``("ab", total)`` to append at ``offset``, ``("wb", total)`` to start over."""
        start, range_total = _parse_content_range(resp.headers.get("Content-Range"))
        if resp.status == 206 and offset:
            if start != offset:
                con.info(f"the server resumed {self.part.name} at the wrong byte; starting over")
                raise _Restart()
            return "ab", range_total
        if resp.status == 206 and start == 0:  # a whole file sent as a range we did not ask for
            return "wb", range_total
        if resp.status == 200:
            if offset:
                con.info(
                    f"the server does not resume {self.part.name} (no Range support or the file "
                    "changed); starting over"
                )
            return "wb", _int_header(resp.headers, "Content-Length")
        raise BrainsegRuntimeError(f"unexpected HTTP {resp.status} {resp.reason} from {self.url}")

    def _receive(self, resp: Any, offset: int) -> None:
        mode, total = self._mode(resp, offset)
        if mode == "wb":  # remember the URL and validator a later resume must match
            offset = 0
            etag, modified = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
            info = {"url": self.url, "total": total, "etag": etag, "last_modified": modified}
            atomic_write_text(self.meta, json.dumps(info))
        length = _int_header(resp.headers, "Content-Length")
        body = (total - offset) if total is not None else length
        if body:
            check_free_space(self.part.parent, body, self.part.name)
        verb = "resuming" if mode == "ab" else "downloading"
        if offset:
            con.info(f"{verb} {self.url} at {fmt_bytes(offset)}")
        with open(self.part, mode) as f:
            received = self._copy(resp, f, offset, body, f"{verb} {self.dest.name}")
        if body is not None and received < body:
            raise _Transient(
                f"connection to {self.url} closed after {fmt_bytes(offset + received)} "
                f"of {fmt_bytes(offset + body)}"
            )

    def _copy(self, resp: Any, f: IO[bytes], offset: int, body: int | None, desc: str) -> int:
        """Copy the body into ``f`` with a progress bar (MiB); return the bytes received."""
        mib_total = -(-body // MiB) if body else None
        received, shown = 0, 0
        with con.progress(
            mib_total, desc, unit="MiB", plain_every=max(1, (mib_total or 0) // 10)
        ) as bar:
            while chunk := self._read(resp, f, offset + received):
                try:
                    f.write(chunk)
                except OSError as exc:
                    raise write_error(
                        self.part,
                        exc,
                        kept="the partial download is kept",
                        hint=None,
                        full_hint="free some space and run the command again to resume",
                    ) from exc
                received += len(chunk)
                if received // MiB > shown:
                    bar.advance(received // MiB - shown)
                    shown = received // MiB
            if body is not None and received >= body and mib_total and mib_total > shown:
                bar.advance(mib_total - shown)
        return received

    def _read(self, resp: Any, f: IO[bytes], at: int) -> bytes:
        try:
            # read1: what has arrived (up to CHUNK), so the bytes received before a stall
            # are kept and the retry resumes after them (read() would drop them)
            return resp.read1(CHUNK) if hasattr(resp, "read1") else resp.read(CHUNK)  # type: ignore[no-any-return]
        except (http.client.HTTPException, OSError) as exc:  # timeouts, resets included
            f.flush()
            raise _Transient(
                f"connection to {self.url} lost after {fmt_bytes(at)}: {exc or 'timed out'}"
            ) from exc
