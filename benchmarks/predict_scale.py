"""Benchmark: ``brainseg predict --engine ray`` against the local engine on the same slices.

    python benchmarks/predict_scale.py [--model model.onnx] [--files 1040] [--json OUT]

--files real slices of --data (the 840 slices of the 25-patient dev subset, replicated under
new names past that) are predicted, in alternating fresh processes, by

- ``brainseg -q predict MODEL DIR -o OUT --workers W`` (the local engine: one process,
  W reader and W writer threads), and
- ``brainseg -q predict MODEL DIR -o OUT --engine ray --workers W`` (a local Ray instance
  with W CPUs and W predictor actors, started by the command itself).

For each: wall time from process start to exit (everything a user waits for, Ray's start-up
included), time to the first mask on disk, throughput after the first mask, the driver's peak
resident memory (VmHWM at exit) and, for Ray, each predictor actor's peak (VmHWM sampled from
/proc while the run lasts). Ratios are taken within one run of this script (same machine,
same load). The masks of both engines are compared byte for byte at the end.

Without --model an untrained UNetVGG16 (random weights: speed does not depend on them) with a
narrow decoder (16/16/8/8/8) at --size 64 is exported to ONNX fp32 with
``brainseg.export.export_onnx``: a few ms per slice, so any per-file or per-task overhead of an
engine shows instead of hiding behind inference. Writes JSON (default
benchmarks/results/predict_scale.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import DEFAULT_DATA, RESULTS, median, provenance, say, show, write_result
from predict_folder import PEAK_WRAPPER, export_model, image_files, make_folder


class ActorPeaks:
    """Peak resident memory (VmHWM, MB) of every Ray predictor actor process, sampled from
    /proc until stopped (the last VmHWM read of a process is its peak up to then)."""

    def __init__(self, every: float = 0.25) -> None:
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ActorPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if b"MapWorker" not in cmd:  # ray::MapWorker(MapBatches(_Worker))
                        continue
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            mb = int(line.split()[1]) / 1024
                            self.peaks[int(pid)] = max(self.peaks.get(int(pid), 0.0), mb)
                except OSError:
                    continue
            self._stop.wait(self._every)


def first_mask_time(out: Path, t0: float, done: threading.Event, found: list[float]) -> None:
    """Record the seconds from ``t0`` until a mask appears in ``out`` (polled every 10 ms)."""
    while not done.is_set():
        if out.is_dir() and any(out.glob("*_mask.tif")):
            found.append(time.perf_counter() - t0)
            return
        time.sleep(0.01)


def run_engine(
    engine: str, model: Path, folder: Path, out: Path, batch: int, workers: int
) -> dict[str, Any]:
    """One ``brainseg -q predict`` process: wall, first mask, throughput, peaks."""
    report = out.parent / f".{out.name}-peak.json"
    cmd = [sys.executable, "-c", PEAK_WRAPPER, str(report), "-q", "predict", str(model)]
    cmd += [str(folder), "-o", str(out), "--batch-size", str(batch), "--workers", str(workers)]
    cmd += ["--device", "cpu"] + (["--engine", "ray"] if engine == "ray" else [])
    if out.exists():
        shutil.rmtree(out)
    done, found = threading.Event(), []  # type: ignore[var-annotated]
    t0 = time.perf_counter()
    watcher = threading.Thread(target=first_mask_time, args=(out, t0, done, found), daemon=True)
    watcher.start()
    with ActorPeaks() as actors:
        p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    done.set()
    watcher.join()
    if p.returncode != 0:
        raise SystemExit(f"brainseg predict --engine {engine} failed: {p.stderr[-2000:]}")
    n = len(list(folder.iterdir()))
    written = len(list(out.glob("*_mask.tif")))
    if written != n:
        raise SystemExit(f"--engine {engine} wrote {written} masks for {n} files")
    first = found[0] if found else wall
    return {
        "engine": engine,
        "files": n,
        "wall_s": round(wall, 2),
        "files_per_s": round(n / wall, 2),
        "first_mask_s": round(first, 2),
        "files_per_s_after_first_mask": round((n - 1) / max(wall - first, 1e-9), 2),
        "driver_peak_mb": round(json.loads(report.read_text())["vmhwm_kb"] / 1024, 1),
        "actor_peaks_mb": sorted(round(v, 1) for v in actors.peaks.values()),
    }


def same_masks(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*_mask.tif"))
    return names == sorted(p.name for p in b.glob("*_mask.tif")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="kaggle_3m dataset folder")
    ap.add_argument("--model", type=Path, help="a .onnx or .safetensors model (else exported)")
    ap.add_argument("--size", type=int, default=64, help="image size of the exported model")
    ap.add_argument("--files", type=int, default=1040, help="slices to predict")
    ap.add_argument("--batch", type=int, default=8, help="--batch-size of brainseg predict")
    ap.add_argument("--workers", type=int, default=2, help="--workers (threads / Ray actors)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each engine (median)")
    ap.add_argument("--json", type=Path, default=RESULTS / "predict_scale.json")
    ap.add_argument("--smoke", action="store_true", help="few files (smoke test)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.files, args.repeats = 12, 1

    from brainseg import console

    result: dict[str, Any] = {"benchmark": "predict_scale", **provenance()}
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    with tempfile.TemporaryDirectory(prefix="brainseg-bench-scale-") as td:
        tmp = Path(td)
        os.environ.setdefault("BRAINSEG_CACHE_DIR", str(tmp / "cache"))
        from brainseg.data import lgg

        root = lgg.find_root(args.data)
        files = image_files(root)
        console.configure(quiet=True)
        if args.model is not None:
            model = args.model
            result["model"] = {"source": str(model)}
        else:
            say(f"exporting an untrained UNetVGG16 (decoder 16/16/8/8/8, {args.size}x{args.size})")
            model = export_model(tmp / "m", root, "fp32", args.size, [16, 16, 8, 8, 8], 8)
            result["model"] = {
                "source": "untrained UNetVGG16, decoder 16/16/8/8/8, ONNX fp32",
                "image_size": args.size,
            }
        folder = make_folder(files, args.files, tmp / "slices")
        say(
            f"{args.files} slices ({len(files)} real, the rest replicated), {args.repeats} x 2 runs"
        )
        runs: dict[str, list[dict[str, Any]]] = {"local": [], "ray": []}
        for r in range(args.repeats):
            for engine in ("local", "ray"):
                res = run_engine(engine, model, folder, tmp / engine, args.batch, args.workers)
                say(f"run {r + 1} {engine}: {res}")
                runs[engine].append(res)
        identical = same_masks(tmp / "local", tmp / "ray")
    best = {e: min(rs, key=lambda x: x["wall_s"]) for e, rs in runs.items()}
    loc, ray = best["local"], best["ray"]
    n = loc["files"]
    local_cost = (loc["wall_s"] - loc["first_mask_s"]) / max(n - 1, 1)  # s per file, 1 machine
    ray_cost = (ray["wall_s"] - ray["first_mask_s"]) / max(n - 1, 1)
    per_task = max(1, min(4 * args.batch, -(-n // args.workers)))  # as the engine picks it
    tasks = -(-n // per_task)
    result.update(
        runs=runs,
        masks_identical=identical,
        ratio_wall=round(loc["wall_s"] / ray["wall_s"], 3),  # ray throughput / local
        ratio_after_first_mask=round(
            ray["files_per_s_after_first_mask"] / loc["files_per_s_after_first_mask"], 3
        ),
        median_wall_s={e: median([x["wall_s"] for x in rs]) for e, rs in runs.items()},
        model_n_machines={
            "local_s_per_file": round(local_cost, 5),
            "ray_s_per_file_steady": round(ray_cost, 5),
            "ray_startup_s": ray["first_mask_s"],
            "files_per_task": per_task,
            "tasks": tasks,
            "ray_overhead_s_per_task": round((ray_cost - local_cost) * n / tasks, 4),
        },
    )
    show(
        f"predict_scale: {n} slices, --workers {args.workers}, batch {args.batch}, "
        f"load {result['machine']['loadavg_start']}",
        [
            "engine",
            "wall s",
            "files/s",
            "first mask s",
            "files/s after first",
            "driver MB",
            "actors MB",
        ],
        [
            [
                e,
                b["wall_s"],
                b["files_per_s"],
                b["first_mask_s"],
                b["files_per_s_after_first_mask"],
                b["driver_peak_mb"],
                ", ".join(map(str, b["actor_peaks_mb"])) or "-",
            ]
            for e, b in best.items()
        ],
    )
    say(
        f"ray / local throughput: {result['ratio_wall']} end to end, "
        f"{result['ratio_after_first_mask']} after the first mask; masks identical: {identical}"
    )
    write_result(args.json, result)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
