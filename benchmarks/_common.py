"""Shared helpers of the benchmark scripts: machine and version records, JSON output, tables.

Every script records the same provenance block (machine, versions, exact command, date, load
average before and after) so a figure in docs/benchmarks.md can always be traced back to the
run that produced it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "lgg-dev" / "kaggle_3m"
STANDIN = REPO.parent / "shared" / "weights" / "vgg16_features_mri_standin.pth"

if str(HERE) not in sys.path:  # scripts import this file as a sibling module
    sys.path.insert(0, str(HERE))


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is often empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU feature flags that matter for these kernels (bf16, AMX, VNNI, AVX-512)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return []
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return [f for f in wanted if f in flags]


def version_of(dist: str) -> str | None:
    """An installed distribution's version without importing it (None when missing)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """CPU model, core count, flags, memory, OS; the load average shows other users."""
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1e6, 1)
    except OSError:
        pass
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict[str, str | None]:
    """Versions of the packages the timings depend on (read from metadata: no imports)."""
    import brainseg  # light: no torch; also right when run from a source tree (PYTHONPATH)

    out: dict[str, str | None] = {"brainseg": brainseg.__version__}
    for name in ("torch", "torchvision", "onnxruntime", "onnx", "numpy"):
        out[name] = version_of(name)
    return out


def command() -> str:
    """The exact command line that produced a result."""
    return shlex.join(["python", *sys.argv])


def provenance() -> dict[str, Any]:
    """The block every result carries: machine, versions, command, date."""
    return {
        "machine": machine(),
        "versions": versions(),
        "command": command(),
        "cwd": os.getcwd(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_result(path: Path, result: dict[str, Any]) -> Path:
    """Write ``result`` (plus the load average at the end) as JSON, atomically."""
    from brainseg.fsutil import atomic_write_text

    result.setdefault("machine", {})["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1, default=str) + "\n")
    say(f"wrote {path}")
    return path


def load_cached(data: Path, tmp: Path) -> tuple[Path, Any]:
    """The dataset root and its uint8 cache, built quietly under ``tmp`` before any timing.

    The cache goes to ``tmp/cache`` unless BRAINSEG_CACHE_DIR is set, so a benchmark never
    writes into the user's cache folder by accident.
    """
    from brainseg import console
    from brainseg.data import cache, lgg

    os.environ.setdefault("BRAINSEG_CACHE_DIR", str(tmp / "cache"))
    root = lgg.find_root(data)
    console.configure(quiet=True)
    try:
        dataset = cache.load_dataset(root)
    finally:
        console.configure(quiet=False)
    return root, dataset


def train_run(
    root: Path, split: Path, decoder: Sequence[int], tmp: Path, **settings: Any
) -> tuple[Path, list[dict[str, str]], float]:
    """A quiet ``brainseg.train.train`` run from scratch: (run folder, metrics.csv rows, wall s).

    ``settings`` are TrainConfig fields (image_size, batch_size, epochs, amp, ...); no preview
    is drawn and the run folder goes under ``tmp``, for the caller to keep or delete.
    """
    import csv

    from brainseg import console
    from brainseg.config import TrainConfig
    from brainseg.train import train

    cfg = TrainConfig(
        data=str(root),
        split=str(split),
        encoder_weights="none",
        decoder_channels=list(decoder),
        augment=True,
        project=str(tmp / "runs"),
        preview_slices=0,
        quiet=True,
        **settings,
    )
    t0 = time.perf_counter()
    try:
        run = train(cfg)
    finally:
        console.configure(quiet=False)
    wall = time.perf_counter() - t0
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return run, rows, wall


def show(title: str, columns: list[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a table (rich on a terminal, plain text otherwise) on stdout."""
    from brainseg import console

    if not console.out.is_terminal:  # logs: wide enough for the tables, not 80 columns
        console.out.width = max(console.out.width, 150)
    console.result(console.table(title, columns, [list(r) for r in rows]))


def say(message: str) -> None:
    """A progress / summary line on stderr (stdout holds the tables)."""
    from brainseg import console

    console.info(f"[{time.strftime('%H:%M:%S')}] {message}")


def median(values: Sequence[float]) -> float:
    """Median of the repetitions (robust to one slow repetition on a shared machine)."""
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how noisy the repetitions were."""
    m = median(values)
    return float((max(values) - min(values)) / m) if m else 0.0


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, 95% percentile bootstrap CI over the values (patients), median: cv's summary."""
    import numpy as np

    from brainseg.train.cv import bootstrap_ci

    v = np.asarray(values, dtype=np.float64)
    lo, hi = bootstrap_ci(v)
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "ci95": [lo, hi],
        "median": float(np.median(v)),
    }


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def dice(a: Any, b: Any) -> float:
    """Dice of two boolean arrays (1.0 when both are empty)."""
    import numpy as np

    inter = int(np.count_nonzero(a & b))
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * inter / total


def limited_root(root: Path, patients: Sequence[str], dest: Path) -> Path:
    """A kaggle_3m folder of links to some patients of ``root`` (no data copied)."""
    out = dest / "kaggle_3m"
    out.mkdir(parents=True, exist_ok=True)
    for pid in patients:
        link = out / pid
        if not link.exists():
            os.symlink((root / pid).resolve(), link, target_is_directory=True)
    return out


def patient_folders(root: Path) -> list[str]:
    """Patient folder names of a kaggle_3m folder, sorted."""
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def write_split(path: Path, patient_ids: Sequence[str], val_ids: Sequence[str]) -> Path:
    """A brainseg split file with the given val patients (the others train)."""
    from brainseg.data.split import Split, dataset_hash, save_split

    val = sorted(val_ids)
    train = sorted(p for p in patient_ids if p not in set(val))
    split = Split(
        seed=0,
        dataset_hash=dataset_hash(patient_ids),
        val_fraction=len(val) / max(1, len(patient_ids)),
        test_fraction=0.0,
        subsets={"train": train, "val": val, "test": []},
    )
    return save_split(split, path, force=True)
