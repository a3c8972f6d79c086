"""Benchmark: end-to-end ``brainseg predict`` over a folder against model-only throughput.

    python benchmarks/predict_folder.py [--model model.onnx] [--files 300] [--json OUT]

1. Throughput. --files real slices (copied from --data into a temporary folder, masks left
   out) are predicted by ``brainseg -q predict MODEL DIR -o OUT`` in a fresh process (start-up,
   session creation, reading, resizing, inference, thresholding, writing every mask and the
   summary: everything a user waits for). Model-only: the same backend
   (``brainseg.inference.predict.Predictor``, same batch size) on the same slices already in memory.
   The two alternate, --repeats times (median). Target: end to end >= 85% of model-only.
2. Memory. Peak resident memory (VmHWM of the predict process, read as it exits) for 200 and
   2000 files (real slices replicated under new names), with a small fast model (64x64,
   narrow decoder) so 2000 files take a minute: the file pipeline must not grow with the
   number of files.

Without --model a full-size UNetVGG16 (random weights: speed does not depend on them) is
exported with ``brainseg.export.export_onnx`` (int8 by default, --variant fp32 for fp32),
calibrated on 3 patients of --data. ``--runtime`` (default auto: what ``brainseg predict``
picks for this CPU, docs/export.md) is passed to both the command and the model-only run, so
the end-to-end ratio is measured for the runtime a user gets. Prints tables and writes JSON
(default benchmarks/results/predict_folder.json).
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

import numpy as np
from _common import (
    DEFAULT_DATA,
    RESULTS,
    limited_root,
    median,
    patient_folders,
    provenance,
    say,
    show,
    spread,
    write_result,
)

TARGET_RATIO = 0.85

# Runs the CLI and records the process's own peak resident memory (VmHWM) at exit. (The
# rusage ru_maxrss of a child also counts the parent's pages from before the exec: useless
# when the parent is a big benchmark process.)
PEAK_WRAPPER = """
import atexit, json, sys
out = sys.argv.pop(1)
def _report():
    hwm = 0
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            hwm = int(line.split()[1])
    with open(out, 'w') as f:
        json.dump({'vmhwm_kb': hwm}, f)
atexit.register(_report)
from brainseg.cli.app import main
sys.argv[0] = 'brainseg'
main()
"""


def export_model(
    dest: Path, root: Path, variant: str, size: int, decoder: list[int], calib_slices: int
) -> Path:
    """An ONNX model of a random-weight UNetVGG16, written by brainseg.export.export_onnx."""
    from brainseg.export import export_onnx
    from brainseg.model.checkpoint import save_checkpoint
    from brainseg.model.unet import UNetVGG16

    dest.mkdir(parents=True, exist_ok=True)
    model = UNetVGG16(decoder_channels=tuple(decoder), encoder_weights=None)
    ckpt = save_checkpoint(dest / "model.safetensors", model, {"image_size": size})
    calib = limited_root(root, patient_folders(root)[:3], dest / "calib")
    out = dest / f"model-{variant}.onnx"
    export_onnx(
        ckpt,
        out,
        int8=variant == "int8",
        calib=calib if variant == "int8" else None,
        verify_data=calib,
        calib_slices=calib_slices,
        force=True,
    )
    return out


def image_files(root: Path) -> list[Path]:
    """Slice images (no masks) of a kaggle_3m folder, sorted."""
    return sorted(p for p in root.rglob("*.tif") if not p.stem.endswith("_mask"))


def make_folder(files: list[Path], n: int, dest: Path) -> Path:
    """``n`` slices copied into ``dest`` (replicated under new names when n > len(files))."""
    dest.mkdir(parents=True)
    for i in range(n):
        src = files[i % len(files)]
        name = src.name if n <= len(files) else f"r{i // len(files):02d}_{src.name}"
        shutil.copyfile(src, dest / name)
    return dest


def run_predict(
    model: Path, folder: Path, out: Path, batch: int, workers: int, runtime: str = "auto"
) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one ``brainseg -q predict`` process."""
    report = out.parent / f".{out.name}-peak.json"
    cmd = [
        sys.executable,
        "-c",
        PEAK_WRAPPER,
        str(report),
        "-q",
        "predict",
        str(model),
        str(folder),
        "-o",
        str(out),
        "--batch-size",
        str(batch),
        "--workers",
        str(workers),
        "--device",
        "cpu",
        "--runtime",
        runtime,
    ]
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"brainseg predict failed ({p.returncode}): {p.stderr[-2000:]}")
    peak_kb = json.loads(report.read_text())["vmhwm_kb"]
    written = len(list(out.rglob("*_mask.tif")))
    n = len(list(folder.iterdir()))
    if written != n:
        raise SystemExit(f"brainseg predict wrote {written} masks for {n} files")
    return wall, peak_kb / 1024


