"""`brainseg download`: HTTP against a local server (resume, retries, auth), safe unpacking, VGG16.

Every request goes to a threaded HTTP server on 127.0.0.1 started by a fixture; nothing here
touches the internet. Retry delays are 0 (or a recorded fake sleep) so nothing waits.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import socket
import stat
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import numpy as np
import pytest
import tifffile
from conftest import run_cli, serve_http

from brainseg.data import download as dl
from brainseg.errors import BrainsegError, BrainsegRuntimeError
from brainseg.model import weights

# --------------------------------------------------------------------------- local server


@dataclass
class Server:
    """What the local server serves and what it saw."""

    base: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    codes: dict[str, list[int]] = field(default_factory=dict)  # consumed one per request
    retry_after: dict[str, str] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    drop_once: set[str] = field(default_factory=set)  # send half the body, then hang up
    ignore_range: bool = False
    auth: str | None = None  # required Authorization header value
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return self.base + path

    def seen(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == path]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def _empty(self, code: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        srv: Server = self.server.state  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        with srv.lock:
            srv.requests.append({"path": path, "headers": dict(self.headers.items())})
            code = srv.codes[path].pop(0) if srv.codes.get(path) else None
            drop = path in srv.drop_once
            srv.drop_once.discard(path)
        if code is not None:
            extra = {"Retry-After": srv.retry_after[path]} if path in srv.retry_after else {}
            return self._empty(code, extra)
        if srv.auth is not None and self.headers.get("Authorization") != srv.auth:
            return self._empty(401, {"WWW-Authenticate": 'Basic realm="kaggle"'})
        if path in srv.redirects:
            return self._empty(302, {"Location": srv.url(srv.redirects[path])})
        data = srv.files.get(path)
        if data is None:
            return self._empty(404)
        start, status = 0, 200
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if m and not srv.ignore_range:
            start, status = int(m.group(1)), 206
            if start >= len(data):
                return self._empty(416, {"Content-Range": f"bytes */{len(data)}"})
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest()[:16] + '"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if drop:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[Server]:
    """A threaded HTTP server on 127.0.0.1 (a free port), shut down after the test."""
    state = Server()
    with serve_http(_Handler, state) as state.base:
        yield state


@pytest.fixture(autouse=True)
def _no_real_credentials_or_proxy(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never read the user's ~/.kaggle, never go through a proxy to reach 127.0.0.1."""
    empty = tmp_path_factory.mktemp("no-kaggle-config")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(empty))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture(autouse=True)
