"""GPU benchmark (run by benchmarks/gpu.sh): brainseg's epoch time against a notebook loop,
against the FLOP floor at the GPU's measured bf16 matmul rate, peak memory, inference rate.

    python benchmarks/gpu_bench.py --data DIR/kaggle_3m [--device cuda] [--compile] [--json OUT]
    python benchmarks/gpu_bench.py --data PHANTOMS --device cpu --smoke   # the smoke test

Measured, in this order, in one process:

1. the dense bf16 matmul rate of the device (``torch.matmul`` of --matmul-n squared
   matrices, median of 3 timed bursts): the practical peak for the MFU figure;
2. the naive reference first (so brainseg's global cuDNN / TF32 settings cannot help it): a
   per-sample Dataset decoding the TIFs with tifffile + per-sample augmentation, a DataLoader
   with --loader-workers workers and pinned memory, the fp32 model in NCHW with PyTorch's
   default settings; one warm-up of --warmup-steps steps, then one timed full epoch;
3. ``brainseg.train.train`` (bf16 autocast, channels_last, training set on the GPU, batched
   augmentation), 2 epochs: the second is timed from the ``images_per_s`` of metrics.csv
   (training steps only); with --compile also a run with ``torch.compile``;
4. model FLOP utilisation: 3 x ``brainseg.model.unet.model_flops`` (forward + backward) x images/s
   divided by the matmul rate; the floor epoch time is the FLOPs of an epoch at that rate;
5. peak GPU memory (``torch.cuda.max_memory_allocated``) of the brainseg run;
6. inference slices/s at batch --infer-batch: the ``brainseg.inference.predict.Predictor`` torch
   backend (what ``brainseg predict x.safetensors`` runs) and the raw model in bf16 autocast
   + channels_last.

Targets (issue 5): brainseg >= 5x the reference per epoch, MFU >= 35%.
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
    load_cached,
    median,
    provenance,
    say,
    show,
    train_run,
    write_result,
    write_split,
)

TARGET_SPEEDUP = 5.0
TARGET_MFU = 0.35


def sync(device: Any) -> None:
    """Wait for the device (timings of asynchronous CUDA work)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: Any, n: int, iters: int) -> float:
    """Dense bf16 matmul FLOP/s (median of 3 bursts of ``iters`` products)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(device)
        rates.append(2 * n**3 * iters / (time.perf_counter() - t0))
    return median(rates)


def reference_epoch(
    pairs: list[tuple[Path, Path]], args: argparse.Namespace, decoder: list[int], device: Any
) -> dict[str, float]:
    """The notebook loop: warm-up steps, then one timed full epoch; images/s and seconds."""
    import torch
    import torch.nn.functional as F
    from train_throughput import NotebookDataset

    from brainseg.model.unet import UNetVGG16

    torch.manual_seed(0)
    model = UNetVGG16(decoder_channels=tuple(decoder), encoder_weights=None).to(device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=4e-4)
    loader = torch.utils.data.DataLoader(
        NotebookDataset(pairs, args.size, augment=True),  # type: ignore[arg-type]
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.loader_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )

    def steps(limit: int | None) -> tuple[int, float]:
        n = 0
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            if limit is not None and i == limit:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(model(x), y)
            loss.backward()
            opt.step()
            loss.item()
            n += len(x)
        sync(device)
        return n, time.perf_counter() - t0

    steps(args.warmup_steps)
    n, secs = steps(args.max_steps or None)
    return {"images": n, "seconds": secs, "images_per_s": n / secs}


def brainseg_epoch(
    root: Path,
    split: Path,
    args: argparse.Namespace,
    decoder: list[int],
    compile_model: bool,
    tmp: Path,
) -> dict[str, Any]:
    """brainseg.train.train for 2 epochs; the second epoch's training images/s, peak memory."""
    import torch

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run, rows, wall = train_run(
        root,
        split,
        decoder,
        tmp,
        image_size=args.size,
        epochs=2,
        steps_per_epoch=args.max_steps or None,
        batch_size=args.batch,
        amp="bf16",
        channels_last=True,
        compile=compile_model,
        device=args.device,
        name="gpu",
    )
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    ckpt = tmp / f"brainseg{'-compiled' if compile_model else ''}.safetensors"
    shutil.copyfile(run / "last.safetensors", ckpt)
    shutil.rmtree(run)
    return {
        "images_per_s": float(rows[-1]["images_per_s"]),
        "first_epoch_images_per_s": float(rows[0]["images_per_s"]),
        "epoch_seconds_incl_validation": float(rows[-1]["seconds"]),
        "run_wall_s": wall,
        "peak_gpu_memory_gib": peak,
        "checkpoint": ckpt,
    }