def model_only(model: Path, images: np.ndarray, batch: int, runtime: str = "auto") -> float:
    """Slices/s of the same backend on slices already in memory (same batch size)."""
    from brainseg.inference.predict import Predictor

    pred = Predictor([model], device="cpu", batch_size=batch, runtime=runtime)
    pred.predict_proba(images[:batch])  # warm-up
    t0 = time.perf_counter()
    for s in range(0, len(images), batch):
        pred.predict_proba(images[s : s + batch])
    return len(images) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="kaggle_3m dataset folder")
    ap.add_argument("--model", type=Path, help="a .onnx or .safetensors model (else exported)")
    ap.add_argument("--variant", choices=["int8", "fp32"], default="int8", help="exported model")
    ap.add_argument("--size", type=int, default=256, help="image size of the exported model")
    ap.add_argument("--files", type=int, default=300, help="slices for the throughput run")
    ap.add_argument("--memory-files", default="200,2000", help="file counts for the memory run")
    ap.add_argument("--batch", type=int, default=8, help="--batch-size of brainseg predict")
    ap.add_argument("--workers", type=int, default=2, help="--workers of brainseg predict")
    ap.add_argument(
        "--runtime",
        default="auto",
        choices=["auto", "onnxruntime", "openvino", "torch"],
        help="--runtime of brainseg predict and of the model-only run (issue 24)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="repetitions (median)")
    ap.add_argument("--json", type=Path, default=RESULTS / "predict_folder.json")
    ap.add_argument("--smoke", action="store_true", help="small model, few files (smoke test)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.files, args.memory_files, args.repeats, args.size = 6, "4,8", 1, 64
    mem_counts = [int(v) for v in args.memory_files.split(",")]

    from brainseg import console
    from brainseg.data.imageio import read_image

    result: dict[str, Any] = {"benchmark": "predict_folder", **provenance()}
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    with tempfile.TemporaryDirectory(prefix="brainseg-bench-predict-") as td:
        tmp = Path(td)
        os.environ.setdefault("BRAINSEG_CACHE_DIR", str(tmp / "cache"))
        from brainseg.data import lgg

        root = lgg.find_root(args.data)
        files = image_files(root)
        console.configure(quiet=True)
        tiny_decoder = [16, 16, 8, 8, 8]
        if args.model is not None:
            model = args.model
            result["model"] = {"source": str(model)}
        else:
            say(f"exporting a full-size UNetVGG16 ({args.variant}, {args.size}x{args.size})")
            decoder = tiny_decoder if args.smoke else [512, 256, 128, 64, 32]
            model = export_model(tmp / "full", root, args.variant, args.size, decoder, 32)
            result["model"] = {
                "source": f"UNetVGG16 random weights, exported {args.variant} by brainseg.export",
                "decoder_channels": decoder,
                "image_size": args.size,
            }
        if args.smoke and args.model is not None:
            small = model
        else:
            say("exporting the small model for the memory runs (64x64, narrow decoder, fp32)")
            small = export_model(tmp / "small", root, "fp32", 64, tiny_decoder, 8)
        console.configure(quiet=False)
        result["model"]["mb"] = round(model.stat().st_size / 1e6, 1)

        # ---- throughput
        n = min(args.files, len(files))
        folder = make_folder(files, n, tmp / "in")
        images = np.stack([read_image(p) for p in sorted(folder.iterdir())])
        say(f"throughput: {n} slices {images.shape[1]}x{images.shape[2]}, {args.repeats} reps")
        e2e: list[float] = []
        mo: list[float] = []
        rss: list[float] = []
        for rep in range(args.repeats):
            for which in ("e2e", "model") if rep % 2 == 0 else ("model", "e2e"):
                if which == "e2e":
                    wall, peak = run_predict(
                        model, folder, tmp / "out", args.batch, args.workers, args.runtime
                    )
                    e2e.append(n / wall)
                    rss.append(peak)
                else:
                    mo.append(model_only(model, images, args.batch, args.runtime))
            say(f"rep {rep + 1}: end to end {e2e[-1]:.2f} slices/s, model only {mo[-1]:.2f}")
        ratio = median(e2e) / median(mo)
        result["throughput"] = {
            "files": n,
            "end_to_end_slices_s": median(e2e),
            "end_to_end_runs": e2e,
            "model_only_slices_s": median(mo),
            "model_only_runs": mo,
            "ratio": ratio,
            "spread_e2e": spread(e2e),
            "spread_model_only": spread(mo),
            "peak_rss_mb": max(rss),
        }

        # ---- memory against the number of files
        mem: dict[str, Any] = {}
        for count in mem_counts:
            f2 = make_folder(files, count, tmp / f"mem{count}")
            wall, peak = run_predict(small, f2, tmp / f"memout{count}", args.batch, args.workers)
            mem[str(count)] = {"peak_rss_mb": peak, "wall_s": wall, "slices_s": count / wall}
            say(f"memory: {count} files -> peak RSS {peak:.0f} MB ({count / wall:.1f} slices/s)")
            shutil.rmtree(f2)
            shutil.rmtree(tmp / f"memout{count}")
        lo, hi = mem[str(mem_counts[0])]["peak_rss_mb"], mem[str(mem_counts[-1])]["peak_rss_mb"]
        result["memory"] = {
            "model": "64x64, decoder 16/16/8/8/8, fp32 ONNX",
            "runs": mem,
            "growth_mb": hi - lo,
            "growth_ratio": hi / lo,
        }

    result["targets"] = {
        "ratio": ratio,
        "ratio_met": ratio >= TARGET_RATIO,
        "memory_growth_mb": hi - lo,
        "memory_flat": hi - lo < 0.1 * lo,  # within 10%
    }
    show(
        f"brainseg predict over {n} real slices vs model only ({model.name}, batch "
        f"{args.batch}, --workers {args.workers}), median of {args.repeats}",
        ["measure", "slices/s", "spread"],
        [
            ["model only (Predictor, in memory)", f"{median(mo):.2f}", f"{spread(mo):.0%}"],
            ["end to end (brainseg predict)", f"{median(e2e):.2f}", f"{spread(e2e):.0%}"],
            ["ratio (target >= 85%)", f"{ratio:.0%}", ""],
        ],
    )
    show(
        "peak resident memory of brainseg predict vs number of files (small model)",
        ["files", "peak RSS MB", "slices/s"],
        [[k, f"{v['peak_rss_mb']:.0f}", f"{v['slices_s']:.1f}"] for k, v in mem.items()],
    )
    t = result["targets"]
    say(
        f"end to end {ratio:.0%} of model-only (target >= 85%: "
        f"{'met' if t['ratio_met'] else 'MISSED'}); memory {lo:.0f} -> {hi:.0f} MB for "
        f"{mem_counts[0]} -> {mem_counts[-1]} files ({'flat' if t['memory_flat'] else 'GROWS'})"
    )
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