def _own_torch_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A torch hub cache per test: these tests put fake weights under torchvision's names,
    which must never be seen by other tests (conftest's TORCH_HOME is shared by the session)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))


# --------------------------------------------------------------------------- archives

PATIENTS = ("TCGA_AA_0001_20000101", "TCGA_BB_0002_20010202")
SLICES = 3  # per patient; slice 2 of each holds a tumor -> 2 tumor slices of 6


def _tif(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, a)
    return buf.getvalue()


def lgg_members() -> dict[str, bytes]:
    """A tiny kaggle_3m layout: 2 patients x 3 slices of real 64x64 uint8 TIFs, plus data.csv."""
    rng = np.random.default_rng(0)
    files: dict[str, bytes] = {
        "kaggle_3m/data.csv": b"Patient,death01\nTCGA_AA_0001,0\nTCGA_BB_0002,1\n",
        "kaggle_3m/README.md": b"# tiny test copy\n",
    }
    for pid in PATIENTS:
        for k in range(1, SLICES + 1):
            img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            mask = np.zeros((64, 64), np.uint8)
            if k == 2:
                mask[20:40, 24:44] = 255
            files[f"kaggle_3m/{pid}/{pid}_{k}.tif"] = _tif(img)
            files[f"kaggle_3m/{pid}/{pid}_{k}_mask.tif"] = _tif(mask)
    return files


def make_zip(members: dict[str, bytes], duplicate: bool = True) -> bytes:
    """Like Kaggle's zip: kaggle_3m/... and a duplicate lgg-mri-segmentation/kaggle_3m/..."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if duplicate:
            for name, data in members.items():
                zf.writestr(f"lgg-mri-segmentation/{name}", data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def members() -> dict[str, bytes]:
    return lgg_members()


@pytest.fixture(scope="module")
def lgg_zip(members: dict[str, bytes]) -> bytes:
    return make_zip(members)


def assert_installed(dest: Path, members: dict[str, bytes]) -> None:
    """dest/kaggle_3m holds exactly the archive's kaggle_3m files, and nothing else is left."""
    root = dest / "kaggle_3m"
    got = {str(p.relative_to(dest)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert got == members
    leftovers = sorted(p.name for p in dest.iterdir() if p.name != "kaggle_3m")
    assert leftovers == []


def cli(args: list[object], env: dict[str, str] | None = None) -> CompletedProcess[str]:
    """``brainseg ARGS`` in a subprocess (paths allowed in ARGS)."""
    return run_cli([str(a) for a in args], env=env)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def basic(user: str, key: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()


# --------------------------------------------------------------------------- lgg: main paths


def test_cli_downloads_verifies_unpacks_and_summarises(
    server: Server, tmp_path: Path, members: dict[str, bytes], lgg_zip: bytes
) -> None:
    server.files["/lgg.zip"] = lgg_zip
    dest = tmp_path / "data"
    r = cli(
        [
            "download",
            "lgg",
            "--dest",
            dest,
            "--url",
            server.url("/lgg.zip"),
            "--sha256",
            sha(lgg_zip),
            "--json",
        ]
    )
    assert r.returncode == 0, r.stderr
    assert_installed(dest, members)  # archive deleted, no temp folders, no duplicate copy
    summary = json.loads(r.stdout)
    assert summary["patients"] == 2
    assert summary["slices"] == 6
    assert summary["tumor_slices"] == 2
    assert summary["path"] == str(dest / "kaggle_3m")
    assert "slices with tumor" in r.stderr  # the table goes to stderr in --json mode
    assert len(server.seen("/lgg.zip")) == 1
    assert "Authorization" not in server.seen("/lgg.zip")[0]["headers"]


def test_cli_prints_summary_table(server: Server, tmp_path: Path, lgg_zip: bytes) -> None:
    server.files["/lgg.zip"] = lgg_zip
    r = cli(
        ["download", "lgg", "--dest", tmp_path, "--url", server.url("/lgg.zip"), "--keep-archive"]
    )
    assert r.returncode == 0, r.stderr
    assert re.search(r"kaggle_3m\s*│\s*2\s*│\s*6\s*│\s*2 \(33%\)", r.stdout), r.stdout
    assert (tmp_path / "lgg.zip").read_bytes() == lgg_zip  # --keep-archive


def test_resume_after_dropped_connection_is_byte_identical(
    server: Server, tmp_path: Path, lgg_zip: bytes, members: dict[str, bytes]
) -> None:
    server.files["/lgg.zip"] = lgg_zip
    server.drop_once.add("/lgg.zip")
    dest = tmp_path / "data"
    r = cli(
        [
            "download",
            "lgg",
            "--dest",
            dest,
            "--url",
            server.url("/lgg.zip"),
            "--retry-delay",
            "0",
            "--keep-archive",
        ]
    )
    assert r.returncode == 0, r.stderr
    assert "retry 1/5" in r.stderr
    first, second = server.seen("/lgg.zip")
    assert "Range" not in first["headers"]
    assert second["headers"]["Range"] == f"bytes={len(lgg_zip) // 2}-"
    assert second["headers"]["If-Range"].startswith('"')  # the ETag of the first response
    assert (dest / "lgg.zip").read_bytes() == lgg_zip
    assert_installed_files = {
        str(p.relative_to(dest)): p.read_bytes()
        for p in (dest / "kaggle_3m").rglob("*")
        if p.is_file()
    }
    assert assert_installed_files == members


def test_rerun_resumes_the_part_file_kept_by_a_failed_run(
    server: Server, tmp_path: Path, lgg_zip: bytes, members: dict[str, bytes]
) -> None:
    server.files["/lgg.zip"] = lgg_zip
    server.drop_once.add("/lgg.zip")
    url = server.url("/lgg.zip")
    r = cli(["download", "lgg", "--dest", tmp_path, "--url", url, "--retries", "0"])
    assert r.returncode == 1
    part = tmp_path / "lgg.zip.part"
    assert part.read_bytes() == lgg_zip[: len(lgg_zip) // 2]
    assert "failed after 1 attempt:" in r.stderr and "resume" in r.stderr
    r = cli(["download", "lgg", "--dest", tmp_path, "--url", url])
    assert r.returncode == 0, r.stderr
    assert server.seen("/lgg.zip")[-1]["headers"]["Range"] == f"bytes={len(lgg_zip) // 2}-"
    assert_installed(tmp_path, members)


def test_server_that_ignores_range_restarts_from_zero(server: Server, tmp_path: Path) -> None:
    data = bytes(range(256)) * 64
    server.files["/f.bin"] = data
    server.ignore_range = True
    url = server.url("/f.bin")
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(b"X" * 1000)  # stale bytes that must not be kept
    (tmp_path / "f.bin.part.json").write_text(json.dumps({"url": url}))
    assert dl.http_fetch(url, dest, retries=0, backoff=0) == dest
    assert dest.read_bytes() == data
    assert server.seen("/f.bin")[0]["headers"]["Range"] == "bytes=1000-"
    assert not (tmp_path / "f.bin.part").exists()
    assert not (tmp_path / "f.bin.part.json").exists()


def test_416_for_a_complete_part_finishes_and_otherwise_restarts(
    server: Server, tmp_path: Path
) -> None:
    data = b"0123456789" * 100
    server.files["/f.bin"] = data
    url = server.url("/f.bin")
    part, meta = tmp_path / "f.bin.part", tmp_path / "f.bin.part.json"
    part.write_bytes(data)
    meta.write_text(json.dumps({"url": url}))
    dl.http_fetch(url, tmp_path / "f.bin", retries=0, backoff=0)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert len(server.seen("/f.bin")) == 1  # the 416 said "complete": no second request

    part.write_bytes(data + b"junk")  # longer than the file: cannot be resumed
    meta.write_text(json.dumps({"url": url}))
    dl.http_fetch(url, tmp_path / "f.bin", retries=0, backoff=0)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert "Range" not in server.seen("/f.bin")[-1]["headers"]


def test_part_from_another_url_is_not_resumed(server: Server, tmp_path: Path) -> None:
    data = b"a" * 5000
    server.files["/new.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(b"b" * 100)
    (tmp_path / "f.bin.part.json").write_text(json.dumps({"url": server.url("/old.bin")}))
    dl.http_fetch(server.url("/new.bin"), tmp_path / "f.bin", retries=0, backoff=0)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert "Range" not in server.seen("/new.bin")[0]["headers"]


def test_transient_errors_are_retried_with_exponential_backoff(
    server: Server, tmp_path: Path
) -> None:
    server.files["/f.bin"] = b"payload"
    server.codes["/f.bin"] = [503, 500, 429]
    server.retry_after["/f.bin"] = "7"  # sent with every coded reply; honoured as given
    slept: list[float] = []
    dl.http_fetch(
        server.url("/f.bin"), tmp_path / "f.bin", retries=3, backoff=0.5, sleep=slept.append
    )
    assert (tmp_path / "f.bin").read_bytes() == b"payload"
    assert slept == [7.0, 7.0, 7.0]

    server.retry_after.clear()
    server.codes["/f.bin"] = [503, 502, 504]
    slept.clear()
    dl.http_fetch(
        server.url("/f.bin"), tmp_path / "g.bin", retries=3, backoff=0.5, sleep=slept.append
    )
    assert slept == [0.5, 1.0, 2.0]


def test_retries_are_bounded(server: Server, tmp_path: Path) -> None:
    server.files["/f.bin"] = b"payload"
    server.codes["/f.bin"] = [503] * 10
    with pytest.raises(BrainsegRuntimeError, match=r"failed after 3 attempts: HTTP 503"):
        dl.http_fetch(server.url("/f.bin"), tmp_path / "f.bin", retries=2, backoff=0)
    assert len(server.seen("/f.bin")) == 3
    assert not (tmp_path / "f.bin").exists()


def test_silent_server_times_out_and_is_retried(tmp_path: Path) -> None:
    """A server that accepts the connection but never answers: each try ends after `timeout`."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # connections complete in the backlog; nothing ever replies
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/f.bin"
        with pytest.raises(BrainsegRuntimeError, match=r"failed after 2 attempts: .*timed out"):
            dl.http_fetch(url, tmp_path / "f.bin", retries=1, backoff=0, timeout=0.2)


def test_404_names_the_url(server: Server, tmp_path: Path) -> None:
    url = server.url("/missing.zip")
    r = cli(["download", "lgg", "--dest", tmp_path, "--url", url])
    assert r.returncode == 1
    assert f"HTTP 404 Not Found: {url}" in r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_deletes_the_download(
    server: Server, tmp_path: Path, lgg_zip: bytes
) -> None:
    server.files["/lgg.zip"] = lgg_zip
    r = cli(
        [
            "download",
            "lgg",
            "--dest",
            tmp_path,
            "--url",
            server.url("/lgg.zip"),
            "--sha256",
            "0" * 64,
        ]
    )
    assert r.returncode == 1
    assert f"checksum mismatch for {server.url('/lgg.zip')}: sha256 is {sha(lgg_zip)}" in r.stderr
    assert list(tmp_path.iterdir()) == []  # no .part to resume, no archive, no kaggle_3m


def test_bad_sha256_value_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(BrainsegError, match="not a SHA-256 hex digest"):
        dl.download_lgg(tmp_path, url="http://127.0.0.1:9/x.zip", sha256="xyz")


def test_no_network_is_one_clear_line_and_keeps_the_part(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/lgg.zip"
    (tmp_path / "lgg.zip.part").write_bytes(b"partial")
    (tmp_path / "lgg.zip.part.json").write_text(json.dumps({"url": url}))
    r = cli(["download", "lgg", "--dest", tmp_path, "--url", url])
    assert r.returncode == 1
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("error:"))
    assert url in line and "--from-file" in line
    assert "Traceback" not in r.stderr
    assert (tmp_path / "lgg.zip.part").read_bytes() == b"partial"


def test_from_file_works_offline_and_existing_dest_needs_force(
    tmp_path: Path, lgg_zip: bytes, members: dict[str, bytes]
) -> None:
    archive = tmp_path / "downloads" / "lgg-mri-segmentation.zip"
    archive.parent.mkdir()
    archive.write_bytes(lgg_zip)
    dest = tmp_path / "data"
    r = cli(
        ["download", "lgg", "--dest", dest, "--from-file", archive, "--json"],
        env={"https_proxy": "http://127.0.0.1:9"},
    )  # any network use would fail
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["slices"] == 6
    assert_installed(dest, members)
    assert archive.read_bytes() == lgg_zip  # the user's file is left alone

    (dest / "kaggle_3m" / "marker").write_text("old")
    r = cli(["download", "lgg", "--dest", dest, "--from-file", archive])
    assert r.returncode == 2
    assert f"{dest / 'kaggle_3m'} already exists" in r.stderr and "--force" in r.stderr
    assert (dest / "kaggle_3m" / "marker").exists()

    r = cli(["download", "lgg", "--dest", dest, "--from-file", archive, "--force"])
    assert r.returncode == 0, r.stderr
    assert_installed(dest, members)  # the old folder (and its marker) is gone


def test_from_file_checks_sha256_without_deleting(tmp_path: Path, lgg_zip: bytes) -> None:
    archive = tmp_path / "lgg.zip"
    archive.write_bytes(lgg_zip)
    with pytest.raises(BrainsegError, match="checksum mismatch") as ei:
        dl.download_lgg(tmp_path / "data", from_file=archive, sha256="ab" * 32)
    assert ei.value.exit_code == 2
    assert archive.exists() and not (tmp_path / "data" / "kaggle_3m").exists()


def test_tar_gz_mirror_archive_is_accepted(tmp_path: Path, members: dict[str, bytes]) -> None:
    archive = tmp_path / "lgg.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(f"mirror/{name}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    root = dl.download_lgg(tmp_path / "data", from_file=archive)
    assert root == tmp_path / "data" / "kaggle_3m"
    assert_installed(tmp_path / "data", members)


def test_archive_without_kaggle_3m_is_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "other.zip"
    archive.write_bytes(make_zip({"readme.txt": b"hello"}, duplicate=False))
    with pytest.raises(BrainsegError, match="holds no kaggle_3m folder"):
        dl.download_lgg(tmp_path / "data", from_file=archive)
    assert [p.name for p in (tmp_path / "data").iterdir()] == []


# --------------------------------------------------------------------------- unsafe archives


def _zip_with(name: str, data: bytes = b"evil", *, mode: int | None = None) -> bytes:
    """A zip whose first member is harmless and whose second member is ``name``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("kaggle_3m/ok.txt", b"fine")
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        zf.writestr(info, data)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "mode", "why"),
    [
        ("../evil.txt", None, "points outside the folder"),
        ("kaggle_3m/../../evil.txt", None, "points outside the folder"),
        ("..\\evil.txt", None, "points outside the folder"),
        ("/tmp/evil.txt", None, "absolute path"),
        ("C:/evil.txt", None, "absolute path"),
        ("kaggle_3m/link", stat.S_IFLNK | 0o777, "symbolic link"),
        ("kaggle_3m/fifo", stat.S_IFIFO | 0o644, "not a regular file"),
    ],
)
def test_unsafe_zip_members_reject_the_whole_archive(
    tmp_path: Path, name: str, mode: int | None, why: str
) -> None:
    archive = tmp_path / "bad.zip"
    archive.write_bytes(_zip_with(name, b"/etc/passwd" if mode else b"evil", mode=mode))
    out = tmp_path / "box" / "out"
    with pytest.raises(BrainsegError, match=why):
        dl.safe_extract_zip(archive, out)
    assert not out.exists()  # not even the harmless first member was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


def test_cli_rejects_dotdot_member_and_writes_nothing(tmp_path: Path) -> None:
    archive = tmp_path / "bad.zip"
    archive.write_bytes(_zip_with("../../escaped.txt"))
    dest = tmp_path / "a" / "data"
    r = cli(["download", "lgg", "--dest", dest, "--from-file", archive])
    assert r.returncode == 2
    assert "unsafe archive" in r.stderr and "'../../escaped.txt'" in r.stderr
    assert not dest.exists()  # the temporary folder is gone, and the --dest it created
    assert not list(tmp_path.rglob("escaped.txt"))


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_tar_links_are_rejected(tmp_path: Path, kind: bytes) -> None:
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        ti = tarfile.TarInfo("kaggle_3m/link")
        ti.type = kind
        ti.linkname = "/etc/passwd"
        tf.addfile(ti)
    with pytest.raises(BrainsegError, match="is a link"):
        dl.safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tar_dotdot_member_is_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tf:
        ti = tarfile.TarInfo("../evil.txt")
        ti.size = 4
        tf.addfile(ti, io.BytesIO(b"evil"))
    with pytest.raises(BrainsegError, match="points outside"):
        dl.safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize(
    ("name", "kind", "why"),
    [
        ("kaggle_3m/link", tarfile.SYMTYPE, "is a link"),  # to a member inside the archive
        ("kaggle_3m/hard", tarfile.LNKTYPE, "is a link"),
        ("kaggle_3m/../evil.txt", tarfile.REGTYPE, "points outside"),  # lands inside, still
        ("/kaggle_3m/evil.txt", tarfile.REGTYPE, "absolute path"),  # the filter strips the /
        ("C:/evil.txt", tarfile.REGTYPE, "absolute path"),
    ],
)
def test_tar_members_the_data_filter_accepts_are_still_rejected(
    tmp_path: Path, name: str, kind: bytes, why: str
) -> None:
    """tarfile's "data" filter (the oracle) lets these through; the house rule refuses them
    (docs/architecture.md says which checks stay ours and why)."""
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = "kaggle_3m/ok.txt" if kind != tarfile.REGTYPE else ""
    tarfile.data_filter(ti, str(tmp_path / "out"))  # accepted: no FilterError
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tf:
        ok = tarfile.TarInfo("kaggle_3m/ok.txt")
        ok.size = 4
        tf.addfile(ok, io.BytesIO(b"fine"))
        ti.size = 0
        tf.addfile(ti, io.BytesIO(b""))
    with pytest.raises(BrainsegError, match=why) as ei:
        dl.safe_extract(archive, tmp_path / "out")
    assert "unsafe archive" in ei.value.message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", [tarfile.FIFOTYPE, tarfile.CHRTYPE, b"Z"])
def test_tar_special_and_unknown_members_are_rejected(tmp_path: Path, kind: bytes) -> None:
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tf:
        tf.addfile(tarfile.TarInfo("kaggle_3m/ok.txt"))
        ti = tarfile.TarInfo("kaggle_3m/odd")
        ti.type = kind
        tf.addfile(ti)
    with pytest.raises(BrainsegError, match=r"unsafe archive .*kaggle_3m/odd"):
        dl.safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_size_and_ratio_limits(tmp_path: Path) -> None:
    archive = tmp_path / "zeros.zip"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("kaggle_3m/zeros.bin", bytes(2 * 2**20))  # compresses about 1000-fold
    archive.write_bytes(buf.getvalue())
    with pytest.raises(BrainsegError, match=r"would expand to 2\.0 MiB, more than the limit"):
        dl.safe_extract(archive, tmp_path / "a", max_total=2**20)
    with pytest.raises(BrainsegError, match="decompression bomb"):
        dl.safe_extract(archive, tmp_path / "b", ratio_min_bytes=2**20)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    dl.safe_extract(archive, tmp_path / "c")  # under the default 64 MiB ratio floor: fine
    assert (tmp_path / "c" / "kaggle_3m" / "zeros.bin").stat().st_size == 2 * 2**20


def test_not_an_archive(tmp_path: Path) -> None:
    page = tmp_path / "page.zip"
    page.write_bytes(b"<!DOCTYPE html><html>login</html>")
    with pytest.raises(BrainsegError, match="is not a zip or tar archive"):
        dl.safe_extract(page, tmp_path / "out")


# --------------------------------------------------------------------------- credentials


def test_kaggle_credentials_from_env_are_sent_to_the_kaggle_url(
    server: Server, tmp_path: Path, lgg_zip: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default source (monkeypatched to the local server) gets credentials by default;
    Kaggle redirects to storage, and the credentials must not follow the redirect."""
    server.files["/storage/lgg.zip"] = lgg_zip
    server.redirects["/api/download"] = "/storage/lgg.zip"
    monkeypatch.setattr(dl, "KAGGLE_URL", server.url("/api/download"))
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "s3cret")
    dl.download_lgg(tmp_path, retries=0, backoff=0)
    assert server.seen("/api/download")[0]["headers"]["Authorization"] == basic("alice", "s3cret")
    assert "Authorization" not in server.seen("/storage/lgg.zip")[0]["headers"]
    assert (tmp_path / "kaggle_3m").is_dir()


def test_kaggle_json_is_read_from_config_dir_and_home(
    server: Server, tmp_path: Path, lgg_zip: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.files["/lgg.zip"] = lgg_zip
    server.auth = basic("bob", "k3y")
    monkeypatch.setattr(dl, "KAGGLE_URL", server.url("/lgg.zip"))
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "kaggle.json").write_text(json.dumps({"username": "bob", "key": "k3y"}))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(cfg))
    dl.download_lgg(tmp_path / "one", retries=0, backoff=0)

    monkeypatch.delenv("KAGGLE_CONFIG_DIR")
    home = tmp_path / "home"
    (home / ".kaggle").mkdir(parents=True)
    (home / ".kaggle" / "kaggle.json").write_text('{"username": "bob", "key": "k3y"}')
    monkeypatch.setenv("HOME", str(home))
    dl.download_lgg(tmp_path / "two", retries=0, backoff=0)
    assert [r["headers"].get("Authorization") for r in server.seen("/lgg.zip")] == [
        basic("bob", "k3y")
    ] * 2


def test_cli_kaggle_auth_with_mirror_and_401_hint(
    server: Server, tmp_path: Path, lgg_zip: bytes
) -> None:
    server.files["/lgg.zip"] = lgg_zip
    server.auth = basic("carol", "right")
    url = server.url("/lgg.zip")
    env = {"KAGGLE_USERNAME": "carol", "KAGGLE_KEY": "wrong"}
    r = cli(["download", "lgg", "--dest", tmp_path, "--url", url, "--kaggle-auth"], env=env)
    assert r.returncode == 1
    assert f"HTTP 401 Unauthorized: {url} refused the download" in r.stderr
    assert "KAGGLE_USERNAME" in r.stderr and "kaggle.json" in r.stderr
    assert server.seen("/lgg.zip")[0]["headers"]["Authorization"] == basic("carol", "wrong")

    env["KAGGLE_KEY"] = "right"
    r = cli(["download", "lgg", "--dest", tmp_path, "--url", url, "--kaggle-auth"], env=env)
    assert r.returncode == 0, r.stderr
    assert "using Kaggle credentials of carol" in r.stderr and "right" not in r.stderr


def test_mirror_does_not_get_credentials_unless_asked(
    server: Server, tmp_path: Path, lgg_zip: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.files["/lgg.zip"] = lgg_zip
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "s3cret")
    dl.download_lgg(tmp_path, url=server.url("/lgg.zip"), retries=0, backoff=0)
    assert "Authorization" not in server.seen("/lgg.zip")[0]["headers"]
    assert dl.is_kaggle_url(dl.KAGGLE_URL)
    assert not dl.is_kaggle_url("http://www.kaggle.com/x")  # never over plain http
    assert not dl.is_kaggle_url("https://kaggle.com.evil.example/x")


def test_kaggle_auth_without_credentials_and_malformed_kaggle_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(BrainsegError, match="no Kaggle credentials were found") as ei:
        dl.download_lgg(tmp_path, url="http://127.0.0.1:9/x.zip", kaggle_auth=True)
    assert "KAGGLE_USERNAME" in (ei.value.hint or "")
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "kaggle.json").write_text('{"username": "x"}')
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(cfg))
    with pytest.raises(BrainsegError, match=r"kaggle.json has no 'username' and 'key'"):
        dl.kaggle_credentials()
    assert "s3cret" not in repr(dl.KaggleCredentials("a", "s3cret", "env"))


def test_unauthorised_kaggle_download_says_how_to_set_credentials(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.codes["/api/download"] = [403]
    monkeypatch.setattr(dl, "KAGGLE_URL", server.url("/api/download"))
    with pytest.raises(BrainsegRuntimeError, match="HTTP 403") as ei:
        dl.download_lgg(tmp_path, retries=0, backoff=0)
    assert "KAGGLE_USERNAME and KAGGLE_KEY" in (ei.value.hint or "")
    assert "~/.kaggle" in (ei.value.hint or "")


# --------------------------------------------------------------------------- synthetic


def test_cli_synthetic_writes_phantoms_and_summarises(tmp_path: Path) -> None:
    r = cli(
        [
            "download",
            "synthetic",
            "--dest",
            tmp_path,
            "--patients",
            "2",
            "--seed",
            "3",
            "--size",
            "64",
            "--json",
        ]
    )
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["patients"] == 2 and s["slices"] > 0 and 0 < s["tumor_slices"] <= s["slices"]
    assert len([p for p in (tmp_path / "kaggle_3m").iterdir() if p.is_dir()]) == 2
    r = cli(["download", "synthetic", "--dest", tmp_path, "--patients", "2"])
    assert r.returncode == 2 and "already exists" in r.stderr


# --------------------------------------------------------------------------- VGG16


def _fake_vgg16_file(folder: Path) -> tuple[Path, dict[str, Any]]:
    """A real torchvision vgg16() state dict (every key and shape) with random values.

    To keep the file small (about 100 KB instead of 528 MB) each tensor is random per output
    channel and broadcast (stride 0) along the other dimensions; torch.save keeps the view.
    The file is named ``vgg16-<first 8 hex of its sha256>.pth`` as torchvision names files.
    """
    import torch
    import torchvision

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.vgg16().state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {
        k: torch.randn(s[0], *[1] * (len(s) - 1), generator=g).expand(s) for k, s in shapes.items()
    }
    tmp = folder / "vgg16.pth"
    torch.save(sd, tmp)
    named = folder / f"vgg16-{sha(tmp.read_bytes())[:8]}.pth"
    tmp.rename(named)
    return named, sd


def fake_weights(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Make brainseg.model.unet name these weights (URL and hub file name) for VGG16 and
    VGG16-BN."""
    import types

    import brainseg.model.unet

    monkeypatch.setattr(
        brainseg.model.unet, "_weights_enum", lambda enc="vgg16": types.SimpleNamespace(url=url)
    )


def hub_dir() -> Path:
    """torch.hub's checkpoint folder, where the weights are installed."""
    from brainseg.model.unet import imagenet_weights_path

    return imagenet_weights_path("vgg16").parent


@pytest.fixture
def fake_vgg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, Any]]:
    """The fake file, and torchvision's expected URL monkeypatched to carry its name."""
    path, sd = _fake_vgg16_file(tmp_path)
    fake_weights(monkeypatch, f"https://download.pytorch.org/models/{path.name}")
    return path, sd


def test_vgg16_from_file_installs_where_torchvision_looks(
    fake_vgg: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asserted: the file lands in torch.hub's checkpoint folder under the name from the URL,
    hash-checked; and torchvision.models.vgg16(weights="IMAGENET1K_V1") loads a file placed
    there under its real name with no network. Not asserted: the real ImageNet file's hash
    (unavailable offline), which is why the copy under the real name bypasses our check."""
    import os

    import torch
    import torch.hub
    import torchvision

    src, sd = fake_vgg
    target = weights.download_vgg16(from_file=src)
    assert target == Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / src.name
    assert target.read_bytes() == src.read_bytes()
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    assert weights.download_vgg16(from_file=src) == target  # installed already: a no-op

    real_url = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    real = Path(torch.hub.get_dir()) / "checkpoints" / real_url.rsplit("/", 1)[1]
    assert real.parent == target.parent
    real.write_bytes(target.read_bytes())  # as if it were torchvision's own file

    def no_network(*a: Any, **k: Any) -> None:
        raise AssertionError("network used")

    monkeypatch.setattr(socket, "create_connection", no_network)
    model = torchvision.models.vgg16(weights="IMAGENET1K_V1")
    assert torch.equal(model.features[0].weight, sd["features.0.weight"])
    assert torch.equal(model.classifier[6].bias, sd["classifier.6.bias"])


def test_vgg16_mirror_download_is_hash_checked(server: Server, fake_vgg: tuple[Path, Any]) -> None:
    src, _ = fake_vgg
    server.files["/bad.pth"] = b"not the weights"
    with pytest.raises(BrainsegRuntimeError, match="checksum mismatch"):
        weights.download_vgg16(url=server.url("/bad.pth"), retries=0, backoff=0)
    assert not hub_dir().exists() or not list(hub_dir().iterdir())

    server.files["/w.pth"] = src.read_bytes()
    target = weights.download_vgg16(url=server.url("/w.pth"), retries=0, backoff=0)
    assert target.name == src.name and target.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in target.parent.iterdir()) == [src.name]


def test_vgg16_file_missing_a_feature_tensor_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`download vgg16` checks every features.* key and shape, as training's encoder load does
    (one loader): a file with the right name and hash but one conv layer short is refused."""
    import torch

    _, sd = _fake_vgg16_file(tmp_path)
    del sd["features.28.weight"]  # the last conv layer's weight
    short = tmp_path / "short.pth"
    torch.save(sd, short)
    fake_weights(monkeypatch, f"https://x/vgg16-{sha(short.read_bytes())[:8]}.pth")
    with pytest.raises(BrainsegError, match=r"features\.28\.weight"):
        weights.download_vgg16(from_file=short)
    assert not hub_dir().exists() or not list(hub_dir().iterdir())


def test_vgg16_file_that_is_not_a_state_dict_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    junk = tmp_path / "junk"
    torch.save({"weight": torch.zeros(3)}, junk)  # loads safely, right hash, wrong content
    fake_weights(monkeypatch, f"https://x/vgg16-{sha(junk.read_bytes())[:8]}.pth")
    with pytest.raises(BrainsegError, match="holds no VGG16 'features"):
        weights.download_vgg16(from_file=junk)
    assert not hub_dir().exists() or not list(hub_dir().iterdir())


def test_cli_vgg16_from_file_with_wrong_hash(tmp_path: Path) -> None:
    wrong = tmp_path / "vgg16-00000000.pth"
    wrong.write_bytes(b"something else")
    r = cli(["download", "vgg16", "--from-file", wrong])
    assert r.returncode == 2
    assert "must start with 397923af" in r.stderr
    assert "Traceback" not in r.stderr
    assert not hub_dir().exists() or not list(hub_dir().iterdir())
    with pytest.raises(BrainsegError, match=r"vgg16_bn-6c64b313\.pth must start with 6c64b313"):
        weights.download_vgg16(bn=True, from_file=wrong)


def test_from_file_that_is_missing_is_reported_before_the_destination(tmp_path: Path) -> None:
    """The input is checked first: an existing DEST/kaggle_3m is not the error to show."""
    (tmp_path / "data" / "kaggle_3m").mkdir(parents=True)
    missing = tmp_path / "missing.zip"
    r = cli(["download", "lgg", "--dest", tmp_path / "data", "--from-file", missing])
    assert r.returncode == 2
    assert f"--from-file {missing} does not exist" in r.stderr
    assert "already exists" not in r.stderr


# --------------------------------------------------------------------------- not our files


def _error_line(r: CompletedProcess[str]) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    return lines[0]


def _user_tar_gz(path: Path) -> bytes:
    """The issue's ``mkdir d; tar czf d/backup.tar.gz x``: a user's own archive."""
    with tarfile.open(path, "w:gz") as tf:
        data = b"my notes\n"
        ti = tarfile.TarInfo("x/notes.txt")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    return path.read_bytes()


def test_a_users_file_named_like_the_download_is_neither_used_nor_deleted(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    before = _user_tar_gz(d / "backup.tar.gz")
    r = cli(["download", "lgg", "--dest", d, "--url", "http://127.0.0.1:9/backup.tar.gz"])
    assert r.returncode == 2, r.stderr
    line = _error_line(r)
    assert str(d / "backup.tar.gz") in line and "not downloaded by brainseg" in line
    assert "--from-file" in r.stderr  # how to install it, if that is what the user wants
    assert (d / "backup.tar.gz").read_bytes() == before
    assert sorted(p.name for p in d.iterdir()) == ["backup.tar.gz"]


def test_a_valid_users_archive_is_not_deleted_after_an_install(
    server: Server, tmp_path: Path, lgg_zip: bytes
) -> None:
    server.files["/lgg.zip"] = lgg_zip
    (tmp_path / "lgg.zip").write_bytes(lgg_zip)  # the user's copy, not brainseg's download
    with pytest.raises(BrainsegError, match="not downloaded by brainseg") as ei:
        dl.download_lgg(tmp_path, url=server.url("/lgg.zip"), retries=0)
    assert ei.value.exit_code == 2
    assert (tmp_path / "lgg.zip").read_bytes() == lgg_zip
    assert server.seen("/lgg.zip") == []  # nothing was downloaded either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lgg.zip"]


def test_a_wrong_sha256_never_deletes_a_users_file(server: Server, tmp_path: Path) -> None:
    server.files["/backup.tar.gz"] = b"whatever the server has"
    before = _user_tar_gz(tmp_path / "backup.tar.gz")
    with pytest.raises(BrainsegError, match="not downloaded by brainseg"):
        dl.download_lgg(tmp_path, url=server.url("/backup.tar.gz"), sha256="0" * 64, retries=0)
    assert (tmp_path / "backup.tar.gz").read_bytes() == before
    assert server.seen("/backup.tar.gz") == []


def test_a_users_file_named_like_the_partial_download_is_not_deleted(
    server: Server, tmp_path: Path, lgg_zip: bytes
) -> None:
    server.files["/lgg.zip"] = lgg_zip
    (tmp_path / "lgg.zip.part").write_bytes(b"mine")  # no .part.json: not brainseg's
    with pytest.raises(BrainsegError, match="not downloaded by brainseg"):
        dl.download_lgg(tmp_path, url=server.url("/lgg.zip"), retries=0)
    assert (tmp_path / "lgg.zip.part").read_bytes() == b"mine"
    assert server.seen("/lgg.zip") == []


def test_brainsegs_own_kept_download_is_reused_then_deleted(
    server: Server, tmp_path: Path, lgg_zip: bytes, members: dict[str, bytes]
) -> None:
    server.files["/lgg.zip"] = lgg_zip
    url = server.url("/lgg.zip")
    dl.download_lgg(tmp_path, url=url, keep_archive=True, retries=0)
    assert (tmp_path / "lgg.zip").read_bytes() == lgg_zip
    assert json.loads((tmp_path / "lgg.zip.part.json").read_text())["sha256"] == sha(lgg_zip)
    # the record says brainseg downloaded it: reused (no request), then deleted with its record
    dl.download_lgg(tmp_path, url=url, force=True, retries=0)
    assert len(server.seen("/lgg.zip")) == 1
    assert_installed(tmp_path, members)


def test_brainsegs_own_download_that_fails_the_sha256_is_downloaded_again(
    server: Server, tmp_path: Path, lgg_zip: bytes, members: dict[str, bytes]
) -> None:
    server.files["/lgg.zip"] = b"an older file"
    url = server.url("/lgg.zip")
    dl.http_fetch(url, tmp_path / "lgg.zip", retries=0, record=True)
    server.files["/lgg.zip"] = lgg_zip
    dl.download_lgg(tmp_path, url=url, sha256=sha(lgg_zip), retries=0)
    assert len(server.seen("/lgg.zip")) == 2
    assert_installed(tmp_path, members)


def test_a_download_record_that_does_not_match_the_file_is_not_trusted(
    server: Server, tmp_path: Path, lgg_zip: bytes
) -> None:
    """The user replaced brainseg's kept archive with a file of their own: left alone."""
    server.files["/lgg.zip"] = lgg_zip
    url = server.url("/lgg.zip")
    dl.http_fetch(url, tmp_path / "lgg.zip", retries=0, record=True)
    (tmp_path / "lgg.zip").write_bytes(b"my own bytes")
    with pytest.raises(BrainsegError, match="not downloaded by brainseg"):
        dl.download_lgg(tmp_path, url=url, retries=0)
    assert (tmp_path / "lgg.zip").read_bytes() == b"my own bytes"


# --------------------------------------------------------------------------- damaged archives

FOUR = tuple(f"TCGA_C{i}_000{i}_2000010{i}" for i in range(1, 5))


@pytest.fixture(scope="module")
def four_members() -> dict[str, bytes]:
    """kaggle_3m with 4 patients x 2 slices (tiny TIFs), patient by patient."""
    files: dict[str, bytes] = {}
    for i, pid in enumerate(FOUR):
        for k in (1, 2):
            img = np.full((32, 32, 3), 40 * i + k, np.uint8)
            mask = np.zeros((32, 32), np.uint8)
            mask[4:8, 4:8] = 255 * (k == 2)
            files[f"kaggle_3m/{pid}/{pid}_{k}.tif"] = _tif(img)
            files[f"kaggle_3m/{pid}/{pid}_{k}_mask.tif"] = _tif(mask)
    return files


def _tar_bytes(members: dict[str, bytes]) -> tuple[bytes, dict[str, int]]:
    """An uncompressed tar of ``members`` and the header offset of each member."""
    buf = io.BytesIO()
    offsets: dict[str, int] = {}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members.items():
            offsets[name] = buf.tell()
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue(), offsets


def _gz(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, mtime=0)


def _damaged(four_members: dict[str, bytes], case: str) -> bytes:
    raw, offsets = _tar_bytes(four_members)
    third = offsets[f"kaggle_3m/{FOUR[2]}/{FOUR[2]}_1.tif"]  # the first member of patient 3
    fourth = offsets[f"kaggle_3m/{FOUR[3]}/{FOUR[3]}_1.tif"]
    if case in ("flipped header bit", "flipped header bit, gzipped"):
        bad = bytearray(raw)
        bad[third + 3] ^= 0x01  # in the member's name: its header checksum no longer matches
        with pytest.raises(tarfile.HeaderError):  # the oracle: tarfile's own header check
            tarfile.TarInfo.frombuf(bytes(bad[third : third + 512]), "utf-8", "strict")
        return bytes(bad) if case == "flipped header bit" else _gz(bytes(bad))
    if case == "gzip CRC fails":
        bad = bytearray(_gz(raw))
        bad[-8] ^= 0xFF  # the CRC-32 in the gzip trailer
        import gzip

        with pytest.raises(gzip.BadGzipFile, match="CRC"):  # what gunzip would say
            gzip.decompress(bytes(bad))
        return bytes(bad)
    if case == "cut at a member boundary":
        return raw[:fourth]  # patients 1-3 complete, no end-of-archive blocks
    if case == "cut at a member boundary, gzipped":
        return _gz(raw[:fourth])
    raise AssertionError(case)


DAMAGED = [
    "flipped header bit",
    "flipped header bit, gzipped",
    "gzip CRC fails",
    "cut at a member boundary",
    "cut at a member boundary, gzipped",
]


@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_tar_installs_nothing(
    tmp_path: Path, four_members: dict[str, bytes], case: str
) -> None:
    archive = tmp_path / "lgg.tar.gz"
    archive.write_bytes(_damaged(four_members, case))
    dest = tmp_path / "data"
    with pytest.raises(BrainsegError) as ei:
        dl.download_lgg(dest, from_file=archive)
    exc = ei.value
    assert exc.exit_code == 2 and "\n" not in exc.message
    assert exc.message.startswith(f"{archive} is damaged"), exc.message
    assert list(dest.iterdir()) == []  # no kaggle_3m, no temporary folder


def test_the_undamaged_four_patient_tar_installs_all_four(
    tmp_path: Path, four_members: dict[str, bytes]
) -> None:
    raw, _ = _tar_bytes(four_members)
    for i, data in enumerate((raw, _gz(raw))):
        archive = tmp_path / f"lgg{i}.tar"
        archive.write_bytes(data)
        dl.download_lgg(tmp_path / f"d{i}", from_file=archive)
        assert_installed(tmp_path / f"d{i}", four_members)


def test_cli_damaged_tar_is_one_line_exit_2(tmp_path: Path, four_members: dict[str, bytes]) -> None:
    archive = tmp_path / "lgg.tar"
    archive.write_bytes(_damaged(four_members, "flipped header bit"))
    r = cli(["download", "lgg", "--dest", tmp_path / "d", "--from-file", archive])
    assert r.returncode == 2, r.stderr
    assert str(archive) in _error_line(r) and "damaged" in r.stderr
    assert not (tmp_path / "d").exists()  # nothing, not even the --dest this run created


def test_member_count_limit_stops_while_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20,000 empty members, limit 100: refused after reading about 100 headers, not all."""
    archive = tmp_path / "many.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for i in range(20_000):
            tf.addfile(tarfile.TarInfo(f"kaggle_3m/{i}"))
    read: list[int] = []
    real_next = tarfile.TarFile.next

    def counting_next(self: tarfile.TarFile) -> tarfile.TarInfo | None:
        read.append(1)
        return real_next(self)

    monkeypatch.setattr(tarfile.TarFile, "next", counting_next)
    with pytest.raises(BrainsegError, match=r"more than 100 members") as ei:
        dl.safe_extract(archive, tmp_path / "out", max_members=100)
    assert ei.value.exit_code == 2
    assert len(read) <= 110, f"{len(read)} member headers read before the limit"
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- bad member names, URLs


def _zip_with_invalid_utf8_name() -> bytes:
    """A zip whose member name is flagged UTF-8 (bit 11) but is not valid UTF-8."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("kaggle_3m/ok.txt", b"fine")
        zf.writestr("kaggle_3m/\u00e9.txt", b"x")  # zipfile sets the UTF-8 flag for it
    data = buf.getvalue()
    assert data.count("\u00e9".encode()) == 2  # local header and central directory
    return data.replace("\u00e9".encode(), b"\xc3\x28")


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (_zip_with_invalid_utf8_name, "not valid UTF-8"),
        (lambda: _zip_with("kaggle_3m/" + "a/" * 2000 + "f.txt"), "too long"),
        (lambda: _zip_with("kaggle_3m/" + "b" * 300 + ".txt"), "too long"),
    ],
)
def test_bad_member_names_are_one_clear_error(tmp_path: Path, make: Any, why: str) -> None:
    archive = tmp_path / "bad.zip"
    archive.write_bytes(make())
    with pytest.raises(BrainsegError, match=why) as ei:
        dl.download_lgg(tmp_path / "d", from_file=archive)
    assert ei.value.exit_code == 2 and str(archive) in ei.value.message
    assert "\n" not in ei.value.message
    assert list((tmp_path / "d").iterdir()) == []


def test_a_long_nested_tar_member_is_one_clear_error(tmp_path: Path) -> None:
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("kaggle_3m/" + "a/" * 2000 + "f.txt")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"x"))
    with pytest.raises(BrainsegError, match="too long") as ei:
        dl.safe_extract(archive, tmp_path / "out")
    assert ei.value.exit_code == 2 and str(archive) in ei.value.message


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "http://[::1", "ftp://127.0.0.1/lgg.zip", "http:///lgg.zip", "lgg.zip"],
)
def test_urls_brainseg_cannot_download_are_usage_errors(tmp_path: Path, url: str) -> None:
    with pytest.raises(BrainsegError) as ei:
        dl.download_lgg(tmp_path / "d", url=url)
    assert ei.value.exit_code == 2 and f"--url {url!r}" in ei.value.message
    assert not (tmp_path / "d").exists()
    with pytest.raises(BrainsegError) as ei:
        weights.download_vgg16(url=url)
    assert ei.value.exit_code == 2 and f"--url {url!r}" in ei.value.message


