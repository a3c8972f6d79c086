"""Benchmark: CPU inference latency and throughput of the torch and onnxruntime backends.

    python benchmarks/inference.py [--checkpoint best.safetensors] [--data DIR] [--json OUT]

At --size (256) on the CPU, for

* torch eager fp32 (NCHW, the reference),
* torch fp32 channels_last (what ``brainseg predict x.safetensors`` uses on CPU),
* torch bf16 autocast + channels_last (``--precision bf16`` of a checkpoint; CPUs with native
  bf16 only),
* torch.compile (inductor) of fp32 and bf16 channels_last (``--no-compile`` leaves them out);
  the one-off compile time is the ``warmup_s`` of their rows,
* onnxruntime fp32 (``brainseg export``),
* onnxruntime int8 (static QDQ via ``brainseg.export.variants.quantize_int8``, calibrated on
  slices of the training patients),
* OpenVINO (``--runtime openvino``, when installed) on the same two files: fp32 (exact), bf16
  inference precision (CPUs with native bf16 only) and int8; each as ``brainseg predict``
  opens it (``brainseg.inference.runtimes.OpenVinoBackend``): LATENCY hint for batch 1, THROUGHPUT
  hint
  with one-image async requests for the batch,

measures the per-slice latency at batch 1 and the throughput at batch --batch (8), the
backends alternating inside each repetition (median of --repeats), and the agreement of each
backend's masks with torch fp32 on every slice of --dice-patients held-out real patients:
pooled mask Dice and the mean per-patient Dice against the ground truth (difference to torch
fp32). Target: int8 at least 2.5x faster than torch eager fp32 at batch 1 with the mean
per-patient Dice within 0.01. The int8 speed-up depends on the CPU's int8 instructions (AMX /
VNNI or plain AVX2, read from /proc/cpuinfo and named in the output: 4.1x on an AVX512-VNNI
CPU, 2.3x on an AVX2-only one).

Without --checkpoint a short run is trained first (brainseg.train, the MRI stand-in encoder
from ../shared/weights frozen, decoder only, a few epochs at --size) so that the Dice
comparison is made on a model that segments something; the held-out patients are its
validation patients. The ONNX sessions are the ones ``brainseg predict`` opens
(``brainseg.inference.predict.OnnxBackend``: default graph optimisations, no thread spinning).

Each row also gets its fraction of the CPU's peak: the model's FLOPs per slice
(``brainseg.model.unet.model_flops``, 2 per multiply-add) x slices/s at the batch, over two peaks:
(1) a practical peak measured in the same run, the dense matmul rate of torch on this CPU
(2048 x 2048, fp32 and bf16, all cores; median of 3 bursts; int8 rows against 2 x the bf16
rate: VNNI's dot product does 4 int8 multiply-adds per 32-bit lane where AVX512-BF16 does 2,
an assumption) and (2) a nominal peak from the flags and the clock in /proc/cpuinfo
(:func:`nominal_peak`). Both are lower bounds of the true peak where the core boosts above the
reported clock or torch's fp32 matmul misses the CPU's fastest kernels (MKL on AMD), and
Winograd convolutions do fewer multiply-adds than the FLOPs counted: a figure above 100 %
says the CPU is near its peak, not beyond it. The JSON records the CPU flags, its kind
(``brainseg.inference.runtimes.cpu_kind``) and what ``--runtime auto`` picks on it for each file.

Prints tables and writes JSON (default benchmarks/results/inference.json).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    DEFAULT_DATA,
    RESULTS,
    STANDIN,
    dice,
    limited_root,
    load_cached,
    median,
    provenance,
    say,
    show,
    spread,
    write_result,
    write_split,
)

TARGET_SPEEDUP = 2.5
TARGET_DICE = 0.01

Runner = Callable[[np.ndarray], np.ndarray]  # N x 3 x H x W float32 -> N x H x W logits


def pick_patients(data: Any, n: int) -> list[str]:
    """``n`` held-out patients with tumour, spread over the sorted ids (deterministic)."""
    tumour = data.tumor_slices_per_patient()
    ids = [p for p in sorted(data.patient_ids) if tumour.get(p, 0) > 0] or sorted(data.patient_ids)
    step = max(1, len(ids) // max(n, 1))
    return ids[step // 2 :: step][:n] if len(ids) > n else ids[:n]


def train_checkpoint(
    root: Path, ids: list[str], val_ids: list[str], args: argparse.Namespace, tmp: Path
) -> Path:
    """A short brainseg training run (frozen stand-in encoder unless --smoke)."""
    from brainseg.config import TrainConfig
    from brainseg.train import train

    split = write_split(tmp / "split.yaml", ids, val_ids)
    weights = str(STANDIN) if (STANDIN.is_file() and not args.smoke) else "none"
    cfg = TrainConfig(
        data=str(root),
        split=str(split),
        image_size=args.size,
        encoder_weights=weights,
        decoder_channels=[16, 16, 8, 8, 8] if args.smoke else [512, 256, 128, 64, 32],
        freeze_encoder_epochs=args.train_epochs if weights != "none" else 0,
        head_bias_prior=0.01,
        lr=1e-3,
        epochs=args.train_epochs,
        steps_per_epoch=args.train_steps,
        batch_size=args.train_batch,
        augment=True,
        project=str(tmp / "runs"),
        name="inference-bench",
        preview_slices=0,
        quiet=True,
    )
    say(
        f"training a checkpoint: {args.train_epochs} epochs x {args.train_steps} steps of "
        f"{args.train_batch}, {args.size}x{args.size}, encoder weights {weights}"
        + (" (frozen)" if weights != "none" else "")
    )
    from brainseg import console

    try:
        run = train(cfg)
    finally:
        console.configure(quiet=False)  # quiet=True in the config silences the process
    return run / "best.safetensors"


def torch_runner(model: Any, channels_last: bool, bf16: bool) -> Runner:
    """A torch forward pass as the predict backend would run it (inference mode)."""
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = model.to(memory_format=fmt)

    def run(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).contiguous(memory_format=fmt)
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return net(t).float()[:, 0].numpy()

    return run


def torch_runners(model: Any, compile_too: bool) -> dict[str, Runner]:
    """The torch rows: eager fp32 (the reference), channels_last, bf16 autocast where the CPU
    has native bf16, and (``compile_too``) torch.compile of each precision."""
    import copy

    import torch

    from brainseg.train.runtime import cpu_has_native_bf16

    precisions = (False, True) if cpu_has_native_bf16() else (False,)
    runners = {"torch fp32": torch_runner(model, False, False)}
    runners["torch fp32 channels_last"] = torch_runner(copy.deepcopy(model), True, False)
    if cpu_has_native_bf16():
        runners["torch bf16 channels_last"] = torch_runner(copy.deepcopy(model), True, True)
    for bf16 in precisions if compile_too else ():  # inductor; compiles on the first calls
        net = torch.compile(copy.deepcopy(model).to(memory_format=torch.channels_last))
        runners[f"torch compile {'bf16' if bf16 else 'fp32'} channels_last"] = torch_runner(
            net, True, bf16
        )
    return runners


def ort_runner(path: Path) -> tuple[Runner, dict[str, Any]]:
    """The session ``brainseg predict`` opens for an .onnx file, and its settings."""
    from brainseg.inference.predict import OnnxBackend

    backend = OnnxBackend(path, "cpu")
    sess = backend.session
    name_in, name_out = backend.input_name, backend.output_name

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run([name_out], {name_in: x})[0][:, 0]

    opts = sess.get_session_options()
    info = {
        "graph_optimization_level": str(opts.graph_optimization_level),
        "intra_op_num_threads": opts.intra_op_num_threads,
        "providers": sess.get_providers(),
    }
    return run, info


def ov_runner(path: Path, precision: str, batch_size: int) -> Runner:
    """The OpenVINO backend ``brainseg predict --runtime openvino`` opens (its logits)."""
    from brainseg.inference.runtimes import OpenVinoBackend, OpenVinoModel

    backend = OpenVinoBackend(OpenVinoModel(path), precision, 0, batch_size)
    return backend._logits


def matmul_peak(dtype_name: str, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of torch's dense ``n x n`` matmul on this CPU (median of 3 bursts of ``reps``)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.matmul(a, b)
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        rates.append(2 * n**3 * reps / (time.perf_counter() - t0))
    return median(rates)


def nominal_peak() -> dict[str, Any]:
    """The CPU's peak from its flags and the clock /proc/cpuinfo reports (an assumption).

    Per core and cycle: fp32 32 FLOP with AVX-512 (two 256-bit FMA pipes, as AMD Zen 4 runs
    AVX-512; Intel server cores with two 512-bit FMA units do 64), 16 with AVX2 only; bf16
    (AVX512-BF16 dot products) 2x fp32; int8 (VNNI) 4x fp32. The clock is the "cpu MHz" line,
    usually the base clock: a core that boosts above it beats this peak.
    """
    from brainseg.inference.runtimes import cpu_flags

    flags = cpu_flags()
    mhz = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":", 1)[1])
                break
    except (OSError, ValueError):
        pass
    fp32 = 32 if "avx512f" in flags else 16
    cores = os.cpu_count() or 1
    base = cores * mhz * 1e6 * fp32
    return {
        "fp32": base,
        "bf16": 2 * base if "avx512_bf16" in flags or "amx_bf16" in flags else base,
        "int8": 4 * base if {"avx512_vnni", "avx_vnni", "amx_int8"} & flags else 2 * base,
        "how": f"{cores} cores x {mhz:.0f} MHz (cpu MHz) x {fp32} fp32 FLOP/cycle; bf16 2x, "
        "int8 4x (VNNI)",
    }


def peak_of(name: str, peaks: dict[str, float]) -> tuple[str, float]:
    """Which assumed peak a backend row is put against."""
    if "int8" in name:
        return "int8 (2 x bf16 matmul)", 2 * peaks["bfloat16"]
    if "bf16" in name:
        return "bf16 matmul", peaks["bfloat16"]
    return "fp32 matmul", peaks["float32"]


def openvino_runners(
    models: dict[str, Path], batch: int, runners: dict[str, Runner], result: dict[str, Any]
) -> dict[str, Runner]:
    """Add the OpenVINO rows (batch 1: LATENCY hint) to ``runners``; return their batch
    runners (THROUGHPUT hint, async); record the CPU kind and auto's choices in ``result``."""
    from brainseg.inference import runtimes

    flags = runtimes.cpu_flags()
    result["cpu_kind"] = runtimes.cpu_kind(flags)
    result["auto_choice"] = {
        v: runtimes.choose(".onnx", v, "auto", "auto", "cpu", flags).as_dict()
        for v in ("fp32", "int8")
    }
    batch_runners: dict[str, Runner] = {}
    if not runtimes._installed("openvino"):
        return batch_runners
    import openvino

    result["openvino_version"] = openvino.__version__
    rows = [("fp32", "fp32"), ("int8", "int8")]
    if runtimes.native_bf16(flags):
        rows.insert(1, ("fp32", "bf16"))
    for file, prec in rows:
        name = f"openvino {prec}"
        runners[name] = ov_runner(models[file], prec, 1)
        batch_runners[name] = ov_runner(models[file], prec, batch)
    return batch_runners


