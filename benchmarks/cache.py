"""Benchmark: loading a dataset from the uint8 cache vs decoding its TIF files again.

    python benchmarks/cache.py [--data PATH] [--json OUT] [--limit N] [--repeats R] [--smoke]

Measures, on the same machine in the same run (the files are read once first, so every
timing sees a warm OS file cache):

* decode:            discover + decode every slice with tifffile (one thread) into
                     N x 3 x H x W / N x H x W arrays: what a run does without the cache
* decode (threads):  the same with the thread pool the cache build uses
* build:             ``load_dataset(rebuild=True)``: decode, check, write the cache
* load:              ``load_dataset()`` from the cache (scan + key + memory map) *and* a sum
                     over every byte of images and masks, so lazy memory mapping cannot cheat
* load (open only):  ``load_dataset()`` without touching the arrays, for reference

Prints a table and writes JSON (default benchmarks/results/cache.json). The cache is built
in a temporary folder, so the user's cache is left alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
    timeit,
    write_result,
)

from brainseg import console
from brainseg.data import cache, lgg

TARGET_RATIO = 10.0  # issue 2: loading from the cache >= 10x faster than decoding the TIFs


def touch(a: np.ndarray) -> int:
    """Read every byte of ``a`` (a 64-bit word sum, wrapping): forces memory-mapped pages in."""
    flat = a.reshape(-1)
    if flat.nbytes % 8 == 0 and flat.flags.c_contiguous:
        return int(flat.view(np.uint64).sum())
    return int(flat.sum(dtype=np.uint64))


def decode_all(root: Path, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """What a run does without the cache: discover, decode every TIF pair into arrays."""
    ds = lgg.discover(root)
    slices = ds.slices
    img0, _ = lgg.read_slice(slices[0])
    h, w = img0.shape[:2]
    images = np.empty((len(slices), 3, h, w), np.uint8)
    masks = np.empty((len(slices), h, w), np.uint8)

    def one(i: int) -> None:
        img, msk = lgg.read_slice(slices[i])
        images[i] = img.transpose(2, 0, 1)
        masks[i] = msk

    if threads == 1:
        for i in range(len(slices)):
            one(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(len(slices))))
    return images, masks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help=f"kaggle_3m folder or its parent (default {DEFAULT_DATA})",
    )
    ap.add_argument(
        "--json", type=Path, default=RESULTS / "cache.json", help="where to write the results"
    )
    ap.add_argument("--limit", type=int, default=None, help="only the first N patients")
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="repeats of each timing (the median is reported; load runs 2x this)",
    )
    ap.add_argument("--smoke", action="store_true", help="2 patients, 1 repeat (for the test)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.limit, args.repeats = 2, 1

    result = {"benchmark": "cache", **provenance()}
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    with tempfile.TemporaryDirectory(prefix="brainseg-bench-cache-") as td:
        tmp = Path(td)
        root = lgg.find_root(args.data)
        if args.limit:
            root = limited_root(root, patient_folders(root)[: args.limit], tmp)
        cache_dir = tmp / "cache"
        ds = lgg.discover(root)
        n = len(ds)
        disk = sum(s.image.stat().st_size + s.mask.stat().st_size for s in ds.slices)
        threads = max(1, min(4, os.cpu_count() or 1))
        say(f"{n} slices; decoding, building and loading {args.repeats}x each")
        console.configure(quiet=True)  # no progress lines inside the timings
        try:
            # The untimed warm-up call of each timing also fills the OS file cache.
            decode = timeit(lambda: decode_all(root), args.repeats)
            decode_t = timeit(lambda: decode_all(root, threads), args.repeats)
            build = timeit(
                lambda: cache.load_dataset(root, cache_dir=cache_dir, rebuild=True), args.repeats
            )

            def load_and_touch() -> None:
                d = cache.load_dataset(root, cache_dir=cache_dir)
                touch(d.images)
                touch(d.masks)

            load = timeit(load_and_touch, 2 * args.repeats)
            open_only = timeit(
                lambda: cache.load_dataset(root, cache_dir=cache_dir), 2 * args.repeats
            )
            data = cache.load_dataset(root, cache_dir=cache_dir)
            ref_images, ref_masks = decode_all(root)
            same = bool(
                np.array_equal(ref_images, data.images) and np.array_equal(ref_masks, data.masks)
            )
            cache_bytes = sum(f.stat().st_size for f in data.path.iterdir()) if data.path else 0
            summary = data.summary()
        finally:
            console.configure(quiet=False)

    decode_s, decode_t_s, build_s = median(decode), median(decode_t), median(build)
    load_s, open_s = median(load), median(open_only)
    ratio = decode_s / load_s
    ratio_t = decode_t_s / load_s
    result |= {
        "patients": summary["patients"],
        "slices": n,
        "tumor_slices": summary["tumor_slices"],
        "size": summary["size"],
        "tif_bytes": disk,
        "cache_bytes": cache_bytes,
        "threads": threads,
        "repeats": args.repeats,
        "decode_s": decode_s,
        "decode_threads_s": decode_t_s,
        "build_s": build_s,
        "load_s": load_s,
        "load_open_only_s": open_s,
        "speedup_vs_decode": ratio,
        "speedup_vs_decode_threads": ratio_t,
        "arrays_equal_decode": same,
        "runs": {
            "decode": decode,
            "decode_threads": decode_t,
            "build": build,
            "load": load,
            "load_open_only": open_only,
        },
        "targets": {"ratio": ratio, "target": TARGET_RATIO, "met": ratio >= TARGET_RATIO},
    }
    rows = [
        ["decode TIFs (1 thread)", decode_s, "1.0x"],
        [f"decode TIFs ({threads} threads)", decode_t_s, f"{decode_s / decode_t_s:.1f}x"],
        ["build cache (once)", build_s, f"{decode_s / build_s:.1f}x"],
        ["load cache + read all bytes", load_s, f"{ratio:.1f}x"],
        ["load cache (open only)", open_s, f"{decode_s / open_s:.1f}x"],
    ]
    show(
        f"dataset cache: {summary['patients']} patients, {n} slices "
        f"{summary['size'][0]}x{summary['size'][1]}, median of {args.repeats}",
        ["step", "ms", "slices/s", "vs decode"],
        [[r[0], f"{r[1] * 1e3:.1f}", f"{n / r[1]:.0f}", r[2]] for r in rows],
    )
    say(
        f"load from cache is {ratio:.1f}x faster than decoding the TIFs "
        f"({ratio_t:.1f}x vs {threads}-thread decoding; target >= {TARGET_RATIO:.0f}x: "
        f"{'met' if ratio >= TARGET_RATIO else 'MISSED'}); arrays identical: {same}"
    )
    write_result(args.json, result)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