def inference_rates(
    ckpt: Path, images: np.ndarray, args: argparse.Namespace, device: Any
) -> dict[str, float]:
    """Slices/s of the Predictor torch backend and of the raw model (bf16, channels_last)."""
    import torch

    from brainseg.inference.predict import Predictor
    from brainseg.model.checkpoint import load_checkpoint

    b = args.infer_batch
    pred = Predictor([ckpt], device=args.device, batch_size=b)

    def timed(fn: Callable[[int, int], object]) -> float:
        fn(0, b)
        sync(device)
        t0 = time.perf_counter()
        for s in range(0, len(images), b):
            fn(s, min(s + b, len(images)))
        sync(device)
        return len(images) / (time.perf_counter() - t0)

    out = {"predictor_slices_s": timed(lambda s, e: pred.predict_proba(images[s:e]))}
    model, _ = load_checkpoint(ckpt, str(device))
    model = model.eval().to(memory_format=torch.channels_last)
    x_all = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)

    def raw(s: int, e: int) -> None:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16):
            model(x_all[s:e].float().contiguous(memory_format=torch.channels_last))

    out["raw_bf16_channels_last_slices_s"] = timed(raw)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="kaggle_3m folder (phantoms)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test)")
    ap.add_argument("--size", type=int, default=256, help="image size")
    ap.add_argument("--batch", type=int, default=16, help="training batch size")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile run")
    ap.add_argument("--loader-workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--warmup-steps", type=int, default=5, help="reference warm-up steps")
    ap.add_argument("--max-steps", type=int, default=0, help="cap on steps per epoch (0: all)")
    ap.add_argument("--matmul-n", type=int, default=8192, help="matmul size for the peak rate")
    ap.add_argument("--infer-batch", type=int, default=32, help="inference batch size")
    ap.add_argument("--infer-slices", type=int, default=512, help="slices for inference")
    ap.add_argument("--json", type=Path, default=None, help="JSON output ($OUT/gpu.json)")
    ap.add_argument("--smoke", action="store_true", help="tiny settings for a CPU smoke test")
    args = ap.parse_args(argv)
    if args.smoke:
        args.max_steps, args.warmup_steps, args.matmul_n = 1, 1, 512
        args.infer_batch, args.infer_slices, args.batch = 2, 4, 4
        args.loader_workers = 0
    out_dir = (
        Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    )
    json_path = args.json or out_dir / "gpu.json"
    decoder = [16, 16, 8, 8, 8] if args.smoke else [512, 256, 128, 64, 32]

    import torch

    from brainseg.data import lgg
    from brainseg.model.unet import UNetVGG16, model_flops

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --smoke for a CPU check")
    result: dict[str, Any] = {"benchmark": "gpu", **provenance()}
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result["settings"]["decoder_channels"] = decoder
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        result["gpu"] = {
            "name": p.name,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "multiprocessors": p.multi_processor_count,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    say(f"device {device}: {result.get('gpu', {}).get('name', 'cpu')}")

    rate = matmul_rate(device, args.matmul_n, 3 if args.smoke else 20)
    result["bf16_matmul_tflops"] = rate / 1e12
    say(f"bf16 matmul {args.matmul_n}^3: {rate / 1e12:.1f} TFLOP/s")
    flops_fwd = model_flops(
        UNetVGG16(decoder_channels=tuple(decoder), encoder_weights=None), args.size, args.size
    )
    result["model_forward_gflop"] = flops_fwd / 1e9

    with tempfile.TemporaryDirectory(prefix="brainseg-bench-gpu-") as td:
        tmp = Path(td)
        root, data = load_cached(args.data, tmp)
        per = data.slices_per_patient()
        ids = sorted(per)
        val = [min(ids, key=lambda p: (per[p], p))]
        split = write_split(tmp / "split.yaml", ids, val)
        pairs = [(s.image, s.mask) for s in lgg.discover(root).slices if s.patient not in val]
        n_train = len(pairs)
        result["data"] = {"root": str(root), "patients": len(ids), "train_slices": n_train}
        say(f"{n_train} training slices of {len(ids) - 1} patients at {args.size}x{args.size}")

        defaults = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
        ref = reference_epoch(pairs, args, decoder, device)
        say(f"reference: {ref['images_per_s']:.1f} img/s")
        result["reference"] = ref
        runs = {"brainseg": brainseg_epoch(root, split, args, decoder, False, tmp)}
        if args.compile:
            try:
                runs["brainseg --compile"] = brainseg_epoch(root, split, args, decoder, True, tmp)
            except Exception as exc:  # keep the other results when the compiler fails
                result["compile_error"] = f"{type(exc).__name__}: {exc}"[:2000]
                say(f"torch.compile run failed: {result['compile_error'][:300]}")
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = defaults
        rows = []
        steps = args.max_steps or n_train // args.batch
        epoch_images = steps * args.batch  # both loops drop the last partial batch
        ref_epoch = epoch_images / ref["images_per_s"]
        floor = 3 * flops_fwd * epoch_images / rate
        rows.append(["reference (fp32, DataLoader)", f"{ref_epoch:.2f}", "1.00x", "", ""])
        for name, r in runs.items():
            r["epoch_seconds"] = epoch_images / r["images_per_s"]
            r["speedup_vs_reference"] = r["epoch_seconds"] and ref_epoch / r["epoch_seconds"]
            r["mfu"] = 3 * flops_fwd * r["images_per_s"] / rate
            mem = r["peak_gpu_memory_gib"]
            rows.append(
                [
                    name,
                    f"{r['epoch_seconds']:.2f}",
                    f"{r['speedup_vs_reference']:.2f}x",
                    f"{r['mfu']:.0%}",
                    f"{mem:.1f}" if mem is not None else "-",
                ]
            )
        ref["mfu"] = 3 * flops_fwd * ref["images_per_s"] / rate
        rows.append(["floor (FLOPs at matmul rate)", f"{floor:.2f}", "", "100%", ""])
        best = max(runs.values(), key=lambda r: r["images_per_s"])
        imgs = np.ascontiguousarray(
            data.resized(args.size).images[: args.infer_slices].transpose(0, 2, 3, 1)
        )
        infer = inference_rates(best["checkpoint"], imgs, args, device)
        for r in runs.values():
            r["checkpoint"] = str(r["checkpoint"].name)
    result["runs"] = runs
    result["epoch_images"] = epoch_images
    result["floor_epoch_seconds"] = floor
    result["inference"] = {**infer, "batch": args.infer_batch, "slices": len(imgs)}
    result["targets"] = {
        "speedup": best["speedup_vs_reference"],
        "speedup_met": best["speedup_vs_reference"] >= TARGET_SPEEDUP,
        "mfu": best["mfu"],
        "mfu_met": best["mfu"] >= TARGET_MFU,
    }
    show(
        f"epoch of {epoch_images} slices {args.size}x{args.size}, batch {args.batch} on "
        f"{result.get('gpu', {}).get('name', str(device))}",
        ["run", "epoch s", "vs reference", "MFU", "peak GiB"],
        rows,
    )
    show(
        f"inference, batch {args.infer_batch}",
        ["backend", "slices/s"],
        [
            ["Predictor (torch backend)", f"{infer['predictor_slices_s']:.1f}"],
            ["raw model bf16 channels_last", f"{infer['raw_bf16_channels_last_slices_s']:.1f}"],
        ],
    )
    t = result["targets"]
    say(
        f"brainseg {t['speedup']:.2f}x the reference per epoch (target >= {TARGET_SPEEDUP}x: "
        f"{'met' if t['speedup_met'] else 'MISSED'}), MFU {t['mfu']:.0%} (target >= "
        f"{TARGET_MFU:.0%}: {'met' if t['mfu_met'] else 'MISSED'})"
    )
    write_result(json_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
