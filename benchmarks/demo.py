"""Benchmark: how long ``brainseg demo`` takes, as a new user runs it, stage by stage.

    python benchmarks/demo.py [--repeats 1] [--json OUT] [--smoke]

Runs the installed ``brainseg demo --json`` in a fresh process (the OS file cache warm after
one untimed run, as for a user's second call) and reports the wall time of the whole
command (start-up and imports included) and the demo's own per-stage seconds from its JSON.
The load average before and after is recorded: a figure taken while other jobs share the
cores is not the idle-machine figure that README quotes. The target is README's promise,
"a minute or two" (120 s) on 2 cores.

Prints a table and writes JSON (default benchmarks/results/demo.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, median, provenance, say, show, write_result

TARGET_S = 120.0


def run_demo(args: list[str], cwd: Path) -> tuple[float, dict[str, Any]]:
    """Wall seconds of ``brainseg demo ARGS --json`` and the JSON it printed."""
    exe = Path(sys.executable).with_name("brainseg")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "brainseg"]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*cmd, "-q", "demo", *args, "--json"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"brainseg demo failed (exit {proc.returncode}):\n{proc.stderr}")
    return seconds, json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", type=Path, default=RESULTS / "demo.json")
    ap.add_argument("--smoke", action="store_true", help="2 epochs, 4 patients (a check)")
    a = ap.parse_args()
    args = ["--epochs", "2", "--patients", "4"] if a.smoke else []
    result: dict[str, Any] = provenance()
    walls, stages = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats + 1):  # the first run warms the OS file cache
            cwd = Path(tmp) / f"run{i}"
            cwd.mkdir()
            seconds, out = run_demo(args, cwd)
            if i:
                walls.append(seconds)
                stages.append(out["seconds"])
            say(f"run {i}: {seconds:.1f} s (load {os.getloadavg()[0]:.2f})")
    per_stage = {k: median([s[k] for s in stages]) for k in stages[0]}
    result.update(
        {
            "args": args,
            "wall_s": walls,
            "wall_median_s": median(walls),
            "stages_s": per_stage,
            "target_s": TARGET_S,
            "dice": out["per_patient_dice"],
        }
    )
    rows = [["whole command", f"{median(walls):.1f}"]]
    rows += [[k, f"{v:.1f}"] for k, v in per_stage.items()]
    show(f"brainseg demo {' '.join(args)} (target {TARGET_S:.0f} s)", ["stage", "s"], rows)
    write_result(a.json, result)


if __name__ == "__main__":
    main()
