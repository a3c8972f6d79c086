"""``brainseg download lgg`` against a hostile local server: connections dropped again and
again, a server that stalls, a wrong Content-Length, a truncated zip. The download resumes
(HTTP Range) or fails with one clear error, and a half-extracted dataset is never left in
place. Everything runs against a threaded HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import io
import re
import signal
import socket
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import serve_http
from test_fault_diskfull import litter, run_faulty

from brainseg.data.download import download_lgg
from brainseg.errors import BrainsegError

pytestmark = pytest.mark.faults


@dataclass
class Hostile:
    """What the server does: one behaviour per request, then plain answers."""

    data: bytes = b""
    plan: list[tuple[str, int]] = field(default_factory=list)  # (behaviour, argument)
    ranges: list[int] = field(default_factory=list)  # the Range start of every request
    lock: threading.Lock = field(default_factory=threading.Lock)
    base: str = ""
    sent: threading.Event = field(default_factory=threading.Event)  # "stop": bytes are out
    stopped: threading.Event = field(default_factory=threading.Event)  # the port is closed


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv: Hostile = self.server.state  # type: ignore[attr-defined]
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start = int(m.group(1)) if m else 0
        with srv.lock:
            srv.ranges.append(start)
            how, arg = srv.plan.pop(0) if srv.plan else ("ok", 0)
        body = srv.data[start:]
        length = len(body)
        if how == "long":  # promise more bytes than are sent
            length += arg
        elif how == "short":  # promise fewer: the client stops early
            length -= arg
            body = body[:length]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(length))
        self.send_header("ETag", '"' + hashlib.sha256(srv.data).hexdigest()[:16] + '"')
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(srv.data) - 1}/{len(srv.data)}")
        self.end_headers()
        if how == "drop":  # send arg bytes, then hang up
            self.wfile.write(body[:arg])
            self.wfile.flush()
            self.close_connection = True
            return
        if how == "stop":  # send arg bytes, then hang up only once the server is gone
            self.wfile.write(body[:arg])
            self.wfile.flush()
            srv.sent.set()
            srv.stopped.wait(30)
            self.close_connection = True
            return
        if how == "stall":  # send arg bytes, then go silent far longer than the timeout
            self.wfile.write(body[:arg])
            self.wfile.flush()
            time.sleep(3)
            self.close_connection = True
            return
        self.wfile.write(body)
        if how == "long":
            self.wfile.flush()
            self.close_connection = True


class _Restartable:
    """A threaded HTTP server on a fixed port that can really stop (port closed) and start."""

    def __init__(self, state: Hostile) -> None:
        self.state = state
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None
        self.port = 0
        self.base_alive = False

    def start(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.state = self.state  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.state.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base_alive = True

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()  # the listening socket is gone: connections are refused
            self.httpd = None
        self.base_alive = False

    def restart(self) -> None:
        self.start()

    def __enter__(self) -> _Restartable:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def server() -> Iterator[Hostile]:
    state = Hostile()
    with serve_http(_Handler, state) as state.base:
        yield state


@pytest.fixture(autouse=True)
def _no_credentials_or_proxy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))


@pytest.fixture(scope="module")
def lgg_zip(phantom_root: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # stored: ~1 MB, many chunks
        for p in sorted(phantom_root.rglob("*")):
            if p.is_file():
                zf.write(p, f"lgg-mri-segmentation/kaggle_3m/{p.relative_to(phantom_root)}")
    return buf.getvalue()


def fetch(server: Hostile, dest: Path, **kw: Any) -> Path:
    return download_lgg(
        dest, url=server.base + "/lgg.zip", retries=kw.pop("retries", 8), backoff=0, **kw
    )


def installed(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def test_connection_dropped_again_and_again_resumes_to_the_same_bytes(
    server: Hostile, lgg_zip: bytes, tmp_path: Path
) -> None:
    server.data = lgg_zip
    server.plan = [("drop", 100_000)] * 6  # every request dies after 100 kB
    sha = hashlib.sha256(lgg_zip).hexdigest()
    root = fetch(server, tmp_path / "d", sha256=sha, keep_archive=True)
    assert (tmp_path / "d" / "lgg.zip").read_bytes() == lgg_zip
    assert server.ranges == [i * 100_000 for i in range(7)]  # each retry resumes
    # (exact here: a drop is deterministic, the server hangs up after exactly 100 kB)
    assert len(list(root.glob("TCGA_*"))) == 6
    assert litter(tmp_path / "d") == []


def test_dropped_without_progress_fails_clearly_and_keeps_the_part(
    server: Hostile, lgg_zip: bytes, tmp_path: Path
) -> None:
    server.data = lgg_zip
    server.plan = [("drop", 50_000)] + [("drop", 0)] * 20  # then no byte ever again
    with pytest.raises(BrainsegError, match=r"failed after 4 attempts") as info:
        fetch(server, tmp_path / "d", retries=3)
    assert "run the command again to resume" in (info.value.hint or "")
    assert installed(tmp_path / "d") == ["lgg.zip.part", "lgg.zip.part.json"]
    server.plan = []  # the network is back: the next run resumes at 50 kB
    fetch(server, tmp_path / "d")
    assert server.ranges[-1] == 50_000 and installed(tmp_path / "d") == ["kaggle_3m"]


def test_stalled_server_times_out_and_resumes(
    server: Hostile, lgg_zip: bytes, tmp_path: Path
) -> None:
    server.data = lgg_zip
    server.plan = [("stall", 200_000), ("stall", 0)]
    fetch(server, tmp_path / "d", timeout=0.5, keep_archive=True)
    # What matters, not the schedule (a slow read on a loaded machine may add a retry):
    # the identical bytes, every retry resumed where the file ended (never from 0 again,
    # never past the stall), and a bounded number of requests.
    assert (tmp_path / "d" / "lgg.zip").read_bytes() == lgg_zip
    assert server.ranges[0] == 0 and 0 < server.ranges[1] <= 200_000
    assert all(a <= b for a, b in zip(server.ranges, server.ranges[1:], strict=False))
    assert len(server.ranges) <= 1 + 8  # retries=8 in fetch()
    assert installed(tmp_path / "d") == ["kaggle_3m", "lgg.zip", "lgg.zip.part.json"]  # + record


def _reopen(server: _Restartable, port: int) -> Callable[[float], None]:
    """A ``sleep`` for the client: once it has met the closed port, start the server again
    on the same port (what an nginx restart looks like from the client)."""
    calls: list[float] = []

    def sleep(_delay: float) -> None:
        calls.append(_delay)
        if len(calls) >= 2 and not server.base_alive:  # a try was made while it was down
            with socket.socket() as probe:  # really refused, not just slow
                assert probe.connect_ex(("127.0.0.1", port)) != 0
            server.restart()

    return sleep


def test_server_that_stops_and_starts_again_mid_transfer_is_ridden_out(
    lgg_zip: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server really goes away mid-transfer (listening socket closed, the port refuses
    connections), then comes back on the same port: the download resumes with Range and
    installs identical bytes, as curl --retry-connrefused would."""
    state = Hostile(data=lgg_zip, plan=[("stop", 300_000)])
    with _Restartable(state) as srv:

        def stop_when_sent() -> None:
            state.sent.wait(30)
            srv.stop()
            state.stopped.set()

        stopper = threading.Thread(target=stop_when_sent, daemon=True)
        stopper.start()
        sha = hashlib.sha256(lgg_zip).hexdigest()
        root = download_lgg(
            tmp_path / "d",
            url=state.base + "/lgg.zip",
            sha256=sha,
            keep_archive=True,
            retries=5,
            backoff=0,
            sleep=_reopen(srv, srv.port),
        )
        stopper.join(5)
    assert "Connection refused" in capsys.readouterr().err  # it met the closed port...
    assert (tmp_path / "d" / "lgg.zip").read_bytes() == lgg_zip  # ...and rode it out
    assert state.ranges[0] == 0 and state.ranges[-1] == 300_000  # resumed, not restarted
    assert len(list(root.glob("TCGA_*"))) == 6 and litter(tmp_path / "d") == []