def test_cli_file_url_is_one_line(tmp_path: Path) -> None:
    r = cli(["download", "lgg", "--dest", tmp_path / "d", "--url", "file:///etc/passwd"])
    assert r.returncode == 2
    line = _error_line(r)
    assert "file:///etc/passwd" in line and "http" in line
    r = cli(["download", "lgg", "--dest", tmp_path / "d", "--url", "http://[::1"])
    assert r.returncode == 2 and "http://[::1" in _error_line(r)


# --------------------------------------------------------------------------- synthetic options


@pytest.mark.parametrize(
    ("option", "value", "word"),
    [
        ("--patients", "100000000000000000000", "--patients"),
        ("--size", "1000000000", "--size"),
        ("--seed", "-1", "--seed"),
    ],
)
def test_cli_synthetic_out_of_range_options_are_one_line(
    tmp_path: Path, option: str, value: str, word: str
) -> None:
    r = cli(["download", "synthetic", "--dest", tmp_path / "s", option, value], env=None)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    assert word in r.stderr and value in r.stderr
    assert not (tmp_path / "s" / "kaggle_3m").exists()


def test_a_second_install_into_the_same_dest_while_one_runs_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `download synthetic --force` into one --dest: the second, started while the first
    indexes its dataset, says what happened and leaves the first's folder alone."""
    from brainseg.data import download as mod

    dest = tmp_path / "d"
    opts = mod.DownloadOptions("synthetic", dest, force=True, patients=1, size=32)
    real_summary = mod.dataset_summary
    seen: list[BaseException | None] = []

    def summary_with_a_rival(root: Path) -> Any:
        if not seen:  # the rival starts while the first run is indexing
            marker = root / "first-run.txt"
            marker.write_text("x")
            try:
                mod.run_download(opts)
                seen.append(None)
            except BrainsegError as exc:
                seen.append(exc)
            assert marker.exists(), "the rival replaced the folder the first run was indexing"
            marker.unlink()
        return real_summary(root)

    monkeypatch.setattr(mod, "dataset_summary", summary_with_a_rival)
    res = mod.run_download(opts)
    assert res.summary is not None and res.summary.patients == 1
    exc = seen[0]
    assert isinstance(exc, BrainsegError) and not isinstance(exc, BrainsegRuntimeError), exc
    assert str(dest) in exc.message and "in use by another run" in exc.message
    assert f"pid {os.getpid()}" in exc.message and "\n" not in exc.message
    assert sorted(p.name for p in dest.iterdir()) == ["kaggle_3m"]  # the lock is gone too


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    import subprocess
    import sys

    from brainseg.data import download as mod

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dest = tmp_path / "d"
    dest.mkdir()
    lock = dest / ".kaggle_3m.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout)}))
    opts = mod.DownloadOptions("synthetic", dest, patients=1, size=32)
    assert mod.run_download(opts).summary is not None
    assert sorted(p.name for p in dest.iterdir()) == ["kaggle_3m"]


