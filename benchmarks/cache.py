"""Benchmark: loading a dataset from the uint8 cache vs decoding its TIF files again.

    python benchmarks/cache.py [--data PATH] [--json OUT] [--limit N] [--repeats R]

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
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from brainseg import __version__, console
from brainseg.data import cache, lgg
from brainseg.fsutil import atomic_write_text

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "lgg-dev" / "kaggle_3m"


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


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """Median wall time of ``repeats`` calls, and all of them."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def limited_root(root: Path, limit: int, tmp: Path) -> Path:
    """A kaggle_3m folder of links to the first ``limit`` patients (sorted by id)."""
    ds = lgg.scan(root)
    out = tmp / "kaggle_3m"
    out.mkdir()
    for p in ds.patients[:limit]:
        os.symlink(p.folder.resolve(), out / p.id, target_is_directory=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help=f"kaggle_3m folder or its parent (default {DEFAULT_DATA})",
    )
    ap.add_argument(
        "--json",
        type=Path,
        default=HERE / "results" / "cache.json",
        help="where to write the JSON results",
    )
    ap.add_argument("--limit", type=int, default=None, help="only the first N patients")
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="repeats of each timing (the median is reported; load runs 2x this)",
    )
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="brainseg-bench-cache-"))
    try:
        root = lgg.find_root(args.data)
        if args.limit:
            root = limited_root(root, args.limit, tmp)
        cache_dir = tmp / "cache"
        ds = lgg.discover(root)
        n = len(ds)
        disk = sum(s.image.stat().st_size + s.mask.stat().st_size for s in ds.slices)
        threads = max(1, min(4, os.cpu_count() or 1))
        console.configure(quiet=True)  # no progress lines inside the timings
        decode_all(root)  # warm the OS file cache for every measurement below

        decode_s, decode_runs = timed(lambda: decode_all(root), args.repeats)
        decode_t_s, decode_t_runs = timed(lambda: decode_all(root, threads), args.repeats)
        build_s, build_runs = timed(
            lambda: cache.load_dataset(root, cache_dir=cache_dir, rebuild=True), args.repeats
        )

        def load_and_touch() -> None:
            d = cache.load_dataset(root, cache_dir=cache_dir)
            touch(d.images)
            touch(d.masks)

        load_s, load_runs = timed(load_and_touch, 2 * args.repeats)
        open_s, open_runs = timed(
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
        shutil.rmtree(tmp, ignore_errors=True)

    ratio = decode_s / load_s
    ratio_t = decode_t_s / load_s
    result = {
        "benchmark": "cache",
        "data": str(args.data),
        "limit": args.limit,
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
            "decode": decode_runs,
            "decode_threads": decode_t_runs,
            "build": build_runs,
            "load": load_runs,
            "load_open_only": open_runs,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "platform": platform.platform(),
        },
        "brainseg": __version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    rows = [
        ["decode TIFs (1 thread)", decode_s * 1e3, n / decode_s, "1.0x"],
        [
            f"decode TIFs ({threads} threads)",
            decode_t_s * 1e3,
            n / decode_t_s,
            f"{decode_s / decode_t_s:.1f}x",
        ],
        ["build cache (once)", build_s * 1e3, n / build_s, f"{decode_s / build_s:.1f}x"],
        ["load cache + read all bytes", load_s * 1e3, n / load_s, f"{ratio:.1f}x"],
        ["load cache (open only)", open_s * 1e3, n / open_s, f"{decode_s / open_s:.1f}x"],
    ]
    title = (
        f"dataset cache: {summary['patients']} patients, {n} slices "
        f"{summary['size'][0]}x{summary['size'][1]}, median of {args.repeats}"
    )
    console.result(
        console.table(
            title,
            ["step", "ms", "slices/s", "vs decode"],
            [[r[0], f"{r[1]:.1f}", f"{r[2]:.0f}", r[3]] for r in rows],
        )
    )
    console.result(
        f"load from cache is {ratio:.1f}x faster than decoding the TIFs "
        f"({ratio_t:.1f}x vs {threads}-thread decoding); arrays identical: {same}"
    )
    atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    console.info(f"wrote {args.json}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
