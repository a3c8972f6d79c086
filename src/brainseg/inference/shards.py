"""Shards of a predict run on a cluster: ``--shard auto`` and ``brainseg predict --merge OUT``.

``--shard auto`` takes the shard of a SLURM job array task: I = SLURM_ARRAY_TASK_ID -
SLURM_ARRAY_TASK_MIN, N = SLURM_ARRAY_TASK_COUNT (outside a job array: no sharding).
``--merge OUT`` combines the shard summaries ``OUT/summary-I-of-N.csv`` (or ``.jsonl``) into
``OUT/summary.csv`` in the order an unsharded run writes.

Standard library only (no numpy, no model code): a merge job needs nothing else.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainseg import console
from brainseg.errors import BrainsegError
from brainseg.fsutil import atomic_write_text

#: The variables SLURM sets in each task of a job array (sbatch --array).
SLURM_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN")
_HINT = "submit with sbatch --array=0-<N-1> (consecutive task ids), or pass --shard I/N"


def slurm_shard(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The (I, N) of this SLURM array task; None outside a job array (no sharding)."""
    env = os.environ if environ is None else environ
    given = {k: env.get(k, "").strip() for k in (*SLURM_VARS, "SLURM_ARRAY_TASK_MAX")}
    if not any(given[k] for k in SLURM_VARS):
        return None
    missing = [k for k in SLURM_VARS if not given[k]]
    if missing:
        raise BrainsegError(
            f"--shard auto: {', '.join(missing)} not set while "
            f"{', '.join(k for k in SLURM_VARS if given[k])} is (not a SLURM job array?)",
            hint=_HINT,
        )
    values: dict[str, int] = {}
    for k, v in given.items():
        if not v:
            continue
        if not re.fullmatch(r"\d+", v):
            raise BrainsegError(f"--shard auto: {k}={v!r} is not a whole number", hint=_HINT)
        values[k] = int(v)
    task, count, low = (values[k] for k in SLURM_VARS)
    i = task - low
    if count < 1 or not 0 <= i < count:
        raise BrainsegError(
            f"--shard auto: SLURM_ARRAY_TASK_ID={task} with SLURM_ARRAY_TASK_MIN={low} and "
            f"SLURM_ARRAY_TASK_COUNT={count} gives shard {i}/{count}, outside 0 <= I < N",
            hint=_HINT,
        )
    high = values.get("SLURM_ARRAY_TASK_MAX")
    if high is not None and high - low + 1 != count:
        raise BrainsegError(
            f"--shard auto: the array's task ids {low}..{high} are not {count} consecutive "
            "numbers (an --array with a step or a list): some files would be in no shard",
            hint=_HINT,
        )
    return i, count


# --------------------------------------------------------------------------- merge

_SHARD_NAME = re.compile(r"summary-(\d+)-of-(\d+)\.(csv|jsonl)")


@dataclass
class MergeResult:
    """What ``--merge`` found: the shards, their rows, what is missing or failed."""

    out_dir: Path
    shards: int  # N
    fmt: str  # csv or jsonl
    rows: dict[int, int] = field(default_factory=dict)  # shard I -> rows
    failed: dict[int, int] = field(default_factory=dict)  # shard I -> rows with status error
    missing: list[int] = field(default_factory=list)  # shards I with no summary
    written: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.missing and not any(self.failed.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "summary": None if self.written is None else str(self.written),
            "shards": self.shards,
            "rows": sum(self.rows.values()),
            "failed_rows": sum(self.failed.values()),
            "missing_shards": self.missing,
            "failed_shards": sorted(i for i, n in self.failed.items() if n),
            "per_shard": [
                {
                    "shard": f"{i}/{self.shards}",
                    "rows": self.rows.get(i),
                    "failed": self.failed.get(i),
                }
                for i in range(self.shards)
            ],
        }