def export_models(ckpt: Path, calib: np.ndarray, verify_root: Path, tmp: Path) -> dict[str, Path]:
    """fp32 ONNX via brainseg.export.export_onnx, int8 QDQ via
    brainseg.export.variants.quantize_int8."""
    import onnx

    from brainseg.export import export_onnx
    from brainseg.export.graph import set_metadata
    from brainseg.export.variants import quantize_int8
    from brainseg.model.checkpoint import read_metadata

    fp32 = tmp / "model-fp32.onnx"
    t0 = time.perf_counter()
    export_onnx(ckpt, fp32, verify_data=verify_root, force=True)
    say(f"exported fp32 ONNX in {time.perf_counter() - t0:.0f} s")
    int8 = tmp / "model-int8.onnx"
    qtmp = tmp / "quant"
    qtmp.mkdir()
    t0 = time.perf_counter()
    quantize_int8(fp32, int8, calib, qtmp)
    proto = onnx.load(str(int8))
    set_metadata(proto, read_metadata(ckpt), "int8", 17, ckpt.name)
    onnx.save(proto, str(int8))
    say(f"quantised to int8 on {len(calib)} calibration slices in {time.perf_counter() - t0:.0f} s")
    return {"fp32": fp32, "int8": int8}


def nchw(images: np.ndarray) -> np.ndarray:
    """uint8 N x 3 x H x W (the cache layout) -> float32 raw pixels, contiguous."""
    return np.ascontiguousarray(images, dtype=np.float32)


