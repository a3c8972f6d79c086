"""SIGTERM (``kill``, a scheduler's time limit) is Ctrl-C for every long command: exit 130, one
``error: interrupted`` line, no hidden temporary left behind; predict's summary describes
every mask on disk.

Real processes and real signals: predict is held (reading its stdin) after n results were
reported and SIGTERM comes from outside; the other commands get SIGTERM from faultkit at the
start of the n-th call of a function that runs mid-command (an exact point, no timing).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _tiny import tiny_onnx, write_images
from test_fault_diskfull import litter, run_faulty

pytestmark = pytest.mark.faults

N = 24

#: ``brainseg ARGV...`` held (blocked reading its stdin) right after its ``after``-th --json
#: line: the outside SIGTERM is sure to land mid-run, with writes of later files in flight.
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
        sys.stdin.read()  # held here until a signal

console.emit_json = emit
main(sys.argv[2:])
"""


def _summary(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("after", [1, 7])
def test_sigterm_mid_predict_exits_130_and_the_summary_lists_every_mask(
    tmp_path: Path, after: int
) -> None:
    model = tiny_onnx(tmp_path / "m.onnx")
    write_images(tmp_path / "scans", N, fmt="png")
    out = tmp_path / "out"
    args = ["predict", model, tmp_path / "scans", "-o", out, "--json"]
    args += ["--batch-size", "2", "--workers", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(after), *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
    )
    assert proc.stdout is not None
    for _ in range(after):
        assert json.loads(proc.stdout.readline())["status"] == "ok"
    proc.send_signal(signal.SIGTERM)
    _stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert "error: interrupted" in stderr and "Traceback" not in stderr, stderr
    masks = sorted(str(p) for p in out.rglob("*_mask.*"))
    assert after <= len(masks) < N  # stopped mid-run, with more masks written than reported
    rows = _summary(out / "summary.csv")
    assert sorted(r["output"] for r in rows) == masks, "the summary misses masks on disk"
    assert all(r["status"] == "ok" for r in rows)
    assert litter(out) == [] and not [p for p in out.rglob(".*")]


# --------------------------------------------------------------------------- other commands


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """4 phantom patients (64x64), a 3/1 split and a small checkpoint trained on them."""
    from brainseg.data.split import make_split, save_split
    from brainseg.data.synthetic import write_synthetic

    d = tmp_path_factory.mktemp("tiny")
    root = write_synthetic(d, patients=4, seed=3, size=64, slices=(8, 10))
    ids = sorted(p.name for p in root.iterdir() if p.is_dir())
    split = save_split(make_split(dict.fromkeys(ids, 1.0), val_fraction=0.25, seed=0), d / "s.yaml")
    r = run_faulty(["-q", "train", root, "--split", split, *RECIPE, "--project", d / "runs"], {})
    assert r.returncode == 0, r.stderr
    return root, split, d / "runs" / "exp" / "best.safetensors"


RECIPE = [
    "--image-size", "64", "--encoder-weights", "none", "--decoder-channels", "8,8,8,8,8",
    "--batch-size", "4", "--steps-per-epoch", "1", "--epochs", "1", "--seed", "3",
]  # fmt: skip


CV_RECIPE = [
    "--image-size", "64", "--encoder-weights", "none", "--set", "decoder_channels=8,8,8,8,8",
    "--batch-size", "4", "--steps-per-epoch", "1", "--epochs", "1", "--seed", "3",
]  # fmt: skip


def _commands(root: Path, split: Path, ckpt: Path, tmp: Path) -> dict[str, tuple[list[Any], str]]:
    """command -> (argv, a function it calls mid-run, where faultkit sends SIGTERM)."""
    return {
        "eval": (
            ["eval", ckpt, root, "--split", split, "--project", tmp / "ev"],
            "brainseg.evaluation.metrics.evaluate",
        ),
        "export": (
            ["export", ckpt, "-o", tmp / "exp" / "m.onnx", "--verify-data", root],
            "brainseg.export.verify.load_slices",
        ),
        "download": (
            ["download", "synthetic", "--dest", tmp / "syn", "--patients", "3", "--size", "64"],
            "brainseg.data.synthetic._write_tif",
        ),
        "cv": (
            ["cv", root, "--folds", "2", *CV_RECIPE, "--project", tmp / "cv"],
            "brainseg.train.validation.validate",
        ),
    }


@pytest.mark.slow
@pytest.mark.parametrize("command", ["eval", "export", "download", "cv"])
def test_sigterm_in_a_long_command_is_ctrl_c(
    tiny: tuple[Path, Path, Path], tmp_path: Path, command: str
) -> None:
    argv, target = _commands(*tiny, tmp_path)[command]
    point = {"target": target, "nth": 1, "signals": ["SIGTERM"]}
    r = run_faulty(argv, {"signal": [point]})
    assert r.returncode == 130, (r.returncode, r.stderr)
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "interrupted" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert litter(tmp_path) == []