def test_a_server_never_reached_fails_fast(tmp_path: Path) -> None:
    """Refused on the very first contact: one clear error, no retries, nothing left."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    slept: list[float] = []
    with pytest.raises(BrainsegError, match=r"cannot reach .*Connection refused") as info:
        download_lgg(tmp_path / "d", url=f"http://127.0.0.1:{port}/lgg.zip", sleep=slept.append)
    assert info.value.exit_code == 1 and slept == []
    assert installed(tmp_path / "d") == []


def test_content_length_longer_than_the_body_is_retried(
    server: Hostile, lgg_zip: bytes, tmp_path: Path
) -> None:
    server.data = lgg_zip
    server.plan = [("long", 5000), ("long", 10)]
    fetch(server, tmp_path / "d", keep_archive=True)
    assert (tmp_path / "d" / "lgg.zip").read_bytes() == lgg_zip  # nothing spliced in
    assert installed(tmp_path / "d") == ["kaggle_3m", "lgg.zip", "lgg.zip.part.json"]  # + record
    assert len(server.ranges) >= 2  # the short body was noticed and the download resumed


@pytest.mark.parametrize("with_sha", [True, False])
def test_content_length_shorter_than_the_file_is_caught(
    server: Hostile, lgg_zip: bytes, tmp_path: Path, with_sha: bool
) -> None:
    """A lying server that stops early: the checksum (or the zip check) catches it, the bad
    download is deleted so it is not reused, and nothing is installed."""
    server.data = lgg_zip
    server.plan = [("short", 1000)]
    sha = hashlib.sha256(lgg_zip).hexdigest() if with_sha else None
    with pytest.raises(BrainsegError, match=r"checksum mismatch|damaged|kaggle_3m") as info:
        fetch(server, tmp_path / "d", sha256=sha)
    assert "deleted" in info.value.message
    assert installed(tmp_path / "d") == []
    fetch(server, tmp_path / "d", sha256=sha)  # a honest server next time: it works
    assert installed(tmp_path / "d") == ["kaggle_3m"]


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.97])
def test_truncated_zip_is_never_half_installed(
    server: Hostile, lgg_zip: bytes, tmp_path: Path, keep: float
) -> None:
    server.data = lgg_zip[: int(len(lgg_zip) * keep)]
    dest = tmp_path / "d"
    (dest / "kaggle_3m" / "TCGA_OLD").mkdir(parents=True)  # an install being replaced
    with pytest.raises(BrainsegError) as info:
        fetch(server, dest, force=True)
    assert "damaged" in info.value.message or "not a zip" in info.value.message
    assert installed(dest) == ["kaggle_3m"]  # the old install, untouched
    assert [p.name for p in (dest / "kaggle_3m").iterdir()] == ["TCGA_OLD"]
    assert litter(dest) == []


def test_sigkill_while_unpacking_leaves_nothing_the_next_run_keeps(
    lgg_zip: bytes, tmp_path: Path
) -> None:
    """A kill after the archive is unpacked, before it is renamed into place: the next run
    installs the dataset and removes the dead run's unpack folder."""
    archive = tmp_path / "lgg.zip"
    archive.write_bytes(lgg_zip)
    dest = tmp_path / "d"
    args = ["-q", "download", "lgg", "--dest", dest, "--from-file", archive]
    kill = {"when": "call", "target": "brainseg.data.lgg.discover", "nth": 1}
    r = run_faulty(args, {"kill": [kill]})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert installed(dest) != ["kaggle_3m"] and litter(dest) != []  # what a kill leaves
    r = run_faulty(args, {})
    assert r.returncode == 0, r.stderr
    assert installed(dest) == ["kaggle_3m"] and litter(dest) == []


def test_sigkill_while_writing_phantoms_leaves_nothing_the_next_run_keeps(tmp_path: Path) -> None:
    dest = tmp_path / "d"
    args = ["-q", "download", "synthetic", "--dest", dest, "--patients", "2", "--size", "64"]
    kill = {"when": "call", "target": "brainseg.data.synthetic._write_tif", "nth": 5}
    r = run_faulty(args, {"kill": [kill]})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert installed(dest) != ["kaggle_3m"] and litter(dest) != []
    r = run_faulty(args, {})
    assert r.returncode == 0, r.stderr
    assert installed(dest) == ["kaggle_3m"] and litter(dest) == []