def _read(path: Path, fmt: str) -> tuple[list[str], list[Any]]:
    """(header, rows) of one shard summary: CSV dicts, or JSON lines kept as text."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BrainsegError(f"cannot read {path}: {exc}") from exc
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            rows = list(reader)
        except csv.Error as exc:
            raise BrainsegError(f"{path} is not a CSV summary: {exc}") from exc
        header = list(reader.fieldnames or [])
        if "status" not in header:
            raise BrainsegError(f"{path} is not a brainseg summary (no status column)")
        return header, rows
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for n, ln in enumerate(lines, 1):
        try:
            obj = json.loads(ln)
        except ValueError as exc:
            raise BrainsegError(f"{path} line {n} is not JSON: {exc}") from exc
        if not isinstance(obj, dict) or "status" not in obj:
            raise BrainsegError(f"{path} line {n} is not a brainseg summary row (no status)")
    return [], lines


def _status(row: Any, fmt: str) -> str:
    return str((row if fmt == "csv" else json.loads(row)).get("status") or "")


def merge_summaries(out_dir: Path) -> MergeResult:
    """Combine ``out_dir/summary-I-of-N.<ext>`` into ``out_dir/summary.<ext>`` (atomic) in the
    order of an unsharded run (row k of shard I is input k*N+I), even with shards missing."""
    if not out_dir.is_dir():
        raise BrainsegError(
            f"--merge {out_dir}: no such folder", hint="pass the -o folder of the shard runs"
        )
    found: dict[tuple[int, str], dict[int, Path]] = {}
    for p in out_dir.iterdir():
        m = _SHARD_NAME.fullmatch(p.name)
        if m and p.is_file():
            found.setdefault((int(m.group(2)), m.group(3)), {})[int(m.group(1))] = p
    if not found:
        raise BrainsegError(
            f"--merge {out_dir}: no shard summaries (summary-I-of-N.csv) in this folder",
            hint="run brainseg predict ... -o OUT --shard I/N (or --shard auto) first",
        )
    if len(found) > 1:
        kinds = ", ".join(f"summary-*-of-{n}.{ext}" for n, ext in sorted(found))
        raise BrainsegError(
            f"--merge {out_dir}: shard summaries of different runs ({kinds})",
            hint="keep the summaries of one run (one N, one format) in the folder",
        )
    (n, fmt), paths = next(iter(found.items()))
    result = MergeResult(out_dir, n, fmt, missing=[i for i in range(n) if i not in paths])
    header: list[str] | None = None
    newline = "\n"
    per_shard: dict[int, list[Any]] = {}
    for i in sorted(paths):
        head, rows = _read(paths[i], fmt)
        if header is not None and fmt == "csv" and head != header:
            raise BrainsegError(
                f"--merge {out_dir}: {paths[i].name} has other columns than the other shards "
                "(a slice and a volume run?)",
                hint="keep the summaries of one run in the folder",
            )
        header = header or head
        if fmt == "csv" and b"\r\n" in paths[i].read_bytes():
            newline = "\r\n"  # the slice summaries' (csv module default) line ends
        per_shard[i] = rows
        result.rows[i] = len(rows)
        result.failed[i] = sum(_status(r, fmt) == "error" for r in rows)
    ordered: list[Any] = []
    for k in range(max(len(r) for r in per_shard.values())):
        ordered += [per_shard[i][k] for i in sorted(per_shard) if k < len(per_shard[i])]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=header or [], lineterminator=newline)
        w.writeheader()
        w.writerows(ordered)
        text = buf.getvalue()
    else:
        text = "".join(ln + "\n" for ln in ordered)
    result.written = atomic_write_text(out_dir / f"summary.{fmt}", text)
    return result


#: Most shards --shard I/N may name (N beyond this died in itertools.islice: internal error).
MAX_SHARDS = 1_000_000


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> (I, N) with 0 <= I < N; None stays None; ``"auto"``: this SLURM array
    task's shard (:func:`slurm_shard`), a status line says which."""

    if value is None:
        return None
    if value.strip().lower() == "auto":
        shard = slurm_shard()
        if shard is None:
            console.info(
                "--shard auto: not in a SLURM job array (no SLURM_ARRAY_TASK_* variables): "
                "no sharding, predicting every input"
            )
        else:
            console.info(
                f"--shard auto: shard {shard[0]}/{shard[1]} (SLURM array task "
                f"{os.environ.get('SLURM_ARRAY_TASK_ID')} of {shard[1]})"
            )
        return shard
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not m:
        raise BrainsegError(
            f"--shard {value!r} is not of the form I/N",
            hint="e.g. --shard 0/4 on the first of 4 machines ... 3/4 on the last, or --shard "
            "auto in a SLURM job array",
        )
    i, n = int(m.group(1)), int(m.group(2))
    if not 1 <= n <= MAX_SHARDS:
        raise BrainsegError(
            f"--shard {value.strip()}: need 0 <= I < N with N from 1 to {MAX_SHARDS:,} (the "
            "number of machines or jobs sharing the inputs)",
            hint="e.g. --shard 0/4 on the first of 4 machines ... 3/4 on the last",
        )
    if not 0 <= i < n:
        raise BrainsegError(
            f"--shard {value.strip()}: need 0 <= I < N (I from 0 to {n - 1})",
            hint=f"the shards of N={n} are 0/{n} ... {n - 1}/{n}",
        )
    return i, n
