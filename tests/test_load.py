"""Load: ``brainseg predict`` over many small files runs in constant memory and reports every
file exactly once.

The real CLI runs in a subprocess with a tiny one-convolution ONNX model (tests/_tiny.py) on
64x64 PNGs; its peak RSS comes from ``wait4``. Memory must not grow with the number of
files: the peak at 10x the files stays within 10% of the smaller run. The default run
compares 200 and 2,000 files (seconds); the stress run (``BRAINSEG_STRESS=1``) compares
2,000 and 20,000, as the issue asks. Timings are printed, never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _tiny import tiny_onnx, write_images


def predict_folder(model: Path, n: int, tmp: Path) -> tuple[float, float, list[dict]]:
    """Run ``brainseg predict`` over ``n`` files: (peak RSS MiB, seconds, --json rows)."""
    scans = tmp / f"scans{n}"
    write_images(scans, n, fmt="png")
    out_file = tmp / f"rows{n}.jsonl"
    cmd = [sys.executable, "-m", "brainseg", "predict", str(model), str(scans)]
    cmd += ["-o", str(tmp / f"out{n}"), "--json", "--batch-size", "16"]
    t0 = time.perf_counter()
    with open(out_file, "w") as stdout:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        err = proc.stderr.read()
        _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, err
    rows = [json.loads(x) for x in out_file.read_text().splitlines()]
    return usage.ru_maxrss / 1024, seconds, rows


def check_every_file_once(rows: list[dict], n: int) -> None:
    paths = [r["path"] for r in rows]
    assert len(paths) == n and len(set(paths)) == n
    assert all(r["status"] == "ok" for r in rows)
    assert len({r["output"] for r in rows}) == n


def _compare(small: int, large: int, tmp: Path) -> None:
    model = tiny_onnx(tmp / "m.onnx")
    rss_small, t_small, rows_small = predict_folder(model, small, tmp)
    check_every_file_once(rows_small, small)
    rss_large, t_large, rows_large = predict_folder(model, large, tmp)
    check_every_file_once(rows_large, large)
    print(
        f"\npeak RSS {rss_small:.1f} MiB for {small} files ({t_small:.1f} s), "
        f"{rss_large:.1f} MiB for {large} files ({t_large:.1f} s)"
    )
    assert rss_large <= rss_small * 1.10, (rss_small, rss_large)


@pytest.mark.slow
def test_memory_is_constant_from_200_to_2000_files(tmp_path: Path) -> None:
    _compare(200, 2_000, tmp_path)


@pytest.mark.stress
def test_memory_is_constant_from_2000_to_20000_files(tmp_path: Path) -> None:
    _compare(2_000, 20_000, tmp_path)
