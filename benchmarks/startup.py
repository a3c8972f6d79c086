"""Benchmark: start-up time of the CLI, and proof that the ONNX predict path imports no torch.

    python benchmarks/startup.py [--repeats 7] [--json OUT] [--smoke]

Measures, each in a fresh subprocess (median of --repeats after one warm-up run, so the OS
file cache is warm as it is for a user's second call):

* ``brainseg --help`` and ``brainseg --version`` through the installed console script
  (target: under 0.5 s on this machine), and ``python -c pass`` as the interpreter's floor;
* ``brainseg predict model.onnx IMAGES -o OUT`` on a small ONNX model exported here, run
  under a wrapper that lists, at exit, every heavy module (torch, torchvision, onnx, scipy,
  matplotlib) present in ``sys.modules``, and once more under ``python -X importtime``; both
  must show no torch.

Prints a table and writes JSON (default benchmarks/results/startup.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, median, provenance, say, show, write_result

TARGET_HELP_S = 0.5
HEAVY = ("torch", "torchvision", "onnx", "onnxscript", "scipy", "matplotlib")

WRAPPER = """
import atexit, json, sys
out = sys.argv.pop(1)
HEAVY = set(sys.argv.pop(1).split(','))
def _report():
    heavy = sorted({m.split('.')[0] for m in sys.modules} & HEAVY)
    with open(out, 'w') as f:
        json.dump({'heavy': heavy, 'modules': len(sys.modules)}, f)
atexit.register(_report)
from brainseg.cli.app import main
sys.argv[0] = 'brainseg'
main()
"""


def console_script() -> list[str]:
    """The installed ``brainseg`` entry point next to this interpreter (else python -m)."""
    exe = Path(sys.executable).with_name("brainseg")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "brainseg"]


def wall(cmd: list[str], repeats: int, env: dict[str, str]) -> list[float]:
    """Wall times of ``cmd`` in fresh processes (one untimed warm-up first)."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, env=env)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"{cmd} failed ({p.returncode}): {p.stderr.decode()[-2000:]}")
        if i:
            times.append(dt)
    return times


def phantom_images(dest: Path) -> Path:
    """A folder of 3 phantom slices (64x64) to predict."""
    from brainseg.data.synthetic import write_synthetic

    root = write_synthetic(dest / "phantoms", patients=1, seed=0, size=64)
    images = dest / "images"
    images.mkdir()
    tifs = sorted(p for p in root.rglob("*.tif") if not p.stem.endswith("_mask"))[:3]
    for t in tifs:
        shutil.copy(t, images / t.name)
    return images


def tiny_onnx(dest: Path) -> tuple[Path, Path]:
    """A small ONNX model (64x64, narrow decoder) and a folder of 3 phantom slices."""
    from brainseg.export import export_onnx
    from brainseg.model.checkpoint import save_checkpoint
    from brainseg.model.unet import UNetVGG16

    model = UNetVGG16(decoder_channels=(16, 16, 8, 8, 8), encoder_weights=None)
    ckpt = save_checkpoint(dest / "tiny.safetensors", model, {"image_size": 64})
    images = phantom_images(dest)
    onnx_path = dest / "model.onnx"
    export_onnx(ckpt, onnx_path, verify_data=dest / "phantoms" / "kaggle_3m")
    return onnx_path, images


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per command (median)")
    ap.add_argument("--json", type=Path, default=RESULTS / "startup.json", help="JSON output")
    ap.add_argument("--onnx", type=Path, help="a brainseg .onnx model (else a small one is made)")
    ap.add_argument("--smoke", action="store_true", help="2 repeats (for the smoke test)")
    args = ap.parse_args(argv)
    repeats = 2 if args.smoke else args.repeats
    result: dict[str, Any] = {"benchmark": "startup", **provenance(), "repeats": repeats}
    env = {**os.environ, "COLUMNS": "100", "NO_COLOR": "1"}

    rows: list[list[Any]] = []
    timings: dict[str, list[float]] = {}
    cmds = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "brainseg --version": [*console_script(), "--version"],
        "brainseg --help": [*console_script(), "--help"],
    }
    for name, cmd in cmds.items():
        timings[name] = wall(cmd, repeats, env)
        rows.append([name, f"{median(timings[name]):.3f}", f"{min(timings[name]):.3f}"])
    help_s = median(timings["brainseg --help"])
    result["seconds"] = {k: median(v) for k, v in timings.items()}
    result["runs"] = timings

    with tempfile.TemporaryDirectory(prefix="brainseg-bench-startup-") as td:
        tmp = Path(td)
        os.environ.setdefault("BRAINSEG_CACHE_DIR", str(tmp / "cache"))
        if args.onnx is None:
            say("exporting a small ONNX model for the predict check")
            onnx_path, images = tiny_onnx(tmp)
        else:
            onnx_path, images = args.onnx, phantom_images(tmp)
        report = tmp / "modules.json"
        pred = ["-q", "predict", str(onnx_path), str(images), "-o"]
        t0 = time.perf_counter()
        p = subprocess.run(
            [sys.executable, "-c", WRAPPER, str(report), ",".join(HEAVY), *pred, str(tmp / "out1")],
            capture_output=True,
            text=True,
            env=env,
        )
        predict_s = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"brainseg predict failed: {p.stderr[-2000:]}")
        heavy = json.loads(report.read_text())["heavy"]
        masks = len(list((tmp / "out1").rglob("*_mask.tif")))
        p2 = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "brainseg", *pred, str(tmp / "out2")],
            capture_output=True,
            text=True,
            env=env,
        )
        imported = [
            line.rsplit("|", 1)[-1].strip()
            for line in p2.stderr.splitlines()
            if line.startswith("import time:") and "|" in line
        ]
        torch_lines = [m for m in imported if m.split(".")[0] in ("torch", "torchvision")]
        ort_seen = any(m.split(".")[0] == "onnxruntime" for m in imported)

    result["predict_onnx"] = {
        "heavy_modules_at_exit": heavy,
        "masks_written": masks,
        "wall_s": predict_s,
        "importtime_modules": len(imported),
        "importtime_torch_modules": torch_lines,
        "importtime_onnxruntime_seen": ort_seen,
        "no_torch": not any(m in ("torch", "torchvision") for m in heavy) and not torch_lines,
    }
    result["targets"] = {
        "help_under_0_5s": help_s < TARGET_HELP_S,
        "predict_onnx_no_torch": result["predict_onnx"]["no_torch"],
    }
    show(
        f"CLI start-up, median of {repeats} fresh processes",
        ["command", "median s", "best s"],
        rows,
    )
    show(
        "brainseg predict model.onnx: modules imported",
        ["check", "result"],
        [
            ["heavy modules in sys.modules at exit", ", ".join(heavy) or "none"],
            ["torch modules in -X importtime", len(torch_lines)],
            ["onnxruntime imported (sanity)", "yes" if ort_seen else "no"],
            ["masks written", masks],
            ["wall time (3 slices, incl. start-up) s", f"{predict_s:.2f}"],
        ],
    )
    say(
        f"brainseg --help: {help_s:.3f} s (target < {TARGET_HELP_S} s: "
        f"{'met' if help_s < TARGET_HELP_S else 'MISSED'}); predict model.onnx imports torch: "
        f"{'no' if result['predict_onnx']['no_torch'] else 'YES'}"
    )
    write_result(args.json, result)
    return 0 if result["predict_onnx"]["no_torch"] and masks == 3 else 1


if __name__ == "__main__":
    sys.exit(main())