def test_unpacked_folders_respect_the_umask(tmp_path: Path, members: dict[str, bytes]) -> None:
    """An archive holding the patient folders at its top level: kaggle_3m is the unpack folder
    itself, which must not keep mkdtemp's 0700."""
    flat = {k.split("/", 1)[1]: v for k, v in members.items()}
    archive = tmp_path / "flat.zip"
    archive.write_bytes(make_zip(flat, duplicate=False))
    old = os.umask(0o022)
    try:
        root = dl.download_lgg(tmp_path / "d", from_file=archive)
    finally:
        os.umask(old)
    modes = {oct(stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")] if p.is_dir()}
    assert modes == {"0o755"}
    files = {oct(stat.S_IMODE(p.stat().st_mode)) for p in root.rglob("*") if p.is_file()}
    assert files == {"0o644"}


def test_an_install_that_loses_the_race_leaves_the_winners_folder(
    tmp_path: Path, lgg_zip: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the library (no lock): kaggle_3m appears while this run unpacks; without --force
    it is left as it is and this run says so."""
    from brainseg.data import download as mod

    archive = tmp_path / "lgg.zip"
    archive.write_bytes(lgg_zip)
    dest = tmp_path / "d"
    real = mod._discover_in_archive

    def discover_while_another_finishes(*args: Any) -> None:
        (dest / "kaggle_3m").mkdir()
        (dest / "kaggle_3m" / "theirs.txt").write_text("x")
        real(*args)

    monkeypatch.setattr(mod, "_discover_in_archive", discover_while_another_finishes)
    with pytest.raises(BrainsegRuntimeError, match="created by another run") as ei:
        dl.download_lgg(dest, from_file=archive)
    assert str(dest / "kaggle_3m") in ei.value.message
    assert [p.name for p in (dest / "kaggle_3m").iterdir()] == ["theirs.txt"]
    assert [p.name for p in dest.iterdir()] == ["kaggle_3m"]


def test_zip_member_count_limit_is_checked_before_the_listing_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(150):
            zf.writestr(f"kaggle_3m/{i}", b"")
    listed: list[int] = []
    real = zipfile.ZipFile._RealGetContents  # type: ignore[attr-defined]

    def spy(self: zipfile.ZipFile) -> None:
        listed.append(1)
        real(self)

    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", spy)
    with pytest.raises(BrainsegError, match=r"150 members \(limit 100\)"):
        dl.safe_extract(archive, tmp_path / "out", max_members=100)
    assert listed == [] and not (tmp_path / "out").exists()
    dl.safe_extract(archive, tmp_path / "ok", max_members=150)  # at the limit: unpacked
    assert len(list((tmp_path / "ok" / "kaggle_3m").iterdir())) == 150


def test_zip64_member_count_is_read_from_the_zip64_end_record(tmp_path: Path) -> None:
    archive = tmp_path / "z64.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # more than 65,535 members: a zip64 end record
        for i in range(70_000):
            zf.writestr(f"k/{i}", b"")
    with pytest.raises(BrainsegError, match=r"70000 members \(limit 1000\)"):
        dl.safe_extract(archive, tmp_path / "out", max_members=1000)
