"""Shared fixtures: isolated caches, phantom data, the real dev subset, a CLI runner."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# Reliability plumbing: hypothesis profiles, the `stress` opt-in, generated-case counts.
from _reliability import pytest_collection_modifyitems, pytest_terminal_summary  # noqa: F401

#: The same runtime on every CPU for the whole session (module-scoped fixtures too, which the
#: function-scoped fixture below does not reach): `auto` would pick OpenVINO bf16 on some CPUs,
#: whose masks differ from fp32's at boundary pixels; tests of `auto` and OpenVINO ask for
#: them (test_runtimes).
RUNTIME = "onnxruntime"
os.environ["BRAINSEG_RUNTIME"] = RUNTIME

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(
    os.environ.get("BRAINSEG_REAL_DATA", REPO.parent / "shared" / "data" / "lgg-dev" / "kaggle_3m")
)
STANDIN_WEIGHTS = REPO.parent / "shared" / "weights" / "vgg16_features_mri_standin.pth"


@pytest.fixture(autouse=True)
def _isolated_caches(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep every test's caches (dataset cache, torch hub) out of the user's home."""
    from brainseg import console

    console.configure(quiet=False, json_mode=False, debug=False)  # no mode leaks between tests
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("BRAINSEG_CACHE_DIR", str(base / "brainseg-cache"))
    monkeypatch.setenv("TORCH_HOME", str(base / "torch-home"))
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.delenv("KAGGLE_CONFIG_DIR", raising=False)
    monkeypatch.setenv("BRAINSEG_RUNTIME", RUNTIME)  # a test that changed it gets it back


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The 25 real LGG patients in ../shared (skipped when absent, as on users' clones)."""
    if not (REAL_DATA / "TCGA_CS_4941_19960909").is_dir() and not any(REAL_DATA.glob("TCGA_*")):
        pytest.skip(f"real LGG dev subset not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def standin_weights() -> Path:
    if not STANDIN_WEIGHTS.is_file():
        pytest.skip(f"MRI stand-in encoder weights not found at {STANDIN_WEIGHTS}")
    return STANDIN_WEIGHTS


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small phantom dataset (6 patients, 64x64) in the kaggle_3m layout, built once."""
    from brainseg.data.synthetic import write_synthetic

    dest = tmp_path_factory.mktemp("phantoms")
    return write_synthetic(dest, patients=6, seed=0, size=64)


@contextlib.contextmanager
def serve_http(handler: type[BaseHTTPRequestHandler], state: object) -> Iterator[str]:
    """A threaded HTTP server on 127.0.0.1 (a free port) until the block ends; yields its URL.

    The handler reaches ``state`` as ``self.server.state`` (what the test serves and records).
    """
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _cli_env(env: dict[str, str] | None) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}


def run_cli(
    args: Sequence[str],
    *,
    input: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m brainseg ARGS`` in a subprocess, as a user would from a shell."""
    return subprocess.run(
        [sys.executable, "-m", "brainseg", *map(str, args)],
        input=input,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_cli_env(env),
        timeout=timeout,
    )


def start_cli(
    args: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start ``python -m brainseg ARGS`` as :func:`run_cli` runs it, without waiting (to run
    two at once, or to kill it midway)."""
    return subprocess.Popen(
        [sys.executable, "-m", "brainseg", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=_cli_env(env),
    )


@pytest.fixture
def cli():
    """The :func:`run_cli` helper as a fixture."""
    return run_cli


@pytest.fixture
def vol_run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The CLI in-process (fast), run from tmp_path with wide tables: volume and score tests."""
    from _volkit import make_runner

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    return make_runner(capsys)