def keep_files(folder: Path | None, files: list[Path]) -> None:
    """--keep: copy the checkpoint and the ONNX files into ``folder``."""
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for p in files:
            shutil.copyfile(p, folder / p.name)


def smoke_settings(args: argparse.Namespace) -> None:
    """--smoke: tiny settings (the test's run)."""
    args.repeats, args.train_epochs, args.train_steps, args.train_batch = 1, 1, 1, 4
    args.dice_patients, args.calib_slices, args.batch = 1, 4, 2
    args.max_slices = args.max_slices or 6
    args.compile = False  # compiling takes about a minute


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="kaggle_3m dataset folder")
    ap.add_argument("--checkpoint", type=Path, help="a trained .safetensors (else one is trained)")
    ap.add_argument("--size", type=int, default=256, help="image size (default 256)")
    ap.add_argument("--batch", type=int, default=8, help="throughput batch size")
    ap.add_argument("--repeats", type=int, default=5, help="repetitions (median reported)")
    ap.add_argument("--dice-patients", type=int, default=3, help="held-out patients for Dice")
    ap.add_argument("--max-slices", type=int, default=0, help="cap on the held-out slices (0: all)")
    ap.add_argument("--calib-slices", type=int, default=64, help="int8 calibration slices")
    ap.add_argument("--train-epochs", type=int, default=4, help="epochs of the short training")
    ap.add_argument("--train-steps", type=int, default=8, help="steps per epoch of that run")
    ap.add_argument("--train-batch", type=int, default=16, help="batch size of that run")
    ap.add_argument("--json", type=Path, default=RESULTS / "inference.json", help="JSON output")
    ap.add_argument(
        "--keep", type=Path, help="copy the checkpoint and ONNX models into this folder"
    )
    ap.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="leave out the torch.compile rows (they compile for about a minute)",
    )
    ap.add_argument(
        "--smoke", action="store_true", help="tiny settings (narrow decoder, 1 repeat, 1 step)"
    )
    args = ap.parse_args(argv)
    if args.smoke:
        smoke_settings(args)

    import torch

    from brainseg.evaluation.metrics import per_patient_dice
    from brainseg.export.cpu import int8_path
    from brainseg.export.verify import pick_rows
    from brainseg.model.checkpoint import load_checkpoint, read_metadata

    result: dict[str, Any] = {"benchmark": "inference", **provenance()}
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result["torch_threads"] = torch.get_num_threads()
    result["cpu_int8_path"] = int8_path()  # VNNI / AMX or plain AVX2: int8 speed depends on it
    with tempfile.TemporaryDirectory(prefix="brainseg-bench-inference-") as td:
        tmp = Path(td)
        root, data = load_cached(args.data, tmp)
        ids = sorted(data.patient_ids)
        held = pick_patients(data, args.dice_patients)
        if args.checkpoint is None:
            ckpt = train_checkpoint(root, ids, held, args, tmp)
            result["checkpoint"] = {
                "source": "trained by this script (MRI stand-in encoder, frozen; decoder only)"
                if not args.smoke
                else "trained by this script (smoke)",
            }
        else:
            ckpt = args.checkpoint
            result["checkpoint"] = {"source": str(ckpt)}
        meta = read_metadata(ckpt)
        result["checkpoint"].update(
            {
                "image_size": meta.get("image_size"),
                "epoch": meta.get("epoch"),
                "metrics": meta.get("metrics"),
                "architecture": meta.get("architecture"),
            }
        )
        sized = data.resized(args.size)
        held_rows = sized.indices_of(held)
        if args.max_slices:
            held_rows = np.sort(pick_rows(held_rows, sized.masks, args.max_slices))
        train_rows = sized.indices_of([p for p in ids if p not in held])
        calib = sized.images[pick_rows(train_rows, sized.masks, args.calib_slices)]
        calib_hwc = np.ascontiguousarray(calib.transpose(0, 2, 3, 1))
        models = export_models(ckpt, calib_hwc, limited_root(root, held, tmp / "held"), tmp)

        keep_files(args.keep, [ckpt, *models.values()])
        model, _ = load_checkpoint(ckpt, "cpu")
        model.eval()
        runners = torch_runners(model, args.compile)
        ort_info = {}
        for name, path in models.items():
            runners[f"onnxruntime {name}"], ort_info[name] = ort_runner(path)
        result["onnxruntime_session"] = ort_info
        batch_runners = openvino_runners(models, args.batch, runners, result)
        result["model_mb"] = {k: round(p.stat().st_size / 1e6, 1) for k, p in models.items()}

        # ---- timings: backends alternate inside each repetition
        x_all = nchw(sized.images[held_rows])
        lat: dict[str, list[float]] = {k: [] for k in runners}
        thr: dict[str, list[float]] = {k: [] for k in runners}
        nb = min(args.batch, len(x_all))

        def batched(name: str) -> Runner:
            return batch_runners.get(name, runners[name])

        warmup: dict[str, float] = {}
        for name, run in runners.items():  # warm-up: first calls build kernels / caches
            t0 = time.perf_counter()  # (torch.compile compiles here: its one-off cost)
            for _ in range(2):
                run(x_all[:1])
                batched(name)(x_all[:nb])
            warmup[name] = time.perf_counter() - t0
        say(f"timing {len(runners)} backends, {args.repeats} repetitions")
        for r in range(args.repeats):
            order = list(runners) if r % 2 == 0 else list(reversed(runners))
            for name in order:
                x1 = x_all[r % len(x_all) : r % len(x_all) + 1]
                t0 = time.perf_counter()
                runners[name](x1)
                lat[name].append(time.perf_counter() - t0)
                xb = x_all[:nb]
                t0 = time.perf_counter()
                batched(name)(xb)
                thr[name].append(nb / (time.perf_counter() - t0))

        # ---- agreement with torch fp32 on every held-out slice
        say(f"Dice agreement on {len(held_rows)} slices of {len(held)} held-out patient(s)")
        thr_logit = float(np.log(meta.get("threshold", 0.5) / (1 - meta.get("threshold", 0.5))))
        gt = sized.masks[held_rows].astype(bool)
        pidx = sized.patient_index[held_rows]
        masks: dict[str, np.ndarray] = {}
        for name in runners:
            run = batched(name)
            out = [run(x_all[s : s + nb]) for s in range(0, len(x_all), nb)]
            masks[name] = np.concatenate(out) > thr_logit
        ref = masks["torch fp32"]
        ref_pp = per_patient_dice(ref, gt, pidx)
        rows_out = []
        base_lat = median(lat["torch fp32"])
        base_thr = median(thr["onnxruntime fp32"])
        from brainseg.model.unet import model_flops

        flops = model_flops(model, args.size, args.size)
        say("measuring the CPU's dense matmul rate (fp32, bf16): the assumed peak")
        peaks = {d: matmul_peak(d) for d in ("float32", "bfloat16")}
        result["peak_flops"] = {
            "fp32_matmul": peaks["float32"],
            "bf16_matmul": peaks["bfloat16"],
            "int8_assumed": 2 * peaks["bfloat16"],
            "how": "torch.matmul 2048x2048 on this CPU, all threads, median of 3 bursts of 5; "
            "int8 assumed 2x bf16 (VNNI)",
        }
        result["model_gflop_per_slice"] = flops / 1e9
        nominal = nominal_peak()
        result["peak_flops_nominal"] = nominal
        backends: dict[str, Any] = {}
        for name in runners:
            pp = per_patient_dice(masks[name], gt, pidx)
            b = {
                "warmup_s": warmup[name],
                "latency_ms_batch1": median(lat[name]) * 1e3,
                "latency_runs_ms": [t * 1e3 for t in lat[name]],
                "latency_spread": spread(lat[name]),
                "throughput_slices_s": median(thr[name]),
                "throughput_runs": thr[name],
                "throughput_batch": nb,
                "speedup_batch1_vs_torch_fp32": base_lat / median(lat[name]),
                "throughput_vs_onnxruntime_fp32": median(thr[name]) / base_thr,
                "peak_assumed": peak_of(name, peaks)[0],
                "fraction_of_peak_batch": median(thr[name]) * flops / peak_of(name, peaks)[1],
                "fraction_of_nominal_peak_batch": median(thr[name])
                * flops
                / nominal["int8" if "int8" in name else "bf16" if "bf16" in name else "fp32"],
                "mask_dice_vs_torch_fp32": dice(masks[name], ref),
                "patient_dice_mean": float(np.mean(pp)),
                "patient_dice_delta_vs_torch_fp32": float(np.mean(pp) - np.mean(ref_pp)),
                "patient_dice_max_abs_diff": float(np.max(np.abs(pp - ref_pp))),
            }
            backends[name] = b
            rows_out.append(
                [
                    name,
                    f"{b['latency_ms_batch1']:.0f}",
                    f"{b['speedup_batch1_vs_torch_fp32']:.2f}x",
                    f"{b['throughput_slices_s']:.2f}",
                    f"{b['throughput_vs_onnxruntime_fp32']:.2f}x",
                    f"{100 * b['fraction_of_peak_batch']:.0f}%",
                    f"{b['mask_dice_vs_torch_fp32']:.4f}",
                    f"{b['patient_dice_mean']:.4f}",
                    f"{b['patient_dice_delta_vs_torch_fp32']:+.4f}",
                ]
            )
    result["backends"] = backends
    result["dice_patients"] = held
    result["dice_slices"] = len(held_rows)
    i8 = backends["onnxruntime int8"]
    result["targets"] = {
        "int8_speedup_batch1": i8["speedup_batch1_vs_torch_fp32"],
        "int8_speedup_met": i8["speedup_batch1_vs_torch_fp32"] >= TARGET_SPEEDUP,
        "int8_patient_dice_within_0_01": abs(i8["patient_dice_delta_vs_torch_fp32"]) <= TARGET_DICE,
    }
    show(
        f"CPU inference {args.size}x{args.size}: latency batch 1, throughput batch {nb}, "
        f"median of {args.repeats}; Dice on {len(held_rows)} slices of {len(held)} patients",
        [
            "backend",
            "ms/slice b1",
            "vs torch fp32",
            f"slices/s b{nb}",
            "vs ORT fp32",
            "% of peak",
            "mask Dice vs fp32",
            "patient Dice",
            "Δ vs fp32",
        ],
        rows_out,
    )
    t = result["targets"]
    say(
        f"int8 vs torch eager fp32 at batch 1: {t['int8_speedup_batch1']:.2f}x (target "
        f">= {TARGET_SPEEDUP}x: {'met' if t['int8_speedup_met'] else 'MISSED'}); per-patient "
        f"Dice within {TARGET_DICE}: {'yes' if t['int8_patient_dice_within_0_01'] else 'NO'}"
    )
    cpu_path = result["cpu_int8_path"]
    say(f"this CPU's int8 path: {cpu_path['name']} (expect {cpu_path['expect']})")
    for v, c in result["auto_choice"].items():
        say(
            f"--runtime auto on this CPU ({result['cpu_kind']}), {v} file: {c['runtime']} "
            f"{c['precision']}"
        )
    pk = result["peak_flops"]
    say(
        f"assumed peak: fp32 {pk['fp32_matmul'] / 1e9:.0f}, bf16 {pk['bf16_matmul'] / 1e9:.0f}, "
        f"int8 {pk['int8_assumed'] / 1e9:.0f} GFLOP/s; model {result['model_gflop_per_slice']:.1f} "
        "GFLOP/slice"
    )
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
