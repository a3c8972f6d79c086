"""``brainseg predict`` killed with SIGKILL part way through a folder: no partial or corrupt
mask under its final name, and re-running with ``--skip-existing`` gives outputs
byte-identical to an uninterrupted run.

Kill points: in the middle of writing the n-th mask (its temporary file cut to half, then
SIGKILL: the state such a kill leaves), right after the n-th mask is renamed into place, in
the middle of a probability map, and from the outside after n results were reported.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _tiny import tiny_onnx, write_images
from conftest import run_cli
from test_fault_diskfull import run_faulty

pytestmark = pytest.mark.faults

N = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, bytes]]:
    """A tiny ONNX model, N scans in two folders, and the outputs of an uninterrupted run."""
    d = tmp_path_factory.mktemp("predict-kill")
    model = tiny_onnx(d / "m.onnx")
    write_images(d / "scans" / "a", N // 2, fmt="tif")
    write_images(d / "scans" / "b", N // 2, fmt="png")
    r = run_cli(["-q", "predict", model, d / "scans", "-o", d / "ref", *OPTIONS])
    assert r.returncode == 0, r.stderr
    return model, d / "scans", outputs(d / "ref")


OPTIONS = ["--probabilities", "--batch-size", "4", "--workers", "2"]


def outputs(out: Path) -> dict[str, bytes]:
    """Every output file except the summary (its rows say "skipped" after a resume)."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and not p.name.startswith("summary")
    }


def check_after_kill(out: Path, ref: dict[str, bytes]) -> int:
    """Every file under a final name is complete and equal to the reference."""
    got = outputs(out)
    assert set(got) <= set(ref)
    for name, data in got.items():
        assert data == ref[name], f"{name} differs from an uninterrupted run"
    return len([n for n in got if n.endswith("_mask.tif")])


def resume(model: Path, scans: Path, out: Path, ref: dict[str, bytes], done: int) -> None:
    r = run_cli(["predict", model, scans, "-o", out, *OPTIONS, "--skip-existing", "--json"])
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(rows) == N and len({x["path"] for x in rows}) == N  # every file once
    assert sum(x["status"] == "skipped" for x in rows) == done
    assert outputs(out) == ref  # byte-identical
    litter = [p for p in out.rglob(".*")]
    assert litter == [], f"the killed run's temporary files are still there: {litter}"


KILLS = [
    ("mid-write of mask 7", {"when": "before_rename", "name": "*_mask.tif", "nth": 7}),
    ("after mask 13", {"when": "after_rename", "name": "*_mask.tif", "nth": 13}),
    ("mid-write of probability 22", {"when": "before_rename", "name": "*_prob.tif", "nth": 22}),
]


@pytest.mark.parametrize("label,point", KILLS, ids=[k[0] for k in KILLS])
def test_sigkill_mid_folder_then_skip_existing_is_byte_identical(
    setup: tuple[Path, Path, dict[str, bytes]], tmp_path: Path, label: str, point: dict[str, Any]
) -> None:
    model, scans, ref = setup
    out = tmp_path / "out"
    r = run_faulty(["-q", "predict", model, scans, "-o", out, *OPTIONS], {"kill": [point]})
    assert r.returncode == -signal.SIGKILL, r.stderr
    done = check_after_kill(out, ref)
    assert 0 < done < N
    if point["when"] == "before_rename":  # the kill left a half-written temporary file
        assert any(p.name.endswith(".tmp") for p in out.rglob(".*"))
    resume(model, scans, out, ref, done)


#: Runs ``brainseg ARGV...`` whose ``after``-th --json line is followed by a stop: the process
#: blocks (reading its stdin) so the outside SIGKILL is sure to land mid-run, not after the end.
_HOLD = """
import sys
from brainseg import console
from brainseg.cli.app import main

after, real, n = int(sys.argv[1]), console.emit_json, 0

def emit(obj):
    global n
    real(obj)
    n += 1
    if n == after:
        sys.stdout.flush()
        sys.stdin.read()  # held here until killed

console.emit_json = emit
main(sys.argv[2:])
"""


@pytest.mark.parametrize("after", [1, 9, 27])
def test_sigkill_from_outside_then_skip_existing(
    setup: tuple[Path, Path, dict[str, bytes]], tmp_path: Path, after: int
) -> None:
    """A real asynchronous SIGKILL once ``after`` results were reported on stdout, while the
    run is held there: the kill always lands mid-run (never after the last file)."""
    model, scans, ref = setup
    out = tmp_path / "out"
    args = ["predict", str(model), str(scans), "-o", str(out), *OPTIONS, "--json"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(after), *args, "--batch-size", "1", "--workers", "1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    for _ in range(after):
        assert json.loads(proc.stdout.readline())["status"] == "ok"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL  # killed, not finished
    done = check_after_kill(out, ref)
    # the reader and writer keep at most a few files ahead of the reported results
    assert after <= done < N
    resume(model, scans, out, ref, done)
